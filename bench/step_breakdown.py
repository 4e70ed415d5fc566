"""Where the train step's time goes: its parts timed one by one, gmem_jax next to the same parts in PyTorch.

GPT-2-124M shape, one segment of batch 4 x 512 tokens, 1024 slots (the train_step / vs_pytorch setting cut to one
segment). Each row adds one piece of work to the row above, so the differences locate the time:
  frozen forward          the 12 blocks and final norm, hidden states only
  + logits                the tied LM head at every position ([4, 512, 50257] fp32)
  memory loss (no grad)   forward_segments: frozen forward + memory read/inject + head + CE + write
  train step              + backward and AdamW (remat on / off)
Wall and process-CPU seconds (medians); GFLOP per CPU-second uses the needed-FLOP model of bench/train_step.py,
so rows are comparable across frameworks even when the machine's load differs between rows.

    python -m bench.step_breakdown [--quick] [--torch-threads 1]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import torch

from bench import common
from bench import torch_ref
from bench.train_step import causal_attention_flops, layer_matmul_params, step_flops
from gmem_jax.backbones.model import forward
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import forward_segments, init_memory
from gmem_jax.training.step import init_train_state, make_optimizer, make_train_step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seg-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=1)
    args = ap.parse_args()
    cfg, B, T = common.gpt2_124m(), args.batch, args.seg_len
    mcfg = MemoryConfig(num_slots=1024, mem_dim=512, injection="final")
    if args.quick:
        cfg, B, T = common.quick_shape(cfg), 2, 64
        mcfg = MemoryConfig(num_slots=64, mem_dim=64, num_heads=4, injection="final")
    torch.set_num_threads(args.torch_threads)
    model = torch_ref.gpt2_torch(cfg)
    cfg, frozen = torch_ref.same_weights_in_jax(model)
    batch_np = common.random_batch(0, B, 1, T, cfg.vocab_size)
    batch = jax.tree.map(jnp.asarray, batch_np)
    tokens = batch["tokens"][:, 0]
    ids = torch.from_numpy(batch_np["tokens"][:, 0]).long()

    full = step_flops(cfg, mcfg, B, 1, T)
    fwd = B * (2 * layer_matmul_params(cfg) * T * cfg.num_layers + causal_attention_flops(cfg, T) * cfg.num_layers)
    head = B * 2 * cfg.hidden_size * cfg.vocab_size * T
    loss_fwd = full["frozen_fwd"] + full["head_fwd"] + full["memory_fwd"]

    mem_params = init_memory(jax.random.key(1), cfg, mcfg)
    opt = make_optimizer(learning_rate=1e-4, total_steps=1000)
    hidden_fn = jax.jit(lambda p, t: forward(p, t, cfg, compute_logits=False).hidden)
    logits_fn = jax.jit(lambda p, t: forward(p, t, cfg).logits)
    loss_fn = jax.jit(lambda m, p, b: forward_segments(m, p, b, cfg, mcfg).loss)
    # each step gets its own copy of the params: the train step donates (deletes) the state it is given
    steps = {r: (make_train_step(cfg, mcfg.replace(remat=r), opt),
                 {"s": init_train_state(jax.tree.map(jnp.copy, mem_params), opt)}) for r in (True, False)}

    def jstep(remat):
        step, holder = steps[remat]
        holder["s"], m = step(holder["s"], frozen, batch)
        jax.block_until_ready(m)

    torch.manual_seed(1)
    tmem = torch_ref.TorchMemory(cfg.hidden_size, mcfg)
    tstep = torch_ref.make_train_step(model, tmem, mcfg)

    def tloss():
        with torch.no_grad():
            state = tmem.initial_state(B)
            torch_ref.segment_forward(model, tmem, state, ids, torch.ones_like(ids))

    def thidden():
        with torch.no_grad():
            model.transformer(input_ids=ids)

    def tlogits():
        with torch.no_grad():
            model(input_ids=ids, output_hidden_states=True)

    parts = [
        ("frozen forward", fwd, lambda: hidden_fn(frozen, tokens).block_until_ready(), thidden),
        ("+ logits", fwd + head, lambda: logits_fn(frozen, tokens).block_until_ready(), tlogits),
        ("memory loss (no grad)", loss_fwd, lambda: loss_fn(mem_params, frozen, batch).block_until_ready(), tloss),
        ("train step, remat on", full["total"], lambda: jstep(True), lambda: tstep(batch_np)),
        ("train step, remat off", full["total"], lambda: jstep(False), None),
    ]
    rows, out = [], []
    for name, flops, jfn, tfn in parts:
        print(f"  {name} ...", flush=True)
        j = common.summary(common.time_calls(jfn, args.repeats, warmup=1))
        t = None if tfn is None else common.summary(common.time_calls(tfn, args.repeats, warmup=1))
        out.append({"part": name, "needed_flops": flops, "gmem_jax": j, "pytorch": t})
        rows.append({"part": name, "needed GFLOP": flops / 1e9, "jax s": j["median_s"], "jax CPU s": j["cpu_median_s"],
                     "jax GFLOP/CPU-s": flops / j["cpu_median_s"] / 1e9,
                     "torch s": "" if t is None else t["median_s"],
                     "torch CPU s": "" if t is None else t["cpu_median_s"],
                     "torch GFLOP/CPU-s": "" if t is None else flops / t["cpu_median_s"] / 1e9})
    print(f"\n(torch threads {args.torch_threads}; the torch 'memory loss' row also computes the frozen logits and "
          "encodes twice, as the author-style code does)\n")
    common.print_table(rows)
    common.write_result("step_breakdown", {"batch": B, "seg_len": T, "torch_threads": args.torch_threads,
                                           "memory_config": mcfg.to_dict(), "parts": out}, args.quick)


if __name__ == "__main__":
    main()
