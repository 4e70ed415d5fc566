"""Memory vs its no-memory twin on HotpotQA, question by question, over seeds (an analysis script for
docs/results.md, not part of the package; no model is run).

    PYTHONPATH=. python docs/analysis/hotpot_paired.py <eval_dir> [<eval_dir> ...]

Each directory is one `python -m gmem_jax.evaluate --config configs/smollm2_hotpotqa.py --workdir MEM
--baseline_workdir TWIN --output_dir DIR` (one seed's pair). With 23 questions one question is 4.3 points, so the
table says how many questions each system alone got right, by greedy exact match and by teacher-forced answer
tokens (each question's count of right answer tokens, the EOS included: the finer measure), per seed and summed.
"""
import argparse
import json
from collections import Counter
from pathlib import Path

from configs.smollm2_hotpotqa import DATA
from gmem_jax.tasks.metrics import exact_match

SYSTEMS = ("memory", "no_memory")


def paired(preds: dict, gold: dict) -> Counter:
    """preds {system: {id: prediction}}, gold {id: answer} -> counts: questions exact for one system only / both,
    answer tokens right per system, questions where one system has more tokens right, answer targets."""
    c = Counter()
    for qid, answer in gold.items():
        m, t = (preds[s][qid] for s in SYSTEMS)
        em_m, em_t = (exact_match(p["answer"], [answer]) > 0 for p in (m, t))
        hm, ht = sum(m["answer_hits"]), sum(t["answer_hits"])
        c.update(mem_only_em=em_m and not em_t, twin_only_em=em_t and not em_m, both_em=em_m and em_t,
                 mem_tokens=hm, twin_tokens=ht, mem_more_tokens=hm > ht, twin_more_tokens=ht > hm,
                 targets=len(m["answer_hits"]))
    return c


def row(name: str, c: Counter, cells: str = " | | |") -> str:
    return (f"| {name} |{cells} {c['mem_only_em']} / {c['twin_only_em']} / {c['both_em']} | {c['mem_tokens']} / "
            f"{c['twin_tokens']} ({c['targets']}) | {c['mem_more_tokens']} / {c['twin_more_tokens']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dirs", nargs="+", type=Path)
    args = ap.parse_args()
    header = ("run", "em mem / twin", "sp f1 mem / twin", "joint f1 mem / twin", "em: mem only / twin only / both",
              "answer tokens right mem / twin (of)", "questions with more tokens right: mem / twin")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    records = json.loads(Path(f"{DATA}/dev_distractor_23.json").read_text())
    total = Counter()
    for d in args.eval_dirs:
        ev = json.loads((d / "eval_results.json").read_text())
        res, preds = ev["results"], ev["predictions"]
        gold = {r["_id"]: r["answer"] for r in records if r["_id"] in preds["memory"]}
        c = paired(preds, gold)
        total += c
        pct = lambda k: " / ".join(f"{100 * res[s][k]:.1f}" for s in SYSTEMS)  # noqa: E731
        print(row(d.name, c, f" {pct('em')} | {pct('sp_f1')} | {pct('joint_f1')} |"))
    if len(args.eval_dirs) > 1:
        print(row("all", total))


if __name__ == "__main__":
    main()
