"""What bAbI qa1 answers are (an analysis script for docs/results.md, not part of the package).

    python docs/analysis/babi_report.py BABI_DIR EVAL_DIR [EVAL_DIR ...]
    python docs/analysis/babi_report.py --segments configs/smollm2_babilong.py:1,1024 BABI_DIR EVAL_DIR [...]

BABI_DIR is the bAbI en-10k folder (../shared/data/babi/en-10k); each EVAL_DIR holds an eval_results.json of
`python -m gmem_jax.evaluate` on qa1. Every predicted location of every system is one of: the asked person's last
location (right), an earlier location of the same person (stale), another location the story names (other), or
one the story does not name (unstated); answers are normalised as the exact-match metric does. Counts per system,
over the evaluated questions. With --segments CONFIG (the eval config, so its examples are rebuilt exactly), the
counts are also split by where the asked person's last two moves sit in the memory layout: one segment, different
segments, or the person moved only once; a write that averages a segment's facts about one person should go stale
mostly in the first group.
"""
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

from gmem_jax.tasks.babi import BabiTask
from gmem_jax.tasks.hotpot_metrics import normalize_answer

KINDS = ("right", "stale", "other", "unstated")


def places(question) -> dict:
    """The story's places by what they are for the asked person: {'right': {the answer}, 'stale': places the person
    was at earlier, 'other': places only others were at}. qa1 facts read 'PERSON VERB to the LOCATION.'; the
    question 'Where is PERSON?'."""
    person = question.question.split()[-1].rstrip("?")
    moves = [(text.split()[0], text.rstrip(".").split()[-1]) for _, text in question.facts]
    right = {question.answer}
    stale = {loc for who, loc in moves if who == person} - right
    return {"right": right, "stale": stale, "other": {loc for _, loc in moves} - right - stale}


def kind(question, answer: str) -> str:
    return next((k for k, locs in places(question).items() if answer in locs), "unstated")


def load_config(config_arg: str):
    """'path/to/config.py:arg' -> that file's get_config(arg)."""
    path, _, arg = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("eval_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def test_questions(babi_dir) -> dict:
    """Question id (as the babilong examples' meta['id']) -> bAbI qa1 test question."""
    return {f"qa1-test-{q.story}-{q.line}": q for q in BabiTask(str(babi_dir), tasks=(1,)).questions("test", 1)}


def fact_segments(config_arg: str) -> dict:
    """Question id -> {fact line id: memory segment index} for the eval examples of a babilong config."""
    from gmem_jax.training import builders

    config = load_config(config_arg)
    task = builders.build_task(config)
    tokenizer = builders.build_tokenizer(config, task)
    examples = builders.build_examples(config, task, tokenizer, config.task.eval_split, config.task.eval_limit,
                                       config.task.seed)
    return {ex.meta["id"]: {key[1]: s for s, keys in enumerate(ex.meta["sent_keys"]) for key in keys if key}
            for ex in examples}


def placement(question, segments: dict) -> str:
    """Where the asked person's last two moves sit: 'one segment', 'two segments', 'moved once', or 'dropped' (one
    of them did not fit the layout)."""
    person = question.question.split()[-1].rstrip("?")
    lines = [lid for lid, text in question.facts if text.split()[0] == person][-2:]
    if any(lid not in segments for lid in lines):
        return "dropped"
    if len(lines) < 2:
        return "moved once"
    return "one segment" if segments[lines[-1]] == segments[lines[-2]] else "two segments"


def report(babi_dir: Path, eval_dir: Path, segments: dict | None = None) -> None:
    questions = test_questions(babi_dir)
    preds = json.loads((eval_dir / "eval_results.json").read_text())["predictions"]
    for system, by_id in preds.items():
        groups = {"all": list(by_id)}
        if segments is not None:
            for i in by_id:
                groups.setdefault(placement(questions[i], segments[i]), []).append(i)
        for name, ids in groups.items():
            counts = Counter(kind(questions[i], normalize_answer(by_id[i]["answer"])) for i in ids)
            label = "" if name == "all" else f" [{name}]"
            print(f"{eval_dir.name} {system}{label}: " + " / ".join(f"{k} {counts[k]}" for k in KINDS)
                  + f" (of {sum(counts.values())})")


if __name__ == "__main__":
    argv = sys.argv[1:]
    seg = None
    if argv[:1] == ["--segments"] and len(argv) >= 2:
        seg, argv = fact_segments(argv[1]), argv[2:]
    if len(argv) < 2:
        sys.exit(__doc__)
    for d in argv[1:]:
        report(Path(argv[0]), Path(d), seg)
