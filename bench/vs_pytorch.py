"""gmem_jax vs the PyTorch way (bench/torch_ref.py), same GPT-2 shape, batch, segments and slots, side by side
in one run.

1. Train step: gmem_jax `make_train_step` (jitted, remat, logits only where needed) vs the author-style PyTorch
   step (frozen pass with hidden states and frozen logits, memory, augmented logits, CE + regularisers, backward,
   AdamW), at torch intra-op threads 2 and 1: on a shared machine 2 OpenMP threads can be much slower than 1
   (a thread waits at every op's barrier for a descheduled partner), so the ratio is taken against the faster.
2. Generation with memory: gmem_jax cached `generate` with the memory hooks (prefill + KV-cache decode) vs the
   PyTorch loop that re-runs the whole sequence for every new token. gmem_jax twice: with the stacked layer
   weights (`generate` copies them into a per-layer tree on every call) and with them unstacked once
   beforehand (`model.unstack_layers`, what a caller that generates repeatedly does; PyTorch keeps its
   weights per layer from the start).

The frozen GPT-2 weights are the same in both frameworks (the torch model saved as safetensors and loaded with
gmem_jax's loader); the memory weights are each side's own random init (speed does not depend on them).
`--dtype bfloat16` holds the frozen GPT-2 in bf16 on both sides (the memory stays fp32 on both).

    python -m bench.vs_pytorch [--quick] [--n-seg 2] [--prompt-len 256] [--new-tokens 32] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import common
from bench import torch_ref
from gmem_jax import generation
from gmem_jax.backbones.model import unstack_layers
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import init_memory, initial_state
from gmem_jax.training.evaluation import generation_hooks
from gmem_jax.training.step import init_train_state, make_optimizer, make_train_step


def jax_train_times(cfg, frozen, mcfg, batch, repeats):
    mem_params = init_memory(jax.random.key(1), cfg, mcfg)
    opt = make_optimizer(learning_rate=1e-4, total_steps=1000)
    holder = {"state": init_train_state(mem_params, opt)}
    batch = jax.tree.map(jnp.asarray, batch)
    t0 = time.perf_counter()
    step = make_train_step(cfg, mcfg, opt).lower(holder["state"], frozen, batch).compile()
    compile_s = time.perf_counter() - t0

    def run():
        holder["state"], metrics = step(holder["state"], frozen, batch)
        jax.block_until_ready(metrics)

    return common.time_calls(run, repeats, warmup=1), compile_s


def torch_train_times(model, mcfg, batch, repeats, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    mem = torch_ref.TorchMemory(model.config.n_embd, mcfg)
    step = torch_ref.make_train_step(model, mem, mcfg)
    return common.time_calls(lambda: step(batch), repeats, warmup=1)


def jax_generate_times(cfg, frozen, mcfg, prompt, new_tokens, repeats):
    mem_params = init_memory(jax.random.key(1), cfg, mcfg)
    state = initial_state(mem_params, cfg, mcfg, prompt.shape[0])
    hooks = generation_hooks(cfg, mcfg)
    mask = np.ones(prompt.shape, bool)

    def run():
        out = generation.generate(frozen, cfg, prompt, mask, max_new_tokens=new_tokens, eos_ids=(), hooks=hooks,
                                  hook_state=(mem_params, state))
        jax.block_until_ready(out.tokens)

    t0 = time.perf_counter()
    run()  # compile + first run
    first_s = time.perf_counter() - t0
    return common.time_calls(run, repeats, warmup=0), first_s


def torch_generate_times(model, mcfg, prompt, new_tokens, repeats, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    mem = torch_ref.TorchMemory(model.config.n_embd, mcfg).eval()
    state = mem.initial_state(prompt.shape[0]).detach()
    torch_ref.generate_rerun(model, mem, state, prompt, 2)  # warm the allocator / kernels
    return common.time_calls(lambda: torch_ref.generate_rerun(model, mem, state, prompt, new_tokens), repeats,
                             warmup=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--n-seg", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seg-len", type=int, default=512)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--mem-dim", type=int, default=512)
    ap.add_argument("--gen-batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-repeats", type=int, default=2, help="the PyTorch train step is slow")
    ap.add_argument("--torch-gen-repeats", type=int, default=2, help="the re-running loop is slow")
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[2, 1],
                    help="torch intra-op thread counts to measure; the ratio is taken against the fastest")
    ap.add_argument("--tag", default="", help="suffix of the result file: bench/results/vs_pytorch_<tag>.json")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="frozen backbone dtype")
    args = ap.parse_args()
    cfg = common.gpt2_124m()
    B, N, T, P, G = args.batch, args.n_seg, args.seg_len, args.prompt_len, args.new_tokens
    mcfg = MemoryConfig(num_slots=args.slots, mem_dim=args.mem_dim, injection="final")
    if args.quick:
        cfg = common.quick_shape(cfg)
        B, T, P, G = 2, 64, 32, 8
        mcfg = MemoryConfig(num_slots=64, mem_dim=64, num_heads=4, injection="final")

    model = torch_ref.gpt2_torch(cfg, dtype=getattr(torch, args.dtype))
    cfg, frozen = torch_ref.same_weights_in_jax(model)
    print(f"GPT-2 shape: {cfg.num_layers} layers, d {cfg.hidden_size}, vocab {cfg.vocab_size}; backbone {args.dtype}; "
          f"slots {mcfg.num_slots}, mem_dim {mcfg.mem_dim}; torch threads {args.torch_threads}", flush=True)
    out = {"memory_config": mcfg.to_dict(), "torch": torch.__version__, "torch_threads": args.torch_threads,
           "backbone_dtype": args.dtype}
    rows = []

    if not args.skip_train:
        batch = common.random_batch(0, B, N, T, cfg.vocab_size)
        tokens = B * N * T
        print(f"train step: batch {B} x {N} segments x {T} tokens ...", flush=True)
        jt, compile_s = jax_train_times(cfg, frozen, mcfg, batch, args.repeats)
        j = common.summary(jt)
        rows.append({"benchmark": "train step", "system": "gmem_jax", "median s": j["median_s"],
                     "tokens/s": tokens / j["median_s"], "cores used": j["cores_used"], "runs s": j["all_s"]})
        by_threads = {}
        for th in args.torch_threads:
            t = by_threads[th] = common.summary(torch_train_times(model, mcfg, batch, args.torch_repeats, th))
            rows.append({"benchmark": "train step", "system": f"pytorch way ({th} thr)", "median s": t["median_s"],
                         "tokens/s": tokens / t["median_s"], "cores used": t["cores_used"], "runs s": t["all_s"]})
        best = min(by_threads.values(), key=lambda t: t["median_s"])
        out["train"] = {"batch": B, "n_seg": N, "seg_len": T, "tokens_per_step": tokens, "gmem_jax": j,
                        "gmem_jax_compile_s": compile_s, "pytorch_by_threads": by_threads,
                        "gmem_jax_tokens_per_s": tokens / j["median_s"],
                        "pytorch_best_tokens_per_s": tokens / best["median_s"],
                        "speedup": best["median_s"] / j["median_s"],
                        "speedup_by_threads": {th: t["median_s"] / j["median_s"] for th, t in by_threads.items()}}

    if not args.skip_generate:
        prompt = np.random.RandomState(1).randint(0, cfg.vocab_size, (args.gen_batch, P)).astype(np.int32)
        print(f"generation: batch {args.gen_batch}, prompt {P}, {G} new tokens ...", flush=True)
        jg, first_s = jax_generate_times(cfg, frozen, mcfg, prompt, G, args.repeats)
        j = common.summary(jg)
        unstacked = dict(frozen, layers=unstack_layers(frozen["layers"]))
        ju = common.summary(jax_generate_times(cfg, unstacked, mcfg, prompt, G, args.repeats)[0])
        del unstacked
        new = args.gen_batch * G
        for name, r in (("gmem_jax (KV cache)", j), ("gmem_jax (KV cache, layers unstacked once)", ju)):
            rows.append({"benchmark": "generate w/ memory", "system": name, "median s": r["median_s"],
                         "tokens/s": new / r["median_s"], "cores used": r["cores_used"], "runs s": r["all_s"]})
        by_threads = {}
        for th in args.torch_threads:
            t = by_threads[th] = common.summary(
                torch_generate_times(model, mcfg, prompt, G, args.torch_gen_repeats, th))
            rows.append({"benchmark": "generate w/ memory", "system": f"pytorch re-run ({th} thr)",
                         "median s": t["median_s"], "tokens/s": new / t["median_s"], "cores used": t["cores_used"],
                         "runs s": t["all_s"]})
        best = min(by_threads.values(), key=lambda t: t["median_s"])
        out["generate"] = {"batch": args.gen_batch, "prompt_len": P, "new_tokens": G, "gmem_jax": j,
                           "gmem_jax_first_call_s": first_s, "pytorch_rerun_by_threads": by_threads,
                           "gmem_jax_tokens_per_s": new / j["median_s"],
                           "pytorch_best_tokens_per_s": new / best["median_s"],
                           "speedup": best["median_s"] / j["median_s"],
                           "speedup_by_threads": {th: t["median_s"] / j["median_s"] for th, t in by_threads.items()},
                           "gmem_jax_layers_unstacked_once": ju,
                           "speedup_layers_unstacked_once": best["median_s"] / ju["median_s"]}

    print()
    common.print_table(rows)
    for k in ("train", "generate"):
        if k in out:
            per = ", ".join(f"{v:.2f}x vs {th} thr" for th, v in out[k]["speedup_by_threads"].items())
            print(f"{k}: gmem_jax is {out[k]['speedup']:.2f}x the fastest PyTorch-way setting ({per})")
    if "generate" in out:
        print(f"generate, layers unstacked once: {out['generate']['speedup_layers_unstacked_once']:.2f}x the "
              "fastest PyTorch-way setting")
    common.write_result("vs_pytorch" + (f"_{args.tag}" if args.tag else ""), out, args.quick)


if __name__ == "__main__":
    main()
