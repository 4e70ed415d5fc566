"""This machine's matmul peak with jnp: the denominator of every FLOP-utilisation figure.

Large square matmuls, jitted, fp32 (default) or bf16 operands accumulated in fp32 (`--dtype bfloat16`, what the
backbone computes with bf16 weights: `gmem_jax.backbones.layers.einsum`), best of N calls per size (on a shared
machine the best call is the one least disturbed by other processes); the peak is the best over sizes.
Importable: `measure_peak_flops()`, so another benchmark measures the peak in the same run (same load) as the
step it divides.

    python -m bench.matmul_peak [--quick] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp

from bench import common


def measure_peak_flops(sizes=(1024, 2048, 4096), repeats: int = 5, verbose: bool = False,
                       dtype: str = "float32") -> dict:
    """[n, n] @ [n, n] in `dtype`, accumulated in fp32 (2 n^3 FLOPs per call), for each size:
    {'peak_flops': best FLOP/s over sizes (wall clock),
     'peak_flops_per_cpu_s': best FLOPs per process-CPU-second (all threads; ~ peak / cores on an idle machine),
     'by_size': {n: {'best_flops', 'median_flops', 'best_flops_per_cpu_s', 'times_s', 'cores_used'}}}."""
    by_size = {}
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    for n in sizes:
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
        t = common.time_calls(lambda: f(a, b).block_until_ready(), repeats, warmup=1)
        flops = 2.0 * n**3
        by_size[n] = {"best_flops": flops / min(t["wall"]), "median_flops": flops / statistics.median(t["wall"]),
                      "best_flops_per_cpu_s": flops / max(min(t["cpu"]), 1e-9),
                      "times_s": [round(x, 5) for x in t["wall"]],
                      "cores_used": statistics.median(t["cpu"]) / statistics.median(t["wall"])}
        if verbose:
            print(f"  n={n:5d}: best {by_size[n]['best_flops'] / 1e9:7.1f} GFLOP/s, "
                  f"median {by_size[n]['median_flops'] / 1e9:7.1f} GFLOP/s")
    return {"peak_flops": max(v["best_flops"] for v in by_size.values()),
            "peak_flops_per_cpu_s": max(v["best_flops_per_cpu_s"] for v in by_size.values()), "by_size": by_size}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small matrices, few repeats (seconds)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    sizes = (256, 512) if args.quick else (1024, 2048, 3072, 4096)
    repeats = args.repeats or (3 if args.quick else 10)
    res = measure_peak_flops(sizes, repeats, dtype=args.dtype)
    rows = [{"n": n, "best GFLOP/s": v["best_flops"] / 1e9, "median GFLOP/s": v["median_flops"] / 1e9,
             "best GFLOP per CPU-s": v["best_flops_per_cpu_s"] / 1e9, "cores used": v["cores_used"]}
            for n, v in res["by_size"].items()]
    common.print_table(rows)
    print(f"\n{args.dtype} matmul peak: {res['peak_flops'] / 1e9:.1f} GFLOP/s wall clock, "
          f"{res['peak_flops_per_cpu_s'] / 1e9:.1f} GFLOP per CPU-second")
    name = "matmul_peak" if args.dtype == "float32" else f"matmul_peak_{args.dtype}"
    common.write_result(name, {"sizes": list(sizes), "repeats": repeats, "dtype": args.dtype, **res}, args.quick)


if __name__ == "__main__":
    main()
