"""Where does a trained bAbI qa1 memory's read land? (An analysis script for docs/results.md, not part of the
package.)

    PYTHONPATH=. python docs/analysis/babi_read_landing.py configs/smollm2_babilong.py:1,1024 BABI_DIR W [W ...]

For each trained keyed-write memory (update gate, final injection) and each eval question of the config, teacher-
forced: at the answer's first position, the share of what the read retrieves that is the value of each written
token (beta = alpha P over every written segment, P each segment's write provenance faded by the later writes'
gates, as memory.pointer_weight with pointer_segments=0 computes it; `gmem_jax.memory.model._push_provenance`).
The written tokens are grouped by what they are for the asked person: the answer's place word wherever it is
written (right), a place the person was at earlier (stale), a place only others were at (other), everything else
(filler, names, verbs: rest); what no write put there (the slots' initial content) is "unwritten". Prints the mean
share per group and how often each place group holds the largest share ("argmax"). Works for runs trained without
the pointer loss too.

Then, to tell a write that mixes people from a read that asks the wrong slots: A = the answer's place token inside
the supporting fact (the batch's support_mask), O = the place tokens only others visited. "read purity" is the
read's beta(A) / (beta(A) + beta(O)); "write purity" is the same ratio for a read whose weight on slot s is
proportional to a_s (it looks where A was written), sum_s a_s^2 / sum_s a_s (a_s + o_s), with a_s, o_s the (faded)
provenance of A and O in slot s; "blind" is sum_s a_s / sum_s (a_s + o_s), what a read spread evenly over the
slots would get (the write purity of a write that puts every place in the same slots).
Write purity near 1 and read purity well below it: the slots keep people apart and the read's address is what
fails; both low: the write itself puts different people's places in the same slots.
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from babi_report import load_config, places, test_questions  # this folder (python puts it first on sys.path)
from gmem_jax.memory.model import frozen_features, memory_module
from gmem_jax.memory.modules import GMemory
from gmem_jax.tasks.base import collate
from gmem_jax.training import builders
from gmem_jax.training.checkpoint import load_exported_memory

GROUPS = ("right", "stale", "other", "rest", "unwritten")


def place_ids(question, tokenizer) -> dict:
    """Group -> set of the first token ids of the place words (" hallway" is " hall" + "way"; the others are one
    token; the first token is what the answer's first position predicts)."""
    return {g: {tokenizer.encode(" " + w)[0] for w in words} for g, words in places(question).items()}


def landing(params, mcfg, cfg, frozen, examples, questions, tokenizer, batch_size=8):
    module = memory_module(cfg, mcfg)
    feats = jax.jit(frozen_features, static_argnums=(3, 4))
    # params are arguments of the jitted calls, not constants baked into them
    read = jax.jit(lambda p, s, h: module.apply({"params": p}, s, h, method=GMemory.read)[1])
    write = jax.jit(lambda p, s, h, m, f: module.apply({"params": p}, s, h, m, None, False, f, True,
                                                       method=GMemory.write))
    shares, wins = {g: [] for g in GROUPS}, {g: 0 for g in GROUPS[:3]}
    purity = {"read": [], "write": [], "blind": []}
    for lo in range(0, len(examples), batch_size):
        exs = examples[lo:lo + batch_size]
        b = collate(exs)
        B, N, T = b["tokens"].shape
        state = module.apply({"params": params}, B, method=GMemory.initial_state)
        history = []  # (P [B, S, T], tokens [B, T], mask [B, T], support [B, T]) per written segment
        done = np.zeros(B, bool)
        for n in range(N):
            tok, msk = jnp.asarray(b["tokens"][:, n]), jnp.asarray(b["token_mask"][:, n])
            f = feats(frozen, tok, msk, cfg, mcfg.write_layer)
            lm = b["loss_mask"][:, n] > 0
            ask = lm.any(-1) & ~done
            if ask.any() and history:
                alpha = np.asarray(read(params, state, f["features"]), np.float64)  # [B, T, S]
                prov, wtok, wmask, wsup = (np.concatenate(x, -1) for x in zip(*history))
                for i in np.flatnonzero(ask):
                    t0 = int(np.argmax(lm[i]))
                    beta = alpha[i, t0] @ prov[i]  # [W * T]
                    q = questions[exs[i].meta["id"]]
                    ids = place_ids(q, tokenizer)
                    got = {g: float(beta[wmask[i] & np.isin(wtok[i], list(ids[g]))].sum()) for g in GROUPS[:3]}
                    got["rest"] = float(beta.sum()) - sum(got.values())
                    got["unwritten"] = 1.0 - float(beta.sum())  # what the slots held before any write
                    for g in GROUPS:
                        shares[g].append(got[g])
                    wins[max(GROUPS[:3], key=lambda g: got[g])] += 1
                    A = wsup[i] & np.isin(wtok[i], list(ids["right"]))
                    O = wmask[i] & np.isin(wtok[i], list(ids["other"]))
                    a, o = prov[i][:, A].sum(-1), prov[i][:, O].sum(-1)  # [S]
                    if a.sum() > 0 and O.any():  # the fact was kept and someone else was somewhere else
                        purity["read"].append(beta[A].sum() / max(beta[A].sum() + beta[O].sum(), 1e-12))
                        purity["write"].append((a * a).sum() / (a * (a + o)).sum())
                        purity["blind"].append(a.sum() / (a + o).sum())
                done |= ask
            write_src = f.get("write_features", f["features"])
            new, z, p = write(params, state, write_src, msk, f["features"])
            keep = 1.0 - np.asarray(z, np.float64).mean(-1)[..., None]
            history = [(q * keep, *rest) for q, *rest in history]
            history.append((np.asarray(p, np.float64), b["tokens"][:, n], b["token_mask"][:, n].astype(bool),
                            b["support_mask"][:, n]))
            state = new
    return ({g: float(np.mean(v)) for g, v in shares.items()}, wins, len(shares["right"]),
            {k: (float(np.mean(v)), len(v)) for k, v in purity.items()})


def main(config_arg, babi_dir, workdirs):
    config = load_config(config_arg)
    _, tokenizer, cfg, frozen, examples = builders.eval_setup(config)
    questions = test_questions(babi_dir)
    print("| run | share of the read: right / stale / other places / rest / unwritten | argmax place: right / stale / "
          "other | purity, supporting fact vs others' places: read / write / blind |")
    print("|---|---|---|---|")
    for wd in workdirs:
        params, mcfg = load_exported_memory(wd, cfg)
        mean, wins, n, pure = landing(params, mcfg, cfg, frozen, examples, questions, tokenizer)
        print(f"| {Path(wd).name} | " + " / ".join(f"{100 * mean[g]:.1f}%" for g in GROUPS)
              + " | " + " / ".join(str(wins[g]) for g in GROUPS[:3]) + f" (of {n}) | "
              + " / ".join(f"{100 * pure[k][0]:.1f}%" for k in ("read", "write", "blind")) + f" (of {pure['read'][1]}) |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
