"""What an answerer that never reads the story can score on bAbI test questions (an analysis script for
docs/results.md, not part of the package; no model is run).

    python docs/analysis/babi_blind_ceiling.py BABI_DIR TASK N [N ...] [--write OUT_DIR]

For the first N test questions of bAbI task TASK (the questions `evaluate` scores with task.eval_limit=N):
- the answer counts;
- the **story-blind ceiling**: the best score of any answerer that sees only the question text, i.e. for each
  distinct question ("Where is the milk?") its most frequent answer among these very questions. It is picked
  with the test answers, so no story-blind system can beat it on these questions (a no-memory twin that collapses
  to one answer per question is such a system);
- the **training prior**: the same rule with each question's most frequent answer in the train split, which is
  what a story-blind answerer can learn without seeing the test answers.
With --write OUT_DIR, the ceiling answerer's predictions on the first N questions (the last N given) go to
OUT_DIR/eval_results.json as system "story_blind_ceiling", so `babi_paired.py` can pair a model with it question by
question (`OUT_DIR:story_blind_ceiling`).
"""
import collections
import json
import sys
from pathlib import Path

from gmem_jax.tasks.babi import BabiTask


def blind_scores(questions: list, train_questions: list) -> dict:
    """{'ceiling', 'prior'}: exact matches of the two story-blind rules on `questions`; 'answers': the answer
    counts; 'by_text': {question text: its answer counts}."""
    by_text = collections.defaultdict(collections.Counter)
    for q in questions:
        by_text[q.question][q.answer] += 1
    prior = collections.defaultdict(collections.Counter)
    for q in train_questions:
        prior[q.question][q.answer] += 1
    ceiling = sum(c.most_common(1)[0][1] for c in by_text.values())
    prior_hits = sum(q.answer == prior[q.question].most_common(1)[0][0] for q in questions if prior[q.question])
    return {"ceiling": ceiling, "prior": prior_hits, "answers": collections.Counter(q.answer for q in questions),
            "by_text": by_text}


def main():
    argv = sys.argv[1:]
    out = None
    if "--write" in argv:
        at = argv.index("--write")
        if at + 1 >= len(argv):
            sys.exit("--write needs an output directory")
        out, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2:]
    if len(argv) < 3:
        sys.exit(__doc__.split("\n\n")[1].strip())
    babi_dir, task, limits = argv[0], int(argv[1]), [int(n) for n in argv[2:]]
    source = BabiTask(babi_dir, tasks=(task,))
    test, train = source.questions("test", task), source.questions("train", task)
    print(f"| first N qa{task} test questions | story-blind ceiling | training prior | most frequent answer | "
          "answers |\n|---|---|---|---|---|")
    for n in limits:
        s = blind_scores(test[:n], train)
        top, top_n = s["answers"].most_common(1)[0]
        per_text = "; ".join(f"{t.rstrip('?').split()[-1]}: " + ", ".join(f"{a} {k}" for a, k in c.most_common())
                             for t, c in sorted(s["by_text"].items()))
        print(f"| {n} | {s['ceiling']} ({100 * s['ceiling'] / n:.1f}%) | {s['prior']} ({100 * s['prior'] / n:.1f}%) "
              f"| {top} {top_n} ({100 * top_n / n:.1f}%) | {per_text} |")
    if out is not None:
        best = {t: c.most_common(1)[0][0] for t, c in s["by_text"].items()}  # s: the loop's last N
        preds = {f"qa{task}-test-{q.story}-{q.line}": {"answer": best[q.question]} for q in test[:limits[-1]]}
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps({"predictions": {"story_blind_ceiling": preds}}, indent=1))
        print(f"wrote {len(preds)} predictions to {out / 'eval_results.json'}")


if __name__ == "__main__":
    main()
