"""Throughput and FLOP utilisation of the memory train step (`make_train_step`) at real backbone shapes.

Random weights at the GPT-2-124M and SmolLM2-135M shapes; batch 4 x n_seg segments x 512 tokens, language-model
loss at every position, 1024 slots, mem_dim 512, injection "final". Reported: tokens/s (all tokens of the
document), the FLOPs the step *needs* (model below) per second as a fraction of this machine's fp32 matmul peak
(measured in the same run, before and after the step timings, best taken) -- also per CPU-second the process
actually got, which discounts other processes' load on a shared machine; the matmul FLOPs the step actually
executes (counted in its jaxpr: rematerialisation, full-square attention and duplicated work included); and
XLA's own `compiled.cost_analysis()` count, which counts each scan (while-loop) body once and so undercounts.
`--dtype bfloat16` holds the frozen backbone in bf16 (its matmuls accumulate in fp32; the trainable memory stays
fp32) and reports utilisation against both the fp32 and the bf16 matmul peak of the same run.

    python -m bench.train_step [--quick] [--models gpt2-124m smollm2-135m] [--n-seg 2] [--repeats 3] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from bench import common
from bench.matmul_peak import measure_peak_flops
from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.model import count_params, init_params
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import init_memory
from gmem_jax.training.step import init_train_state, make_optimizer, make_train_step


# ---- the FLOP model: matmul FLOPs the step needs (2 per multiply-add) -----------------------------------------
# Elementwise work (norms, softmax, GELU, the optimizer update) is left out, as is usual for utilisation figures;
# so are rematerialisation and any duplicated work, which cost time but are not *needed*.
def layer_matmul_params(cfg: BackboneConfig) -> int:
    """Weights one token multiplies through in one block: q, k, v, o and the MLP (2 matrices GPT-2, 3 Llama)."""
    D, H, K, E, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    attn = D * H * E + 2 * D * K * E + H * E * D
    mlp = (2 if cfg.arch == "gpt2" else 3) * D * F
    return attn + mlp


def causal_attention_flops(cfg: BackboneConfig, T: int) -> int:
    """Scores q.k and the weighted sum of v for one sequence of T tokens in one layer, counting only the keys a
    causal query may see (token t sees t + 1 keys): 2 matmuls x 2 FLOPs x H x E x T(T+1)/2."""
    return 4 * cfg.num_heads * cfg.head_dim * T * (T + 1) // 2


def memory_forward_flops(cfg: BackboneConfig, mcfg: MemoryConfig, T: int) -> dict:
    """Forward matmul FLOPs of the memory for one example and one segment of T tokens.

    The encoder E(h) is counted once per segment: read and write see the same extracted hidden states."""
    D, S, M = cfg.hidden_size, mcfg.num_slots, mcfg.mem_dim
    n_gates = 2 if mcfg.gate == "gru" else 1
    importance = 2 * S * (M * max(M // 4, 1) + max(M // 4, 1))  # MLP(Mem) -> s, per use
    encode = 2 * T * (D * 2 * M + 2 * M * M)
    read = 2 * T * S * M * 2 + 2 * T * (M * D + D * D)  # scores + weighted sum over slots, decoder D(r)
    read += importance if mcfg.importance_in_read else 0
    inject = 2 * T * (2 * D * D) if mcfg.injection == "final" else 0  # W[h; r]
    write = 2 * S * M * M * 2 + 2 * 2 * T * M * M + 2 * 2 * S * T * M  # q/out proj (slots), k/v proj (tokens), attn
    write += 2 * S * 2 * M * n_gates * M + (2 * S * 2 * M * M if mcfg.gate == "gru" else 0)
    write += importance  # s of the new state, for the sparsity / entropy regularisers
    return {"encode": encode, "read": read, "inject": inject, "write": write}


def step_flops(cfg: BackboneConfig, mcfg: MemoryConfig, B: int, N: int, T: int) -> dict:
    """Needed FLOPs of one train step over B documents of N segments of T tokens, by part."""
    L, D, V = cfg.num_layers, cfg.hidden_size, cfg.vocab_size
    K = min(mcfg.loss_positions, T) if mcfg.loss_positions else T  # positions per segment that need logits
    seqs = B * N
    # frozen forward: every token through every block, plus causal attention
    frozen_fwd = seqs * (2 * layer_matmul_params(cfg) * T * L + causal_attention_flops(cfg, T) * L)
    # the frozen layers above a residual injection point need their backward w.r.t. activations only (no weight
    # gradients): one forward's worth of matmuls, and 2x for attention (dQ, dK from dS; dP, dV from dO).
    if mcfg.injection == "residual":
        above = L - mcfg.read_layer
        frozen_bwd = seqs * (2 * layer_matmul_params(cfg) * T * above + 2 * causal_attention_flops(cfg, T) * above)
    else:
        frozen_bwd = 0  # final injection: nothing trainable below the final norm, no backward through the stack
    head_fwd = seqs * 2 * D * V * K  # logits only where a loss is taken
    head_bwd = seqs * 2 * D * V * K  # d hidden = d logits @ W (the frozen head needs no weight gradient)
    mem = memory_forward_flops(cfg, mcfg, T)
    mem_fwd = seqs * sum(mem.values())
    # backward of the memory: activation + weight gradients (2x forward) except the encoder's input gradient
    # (its input, the frozen hidden states, needs none).
    mem_bwd = 2 * mem_fwd - seqs * 2 * T * D * 2 * mcfg.mem_dim
    parts = {"frozen_fwd": frozen_fwd, "frozen_bwd": frozen_bwd, "head_fwd": head_fwd, "head_bwd": head_bwd,
             "memory_fwd": mem_fwd, "memory_bwd": mem_bwd}
    parts["total"] = sum(parts.values())
    return parts


def xla_flops(compiled) -> float | None:
    """XLA's FLOP estimate of a compiled executable (a dict, or a list of one dict in older jax)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    return float(ca.get("flops", 0.0)) if ca else None


def bench_model(name: str, cfg: BackboneConfig, mcfg: MemoryConfig, B: int, N: int, T: int, repeats: int) -> dict:
    frozen = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    mem_params = init_memory(jax.random.key(1), cfg, mcfg)
    opt = make_optimizer(learning_rate=1e-4, total_steps=1000)
    state = init_train_state(mem_params, opt)
    batch = jax.tree.map(jnp.asarray, common.random_batch(0, B, N, T, cfg.vocab_size))
    step = make_train_step(cfg, mcfg, opt)

    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    compile_s = time.perf_counter() - t0
    xla = xla_flops(compiled)
    executed = common.jaxpr_matmul_flops(step, state, frozen, batch)["flops"]

    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)

    times = common.time_calls(run, repeats, warmup=1)
    med = common.summary(times)
    flops = step_flops(cfg, mcfg, B, N, T)
    tokens = B * N * T
    return {"model": name, "backbone_params": count_params(frozen), "memory_params": count_params(mem_params),
            "batch": B, "n_seg": N, "seg_len": T, "tokens_per_step": tokens, "compile_s": compile_s,
            "step": med, "tokens_per_s": tokens / med["median_s"], "needed_flops": flops,
            "needed_flops_per_s": flops["total"] / med["median_s"], "executed_flops": executed,
            "executed_flops_per_s": executed / med["median_s"], "xla_flops": xla,
            "xla_flops_per_s": None if xla is None else xla / med["median_s"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--models", nargs="+", default=["gpt2-124m", "smollm2-135m"], choices=["gpt2-124m", "smollm2-135m"])
    ap.add_argument("--n-seg", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seg-len", type=int, default=512)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--mem-dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="frozen backbone dtype")
    args = ap.parse_args()
    B, N, T = args.batch, args.n_seg, args.seg_len
    mcfg = MemoryConfig(num_slots=args.slots, mem_dim=args.mem_dim, injection="final")
    if args.quick:
        B, T, mcfg = 2, 64, MemoryConfig(num_slots=64, mem_dim=64, num_heads=4, injection="final")
    peak_sizes = (256, 512) if args.quick else (1024, 2048, 4096)

    before = measure_peak_flops(peak_sizes, repeats=5)
    peak_bf16 = measure_peak_flops(peak_sizes, repeats=5, dtype="bfloat16") if args.dtype == "bfloat16" else None
    results = []
    for name in args.models:
        cfg = common.MODELS[name]().replace(dtype=args.dtype, param_dtype=args.dtype)
        if args.quick:
            cfg = common.quick_shape(cfg)
        print(f"[{name}] B={B} N={N} T={T} slots={mcfg.num_slots} mem_dim={mcfg.mem_dim} backbone {args.dtype} ...",
              flush=True)
        results.append(bench_model(name, cfg, mcfg, B, N, T, args.repeats))
    after = measure_peak_flops(peak_sizes, repeats=5)
    peak_before, peak_after = before["peak_flops"], after["peak_flops"]
    peak = max(peak_before, peak_after)
    peak_cpu = max(before["peak_flops_per_cpu_s"], after["peak_flops_per_cpu_s"])

    rows = []
    for r in results:
        r["utilisation_needed"] = r["needed_flops_per_s"] / peak
        # contention-robust view: FLOPs per CPU-second this process got, vs the matmul's FLOPs per CPU-second
        r["utilisation_needed_per_cpu_s"] = r["needed_flops"]["total"] / r["step"]["cpu_median_s"] / peak_cpu
        r["utilisation_xla"] = None if r["xla_flops_per_s"] is None else r["xla_flops_per_s"] / peak
        rows.append({"model": r["model"], "step s (median)": r["step"]["median_s"], "tokens/s": r["tokens_per_s"],
                     "needed TFLOP": r["needed_flops"]["total"] / 1e12,
                     "needed GFLOP/s": r["needed_flops_per_s"] / 1e9, "% peak": 100 * r["utilisation_needed"],
                     "% peak per CPU-s": 100 * r["utilisation_needed_per_cpu_s"], "cores used": r["step"]["cores_used"],
                     "executed TFLOP": r["executed_flops"] / 1e12,
                     "executed % peak": 100 * r["executed_flops_per_s"] / peak,
                     "XLA TFLOP": (r["xla_flops"] or 0) / 1e12, "compile s": r["compile_s"]})
        if peak_bf16 is not None:
            r["utilisation_needed_bf16_peak"] = r["needed_flops_per_s"] / peak_bf16["peak_flops"]
            rows[-1]["% bf16 peak"] = 100 * r["utilisation_needed_bf16_peak"]
    print(f"\nfp32 matmul peak (best of before/after): {peak / 1e9:.1f} GFLOP/s "
          f"(before {peak_before / 1e9:.1f}, after {peak_after / 1e9:.1f})\n")
    common.print_table(rows)
    for r in results:
        total = r["needed_flops"]["total"]
        parts = ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in r["needed_flops"].items() if k != "total")
        print(f"  {r['model']} needed FLOPs by part: {parts}")
    print("  executed = matmul FLOPs in the step's jaxpr (scan bodies x length, remat recomputation included);\n"
          "  XLA = compiled.cost_analysis()['flops'], which counts each while-loop (scan) body once.")
    print(f"fp32 matmul FLOPs per CPU-second: {peak_cpu / 1e9:.1f} G (the per-CPU-s utilisation divides by this)")
    if peak_bf16 is not None:
        print(f"bf16 matmul peak (fp32 accumulation): {peak_bf16['peak_flops'] / 1e9:.1f} GFLOP/s")
    name = "train_step" if args.dtype == "float32" else f"train_step_{args.dtype}"
    common.write_result(name, {"peak_flops": peak, "peak_before": peak_before, "peak_after": peak_after,
                               "peak_flops_per_cpu_s": peak_cpu, "backbone_dtype": args.dtype,
                               "peak_bf16": peak_bf16,
                                       "memory_config": mcfg.to_dict(), "results": results}, args.quick)


if __name__ == "__main__":
    main()
