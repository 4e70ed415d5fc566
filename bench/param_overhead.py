"""Trainable memory parameters vs frozen backbone parameters, against the paper's "< 3%" (G-MemLLM,
arXiv 2602.00015). Shapes only (`jax.eval_shape`): no weights are created, so the 8B model costs nothing.

For GPT-2-124M, SmolLM2-135M and Llama-3.1-8B at 1024 slots x mem_dim 512 (8 write heads), both injections
("final": the [h; r] -> h fusion before the LM head; "residual": a per-channel gate into the residual stream),
with the memory's parameters broken down by module.

    python -m bench.param_overhead [--quick] [--slots 1024] [--mem-dim 512]
"""
from __future__ import annotations

import argparse

import jax

from bench import common
from gmem_jax.backbones.model import count_params, init_params
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import init_memory

PAPER_BOUND = 0.03


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="GPT-2 only")
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--mem-dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    args = ap.parse_args()
    names = ["gpt2-124m"] if args.quick else list(common.MODELS)

    rows, results = [], []
    for name in names:
        cfg = common.MODELS[name]()
        backbone = count_params(jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0)))
        for injection in ("final", "residual"):
            mcfg = MemoryConfig(num_slots=args.slots, mem_dim=args.mem_dim, num_heads=args.heads,
                                injection=injection, read_layer=cfg.num_layers // 2)
            shapes = jax.eval_shape(lambda k: init_memory(k, cfg, mcfg), jax.random.key(1))
            by_module = {k: count_params(v) for k, v in shapes.items()}
            memory = sum(by_module.values())
            ratio = memory / backbone
            results.append({"model": name, "injection": injection, "backbone_params": backbone,
                            "memory_params": memory, "ratio": ratio, "within_paper_bound": ratio < PAPER_BOUND,
                            "by_module": by_module})
            rows.append({"model": name, "injection": injection, "backbone M": backbone / 1e6,
                         "memory M": memory / 1e6, "memory / backbone %": 100 * ratio,
                         "< 3%": "yes" if ratio < PAPER_BOUND else "NO"})
    common.print_table(rows)
    print("\nmemory params by module (M):")
    mods = sorted({m for r in results for m in r["by_module"]})
    common.print_table([{"model": r["model"], "injection": r["injection"],
                         **{m: r["by_module"].get(m, 0) / 1e6 for m in mods}} for r in results])
    common.write_result("param_overhead", {"slots": args.slots, "mem_dim": args.mem_dim, "heads": args.heads,
                                           "paper_bound": PAPER_BOUND, "results": results}, args.quick)


if __name__ == "__main__":
    main()
