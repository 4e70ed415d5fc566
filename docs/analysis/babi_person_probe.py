"""Does a trained bAbI qa1 keyed write address a place word by its person or by the place itself? (An analysis
script for docs/results.md, not part of the package.)

    PYTHONPATH=. python docs/analysis/babi_person_probe.py configs/smollm2_babilong.py:1,1024 BABI_DIR W [W ...]

On the eval examples of the config, at the first token of the place word of every fact ('PERSON VERB to the
PLACE.') in the written segments:
1. Is the person there to be used? A ridge one-vs-rest probe on the frozen write features (block write_layer's
   input through the final norm, what the write's keys are made from) predicts the person and, for contrast, the
   place; trained on the facts of even-numbered stories, scored on the odd ones (chance: 1 / 4 people, 1 / 6
   places). The same person probe on the final hidden states there (memory.write_key_source="final") and on the
   mean write features of the place token and the 7 before it (what a key window could gather) and of the 8
   tokens before it (what the window of the token before gathers, memory.write_value_shift=1).
2. What does each trained write use? The slot shares of the address that stores the place token's value (softmax
   over the slot addresses of the windowed key of the place token, or of the token before it with
   memory.write_value_shift=1; `GMemory` keyed write, before strength and recency) are compared between pairs of
   facts of the same document: mean cosine over heads for pairs with the same person and another place, another
   person and the same place, and neither. A write that addresses by person gives the first pairs the higher
   similarity; one that addresses by place, the second.
3. How sharp each address is: the number of slots a place token's shares spread over (exp of their entropy).
4. With memory.write_key_select, where the window's pick lands: its mean weight on the person's (first) token and
   how often that token has the largest weight, per head.
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from babi_report import load_config, test_questions  # this folder (python puts it first on sys.path)
from gmem_jax.memory.model import frozen_features, memory_module
from gmem_jax.tasks.base import collate
from gmem_jax.training import builders
from gmem_jax.training.checkpoint import load_exported_memory


def place_facts(examples, questions, tokenizer, cfg, frozen, write_layer, window=16, batch_size=8):
    """Per fact occurrence: (example index, story, person, place, write features [window, H] of the place token
    and the window - 1 tokens before it, newest first, zero before the segment's start, final hidden state [H],
    the person's first token's offset back from the place token, -1 if it is not in the window)."""
    feats = jax.jit(frozen_features, static_argnums=(3, 4))
    rows = []
    for lo in range(0, len(examples), batch_size):
        exs = examples[lo:lo + batch_size]
        b = collate(exs)
        for n in range(b["tokens"].shape[1] - 1):
            if not b["token_mask"][:, n].any():
                continue
            out = feats(frozen, jnp.asarray(b["tokens"][:, n]), jnp.asarray(b["token_mask"][:, n]), cfg, write_layer)
            f = np.asarray(out["write_features"]) * b["token_mask"][:, n, :, None]  # padding never enters a key
            final = np.asarray(out["features"])
            for i, ex in enumerate(exs):
                q = questions[ex.meta["id"]]
                text = dict(q.facts)
                for k in np.flatnonzero(b["sent_mask"][i, n]):
                    fact = text[ex.meta["sent_keys"][n][k][1]]
                    person, place = fact.split()[0], fact.rstrip(".").split()[-1]
                    ids = tokenizer.encode(" " + place)
                    pos = int(b["sent_pos"][i, n, k]) - len(ids)  # the sentence ends with '.'
                    if pos < 0 or int(b["tokens"][i, n, pos]) != ids[0]:
                        continue  # the place word started in the segment before; skip it
                    win = np.zeros((window, f.shape[-1]), f.dtype)
                    back = f[i, max(0, pos - window + 1):pos + 1][::-1]
                    win[:len(back)] = back
                    names = {tokenizer.encode(" " + person)[0], tokenizer.encode(person)[0]}
                    back_ids = [int(t) for t in b["tokens"][i, n, max(0, pos - window + 1):pos + 1][::-1]]
                    offset = next((j for j, t in enumerate(back_ids) if j and t in names), -1)
                    rows.append((lo + i, q.story, person, place, win, final[i, pos], offset))
    return rows


def ridge_accuracy(x, labels, train):
    """One-vs-rest ridge on standardised x [N, D]: accuracy on ~train."""
    classes = sorted(set(labels))
    y = np.array([[float(lab == c) for c in classes] for lab in labels]) * 2 - 1
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    z = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], 1)
    w = np.linalg.solve(z[train].T @ z[train] + 10.0 * np.eye(z.shape[1]), z[train].T @ y[train])
    pred = np.array(classes)[np.argmax(z[~train] @ w, 1)]
    return float(np.mean(pred == np.array(labels)[~train]))


def slot_shares(params, mcfg, cfg, windows):
    """Slot shares [R, heads, S] of the place tokens' windowed write keys and the window weights [R, heads, w]
    that made them (the fixed mix, or memory.write_key_select's pick); windows [R, w, H] as `place_facts`. With
    memory.write_value_shift=1 the place token's value is stored at the address of the token before it, whose
    window starts one row later."""
    if mcfg.write_key_source != "write":
        raise SystemExit("this probe makes the keys from the write features: memory.write_key_source='final' "
                         "is not supported")
    windows = windows[:, mcfg.write_value_shift:]
    module = memory_module(cfg, mcfg)
    keys = jax.jit(lambda p, h: module.apply({"params": p}, h, method=lambda m, y: m.write_k(m.encode(y, "write"))))
    nh, S = mcfg.num_heads, mcfg.num_slots
    addr = np.asarray(params["slot_keys"], np.float64).reshape(S, nh, -1)  # [S, nh, d]
    mix = np.asarray(params["write_key_mix"], np.float64) if mcfg.write_key_window > 1 else np.ones((1, nh))
    real = (np.abs(windows).sum(-1) > 0)[:, :len(mix)]  # [R, w]: zero rows are before the segment's start
    k = np.asarray(keys(params, jnp.asarray(windows)), np.float64)[:, :len(mix)] * real[..., None]
    k = k.reshape(k.shape[:2] + (nh, -1))  # [R, window, nh, d], newest first
    weights = np.broadcast_to(mix.T[None], (len(k), nh, len(mix)))  # [R, nh, w]
    if mcfg.write_key_select:
        u = np.asarray(params["write_key_query"], np.float64)  # [nh, d]
        pick = mix.T[None] + np.einsum("rjhd,hd->rhj", k, u) / np.sqrt(k.shape[-1])
        pick = np.where(real[:, None, :], pick, -np.inf)
        weights = np.exp(pick - pick.max(-1, keepdims=True))
        weights = weights / weights.sum(-1, keepdims=True)
    kw = np.einsum("rjhd,rhj->rhd", k, weights)
    logits = np.einsum("shd,rhd->rhs", addr, kw) * mcfg.address_scale / np.sqrt(addr.shape[-1])
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True), weights


def pair_similarity(rows, shares):
    """Mean over heads of the cosine between two facts' slot shares, by pair type, within each example."""
    sims = {"same person, other place": [], "other person, same place": [], "other person, other place": []}
    by_ex = {}
    for r, (ex, _, person, place, *_) in enumerate(rows):
        by_ex.setdefault(ex, []).append((r, person, place))
    unit = shares / np.linalg.norm(shares, axis=-1, keepdims=True)
    for facts in by_ex.values():
        for a in range(len(facts)):
            for b in range(a + 1, len(facts)):
                (ra, pa, la), (rb, pb, lb) = facts[a], facts[b]
                if pa == pb and la == lb:
                    continue
                kind = ("same person, other place" if pa == pb else
                        "other person, same place" if la == lb else "other person, other place")
                sims[kind].append(float((unit[ra] * unit[rb]).sum(-1).mean()))
    return {k: (float(np.mean(v)), len(v)) for k, v in sims.items()}


def main(config_arg, babi_dir, workdirs):
    config = load_config(config_arg)
    _, tokenizer, cfg, frozen, examples = builders.eval_setup(config)
    questions = test_questions(babi_dir)
    memories = [load_exported_memory(wd, cfg) for wd in workdirs]
    layers = {mcfg.write_layer for _, mcfg in memories}
    if len(layers) != 1 or min(layers) < 0:
        raise SystemExit(f"the runs must share one write_layer >= 0, got {sorted(layers)}")
    rows = place_facts(examples, questions, tokenizer, cfg, frozen, layers.pop())
    windows = np.stack([r[4] for r in rows])
    train = np.array([r[1] % 2 == 0 for r in rows])
    people, where = [r[2] for r in rows], [r[3] for r in rows]
    probe = {"person, write features": (windows[:, 0], people), "place, write features": (windows[:, 0], where),
             "person, final hidden state": (np.stack([r[5] for r in rows]), people),
             "person, mean write features of the 8-token window": (windows[:, :8].mean(1), people),
             "person, mean write features of the 8 tokens before": (windows[:, 1:9].mean(1), people)}
    print(f"{len(rows)} place tokens ({train.sum()} train / {(~train).sum()} test); ridge probe accuracy: "
          + "; ".join(f"{k} {100 * ridge_accuracy(x, y, train):.1f}%" for k, (x, y) in probe.items()))
    for wd, (params, mcfg) in zip(workdirs, memories):
        shares, weights = slot_shares(params, mcfg, cfg, windows)
        sims = pair_similarity(rows, shares)
        print(f"{Path(wd).name}:")
        print("  slot-share cosine: " + "; ".join(f"{k} {v:.3f} ({n} pairs)" for k, (v, n) in sims.items()))
        entropy = -(shares * np.log(shares + 1e-30)).sum(-1)  # [R, nh]
        print(f"  slots the address of a place token's value spreads over (exp entropy of its shares, of "
              f"{mcfg.num_slots}), per head: " + " ".join(f"{x:.0f}" for x in np.exp(entropy).mean(0)))
        offsets = np.array([r[6] for r in rows]) - mcfg.write_value_shift  # from the token whose key is used
        inside = np.flatnonzero((offsets >= 0) & (offsets < weights.shape[-1]))
        on_name = weights[inside, :, offsets[inside]]  # [R', nh]
        top = weights[inside].argmax(-1) == offsets[inside, None]
        print(f"  window weight on the person's token ({len(inside)} facts with it in the window), per head: mean "
              + " ".join(f"{x:.2f}" for x in on_name.mean(0)) + "; largest weight "
              + " ".join(f"{100 * x:.0f}%" for x in top.mean(0)))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
