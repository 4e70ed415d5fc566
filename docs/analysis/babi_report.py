"""What bAbI qa1 answers are (an analysis script for docs/results.md, not part of the package).

    python docs/analysis/babi_report.py BABI_DIR EVAL_DIR [EVAL_DIR ...]

BABI_DIR is the bAbI en-10k folder (../shared/data/babi/en-10k); each EVAL_DIR holds an eval_results.json of
`python -m gmem_jax.evaluate` on qa1. Every predicted location of every system is one of: the asked person's last
location (right), an earlier location of the same person (stale), another location the story names (other), or
one the story does not name (unstated); answers are normalised as the exact-match metric does. Counts per system,
over the evaluated questions.
"""
import json
import sys
from collections import Counter
from pathlib import Path

from gmem_jax.tasks.babi import BabiTask
from gmem_jax.tasks.hotpot_metrics import normalize_answer

KINDS = ("right", "stale", "other", "unstated")


def kind(question, answer: str) -> str:
    """qa1 facts read 'PERSON VERB to the LOCATION.'; the question 'Where is PERSON?'."""
    person = question.question.split()[-1].rstrip("?")
    moves = [(text.split()[0], text.rstrip(".").split()[-1]) for _, text in question.facts]
    if answer == question.answer:
        return "right"
    if answer in {loc for who, loc in moves if who == person}:
        return "stale"
    return "other" if answer in {loc for _, loc in moves} else "unstated"


def report(babi_dir: Path, eval_dir: Path) -> None:
    questions = {f"qa1-test-{q.story}-{q.line}": q for q in BabiTask(str(babi_dir), tasks=(1,)).questions("test", 1)}
    preds = json.loads((eval_dir / "eval_results.json").read_text())["predictions"]
    for system, by_id in preds.items():
        counts = Counter(kind(questions[i], normalize_answer(p["answer"])) for i, p in by_id.items())
        print(f"{eval_dir.name} {system}: " + " / ".join(f"{k} {counts[k]}" for k in KINDS)
              + f" (of {sum(counts.values())})")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    for d in sys.argv[2:]:
        report(Path(sys.argv[1]), Path(d))
