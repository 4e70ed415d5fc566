"""Long documents: train-step time and compiled peak memory as the number of segments grows.

Target: time linear in the number of segments N (constant time per segment) and peak memory flat, with the
memory's per-segment rematerialisation on (`MemoryConfig.remat=True`); `remat=False` for contrast.

Peak memory is XLA's static figure for the compiled step, `compiled.memory_analysis()`: temp + argument + output
bytes (the state argument is donated, so its buffers are reused by the output; the alias bytes are reported too).

Shape (to stay within a few minutes on 2 cores): GPT-2 small's width (d 768, 12 heads, MLP 3072) with 6 layers
and a 16384-token vocabulary, batch 1 x N segments x 256 tokens, 1024 slots, mem_dim 512, injection final.

    python -m bench.long_context [--quick] [--segments 4 8 16 32] [--repeats 2]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from gmem_jax.backbones.model import init_params
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import init_memory
from gmem_jax.training.step import init_train_state, make_optimizer, make_train_step


def memory_bytes(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias")}
    out["peak"] = out["temp"] + out["argument"] + out["output"]
    return out


def run_one(cfg, frozen, mcfg, B, N, T, repeats) -> dict:
    opt = make_optimizer(learning_rate=1e-4, total_steps=1000)
    holder = {"state": init_train_state(init_memory(jax.random.key(1), cfg, mcfg), opt)}
    batch = jax.tree.map(jnp.asarray, common.random_batch(N, B, N, T, cfg.vocab_size))
    t0 = time.perf_counter()
    compiled = make_train_step(cfg, mcfg, opt).lower(holder["state"], frozen, batch).compile()
    compile_s = time.perf_counter() - t0

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)

    times = common.summary(common.time_calls(run, repeats, warmup=1))
    return {"n_seg": N, "remat": mcfg.remat, "tokens": B * N * T, "compile_s": compile_s, "step": times,
            "s_per_segment": times["median_s"] / N, "memory": memory_bytes(compiled)}


def linear_fit(x, y) -> tuple[float, float, float]:
    """Least squares y = a + b x -> (a, b, worst relative residual)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b), float(np.max(np.abs(a + b * x - y) / y))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--segments", type=int, nargs="+", default=None, help="default 4 8 16 32 (quick: 2 4)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seg-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-contrast", action="store_true", help="skip the remat=False runs")
    args = ap.parse_args()
    cfg = common.gpt2_124m().replace(num_layers=6, vocab_size=16384)
    B, T = args.batch, args.seg_len
    segments = args.segments or ([2, 4] if args.quick else [4, 8, 16, 32])
    mcfg = MemoryConfig(num_slots=1024, mem_dim=512, injection="final")
    if args.quick:
        cfg, T = common.quick_shape(cfg), 32
        mcfg = MemoryConfig(num_slots=64, mem_dim=64, num_heads=4, injection="final")
    frozen = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    print(f"backbone {cfg.num_layers}L d{cfg.hidden_size} vocab {cfg.vocab_size}; batch {B} x N x {T} tokens; "
          f"slots {mcfg.num_slots}, mem_dim {mcfg.mem_dim}", flush=True)

    results = []
    for remat in ([True] if args.no_contrast else [True, False]):
        for N in segments:
            print(f"  remat={remat} N={N} ...", flush=True)
            results.append(run_one(cfg, frozen, mcfg.replace(remat=remat), B, N, T, args.repeats))

    rows, fits = [], {}
    for remat in sorted({r["remat"] for r in results}, reverse=True):
        rs = [r for r in results if r["remat"] == remat]
        a, b, resid = linear_fit([r["n_seg"] for r in rs], [r["step"]["median_s"] for r in rs])
        ca, cb, cresid = linear_fit([r["n_seg"] for r in rs], [r["step"]["cpu_median_s"] for r in rs])
        ma, mb, _ = linear_fit([r["n_seg"] for r in rs], [r["memory"]["peak"] for r in rs])
        fits[f"remat={remat}"] = {"time_intercept_s": a, "time_per_segment_s": b, "time_worst_rel_residual": resid,
                                  "cpu_intercept_s": ca, "cpu_per_segment_s": cb, "cpu_worst_rel_residual": cresid,
                                  "peak_bytes_intercept": ma, "peak_bytes_per_segment": mb}
        for r in rs:
            m = r["memory"]
            rows.append({"remat": remat, "segments": r["n_seg"], "tokens": r["tokens"],
                         "step s (median)": r["step"]["median_s"], "s / segment": r["s_per_segment"],
                         "CPU s / segment": r["step"]["cpu_median_s"] / r["n_seg"],
                         "cores used": r["step"]["cores_used"],
                         "peak MiB": m["peak"] / 2**20, "temp MiB": m["temp"] / 2**20,
                         "arg MiB": m["argument"] / 2**20, "out MiB": m["output"] / 2**20,
                         "compile s": r["compile_s"]})
    print()
    common.print_table(rows)
    for k, f in fits.items():
        print(f"{k}: time = {f['time_intercept_s']:.3f} s + {f['time_per_segment_s']:.3f} s x N "
              f"(worst residual {100 * f['time_worst_rel_residual']:.1f}%); CPU time = {f['cpu_intercept_s']:.3f} s + "
              f"{f['cpu_per_segment_s']:.3f} s x N (worst residual {100 * f['cpu_worst_rel_residual']:.1f}%); "
              f"peak memory grows "
              f"{f['peak_bytes_per_segment'] / 2**20:.2f} MiB per segment")
    common.write_result("long_context", {"backbone": {"layers": cfg.num_layers, "hidden": cfg.hidden_size,
                                                      "vocab": cfg.vocab_size},
                                         "batch": B, "seg_len": T, "memory_config": mcfg.to_dict(),
                                         "results": results, "fits": fits}, args.quick)


if __name__ == "__main__":
    main()
