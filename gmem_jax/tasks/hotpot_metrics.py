"""HotpotQA metrics with the semantics of the official `hotpot_evaluate_v1.py` (written here from them).

- normalize_answer: lowercase, drop punctuation (string.punctuation), drop the words a/an/the, collapse spaces.
- Answer EM: normalized strings equal. Answer F1/precision/recall: bag-of-words overlap of the normalized
  strings, except that when either normalized side is "yes", "no" or "noanswer" and the two differ, all three
  are 0; no overlap also gives 0 (so two empty answers have EM 1 but F1 0, as in the official script).
- Supporting facts: sets of (title, sent_id); precision tp/(tp+fp), recall tp/(tp+fn) (0 when the denominator
  is 0), F1 from those, EM 1 when fp = fn = 0.
- Joint: precision = ans_prec * sp_prec, recall = ans_recall * sp_recall, F1 from those, EM = em * sp_em; only
  for questions that have both an answer and an sp prediction.
- Every metric is averaged over ALL gold questions: a missing prediction adds 0 (and is reported).

CLI: `python -m gmem_jax.evaluate hotpotqa PRED.json GOLD.json` (or `main([PRED, GOLD])`), where PRED is
{"answer": {id: text}, "sp": {id: [[title, sent_id], ...]}} and GOLD is the original JSON list, a JSONL file
or the hub layout; prints one JSON object with the 12 metrics.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import string
import sys
from typing import Iterable, Mapping, Sequence

from gmem_jax.errors import GmemError

METRIC_KEYS = ("em", "f1", "prec", "recall", "sp_em", "sp_f1", "sp_prec", "sp_recall",
               "joint_em", "joint_f1", "joint_prec", "joint_recall")
_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_SPECIAL_ANSWERS = ("yes", "no", "noanswer")


def normalize_answer(s: str) -> str:
    """Lowercase, remove punctuation, remove articles, collapse whitespace (in that order)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def answer_scores(prediction: str, gold: str) -> tuple[float, float, float, float]:
    """(em, f1, precision, recall) of one answer."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    em = float(pred == ref)
    if pred != ref and (pred in _SPECIAL_ANSWERS or ref in _SPECIAL_ANSWERS):
        return em, 0.0, 0.0, 0.0
    pred_toks, ref_toks = pred.split(), ref.split()
    same = sum((collections.Counter(pred_toks) & collections.Counter(ref_toks)).values())
    if same == 0:
        return em, 0.0, 0.0, 0.0
    prec, recall = same / len(pred_toks), same / len(ref_toks)
    return em, _f1(prec, recall), prec, recall


def sp_scores(prediction: Iterable[Sequence], gold: Iterable[Sequence]) -> tuple[float, float, float, float]:
    """(em, f1, precision, recall) of one question's supporting facts, as sets of (title, sent_id)."""
    pred, ref = set(map(tuple, prediction)), set(map(tuple, gold))
    tp, fp, fn = len(pred & ref), len(pred - ref), len(ref - pred)
    prec = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return float(fp + fn == 0), _f1(prec, recall), prec, recall


def _f1(prec: float, recall: float) -> float:
    return 2 * prec * recall / (prec + recall) if prec + recall > 0 else 0.0


def evaluate(prediction: Mapping[str, Mapping], gold: Sequence[Mapping], *, quiet: bool = False) -> dict[str, float]:
    """The 12 official metrics. prediction = {'answer': {id: text}, 'sp': {id: [[title, sent_id], ...]}} (either
    part may be absent); gold = records with '_id' (or 'id'), 'answer', 'supporting_facts' [[title, sent_id]].
    Missing predictions count 0 and are summarised on stderr (one line per kind) unless `quiet`."""
    if not gold:
        raise GmemError("HotpotQA evaluation got no gold questions; pass a non-empty gold file")
    answers, sps = prediction.get("answer", {}), prediction.get("sp", {})
    totals = dict.fromkeys(METRIC_KEYS, 0.0)
    missing: dict[str, list[str]] = {"answer": [], "sp fact": []}
    for record in gold:
        qid = record["_id"] if "_id" in record else record["id"]
        has_answer, has_sp = qid in answers, qid in sps
        if has_answer:
            em, f1, prec, recall = answer_scores(answers[qid], record["answer"])
            for k, v in zip(("em", "f1", "prec", "recall"), (em, f1, prec, recall)):
                totals[k] += v
        else:
            missing["answer"].append(qid)
        if has_sp:
            sp_em, sp_f1, sp_prec, sp_recall = sp_scores(sps[qid], record["supporting_facts"])
            for k, v in zip(("sp_em", "sp_f1", "sp_prec", "sp_recall"), (sp_em, sp_f1, sp_prec, sp_recall)):
                totals[k] += v
        else:
            missing["sp fact"].append(qid)
        if has_answer and has_sp:
            joint_prec, joint_recall = prec * sp_prec, recall * sp_recall
            totals["joint_em"] += em * sp_em
            totals["joint_f1"] += _f1(joint_prec, joint_recall)
            totals["joint_prec"] += joint_prec
            totals["joint_recall"] += joint_recall
    for kind, ids in missing.items():
        if ids and not quiet:
            shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
            print(f"missing {kind} for {len(ids)} of {len(gold)} questions ({shown}): counted as 0", file=sys.stderr)
    return {k: v / len(gold) for k, v in totals.items()}


def read_prediction(path: str) -> dict[str, dict]:
    """The official prediction file, checked: {'answer': {id: str}, 'sp': {id: [[title, int], ...]}}."""
    try:
        with open(path, encoding="utf-8") as f:
            pred = json.load(f)
    except OSError as e:
        raise GmemError(f"cannot read prediction file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise GmemError(f"prediction file {path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(pred, dict) or not ({"answer", "sp"} & pred.keys()):
        raise GmemError(f"prediction file {path}: expected an object with 'answer' {{id: text}} and/or 'sp' "
                        "{id: [[title, sent_id], ...]}")
    for part in ("answer", "sp"):
        if not isinstance(pred.get(part, {}), dict):
            raise GmemError(f"prediction file {path}: '{part}' must map question ids to predictions, "
                            f"got a {type(pred[part]).__name__}")
    for qid, text in pred.get("answer", {}).items():
        if not isinstance(text, str):
            raise GmemError(f"prediction file {path}: answer of {qid} is a {type(text).__name__}; use a string")
    for qid, facts in pred.get("sp", {}).items():
        if not isinstance(facts, list) or not all(
                isinstance(f, (list, tuple)) and len(f) == 2 and isinstance(f[0], str) and isinstance(f[1], int)
                and not isinstance(f[1], bool) for f in facts):
            raise GmemError(f"prediction file {path}: sp of {qid} must be a list of [title, sent_id] pairs "
                            "(string, integer)")
    return pred


def main(argv: Sequence[str] | None = None) -> int:
    """`main([PRED.json, GOLD.json])`: print the 12 metrics as JSON; returns the exit code (2 on bad input)."""
    from gmem_jax.tasks.hotpotqa import load_hotpot_file

    parser = argparse.ArgumentParser(prog="python -m gmem_jax.evaluate hotpotqa",
                                     description="HotpotQA answer / supporting-fact / joint metrics "
                                                 "(official hotpot_evaluate_v1 semantics).")
    parser.add_argument("prediction", help='JSON {"answer": {id: text}, "sp": {id: [[title, sent_id], ...]}}')
    parser.add_argument("gold", help="gold HotpotQA file: original JSON list, JSONL, or hub layout")
    args = parser.parse_args(argv)
    try:
        pred = read_prediction(args.prediction)
        gold = [{"_id": r.id, "answer": r.answer, "supporting_facts": [list(f) for f in r.supporting_facts]}
                for r in load_hotpot_file(args.gold)]
        metrics = evaluate(pred, gold)
    except GmemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
