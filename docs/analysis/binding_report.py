"""Binding report of synthetic-task run folders (an analysis script for docs/results.md, not part of the package).

    python docs/analysis/binding_report.py RUN_DIR [RUN_DIR ...]

From each folder's config.json and eval_<split>.json (the eval examples are rebuilt from the config):
  - teacher-forced first answer token right / another stated person's first token, over the examples whose two
    people live in different cities; second answer token right (answers with more than one token + EOS);
  - generated answers: right / another stated person's city / neither;
  - for the "neither" answers: gold city, answer, and how many cities of the dev documents share the gold city's
    first token (several do: a store trained by the first target alone need not tell them apart).
"""
import json
import sys
from collections import Counter
from pathlib import Path

import ml_collections

from gmem_jax.training import builders


def report(run: Path) -> None:
    config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
    task = builders.build_task(config)
    tok = builders.build_tokenizer(config, task)
    examples = builders.build_examples(config, task, tok, config.task.eval_split, config.task.eval_limit,
                                       config.task.seed)
    preds = json.loads(next(run.glob("eval_*.json")).read_text())["predictions"]

    def ids(text):
        return tok(" " + text, add_special_tokens=False)["input_ids"]

    cities = {ex.meta["answers"][0] for ex in examples} | {o for ex in examples for o in ex.meta["other_answers"]}
    sharing = Counter(ids(c)[0] for c in cities)  # first token -> how many dev cities start with it
    r1 = o1 = n1 = r2 = n2 = 0
    generated = Counter()
    neither = []
    for ex in examples:
        p = preds[ex.meta["id"]]
        gold_ids = [int(t) for t, m in zip(ex.labels[-1], ex.loss_mask[-1]) if m > 0]
        if ex.meta["other_answers"]:  # the two people live in different cities
            n1 += 1
            r1 += p["answer_preds"][0] == gold_ids[0]
            o1 += p["answer_preds"][0] in {ids(o)[0] for o in ex.meta["other_answers"]} - {gold_ids[0]}
        if len(gold_ids) > 2:
            n2 += 1
            r2 += p["answer_preds"][1] == gold_ids[1]
        answer, gold = p["answer"].strip(), ex.meta["answers"][0]
        kind = "right" if answer == gold else "other" if answer in ex.meta["other_answers"] else "neither"
        generated[kind] += 1
        if kind == "neither":
            neither.append((gold, answer, sharing[ids(gold)[0]], ids(answer)[:1] == ids(gold)[:1]))
    print(f"{run.name}: first token right/other {r1}/{o1} of {n1} (cities differ); second token right {r2} of {n2}; "
          f"answers right/other/neither {generated['right']}/{generated['other']}/{generated['neither']} "
          f"of {len(examples)}")
    print(f"  neither: {sum(n[3] for n in neither)} start with the right token; the gold city shares its first token "
          f"with another dev city in {sum(n[2] > 1 for n in neither)} of {len(neither)} "
          f"(in {sum(sharing[ids(ex.meta['answers'][0])[0]] > 1 for ex in examples)} of all {len(examples)})")
    for gold, answer, n_sharing, _ in neither:
        print(f"    gold {gold!r} ({n_sharing} dev cities share its first token), answer {answer!r}")


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        report(Path(folder))
