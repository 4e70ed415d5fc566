"""Where does a trained ZsRE memory's read land: on the slots the edit wrote, or on the ones it left as they were?
(An analysis script for docs/results.md, not part of the package.)

    PYTHONPATH=. python docs/analysis/zsre_read_landing.py <workdir> [<workdir> ...]

For each trained memory, on the first 64 dev reliability questions of configs/smollm2_zsre.py with their edit
written, at the question's answer positions (its loss tokens, where the answer is predicted):
- written slots: per question, the slots whose content the edit's write moved by at least 10% of the largest move,
  ||M_s - M0_s|| >= 0.1 max_s ||M_s - M0_s|| (M0 the initial bank the edit segment read, M the bank the question
  reads); printed, the median count, and the median share of the read weight (mean over heads) that lands on them;
- how many slots the write spreads over: exp(entropy) of the moves ||M_s - M0_s|| normalised to sum 1 (k equal
  moves: k), and how many the read spreads over (the same of the read weights);
- how much of what is read depends on the edit: ||rho - rho'|| / ||rho||, rho = sum_s w_s M_s the retrieved vector
  (per head, before the decoder) with the question's own edit written, rho' with the next question's edit written
  instead (the batch's edit segments rolled by one); and the same for what the decoder makes of it, D(rho), which
  the injection adds (gated). A second table follows that through the decoder's stages, D(x) = W_o GELU(LN(W_i x +
  b_i)) + b_o (recomputed here in NumPy and checked against the decoder's own output), to show where it is lost.
A third table gives how token-specific the write's values are: u_t = W_o W_v E(x_t) over the real tokens of the edit
segments (x the write's source; u_t is what a slot won entirely by token t would hold), ||u_t - u_mean|| / ||u_t||
with u_mean the mean over all of them (0: every token stores the same vector).
It asks whether a memory whose update does not depend on the edit (docs/analysis/zsre_update_scale.py) reads past
the written slots, or reads them and finds the same thing whichever edit was written.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gmem_jax.memory import modules
from gmem_jax.memory.model import forward_segments, input_features, memory_module, slot_spread
from gmem_jax.training.checkpoint import load_exported_memory
from zsre_update_scale import edit_swapped_batches, reliability_setup  # this folder (python puts it first on sys.path)

WRITTEN = 0.1  # a slot counts as written if the edit moved it by at least this fraction of the largest move
_records = []  # (slots [B, S, M], read weights [B, T, S] or [B, T, heads, S]), one per segment read
_decoded = []  # D(rho) [B, T, H], one per segment read


def _recording_retrieve(original):
    def retrieve(self, state, h, *args, **kw):
        out = original(self, state, h, *args, **kw)
        slots = self.split_summary(state)[0]
        jax.debug.callback(lambda *a: _records.append(tuple(np.asarray(x, np.float64) for x in a)), slots, out[1])
        return out
    return retrieve


def _recording_inject(original):
    def inject(self, h, r, *args, **kw):
        jax.debug.callback(lambda x: _decoded.append(np.asarray(x, np.float64)), r)
        return original(self, h, r, *args, **kw)
    return inject


def gather(weights: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """What GMemory._gather reads (without memory.read_by_write_key): weights [B, T, S] or [B, T, heads, S], slots
    [B, S, M] -> [B, T, M]."""
    if weights.ndim == 3:
        return np.einsum("bts,bsm->btm", weights, slots)
    nh = weights.shape[2]
    out = np.einsum("bths,bshd->bthd", weights, slots.reshape(slots.shape[:2] + (nh, -1)))
    return out.reshape(out.shape[:2] + (-1,))


def decoder_stages(p: dict, x: np.ndarray) -> list[np.ndarray]:
    """The decoder's stages for input x [..., M]: [W_i x + b_i, LN(.), GELU(.), W_o . + b_o] (memory.modules._MLPMap
    with biases and LayerNorm; flax defaults: LayerNorm epsilon 1e-6, exact GELU)."""
    from scipy.special import erf
    a = x @ p["in"]["kernel"] + p["in"]["bias"]
    mu, var = a.mean(-1, keepdims=True), a.var(-1, keepdims=True)
    n = (a - mu) / np.sqrt(var + 1e-6) * p["norm"]["scale"] + p["norm"]["bias"]
    g = 0.5 * n * (1.0 + erf(n / np.sqrt(2.0)))
    return [a, n, g, g @ p["out"]["kernel"] + p["out"]["bias"]]


def _relative_change(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """||x - y|| / ||x|| over the last axis."""
    return np.linalg.norm(x - y, axis=-1) / np.maximum(np.linalg.norm(x, axis=-1), 1e-12)


def question_read(params, frozen, batch, cfg, mcfg):
    """Run the batch eagerly -> ((the bank the edit segment read, the initial one [B, S, M]; its read weights),
    (the bank the question reads [B, S, M]; its read weights), the question's D(rho) [B, T, H]); the question is the
    last segment."""
    _records.clear()
    _decoded.clear()
    forward_segments(params, frozen, batch, cfg, mcfg)
    jax.effects_barrier()
    assert len(_records) == len(_decoded) == batch["tokens"].shape[1], len(_records)  # one read per segment
    return _records[0], _records[-1], _decoded[-1]


def value_vectors(params, frozen, batch, cfg, mcfg) -> np.ndarray:
    """u_t = W_o W_v E(x_t) for the real tokens of the batch's edit segments (all but the last) -> [n, M]."""
    tokens, mask = batch["tokens"][:, :-1], batch["token_mask"][:, :-1].astype(bool)
    flat = lambda a: a.reshape((-1,) + a.shape[2:])  # noqa: E731  [B, N-1, ...] -> [B (N-1), ...]
    x = input_features(frozen, flat(tokens), flat(mask), cfg, mcfg)["write"]
    u = memory_module(cfg, mcfg).apply({"params": params}, x,
                                       method=lambda m, y: m.write_o(m.write_v(m.encode(y, "write"))))
    return np.asarray(u, np.float64)[np.asarray(flat(mask))]


def main(workdirs):
    modules.GMemory._retrieve = _recording_retrieve(modules.GMemory._retrieve)
    modules.GMemory._inject = _recording_inject(modules.GMemory._inject)
    cfg, frozen, exs = reliability_setup()
    print("| run | injection | slots written (>= 10% of the largest move) | slots the write spreads over "
          "| read weight on the written slots | slots the read spreads over | edit-dependent part of what is read "
          "| the same after the decoder |")
    print("|---|---|---|---|---|---|---|---|")
    stage_tables, value_rows = [], []
    for wd in workdirs:
        params, mcfg = load_exported_memory(wd, cfg)
        assert not mcfg.read_by_write_key, "gather() here reads whole slots"
        counts, spreads, masses, read_spreads, deps, decoded_deps = [], [], [], [], [], []
        dec_params = jax.tree.map(lambda x: np.asarray(x, np.float64), params["decoder"])
        stage_deps = []  # per batch: [4 stages] of [answer positions]
        values = []  # per batch: [real edit tokens, M]
        for b, batch, swapped in edit_swapped_batches(exs):
            (m0, _), (m, w), dec = question_read(params, frozen, batch, cfg, mcfg)
            _, (m_other, w_other), dec_other = question_read(params, frozen, swapped, cfg, mcfg)
            move = np.linalg.norm(m - m0, axis=-1)  # [B, S]
            written = move >= WRITTEN * move.max(-1, keepdims=True)  # [B, S]
            alpha = w.mean(2) if w.ndim == 4 else w  # [B, T, S]
            at = b["loss_mask"][:, -1] > 0  # [B, T] the question's answer positions
            counts.append(written.sum(-1))
            spreads.append(np.asarray(slot_spread(jnp.asarray(move))))
            masses.append((alpha * written[:, None, :]).sum(-1)[at])
            read_spreads.append(np.asarray(slot_spread(jnp.asarray(alpha)))[at])
            rho, rho_other = gather(w, m), gather(w_other, m_other)
            deps.append(_relative_change(rho, rho_other)[at])
            decoded_deps.append(_relative_change(dec, dec_other)[at])
            stages, stages_other = decoder_stages(dec_params, rho[at]), decoder_stages(dec_params, rho_other[at])
            np.testing.assert_allclose(stages[-1], dec[at], rtol=1e-3, atol=1e-3 * np.abs(dec).max())
            stage_deps.append([_relative_change(x, y) for x, y in zip(stages, stages_other)])
            values.append(value_vectors(params, frozen, batch, cfg, mcfg))
        count, spread, mass, read_spread, dep, decoded_dep = (
            np.concatenate(x) for x in (counts, spreads, masses, read_spreads, deps, decoded_deps))
        pct = lambda x: (f"{100 * np.median(x):.1f}% ({100 * np.percentile(x, 10):.1f}"  # noqa: E731
                         f"-{100 * np.percentile(x, 90):.1f})")
        where = f"residual, block {mcfg.read_layer}" if mcfg.injection == "residual" else "final"
        print(f"| {wd} | {where} | {np.median(count):.0f} of {m.shape[1]} | {np.median(spread):.0f} | {pct(mass)} "
              f"| {np.median(read_spread):.0f} | {pct(dep)} | {pct(decoded_dep)} |")
        u = np.concatenate(values)
        value_rows.append(f"| {wd} | {len(u)} | {pct(_relative_change(u, u.mean(0, keepdims=True)))} |")
        stage_tables.append(f"| {wd} | {pct(dep)} | " + " | ".join(
            pct(np.concatenate([b[i] for b in stage_deps])) for i in range(4)) + " |")
    print("\nThe edit-dependent part through the decoder's stages, at the answer positions, median (10th-90th pct):\n")
    print("| run | rho | W_i rho + b_i | LayerNorm | GELU | D(rho) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(stage_tables))
    print("\nToken-specific part of the write's values, ||u_t - u_mean|| / ||u_t||, median (10th-90th pct):\n")
    print("| run | real edit tokens | token-specific part |")
    print("|---|---|---|")
    print("\n".join(value_rows))


if __name__ == "__main__":
    main(sys.argv[1:])
