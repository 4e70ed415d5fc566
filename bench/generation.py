"""Generation speed with and without memory, in one framework and against transformers' PyTorch `generate`.

Same GPT-2 weights everywhere (the torch model saved as safetensors and loaded with gmem_jax's loader). Systems:
  hf generate         transformers' cached greedy `generate`, no memory (torch threads 2 and 1, fastest kept)
  gmem_jax            `generation.generate`, KV cache, no memory
  gmem_jax + memory   the same with the memory hooks (every prefilled and decoded token reads the memory)
  + memory, no imp.   memory with importance_in_read=False: isolates what the per-slot importance costs a token
  scan decode         gmem_jax without / with memory, per_layer_decode=False: the decode loop runs the layer scan
                      over the stacked weights (the default before per-layer decoding; for before/after in one run)
For each: the time of prompt + 1 token (prefill) and of prompt + G tokens, median of repeats, the systems
interleaved round by round (so load changes on a shared machine hit all of them); per decoded token
= (t_G - t_1) / (G - 1), in wall and in process-CPU seconds. Memory overhead per token is measured against
gmem_jax without memory.

Sanity checks recorded in the JSON: gmem_jax without memory emits the same greedy tokens as transformers, and
with a freshly initialised memory (its fusion is exactly the identity at init) the same tokens again.

    python -m bench.generation [--quick] [--batch 1] [--prompt-len 128] [--new-tokens 32]
"""
from __future__ import annotations

import argparse

import jax
import numpy as np
import torch

from bench import common
from bench import torch_ref
from gmem_jax import generation
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import init_memory, initial_state
from gmem_jax.training.evaluation import generation_hooks


def jax_runs(frozen, cfg, prompt, G, mcfg=None, mem_params=None, per_layer_decode=None) -> dict:
    """Compile, then return {'run1': prompt + 1 token, 'runG': prompt + G tokens, 'tokens': the G tokens}.

    For batch 1 the 1-token run reuses the G-token executable: it passes the first generated token as the stop
    id, so the decode loop exits after it (the stop set is a traced [1] array either way: `eos_ids=()` becomes
    [-1]). Larger batches get a separate 1-token executable (rows may emit different first tokens)."""
    mask = np.ones(prompt.shape, bool)
    kw = {"per_layer_decode": per_layer_decode}
    if mcfg is not None:
        kw.update(hooks=generation_hooks(cfg, mcfg),
                  hook_state=(mem_params, initial_state(mem_params, cfg, mcfg, prompt.shape[0])))

    def gen(n, eos_ids):
        out = generation.generate(frozen, cfg, prompt, mask, max_new_tokens=n, eos_ids=eos_ids, **kw)
        return np.asarray(out.tokens), np.asarray(out.lengths)

    tokens, _ = gen(G, ())  # compile
    if prompt.shape[0] == 1:
        first = (int(tokens[0, 0]),)
        assert int(gen(G, first)[1][0]) == 1, "the stop-after-first-token trick did not stop"
        run1 = lambda: gen(G, first)
    else:
        gen(1, ())
        run1 = lambda: gen(1, ())
    return {"run1": run1, "runG": lambda: gen(G, ()), "tokens": tokens}


def hf_runs(model, prompt, G, threads) -> dict:
    def at(n):
        torch.set_num_threads(threads)  # set per call: the systems are interleaved
        return torch_ref.hf_generate(model, prompt, n)

    return {"run1": lambda: at(1), "runG": lambda: at(G), "tokens": at(G)}


def interleaved_times(systems: dict, repeats: int) -> dict:
    """Time every system's run1 and runG once per round, round after round, so a change in the machine's load
    hits all systems alike instead of whichever ran during it. -> {name: {'t1': summary, 'tG': summary}}."""
    raw = {n: {"t1": {"wall": [], "cpu": []}, "tG": {"wall": [], "cpu": []}} for n in systems}
    for _ in range(repeats):
        for name, s in systems.items():
            for key, fn in (("t1", s["run1"]), ("tG", s["runG"])):
                t = common.time_calls(fn, 1, warmup=0)
                raw[name][key]["wall"] += t["wall"]
                raw[name][key]["cpu"] += t["cpu"]
    return {n: {k: common.summary(v) for k, v in r.items()} for n, r in raw.items()}


def per_token(r: dict, G: int, key: str = "median_s") -> float:
    """Seconds per decoded token: (t_G - t_1) / (G - 1), wall ('median_s') or CPU ('cpu_median_s')."""
    return (r["tG"][key] - r["t1"][key]) / (G - 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--slots", type=int, default=1024)
    ap.add_argument("--mem-dim", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[2, 1])
    args = ap.parse_args()
    cfg = common.gpt2_124m()
    B, P, G = args.batch, args.prompt_len, args.new_tokens
    mcfg = MemoryConfig(num_slots=args.slots, mem_dim=args.mem_dim, injection="final")
    if args.quick:
        cfg, P, G = common.quick_shape(cfg), 32, 8
        mcfg = MemoryConfig(num_slots=64, mem_dim=64, num_heads=4, injection="final")

    model = torch_ref.gpt2_torch(cfg)
    cfg, frozen = torch_ref.same_weights_in_jax(model)
    prompt = np.random.RandomState(1).randint(0, cfg.vocab_size, (B, P)).astype(np.int32)
    mem_params = init_memory(jax.random.key(1), cfg, mcfg)
    print(f"GPT-2 shape {cfg.num_layers}L d{cfg.hidden_size}; batch {B}, prompt {P}, {G} new tokens; "
          f"slots {mcfg.num_slots}, mem_dim {mcfg.mem_dim}", flush=True)

    print("  compiling / warming up ...", flush=True)
    systems = {f"hf generate ({th} thr)": hf_runs(model, prompt, G, th) for th in args.torch_threads}
    systems["gmem_jax"] = jax_runs(frozen, cfg, prompt, G)
    systems["gmem_jax + memory"] = jax_runs(frozen, cfg, prompt, G, mcfg, mem_params)
    systems["gmem_jax + memory (no importance in read)"] = jax_runs(
        frozen, cfg, prompt, G, mcfg.replace(importance_in_read=False), mem_params)
    systems["gmem_jax, scan decode"] = jax_runs(frozen, cfg, prompt, G, per_layer_decode=False)
    systems["gmem_jax + memory, scan decode"] = jax_runs(frozen, cfg, prompt, G, mcfg, mem_params,
                                                         per_layer_decode=False)
    print(f"  timing {args.repeats} interleaved rounds ...", flush=True)
    times = interleaved_times(systems, args.repeats)

    base, base_cpu = per_token(times["gmem_jax"], G), per_token(times["gmem_jax"], G, "cpu_median_s")
    rows, payload = [], {}
    for name, r in times.items():
        pt, pc = per_token(r, G), per_token(r, G, "cpu_median_s")
        rows.append({"system": name, "prompt+1 s": r["t1"]["median_s"], f"prompt+{G} s": r["tG"]["median_s"],
                     "ms / token": 1e3 * pt, "CPU ms / token": 1e3 * pc, "decode tokens/s": B / pt,
                     "vs no memory": pt / base, "vs no memory (CPU)": pc / base_cpu,
                     "cores used": r["tG"]["cores_used"]})
        payload[name] = {"t1": r["t1"], "tG": r["tG"], "per_token_s": pt, "per_token_cpu_s": pc,
                         "per_token_vs_no_memory": pt / base, "per_token_cpu_vs_no_memory": pc / base_cpu}
    hf_name = min((n for n in times if n.startswith("hf")), key=lambda n: per_token(times[n], G))
    ref = systems[hf_name]["tokens"]
    checks = {f"{n}_tokens_match_{hf_name}": float((systems[n]["tokens"] == ref).mean())
              for n in ("gmem_jax", "gmem_jax + memory", "gmem_jax, scan decode", "gmem_jax + memory, scan decode")}
    overhead = payload["gmem_jax + memory"]["per_token_vs_no_memory"] - 1
    overhead_cpu = payload["gmem_jax + memory"]["per_token_cpu_vs_no_memory"] - 1
    no_imp = payload["gmem_jax + memory (no importance in read)"]
    scan_overhead = (payload["gmem_jax + memory, scan decode"]["per_token_s"]
                     / payload["gmem_jax, scan decode"]["per_token_s"] - 1)
    print()
    common.print_table(rows)
    print(f"\nmemory overhead per decoded token (gmem_jax): {100 * overhead:+.1f}% wall, "
          f"{100 * overhead_cpu:+.1f}% CPU "
          f"(without importance in read: {100 * (no_imp['per_token_vs_no_memory'] - 1):+.1f}% wall, "
          f"{100 * (no_imp['per_token_cpu_vs_no_memory'] - 1):+.1f}% CPU); with the scan decode: "
          f"{100 * scan_overhead:+.1f}% wall")
    print(f"greedy tokens equal to {hf_name}: " + ", ".join(f"{k.split('_tokens')[0]} {100 * v:.0f}%"
                                                           for k, v in checks.items()))
    common.write_result("generation", {"batch": B, "prompt_len": P, "new_tokens": G, "memory_config": mcfg.to_dict(),
                                       "systems": payload, "memory_overhead_per_token": overhead,
                                       "memory_overhead_per_token_cpu": overhead_cpu,
                                       "memory_overhead_per_token_scan_decode": scan_overhead, "checks": checks},
                        args.quick)


if __name__ == "__main__":
    main()
