"""Diagnostic: what one KV-cache decode step costs with the stacked layer params vs per-layer arrays.

`backbones/model.py::run_layers` scans over layer indices and reads each layer's weights with
`lax.dynamic_index_in_dim` from the stacked [L, ...] leaves. On XLA:CPU every such read is a dynamic-slice
*copy* of the layer's weights (visible in the compiled HLO as `dynamic-slice_bitcast_fusion` producing e.g.
f32[768,3072] inside the while body). A training segment amortises the copy over thousands of tokens; a decode
step processes one token per row, so it is bound by weight memory traffic and the copy shows directly. This
script times one GPT-2-124M decode step (1 token, 160-slot cache) both ways and checks they give the same logits:
`forward` on the stacked tree (the layer scan) and on the per-layer tree from `model.unstack_layers` (a loop
over static indices; what `generation` decodes with on CPU, the split made once per generate call).

    python -m bench.decode_layout [--quick] [--repeats 30]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from gmem_jax.backbones.model import forward, init_cache, init_params, lm_logits, unstack_layers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    cfg = common.gpt2_124m()
    if args.quick:
        cfg = common.quick_shape(cfg)
    B, S, at = args.batch, 160, 100  # cache slots, index of the decoded token
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    cache = init_cache(cfg, B, S)
    tok = jnp.zeros((B, 1), jnp.int32)
    kv_mask = jnp.ones((B, S), bool)

    @jax.jit
    def step(params, cache, tok):  # one decode step; the layout of params['layers'] and cache picks the path
        out = forward(params, tok, cfg, kv_mask=kv_mask, cache=cache, cache_index=at, compute_logits=False)
        return lm_logits(params, out.hidden[:, -1], cfg), out.cache

    per_layer = dict(params, layers=unstack_layers(params["layers"]))
    caches = unstack_layers(cache)
    run_a = lambda: jax.block_until_ready(step(params, cache, tok))
    run_b = lambda: jax.block_until_ready(step(per_layer, caches, tok))
    max_diff = float(np.max(np.abs(np.asarray(run_a()[0]) - np.asarray(run_b()[0]))))
    raw = {"stacked": {"wall": [], "cpu": []}, "per_layer": {"wall": [], "cpu": []}}
    for _ in range(args.repeats):  # interleaved, so load changes hit both
        for name, fn in (("stacked", run_a), ("per_layer", run_b)):
            t = common.time_calls(fn, 1, warmup=0)
            raw[name]["wall"] += t["wall"]
            raw[name]["cpu"] += t["cpu"]
    res = {k: common.summary(v) for k, v in raw.items()}
    rows = [{"layout": k, "ms / decode step": 1e3 * v["median_s"], "CPU ms": 1e3 * v["cpu_median_s"]}
            for k, v in res.items()]
    common.print_table(rows)
    ratio = res["stacked"]["median_s"] / res["per_layer"]["median_s"]
    print(f"\nstacked / per-layer: {ratio:.2f}x; max |logit difference| {max_diff:.2e}")
    common.write_result("decode_layout", {"batch": B, "cache_slots": S, "results": res, "ratio": ratio,
                                          "max_abs_logit_diff": max_diff}, args.quick)


if __name__ == "__main__":
    main()
