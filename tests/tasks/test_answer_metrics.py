"""Teacher-forced answer-token accuracies by position, on hand-computed predictions."""
import pytest

from gmem_jax.tasks.metrics import answer_token_scores


def test_answer_token_scores_split_first_inner_and_end_targets():
    preds = {
        "a": {"token_em": 2 / 3, "answer_hits": [1, 0, 1]},     # first right, one inner wrong, EOS right
        "b": {"token_em": 0.5, "answer_hits": [0, 1]},          # single-token answer: first wrong, EOS right
        "c": {"token_em": 0.5, "answer_hits": [1, 1, 0, 0]},    # two inner tokens, EOS wrong
        "d": {"token_em": 1.0, "answer_hits": [1]},             # no answer tokens, only EOS: counts as an end only
        "e": {"token_em": 0.0},                                 # no hits recorded (older prediction files)
    }
    s = answer_token_scores(preds)
    assert s["answer_token_acc"] == pytest.approx((2 / 3 + 0.5 + 0.5 + 1.0 + 0.0) / 5)
    assert s["first_token_acc"] == pytest.approx(2 / 3)   # a, b, c
    assert s["inner_token_acc"] == pytest.approx(1 / 3)   # a's 0, c's 1 and 0
    assert s["end_token_acc"] == pytest.approx(3 / 4)     # a, b, d right; c wrong
    only_single = answer_token_scores({"x": {"token_em": 1.0, "answer_hits": [1, 1]}})
    assert "inner_token_acc" not in only_single and only_single["first_token_acc"] == 1.0
    assert answer_token_scores({}) == {}
