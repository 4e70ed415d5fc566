"""Do SmolLM2's frozen features tell a ZsRE question its edit concerns from one it does not? (An analysis script
for docs/results.md, not part of the package; no training, no memory.)

    PYTHONPATH=. python docs/analysis/zsre_scope_probe.py

On the dev split of configs/smollm2_zsre.py (the evaluation's examples: segment 0 the edit, segment 1 the question
with its gold answer), per layer (block 16's input through the final norm, as memory.write_layer=16 sees it, and
the final-norm output the read sees), every feature standardised per channel over all the vectors compared, then:
  - AUC of the cosine between the question and its own edit: reliability + generalization (in scope) against
    locality (out of scope) questions;
  - top-1: for each reliability question, is its own edit the most similar of the dev edits?
Vectors: the edit's mean over its real tokens (E*_mean) or its last token (E16_last); the question's mean over its
answer positions (Q*_ans, the positions the memory's read serves) or over its prompt before the answer (Q*_prompt).
"""
import jax
import jax.numpy as jnp
import numpy as np

from configs.smollm2_zsre import get_config
from gmem_jax.memory.model import frozen_features
from gmem_jax.tasks.base import collate
from gmem_jax.training import builders

WRITE_LAYER = 16
PAIRS = [("Qfin_ans", "Efin_mean"), ("Q16_ans", "E16_mean"), ("Q16_ans", "E16_last"), ("Q16_prompt", "E16_mean"),
         ("Q16_prompt", "E16_last"), ("Qfin_prompt", "Efin_mean")]


def masked_mean(x, w):
    """x [B, T, H], w [B, T] -> [B, H]."""
    return (x * w[..., None]).sum(1) / np.maximum(w.sum(1), 1.0)[:, None]


def auc(pos, neg):
    """P(a positive scores above a negative), by ranks (no ties in float cosines)."""
    ranks = np.concatenate([pos, neg]).argsort().argsort() + 1
    return (ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def vectors(config):
    _, _, cfg, frozen, examples = builders.eval_setup(config)
    feats = jax.jit(lambda t, m: frozen_features(frozen, t, m, cfg, WRITE_LAYER))
    out, kinds, records = {}, [], []
    for start in range(0, len(examples), 16):
        chunk = examples[start:start + 16]
        b = collate(chunk)
        (e_fin, e16), (q_fin, q16) = [
            (np.asarray(f["features"]), np.asarray(f["write_features"]))
            for f in (feats(jnp.asarray(b["tokens"][:, s]), jnp.asarray(b["token_mask"][:, s])) for s in range(2))]
        edit = b["token_mask"][:, 0].astype(np.float32)
        answer = (b["loss_mask"][:, 1] > 0).astype(np.float32)
        prompt = (b["token_mask"][:, 1] & (np.cumsum(answer, -1) == 0)).astype(np.float32)
        last = np.maximum(b["token_mask"][:, 0].sum(-1) - 1, 0)
        for name, v in [("E16_mean", masked_mean(e16, edit)), ("Efin_mean", masked_mean(e_fin, edit)),
                        ("E16_last", e16[np.arange(len(chunk)), last]), ("Q16_ans", masked_mean(q16, answer)),
                        ("Qfin_ans", masked_mean(q_fin, answer)), ("Q16_prompt", masked_mean(q16, prompt)),
                        ("Qfin_prompt", masked_mean(q_fin, prompt))]:
            out.setdefault(name, []).append(v)
        kinds += [ex.meta["kind"] for ex in chunk]
        records += [ex.meta["id"].rsplit("-", 1)[0] for ex in chunk]  # "zsre-{index}"
    return {k: np.concatenate(v) for k, v in out.items()}, np.array(kinds), np.array(records)


def main():
    vec, kinds, records = vectors(get_config("distill"))
    for layer in (("E16_mean", "E16_last", "Q16_ans", "Q16_prompt"), ("Efin_mean", "Qfin_ans", "Qfin_prompt")):
        stacked = np.concatenate([vec[n] for n in layer])
        mu, sd = stacked.mean(0), stacked.std(0) + 1e-6
        vec.update({n: (vec[n] - mu) / sd for n in layer})
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    in_scope, out_scope = np.isin(kinds, ["reliability", "generalization"]), kinds == "locality"
    reliability = kinds == "reliability"
    edit_of = {r: i for i, r in enumerate(records) if kinds[i] == "reliability"}
    names = sorted(edit_of)
    print(f"{in_scope.sum()} in-scope and {out_scope.sum()} locality questions; {len(names)} dev edits")
    for q, e in PAIRS:
        own = (unit(vec[q]) * unit(vec[e])).sum(-1)
        sims = unit(vec[q][reliability]) @ unit(vec[e][[edit_of[r] for r in names]]).T
        top1 = np.mean([names[j] == r for j, r in zip(sims.argmax(1), records[reliability])])
        print(f"{q:12s} vs {e:10s}: AUC in / out of scope {auc(own[in_scope], own[out_scope]):.3f}, "
              f"top-1 own edit {top1:.3f}")


if __name__ == "__main__":
    main()
