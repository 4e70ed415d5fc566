"""Answer metrics shared by the non-HotpotQA tasks (HotpotQA's official ones are in hotpot_metrics).

Teacher-forced targets of an example are its last segment's labels where loss_mask is 1: with `pred_ids` the
argmax of the logits at every position of the last segment,
    token_em(pred_ids, ex.labels[-1], ex.loss_mask[-1] > 0)
is EasyEdit's token accuracy, and locality is the same function applied to the predictions WITH memory
against those WITHOUT memory (agreement with the frozen model's own output).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.tasks.hotpot_metrics import normalize_answer


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalized prediction equals any normalized gold answer (HotpotQA/SQuAD normalization)."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def token_em(pred_ids: Any, target_ids: Any, mask: Any) -> np.ndarray:
    """Fraction of masked positions where pred_ids == target_ids, per row: [..., T] -> [...].

    Every row needs at least one masked position (a row without targets has no accuracy)."""
    pred, target, mask = np.asarray(pred_ids), np.asarray(target_ids), np.asarray(mask, bool)
    if not pred.shape == target.shape == mask.shape:
        raise GmemError(f"token_em: pred_ids {pred.shape}, target_ids {target.shape} and mask {mask.shape} must "
                        "have the same shape")
    n = mask.sum(-1)
    if np.any(n == 0):
        raise GmemError("token_em: a row has no masked target position; pass the loss_mask of examples with answers")
    return ((pred == target) & mask).sum(-1) / n


def clean_generation(text: str) -> str:
    """A generated answer up to the first newline, stripped (models continue with a new 'Question:')."""
    return text.split("\n", 1)[0].strip()


def grouped_mean(examples: Sequence[Any], value: Callable[[Any], float | None], group: Callable[[Any], str]
                 ) -> dict[str, float]:
    """Mean of value(ex) per group(ex) name; examples whose value is None are left out of their group."""
    sums: dict[str, list[float]] = {}
    for ex in examples:
        v = value(ex)
        if v is not None:
            sums.setdefault(group(ex), []).append(float(v))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def answer_em(predictions: Mapping[str, Mapping[str, Any]], example: Any, key: str = "answers") -> float:
    """Normalized exact match of predictions[id]['answer'] against meta[key] (a list of strings; an empty list
    matches nothing); a missing prediction is 0."""
    p, golds = predictions.get(example.meta["id"]), example.meta[key]
    return exact_match(p["answer"], golds) if p and "answer" in p else 0.0


def answer_token_scores(predictions: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Teacher-forced answer-token accuracy, overall and by target position, from predictions' 'token_em' and
    'answer_hits' (1/0 per answer target, in order; the last target is the end of the answer, EOS):

      answer_token_acc  mean over examples of their token_em
      first_token_acc   the first answer token (the one that must come from the context)
      inner_token_acc   targets between the first and the last (later tokens of multi-token answers)
      end_token_acc     the last target (does the model stop?)

    Predictions without 'answer_hits' (memory.loss_positions kept fewer targets than the answer has) count only in
    answer_token_acc; a position group without any target (e.g. single-token answers: no inner tokens) is left
    out."""
    out = {"answer_token_acc": float(np.mean([p["token_em"] for p in predictions.values()]))} if predictions else {}
    hits = [list(p["answer_hits"]) for p in predictions.values() if p.get("answer_hits")]
    groups = {"first_token_acc": [h[0] for h in hits if len(h) > 1],
              "inner_token_acc": [x for h in hits for x in h[1:-1]],
              "end_token_acc": [h[-1] for h in hits]}
    out.update({k: float(np.mean(v)) for k, v in groups.items() if v})
    return out
