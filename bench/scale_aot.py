"""Does Llama-3.1-8B + a 1024-slot memory train on 16 GiB chips? An ahead-of-time compile, no weights.

The train step (`make_train_step`, memory remat on) is lowered with abstract arguments only
(`jax.ShapeDtypeStruct` carrying their shardings) for an 8-device FSDP mesh of simulated CPU devices, frozen
params in bf16, a 4096-token document as 8 segments x 512 tokens, one document per device (batch 8), and
compiled; XLA's memory analysis of the partitioned program is the per-device footprint (temp + argument + output
bytes; the donated state's alias bytes are reported too). Compared with 16 GiB of HBM per TPU v5e chip.

The CPU compiler is not the TPU compiler (different fusion and scheduling), so the figure is an estimate of
the partitioned program's live buffers, not a TPU measurement.

    python -m bench.scale_aot [--quick] [--segments 8] [--seg-len 512] [--devices 8] [--no-remat] [--explain]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _set_device_count() -> int:
    """Simulated CPU devices must be requested before jax is imported."""
    n = 8
    for i, a in enumerate(sys.argv):
        if a == "--devices" and i + 1 < len(sys.argv):
            n = int(sys.argv[i + 1])
        elif a.startswith("--devices="):
            n = int(a.split("=", 1)[1])
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags = f"{flags} --xla_force_host_platform_device_count={n}"
    if "--explain" in sys.argv:  # XLA writes its buffer report for the compiled step here
        flags = f"{flags} --xla_dump_to={EXPLAIN_DIR} --xla_dump_hlo_pass_re=NONE --xla_dump_hlo_module_re=train_step"
    os.environ["XLA_FLAGS"] = flags.strip()
    return n


EXPLAIN_DIR = tempfile.mkdtemp(prefix="gmem_scale_aot_") if "--explain" in sys.argv else ""
_N_DEVICES = _set_device_count()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from gmem_jax.backbones.model import count_params, init_params  # noqa: E402
from gmem_jax.memory.config import MemoryConfig  # noqa: E402
from gmem_jax.memory.model import init_memory  # noqa: E402
from gmem_jax.training import sharding  # noqa: E402
from gmem_jax.training.step import init_train_state, make_optimizer, make_train_step  # noqa: E402

HBM_PER_CHIP = 16 * 2**30  # TPU v5e


def abstract(tree, shardings):
    """ShapeDtypeStructs of a shape tree, each with its sharding: what `lower` needs instead of arrays."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def print_largest_buffers(dump_dir: str, n: int = 12) -> None:
    """The head of XLA's memory-usage report: the largest allocations and the values (shapes) sharing each."""
    reports = sorted(Path(dump_dir).glob("*train_step*memory-usage-report.txt"))
    if not reports:
        print(f"(no memory-usage report found in {dump_dir})")
        return
    lines = reports[-1].read_text().splitlines()
    print(f"\nlargest per-device allocations ({reports[-1].name}):")
    for line in lines[:n + 4]:
        print("  " + (line if len(line) < 240 else line[:237] + "..."))
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small Llama shape (seconds)")
    ap.add_argument("--devices", type=int, default=8, help="simulated CPU devices = FSDP mesh size")
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--seg-len", type=int, default=512)
    ap.add_argument("--per-device-batch", type=int, default=1)
    ap.add_argument("--no-remat", action="store_true", help="memory remat off, for contrast")
    ap.add_argument("--explain", action="store_true",
                    help="print the largest buffers of XLA's per-device memory-usage report")
    args = ap.parse_args()
    if len(jax.devices()) != _N_DEVICES:
        raise SystemExit(f"expected {_N_DEVICES} devices, got {len(jax.devices())}; is XLA_FLAGS set elsewhere?")

    cfg = common.llama31_8b(dtype="bfloat16", param_dtype="bfloat16")
    N, T = args.segments, args.seg_len
    mcfg = MemoryConfig(num_slots=1024, mem_dim=512, injection="final", remat=not args.no_remat)
    if args.quick:
        cfg = common.quick_shape(cfg).replace(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512)
        N, T = 2, 64
        mcfg = mcfg.replace(num_slots=64, mem_dim=64, num_heads=4)
    B = args.per_device_batch * _N_DEVICES
    mesh = sharding.make_mesh({"fsdp": _N_DEVICES})

    frozen_shapes = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
    opt = make_optimizer(learning_rate=1e-4, total_steps=1000)
    state_shapes = jax.eval_shape(lambda k: init_train_state(init_memory(k, cfg, mcfg), opt), jax.random.key(1))
    frozen = abstract(frozen_shapes, sharding.tree_shardings(frozen_shapes, mesh, sharding.BACKBONE_RULES))
    state = abstract(state_shapes, sharding.tree_shardings(state_shapes, mesh, sharding.memory_rules()))
    bs = sharding.batch_sharding(mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((B, N, T), jnp.int32, sharding=bs),
             "labels": jax.ShapeDtypeStruct((B, N, T), jnp.int32, sharding=bs),
             "token_mask": jax.ShapeDtypeStruct((B, N, T), jnp.bool_, sharding=bs),
             "loss_mask": jax.ShapeDtypeStruct((B, N, T), jnp.float32, sharding=bs)}

    n_backbone, n_memory = count_params(frozen_shapes), count_params(state_shapes["params"])
    print(f"backbone {n_backbone / 1e9:.2f} B params bf16, memory {n_memory / 1e6:.2f} M params fp32; "
          f"mesh fsdp={_N_DEVICES}; batch {B} x {N} segments x {T} tokens; remat={mcfg.remat}", flush=True)
    step = make_train_step(cfg, mcfg, opt)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # activations batch-sharded (sharding.constrain_batch), as in the trainer
        lowered = step.lower(state, frozen, batch)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    mem = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("temp", "argument", "output", "alias")}
    mem["peak"] = mem["temp"] + mem["argument"] + mem["output"]
    mem["peak_minus_alias"] = mem["peak"] - mem["alias"]
    frozen_per_device = sum(x.size * x.dtype.itemsize / _N_DEVICES for x in jax.tree.leaves(frozen_shapes))

    rows = [{"quantity": k, "GiB per device": common.gib(v)} for k, v in mem.items()]
    rows.append({"quantity": "frozen params / devices (ideal FSDP)", "GiB per device": common.gib(frozen_per_device)})
    common.print_table(rows)
    if args.explain:
        print_largest_buffers(EXPLAIN_DIR)
    fits = mem["peak"] <= HBM_PER_CHIP
    print(f"\nper-device peak {common.gib(mem['peak']):.2f} GiB (temp + argument + output) vs 16 GiB per v5e chip: "
          f"{'fits' if fits else 'does NOT fit'} ({100 * mem['peak'] / HBM_PER_CHIP:.0f}% of HBM); "
          f"lower {lower_s:.1f} s, compile {compile_s:.1f} s")
    common.write_result("scale_aot" + ("_no_remat" if args.no_remat else ""), {
        "model": "llama3.1-8b (shape)" if not args.quick else "small llama (quick)", "devices": _N_DEVICES,
        "mesh": {"fsdp": _N_DEVICES}, "batch": B, "n_seg": N, "seg_len": T, "frozen_dtype": cfg.param_dtype,
        "memory_config": mcfg.to_dict(), "backbone_params": n_backbone, "memory_params": n_memory,
        "memory_bytes_per_device": mem, "frozen_bytes_per_device_ideal": frozen_per_device,
        "hbm_per_chip_bytes": HBM_PER_CHIP, "fits_16gib": fits, "lower_s": lower_s, "compile_s": compile_s,
    }, args.quick)


if __name__ == "__main__":
    main()
