"""Does a ZsRE memory copy the edit's answer, or recall answers it was trained on? (an analysis script for
docs/results.md, not part of the package; no model is run).

    PYTHONPATH=. python docs/analysis/zsre_novel_answers.py <eval_dir> [<eval_dir> ...]

For each directory written by `python -m gmem_jax.evaluate --config configs/smollm2_zsre.py ... --output_dir`,
re-scores its saved predictions on the dev edits split two ways (ZsRETask.answer_is_novel): answers that appear
among the train split's answer strings ("seen": a recipe may have trained on them as targets) and answers that do
not ("novel"). Prints exact match, teacher-forced answer-token accuracy (and its first token's) per system,
kind and subset, and what the memory's wrong answers are (a train split answer string, the frozen model's answer,
or something else).
"""
import argparse
import json
from pathlib import Path

from configs.smollm2_zsre import get_config
from gmem_jax.tasks.metrics import exact_match, normalize_answer
from gmem_jax.training import builders

KINDS = ("reliability", "generalization")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dirs", nargs="+", type=Path)
    args = ap.parse_args()
    config = get_config("distill")
    task = builders.build_task(config)
    tok = builders.build_tokenizer(config, task)
    examples = builders.build_examples(config, task, tok, config.task.eval_split, config.task.eval_limit,
                                       config.task.seed)
    train_answers = task.train_answers()
    subsets = {"seen": [ex for ex in examples if ex.meta["kind"] in KINDS and not task.answer_is_novel(ex)],
               "novel": [ex for ex in examples if ex.meta["kind"] in KINDS and task.answer_is_novel(ex)]}
    n = {name: sum(ex.meta["kind"] == "reliability" for ex in exs) for name, exs in subsets.items()}
    print(f"dev reliability questions: {n['seen']} seen answers, {n['novel']} novel")
    print("| run | system | subset | rel em | rel token acc | rel first token | gen em | gen token acc |")
    print("|---|---|---|---|---|---|---|---|")
    for d in args.eval_dirs:
        preds = json.loads((d / "eval_results.json").read_text())["predictions"]
        for system in [s for s in ("memory", "in_prompt", "frozen") if s in preds]:  # in_prompt is optional
            if system != "memory" and d != args.eval_dirs[0]:
                continue  # the baselines are the same in every run
            for name, exs in subsets.items():
                s = task.score(preds[system], exs)
                hits = [preds[system][ex.meta["id"]]["answer_hits"][0] for ex in exs
                        if ex.meta["kind"] == "reliability" and preds[system].get(ex.meta["id"], {}).get("answer_hits")]
                s["reliability_first"] = sum(hits) / max(len(hits), 1)
                print(f"| {d.name} | {system} | {name} | " + " | ".join(
                    f"{100 * s.get(f'{k}_{m}', float('nan')):.1f}" for k, m in (
                        ("reliability", "em"), ("reliability", "token_em"), ("reliability", "first"),
                        ("generalization", "em"), ("generalization", "token_em"))) + " |")
        wrong, right = {"train answer": 0, "frozen's answer": 0, "other": 0}, []
        for ex in subsets["novel"]:
            i = ex.meta["id"]
            answer = preds["memory"].get(i, {}).get("answer", "")
            if ex.meta["kind"] != "reliability":
                continue
            if exact_match(answer, ex.meta["answers"]):
                right.append(answer)
                continue
            key = ("train answer" if normalize_answer(answer) in train_answers else
                   "frozen's answer" if exact_match(answer, [preds["frozen"].get(i, {}).get("answer", "")]) else
                   "other")
            wrong[key] += 1
        print(f"  {d.name}: memory's wrong answers to novel reliability questions: {wrong}")
        print(f"  {d.name}: its right ones: {right}")


if __name__ == "__main__":
    main()
