"""How large is what a trained ZsRE memory adds to the hidden states, relative to them? (An analysis script for
docs/results.md, not part of the package.)

    PYTHONPATH=. python docs/analysis/zsre_update_scale.py <workdir> [<workdir> ...]

For each trained memory, on the first 64 dev reliability questions of configs/smollm2_zsre.py with their edit
written: at every real token of the question segment, ||h' - h|| / ||h||, where h is what the injection receives
(the residual stream entering memory.read_layer for a residual injection, the final-normed hidden states for the
final one) and h' what it returns (the scope gate included). Printed: the median and the 90th percentile over the
tokens; how much of the update depends on the edit: ||u - u'|| / ||u|| (median), u the update with the question's own
edit written, u' with the next question's edit written instead (the batch's edit segments rolled by one), beside
the scope gate with each (a shut gate alone makes u' small and this ratio ~100%), and the ratio again with each
update divided by its scope gate (what is added, apart from how much of it is let in); and for a
residual injection the trained per-channel gate |g| (mean, max) beside the median per-channel RMS of h. It asks
whether a memory that answers nothing adds too little to matter, or adds much but the same for every edit.
"""
import inspect
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs.smollm2_zsre import get_config
from gmem_jax.memory import modules
from gmem_jax.memory.model import forward_segments
from gmem_jax.tasks.base import collate
from gmem_jax.training import builders
from gmem_jax.training.checkpoint import load_exported_memory

LIMIT = 64
_records = []  # (h [B, T, H], update h' - h [B, T, H], scope gate [B, T] or NaN), one per segment read


def _recording_inject(original):
    signature = inspect.signature(original)

    def inject(self, h, r, *args, **kw):
        out, gate = original(self, h, r, *args, **kw)
        scope = signature.bind(self, h, r, *args, **kw).arguments.get("scope")  # [B, T], None without a gate
        scope = jnp.full(h.shape[:2], jnp.nan) if scope is None else scope
        jax.debug.callback(lambda *a: _records.append(tuple(np.asarray(x) for x in a)), h, out - h, scope)
        return out, gate
    return inject


def question_read(params, frozen, batch, cfg, mcfg):
    """Run the batch eagerly (the callback sees every segment's read) -> the question segment's (h [B, T, H], update
    [B, T, H], scope gate [B, T]); the question is the last segment, the edit the ones before."""
    _records.clear()
    forward_segments(params, frozen, batch, cfg, mcfg)
    jax.effects_barrier()
    assert len(_records) == batch["tokens"].shape[1], len(_records)  # one read per segment
    return _records[-1]


def reliability_setup():
    """(backbone config, frozen tree, the first LIMIT dev reliability examples of configs/smollm2_zsre.py)."""
    _, _, cfg, frozen, examples = builders.eval_setup(get_config("scoped_induction"))
    return cfg, frozen, [e for e in examples if e.meta["kind"] == "reliability"][:LIMIT]


def edit_swapped_batches(exs, batch_size=16):
    """Yield (collated numpy batch, its arrays, the same with the next question's edit written instead: the segments
    before the last, the question, rolled by one example)."""
    for start in range(0, len(exs), batch_size):
        b = collate(exs[start:start + batch_size])
        batch = {k: jnp.asarray(b[k]) for k in ("tokens", "token_mask", "labels", "loss_mask")}
        yield b, batch, {k: v.at[:, :-1].set(jnp.roll(v[:, :-1], 1, axis=0)) for k, v in batch.items()}


def main(workdirs):
    modules.GMemory._inject = _recording_inject(modules.GMemory._inject)
    cfg, frozen, exs = reliability_setup()
    print("| run | injection | update / hidden, median | 90th percentile | edit-dependent part of the update, median "
          "| the same, scope gate divided out | scope gate, own / other edit, median | gate abs mean / max "
          "| h channel RMS, median |")
    print("|---|---|---|---|---|---|---|---|---|")
    for wd in workdirs:
        params, mcfg = load_exported_memory(wd, cfg)
        rels, hs, deps, gates, contents = [], [], [], [], []
        for b, batch, swapped in edit_swapped_batches(exs):
            h, update, scope = question_read(params, frozen, batch, cfg, mcfg)
            _, other, other_scope = question_read(params, frozen, swapped, cfg, mcfg)
            mask = b["token_mask"][:, -1].astype(bool)
            norm = lambda x: np.linalg.norm(x, axis=-1)[mask]  # noqa: E731  per real question token
            rels.append(norm(update) / np.maximum(norm(h), 1e-6))
            hs.append(h[mask])
            gates.append((scope[:, 0], other_scope[:, 0]))
            deps.append(norm(update - other) / norm(update))
            # the same with the scope gate divided out: what differs in what is added, not in how much is let in
            u, o = (x / np.where(np.isnan(g), 1.0, g)[..., None] for x, g in ((update, scope), (other, other_scope)))
            contents.append(norm(u - o) / norm(u))
        rel, h, dep = np.concatenate(rels), np.concatenate(hs), np.concatenate(deps)
        own_g, other_g = (np.median(np.concatenate(g)) for g in zip(*gates))
        content = np.median(np.concatenate(contents))
        chan_rms = float(np.median(np.sqrt((h ** 2).mean(0))))
        gate = params.get("inject_gate")
        gate_cell = f"{np.abs(gate).mean():.3f} / {np.abs(gate).max():.3f}" if gate is not None else "(none)"
        where = f"residual, block {mcfg.read_layer}" if mcfg.injection == "residual" else "final"
        print(f"| {wd} | {where} | {100 * np.median(rel):.2f}% | {100 * np.percentile(rel, 90):.2f}% | "
              f"{100 * np.median(dep):.1f}% | {100 * content:.1f}% | {own_g:.3f} / {other_g:.3f} | {gate_cell} "
              f"| {chan_rms:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
