"""What `train.feature_cache` buys: the memory train step on cached frozen features vs the step that runs the
frozen backbone, side by side in one run, plus what building the cache costs per segment.

Random weights at the SmolLM2-135M shape, the QA layout of the configs (loss at 8 positions per segment, 1024
slots x 256, final injection): the demo's documents (3 x 32 tokens, also with 64 slots) and ZsRE's (2 x 64
tokens), batch 8.

    python -m bench.feature_cache [--quick] [--repeats 5] [--slots 1024,64]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from gmem_jax.backbones.model import init_params
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import frozen_features, init_memory
from gmem_jax.training.step import init_train_state, make_optimizer, make_train_step


def qa_batch(B: int, N: int, T: int, vocab: int, loss_positions: int) -> dict:
    batch = common.random_batch(0, B, N, T, vocab)
    loss_mask = np.zeros((B, N, T), np.float32)
    loss_mask[:, -1, -loss_positions:] = 1.0  # the answer ends the last segment; the others are context
    return dict(batch, loss_mask=loss_mask)


def bench_layout(name, cfg, mcfg, B, N, T, repeats) -> dict:
    frozen = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    opt = make_optimizer(learning_rate=1e-4, total_steps=1000)
    step = make_train_step(cfg, mcfg, opt)
    batch = jax.tree.map(jnp.asarray, qa_batch(B, N, T, cfg.vocab_size, mcfg.loss_positions))
    feats_fn = jax.jit(frozen_features, static_argnums=3)
    tok, msk = batch["tokens"].reshape(B * N, T), batch["token_mask"].reshape(B * N, T)
    feats = feats_fn(frozen, tok, msk, cfg)["features"].reshape(B, N, T, -1)
    cached = dict(batch, features=feats)
    row = {"layout": name, "batch": B, "n_seg": N, "seg_len": T}
    for label, b in (("backbone_each_step", batch), ("cached_features", cached)):
        holder = {"state": init_train_state(init_memory(jax.random.key(1), cfg, mcfg), opt)}

        def run(b=b):
            holder["state"], metrics = step(holder["state"], frozen, b)
            jax.block_until_ready(metrics)

        row[label + "_ms"] = common.summary(common.time_calls(run, repeats, warmup=1))["median_s"] * 1e3
    build = common.summary(common.time_calls(lambda: jax.block_until_ready(feats_fn(frozen, tok, msk, cfg)), repeats))
    row["speedup"] = row["backbone_each_step_ms"] / row["cached_features_ms"]
    row["cache_build_ms_per_segment"] = build["median_s"] * 1e3 / (B * N)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slots", default="1024,64", help="slot counts for the demo layout (the step's cost that "
                    "remains with cached features scales with them)")
    args = ap.parse_args()
    cfg = common.smollm2_135m()
    if args.quick:
        cfg = common.quick_shape(cfg)
    mcfg = MemoryConfig(num_slots=1024, mem_dim=256, num_heads=4, injection="final", loss_positions=8)
    rows = [bench_layout(f"demo 3x32, {s} slots", cfg, mcfg.replace(num_slots=s), 8, 3, 32, args.repeats)
            for s in map(int, args.slots.split(","))]
    rows.append(bench_layout("zsre 2x64, 1024 slots", cfg, mcfg, 8, 2, 64, args.repeats))
    common.print_table(rows)
    common.write_result("feature_cache", {"model": "smollm2-135m shape, random weights", "memory": mcfg.to_dict(),
                                          "rows": rows}, args.quick)


if __name__ == "__main__":
    main()
