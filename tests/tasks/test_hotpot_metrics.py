"""HotpotQA metrics: every rule of the official hotpot_evaluate_v1 semantics on hand-computed cases, and the CLI."""
import json
import subprocess
import sys

import pytest

from gmem_jax import evaluate as evaluate_cli
from gmem_jax.errors import GmemError
from gmem_jax.tasks.hotpot_metrics import METRIC_KEYS, answer_scores, evaluate, main, normalize_answer, sp_scores


@pytest.mark.parametrize("text, expected", [
    ("The  Cat's Hat!", "cats hat"),            # lowercase, punctuation removed without a space, article gone
    ("An apple, a day", "apple day"),
    ("theater anthem", "theater anthem"),       # articles only as whole words
    ("A", ""),
    ("  U.S.\tArmy\n", "us army"),              # whitespace collapsed, dots removed
    ("the-the", "thethe"),                      # punctuation is removed BEFORE articles
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("Yes.", "yes", (1.0, 1.0, 1.0, 1.0)),
    ("yes", "no", (0.0, 0.0, 0.0, 0.0)),
    ("yes", "yes sir", (0.0, 0.0, 0.0, 0.0)),        # prediction is yes/no/noanswer and differs: all zero
    ("no way", "no", (0.0, 0.0, 0.0, 0.0)),          # gold is special and differs, despite the overlap
    ("noanswer", "no answer", (0.0, 0.0, 0.0, 0.0)),
    ("the big red dog", "Red dog", (0.0, 0.8, 2 / 3, 1.0)),
    ("dog dog dog", "dog", (0.0, 0.5, 1 / 3, 1.0)),  # bag-of-words counts, not sets
    ("", "", (1.0, 0.0, 0.0, 0.0)),                  # official: EM 1 but no common token -> F1 0
    ("cat", "dog", (0.0, 0.0, 0.0, 0.0)),
])
def test_answer_scores(pred, gold, expected):
    assert answer_scores(pred, gold) == pytest.approx(expected)


def test_sp_scores_partial_duplicates_and_empty():
    pred = [["A", 0], ["B", 1], ["C", 2], ["A", 0]]  # duplicate counted once (a set)
    assert sp_scores(pred, [["A", 0], ["B", 0]]) == pytest.approx((0.0, 0.4, 1 / 3, 0.5))
    assert sp_scores([("A", 0), ("B", 0)], [["B", 0], ["A", 0]]) == (1.0, 1.0, 1.0, 1.0)
    assert sp_scores([], []) == (1.0, 0.0, 0.0, 0.0)  # no fp, no fn: EM 1, precision/recall 0 by the 0-denominator rule
    assert sp_scores([], [["A", 0]]) == (0.0, 0.0, 0.0, 0.0)


GOLD = [
    {"_id": "q1", "answer": "Paris", "supporting_facts": [["T1", 0], ["T2", 1]]},
    {"_id": "q2", "answer": "yes", "supporting_facts": [["T3", 0]]},
    {"_id": "q3", "answer": "blue whale", "supporting_facts": [["T4", 2]]},
    {"_id": "q4", "answer": "Blue", "supporting_facts": [["T5", 0]]},
]
PRED = {"answer": {"q1": "the Paris city", "q2": "no", "q4": "blue."},        # q3: answer missing
        "sp": {"q1": [["T1", 0], ["T9", 9]], "q3": [["T4", 2]], "q4": [["T5", 0]]}}  # q2: sp missing
# By hand: q1 answer p=1/2 r=1 f1=2/3 em=0; sp p=r=f1=1/2 em=0; joint p=1/4 r=1/2 f1=1/3 em=0.
# q2 answer all 0, no sp, no joint. q3 no answer, sp all 1, no joint. q4 everything 1. Averages over all 4.
EXPECTED = {"em": 1 / 4, "f1": (2 / 3 + 1) / 4, "prec": (1 / 2 + 1) / 4, "recall": 2 / 4,
            "sp_em": 2 / 4, "sp_f1": (1 / 2 + 1 + 1) / 4, "sp_prec": (1 / 2 + 1 + 1) / 4,
            "sp_recall": (1 / 2 + 1 + 1) / 4, "joint_em": 1 / 4, "joint_f1": (1 / 3 + 1) / 4,
            "joint_prec": (1 / 4 + 1) / 4, "joint_recall": (1 / 2 + 1) / 4}


def test_evaluate_missing_predictions_and_joint_products(capsys):
    metrics = evaluate(PRED, GOLD)
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics == pytest.approx(EXPECTED)
    err = capsys.readouterr().err
    assert "missing answer for 1 of 4 questions (q3)" in err and "missing sp fact for 1 of 4 questions (q2)" in err


def _write(path, obj, jsonl=False):
    path.write_text("\n".join(json.dumps(r) for r in obj) if jsonl else json.dumps(obj))
    return str(path)


def _hub(rec):
    return {"id": rec["_id"], "question": "?", "answer": rec["answer"], "context": {"title": [], "sentences": []},
            "supporting_facts": {"title": [t for t, _ in rec["supporting_facts"]],
                                 "sent_id": [i for _, i in rec["supporting_facts"]]}}


@pytest.mark.parametrize("layout", ["json", "jsonl", "hub"])
def test_cli_prints_the_12_metrics(tmp_path, capsys, layout):
    gold = [dict(g, question="?", context=[]) for g in GOLD]
    if layout == "hub":
        gold = [_hub(g) for g in GOLD]
    gold_file = _write(tmp_path / f"gold.{'jsonl' if layout == 'jsonl' else 'json'}", gold, jsonl=layout == "jsonl")
    assert main([_write(tmp_path / "pred.json", PRED), gold_file]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == list(METRIC_KEYS)
    assert out == pytest.approx(EXPECTED)


def test_evaluate_module_dispatch_and_bad_input(tmp_path, capsys):
    gold = _write(tmp_path / "gold.json", [dict(g, question="?", context=[]) for g in GOLD])
    assert evaluate_cli.main(["hotpotqa", _write(tmp_path / "pred.json", PRED), gold]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(EXPECTED)
    bad = _write(tmp_path / "bad.json", {"answer": {"q1": "x"}, "sp": {"q1": [["T1", "zero"]]}})
    assert evaluate_cli.main(["hotpotqa", bad, gold]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sp of q1" in err
    assert evaluate_cli.main(["nonsense"]) == 2
    with pytest.raises(GmemError, match="no gold questions"):
        evaluate(PRED, [])


def test_cli_perfect_predictions_on_shared_dev(shared_data, tmp_path):
    """`python -m gmem_jax.evaluate hotpotqa` on the real distractor dev file: gold as predictions scores 1."""
    gold_file = shared_data / "hotpotqa" / "dev_distractor_23.json"
    gold = json.loads(gold_file.read_text())
    pred = {"answer": {r["_id"]: r["answer"] for r in gold}, "sp": {r["_id"]: r["supporting_facts"] for r in gold}}
    res = subprocess.run([sys.executable, "-m", "gmem_jax.evaluate", "hotpotqa", _write(tmp_path / "p.json", pred),
                          str(gold_file)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {k: 1.0 for k in METRIC_KEYS}
