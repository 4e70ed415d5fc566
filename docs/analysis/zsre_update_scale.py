"""How large is what a trained ZsRE memory adds to the hidden states, relative to them? (An analysis script for
docs/results.md, not part of the package.)

    PYTHONPATH=. python docs/analysis/zsre_update_scale.py <workdir> [<workdir> ...]

For each trained memory, on the first 64 dev reliability questions of configs/smollm2_zsre.py with their edit
written: at every real token of the question segment, ||h' - h|| / ||h||, where h is what the injection receives
(the residual stream entering memory.read_layer for a residual injection, the final-normed hidden states for the
final one) and h' what it returns (the scope gate included). Printed: the median and the 90th percentile over the
tokens, and for a residual injection the trained per-channel gate |g| (mean, max) beside the median per-channel RMS
of h. A residual update of a few percent of a stream that later blocks and the final norm process is a small
perturbation; the final injection's update feeds the LM head directly.
"""
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
_records = []  # (relative update norm [B, T], h's per-channel RMS [H], token mask proxy [B, T])


def _recording_inject(original):
    def inject(self, h, r, *args, **kw):
        out, gate = original(self, h, r, *args, **kw)
        rel = jnp.linalg.norm(out - h, axis=-1) / jnp.maximum(jnp.linalg.norm(h, axis=-1), 1e-6)
        jax.debug.callback(lambda a, b: _records.append((np.asarray(a), np.asarray(b))), rel, h)
        return out, gate
    return inject


def main(workdirs):
    modules.GMemory._inject = _recording_inject(modules.GMemory._inject)
    _, _, cfg, frozen, examples = builders.eval_setup(get_config("scoped_induction"))
    exs = [e for e in examples if e.meta["kind"] == "reliability"][:LIMIT]
    print("| run | injection | update / hidden, median | 90th percentile | gate abs mean / max | h channel RMS, median |")
    print("|---|---|---|---|---|---|")
    for wd in workdirs:
        params, mcfg = load_exported_memory(wd, cfg)
        _records.clear()
        rels, hs = [], []
        for start in range(0, len(exs), 16):
            b = collate(exs[start:start + 16])
            batch = {k: jnp.asarray(b[k]) for k in ("tokens", "token_mask", "labels", "loss_mask")}
            _records.clear()
            forward_segments(params, frozen, batch, cfg, mcfg)  # eager: the callback sees every segment's read
            jax.effects_barrier()
            assert len(_records) == b["tokens"].shape[1], len(_records)  # one read per segment
            rel, h = _records[-1]  # the last segment read: the question (segment 0 is the edit)
            mask = b["token_mask"][:, -1].astype(bool)
            rels.append(rel[mask])
            hs.append(h[mask])
        rel, h = np.concatenate(rels), np.concatenate(hs)
        chan_rms = float(np.median(np.sqrt((h ** 2).mean(0))))
        gate = params.get("inject_gate")
        gate_cell = f"{np.abs(gate).mean():.3f} / {np.abs(gate).max():.3f}" if gate is not None else "(none)"
        where = f"residual, block {mcfg.read_layer}" if mcfg.injection == "residual" else "final"
        print(f"| {wd} | {where} | {100 * np.median(rel):.2f}% | {100 * np.percentile(rel, 90):.2f}% | {gate_cell} "
              f"| {chan_rms:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
