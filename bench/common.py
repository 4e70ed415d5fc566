"""Shared pieces of the benchmark scripts: real model shapes, a random document batch, timing, result files.

Benchmarks are not tests: each script prints a table and writes bench/results/<name>.json with the machine it
ran on, so a figure can always be traced back to its command, date and load.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---- model shapes (random weights, real dimensions) -----------------------------------------------------------
def gpt2_124m(**kw):
    from gmem_jax.backbones.config import BackboneConfig

    return BackboneConfig(arch="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12,
                          num_kv_heads=12, head_dim=64, intermediate_size=3072, max_position_embeddings=1024,
                          norm_eps=1e-5, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                          bos_token_id=50256, eos_token_ids=(50256,), **kw)


def smollm2_135m(**kw):
    from gmem_jax.backbones.config import BackboneConfig

    return BackboneConfig(arch="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                          num_kv_heads=3, head_dim=64, intermediate_size=1536, max_position_embeddings=8192,
                          norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0, bos_token_id=1,
                          eos_token_ids=(2,), **kw)


def llama31_8b(**kw):
    from gmem_jax.backbones.config import BackboneConfig

    scaling = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
               ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
    return BackboneConfig(arch="llama", vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32,
                          num_kv_heads=8, head_dim=128, intermediate_size=14336, max_position_embeddings=131072,
                          norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0, rope_scaling=scaling,
                          bos_token_id=128000, eos_token_ids=(128001,), **kw)


def quick_shape(cfg):
    """The same architecture family shrunk for --quick runs: 2 layers, d 128, 2 heads, vocab 2048."""
    return cfg.replace(num_layers=2, hidden_size=128, num_heads=2, num_kv_heads=1 if cfg.arch == "llama" else 2,
                       head_dim=64, intermediate_size=256, vocab_size=2048,
                       max_position_embeddings=min(cfg.max_position_embeddings, 1024))


MODELS: dict[str, Callable] = {"gpt2-124m": gpt2_124m, "smollm2-135m": smollm2_135m, "llama3.1-8b": llama31_8b}


def random_batch(rng_seed: int, batch: int, n_seg: int, seg_len: int, vocab: int) -> dict:
    """A language-modelling batch of random documents: tokens/labels [B, N, T] int32, every token real and with
    loss (token_mask True, loss_mask 1), so logits are needed at every position."""
    import numpy as np

    rs = np.random.RandomState(rng_seed)
    seq = rs.randint(0, vocab, size=(batch, n_seg * seg_len + 1)).astype(np.int32)
    shape = (batch, n_seg, seg_len)
    return {"tokens": seq[:, :-1].reshape(shape), "labels": seq[:, 1:].reshape(shape),
            "token_mask": np.ones(shape, bool), "loss_mask": np.ones(shape, np.float32)}


# ---- timing ---------------------------------------------------------------------------------------------------
def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict:
    """Wall and process-CPU seconds of `repeats` calls of fn() after `warmup` untimed calls: {'wall': [...],
    'cpu': [...]}. fn must block until its result is ready (.block_until_ready() / jax.block_until_ready).

    CPU time is summed over all threads of this process; cpu / wall is how many cores the call really got, which
    on a machine shared with other processes is less than the core count."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def summary(t: dict) -> dict:
    """Median/min/max wall seconds of a `time_calls` result, the median CPU seconds and cores used."""
    wall, cpu = t["wall"], t["cpu"]
    med = statistics.median(wall)
    return {"median_s": med, "min_s": min(wall), "max_s": max(wall), "n": len(wall),
            "all_s": [round(x, 4) for x in wall], "cpu_median_s": statistics.median(cpu),
            "cores_used": statistics.median(cpu) / med if med > 0 else None}


# ---- machine info and result files ----------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    import jax

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "jax_backend": jax.default_backend(),
            "devices": len(jax.devices()), "python": platform.python_version(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": _command(),
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:  # other processes share the 2 cores: record the load so contention is visible next to every figure
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        mem_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def _command() -> str:
    """How this process was started, as typed: `python -m bench.<name> args...`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return " ".join(head + sys.argv[1:])


def write_result(name: str, payload: dict, quick: bool) -> Path:
    """bench/results/<name>.json (or <name>.quick.json) with the machine info added."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}{'.quick' if quick else ''}.json"
    path.write_text(json.dumps({"benchmark": name, "quick": quick, "machine": machine_info(), **payload}, indent=2,
                               default=_jsonable) + "\n")
    print(f"\nwrote {path}")
    return path


def _jsonable(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """A plain aligned text table of dict rows."""
    if not rows:
        return
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


# ---- counting the matmul FLOPs a program actually executes ----------------------------------------------------
def jaxpr_matmul_flops(fn: Callable, *args, **kwargs) -> dict:
    """Matmul FLOPs (2 per multiply-add of every dot_general) in the jaxpr of fn(*args), with scan bodies
    multiplied by their length and remat'd (recomputed) code counted again.

    XLA's `cost_analysis()` counts a while-loop body once whatever its trip count, so for code that scans over
    layers and segments it undercounts by those factors; this walks the jaxpr instead. While loops (unknown trip
    count) are counted once and reported in 'while_loops'. XLA may still remove dead code this count includes.
    """
    import jax

    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    counts = {"flops": 0, "while_loops": 0}
    _walk(closed.jaxpr, 1, counts)
    return counts


def _walk(jaxpr, mult: int, counts: dict) -> None:
    import math

    from jax.extend import core as jcore

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            contract = math.prod(lhs[d] for d in lc)
            batch = math.prod(lhs[d] for d in lb)
            lfree = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
            rfree = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
            counts["flops"] += mult * 2 * batch * lfree * rfree * contract
            continue
        inner = mult * (eqn.params["length"] if name == "scan" else 1)
        if name == "while":
            counts["while_loops"] += 1
        subs = []
        for v in eqn.params.values():
            for item in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(item, jcore.ClosedJaxpr):
                    subs.append(item.jaxpr)
                elif isinstance(item, jcore.Jaxpr):
                    subs.append(item)
        if name == "cond":  # one branch runs: count the most expensive
            best = 0
            for sub in subs:
                c = {"flops": 0, "while_loops": 0}
                _walk(sub, inner, c)
                best = max(best, c["flops"])
                counts["while_loops"] += c["while_loops"]
            counts["flops"] += best
        else:
            for sub in subs:
                _walk(sub, inner, counts)
