"""Two systems on the same bAbI questions, question by question (an analysis script for docs/results.md, not part
of the package; no model is run).

    python docs/analysis/babi_paired.py [--common] BABI_DIR A_DIR[:SYSTEM] B_DIR[:SYSTEM] [A_DIR[:SYSTEM] B_DIR[:SYSTEM] ...]

BABI_DIR is the bAbI en-10k folder (../shared/data/babi/en-10k), for the gold answers. The other arguments come in
pairs (A, B); each is a `python -m gmem_jax.evaluate` output directory (its eval_results.json)
and the system to read from it (default: `memory`, else `no_memory` for a twin scored alone). Both must hold the
same questions, unless --common is given: then each pair is scored on the questions both hold (e.g. the first 500
of a run evaluated on 1,000 against one evaluated on 500; the table's "n" says how many). Per pair: each system's
exact-match count, the questions only A / only B / both got right, and the exact two-sided McNemar p-value (a binomial test on the questions where the two disagree): the chance of a split at
least this uneven if both systems were equally good on these questions. With 100 questions, a 16-point gap can be
anything from certain to noise depending on how many questions the two systems share.

McNemar treats the questions as independent, but bAbI asks five questions per story (the first 100 test questions
are 20 stories), and a story's answers go together (the object stays in one place for several questions). So each
pair also gets two story-level figures: a 95% bootstrap interval of A - B in points (stories resampled with
replacement, 10,000 draws, seed 0) and a paired randomisation p (each story's difference sign-flipped at random,
10,000 draws, seed 0; two-sided).
"""
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np

from gmem_jax.tasks.babi import BabiTask
from gmem_jax.tasks.metrics import exact_match


@functools.cache  # every argument of a task reads the same split; parse it once
def gold_answers(babi_dir: str, task: int) -> dict:
    """Question id (as the babilong examples' meta['id']) -> gold answer, for one bAbI task's test split."""
    return {f"qa{task}-test-{q.story}-{q.line}": q.answer
            for q in BabiTask(babi_dir, tasks=(task,)).questions("test", task)}


def load(arg: str, babi_dir: str) -> tuple[str, dict]:
    """'DIR[:SYSTEM]' -> (label, {question id: exactly right?})."""
    path, _, system = arg.partition(":")
    preds = json.loads((Path(path) / "eval_results.json").read_text())["predictions"]
    system = system or ("memory" if "memory" in preds else "no_memory")
    if system not in preds:
        sys.exit(f"{path} has no system {system!r} (it has {', '.join(preds)}); name one as DIR:SYSTEM")
    by_id = preds[system]
    tasks = {int(q.split("-")[0].removeprefix("qa")) for q in by_id}
    gold = {q: a for t in tasks for q, a in gold_answers(babi_dir, t).items()}
    return f"{Path(path).name}:{system}", {q: exact_match(p["answer"], [gold[q]]) > 0 for q, p in by_id.items()}


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p: twice the binomial(n, 1/2) tail of the smaller count, capped at 1."""
    n, k = only_a + only_b, min(only_a, only_b)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


def story_stats(ra: dict, rb: dict, draws: int = 10_000) -> tuple[float, float, float]:
    """(low, high, p): the story-bootstrap 95% interval of em(A) - em(B) in points and the story sign-flip p.
    Question ids are 'qa{task}-test-{story}-{line}'; a story is (task, story)."""
    per_story: dict = {}
    for q in ra:
        key = tuple(q.split("-")[:3])
        per_story.setdefault(key, [0, 0])
        per_story[key][0] += int(ra[q]) - int(rb[q])
        per_story[key][1] += 1
    # stories in sorted order, so the seeded draws do not depend on the order the questions came in
    diff, count = (np.array(v, float) for v in zip(*(per_story[k] for k in sorted(per_story))))
    rng = np.random.default_rng(0)
    pick = rng.integers(0, len(diff), (draws, len(diff)))
    boot = 100 * diff[pick].sum(1) / count[pick].sum(1)
    flips = rng.choice([-1.0, 1.0], (draws, len(diff)))
    observed = abs(diff.sum())
    p = (1 + np.sum(np.abs((flips * diff).sum(1)) >= observed - 1e-9)) / (draws + 1)
    return float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)), float(p)


def main():
    argv = sys.argv[1:]
    common = "--common" in argv
    argv = [a for a in argv if a != "--common"]
    babi_dir, args = argv[0] if argv else "", argv[1:]
    if not args or len(args) % 2:
        sys.exit(__doc__.split("\n\n")[1].strip())
    print("| A | B | n | em A / B | only A / only B / both | McNemar p | A - B, story bootstrap 95% | story sign-flip p |"
          "\n|---|---|---|---|---|---|---|---|")
    for a_arg, b_arg in zip(args[::2], args[1::2]):
        (a, ra), (b, rb) = load(a_arg, babi_dir), load(b_arg, babi_dir)
        if common:
            shared = ra.keys() & rb.keys()
            if not shared:
                sys.exit(f"{a} and {b} share no question")
            ra, rb = ({q: r[q] for q in shared} for r in (ra, rb))
        elif ra.keys() != rb.keys():
            sys.exit(f"{a} and {b} scored different questions; evaluate both on the same config, or pass --common")
        only_a = sum(ra[q] and not rb[q] for q in ra)
        only_b = sum(rb[q] and not ra[q] for q in ra)
        both = sum(ra[q] and rb[q] for q in ra)
        low, high, p = story_stats(ra, rb)
        print(f"| {a} | {b} | {len(ra)} | {sum(ra.values())} / {sum(rb.values())} | {only_a} / {only_b} / {both} | "
              f"{mcnemar_p(only_a, only_b):.3g} | {low:+.1f} to {high:+.1f} | {p:.3g} |")


if __name__ == "__main__":
    main()
