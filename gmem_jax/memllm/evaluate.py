"""MemLLM on ZsRE: write each edit into a fresh triple store, then ask the edit's questions with MemoryDecoder.

    python -m gmem_jax.memllm.evaluate --model smollm2 --workdir runs/memllm --limit 50

Systems, all on the same records and questions, greedy, one decoding code path (`MemoryDecoder`):
  frozen              the backbone without LoRA, question only, empty store (the no-memory baseline);
  in_prompt           the backbone without LoRA, " " + edit statement, "\\n", question (edit-in-prompt
                      baseline; the three pieces tokenized separately and concatenated, as ZsRETask's "prompt"
                      layout does);
  memllm_gold_write   LoRA model; the gold triple (what memllm.data trains the model to write) is inserted
                      directly, so the scores isolate the model's reading;
  memllm_model_write  LoRA model; the model itself writes the edit: it is given the training write prompt
                      ("The answer to '{src}' is {alt}.") and its MEM_WRITE calls are executed.
Each record gets a fresh in-memory store (so edits cannot help each other). Its questions, as in ZsRETask:
src (reliability), rephrase (generalization), loc (locality) and the portability question, each as
"Question: {q}\\nAnswer:". The answer is the generated text with memory calls removed, up to the first newline
(`answer_text`); generation stops at EOS or at a token containing a newline (the answer is the first line
either way). Scores are `ZsRETask.score`: '{kind}_em' against the gold answers and 'locality' = agreement with
the frozen system's own locality answer.

Besides the task metrics, per system: mean store size, how often the model wrote the gold triple exactly
('write_exact'), read-call rate per question, the share of reads that returned something, store read latency
(ms per query, wall clock around `TripleStore.read`) and seconds per question. `gold_store_reads` reads every
record's gold query from ONE store holding all evaluated edits (no model): retrieval precision at that size.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.memllm.calls import format_query, parse_calls
from gmem_jax.memllm.data import examples_from_record
from gmem_jax.memllm.embed import HashedNgramEmbedder
from gmem_jax.memllm.store import ReadConfig, ReadQuery, Triple, TripleStore
from gmem_jax.tasks.base import QA_PROMPT
from gmem_jax.tasks.metrics import clean_generation, exact_match
from gmem_jax.tasks.zsre import KINDS, ZsreRecord, ZsRETask

SYSTEMS = ("frozen", "in_prompt", "memllm_gold_write", "memllm_model_write")
_CALL = re.compile(r"\(\{.*?\}\)", re.DOTALL)  # "({" ... the first "})": a complete call of any kind


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    max_new_tokens: int = 48  # per generation, model tokens (a read call + answer is ~20-35 SmolLM2 tokens)
    max_calls: int = 4
    max_result_tokens: int = 24
    cache_bucket: int = 64  # KV-cache lengths are rounded up to a multiple: fewer distinct compiled programs
    read_config: ReadConfig = ReadConfig()


def answer_text(generated: str) -> str:
    """The answer in a generation: complete memory calls removed, an unfinished call cut off, first line,
    stripped. " ({MEM_READ(a>>b>>)--> c}) c" -> "c"."""
    text = _CALL.sub(" ", generated)
    unfinished = text.find("({")
    return clean_generation(text if unfinished < 0 else text[:unfinished])


def gold_triple(rec: ZsreRecord) -> Optional[Triple]:
    """The triple memllm.data trains the model to write for this edit (None if the record has no write
    example, i.e. its names cannot be written in a call)."""
    write = examples_from_record(rec, ("write",))
    if not write:
        return None
    (call,) = parse_calls(write[0].target)
    return call.triples[0]


def _stop_on_newline_ids(tokenizer, n: int) -> tuple[int, ...]:
    if hasattr(tokenizer, "batch_decode"):
        texts = tokenizer.batch_decode([[i] for i in range(n)])
    else:
        texts = [tokenizer.decode([i]) for i in range(n)]
    return tuple(i for i, t in enumerate(texts) if "\n" in t)


class _RecordStore:
    """The store the decoder sees: `reset()` swaps in a fresh in-memory TripleStore (one per record); reads are
    timed. Implements what MemoryDecoder uses (read, insert) plus inspection (triples, len, contains)."""

    def __init__(self, read_config: ReadConfig):
        self.embedder = HashedNgramEmbedder()  # shared: its memo survives the per-record stores
        self.read_config = read_config
        self.read_seconds: list[float] = []
        self.inner: Optional[TripleStore] = None
        self.reset()

    def reset(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.inner = TripleStore(":memory:", self.embedder, read_config=self.read_config)

    def read(self, query: ReadQuery, config: Optional[ReadConfig] = None) -> list[str]:
        t0 = time.perf_counter()
        try:
            return self.inner.read(query, config)
        finally:
            self.read_seconds.append(time.perf_counter() - t0)

    def insert(self, triples) -> int:
        return self.inner.insert(triples)

    def triples(self) -> list[Triple]:
        return self.inner.triples()

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, triple) -> bool:
        return triple in self.inner

    def close(self) -> None:
        self.inner.close()


def _make_decoder(cfg, tokenizer, store: _RecordStore, settings: EvalSettings):
    from gmem_jax.memllm.decode import MemoryDecoder

    class BucketedDecoder(MemoryDecoder):
        """Cache lengths rounded up to `cache_bucket`, so prompts of different lengths share the resume
        programs (only the prefill still compiles per prompt length). Extra slots stay masked."""

        def cache_len(self, prompt_len: int, max_new_tokens: int) -> int:
            n = super().cache_len(prompt_len, max_new_tokens)
            return -(-n // settings.cache_bucket) * settings.cache_bucket

    return BucketedDecoder(cfg, tokenizer, store, read_config=settings.read_config, max_calls=settings.max_calls,
                           max_result_tokens=settings.max_result_tokens)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _questions(rec: ZsreRecord, kinds: Sequence[str]) -> list[tuple[str, str, str]]:
    """(kind, question, gold answer) for each kind the record has."""
    return [(kind, *rec.query(kind)) for kind in kinds if rec.query(kind) is not None]


class _Meta:
    """What ZsRETask.score reads from an example: its meta."""

    def __init__(self, meta: dict):
        self.meta = meta


def evaluate_memllm(task: ZsRETask, tokenizer, cfg, *, frozen: dict, adapted: Optional[dict], split: str = "dev",
                    limit: Optional[int] = None, systems: Sequence[str] = SYSTEMS, kinds: Sequence[str] = KINDS,
                    settings: EvalSettings = EvalSettings(), log=None) -> dict:
    """Evaluate the systems (module docstring) on the first `limit` records of `split`.

    frozen: backbone params; adapted: the LoRA-merged params (`merge_lora(frozen, lora, alpha)`; needed by the
    memllm systems). The frozen system always runs (its locality answers are the locality reference). Returns
    {'results': {system: metrics}, 'stats': {system: {...}}, 'predictions': {system: {id: {...}}},
    'gold_store_reads': {...}, 'records': n, 'split': split}."""
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise GmemError(f"unknown MemLLM eval systems {unknown}; choose among {', '.join(SYSTEMS)}")
    systems = ["frozen"] + [s for s in SYSTEMS if s in systems and s != "frozen"]
    if adapted is None and any(s.startswith("memllm") for s in systems):
        raise GmemError("the memllm systems need the LoRA-adapted params (adapted=merge_lora(frozen, lora, alpha))")
    records = task.records(split)[:limit]
    if not records:
        raise GmemError(f"no {split} records to evaluate; check the data file and --limit")
    eos = getattr(tokenizer, "eos_token_id", None)
    store = _RecordStore(settings.read_config)
    decoder = _make_decoder(cfg, tokenizer, store, settings)
    vocab = min(cfg.vocab_size, len(tokenizer))
    stop_ids = tuple(dict.fromkeys(([] if eos is None else [int(eos)]) + list(_stop_on_newline_ids(tokenizer, vocab))))
    sep = _encode(tokenizer, "\n")

    def run(params, prompt_ids):
        t0 = time.perf_counter()
        gen = decoder.generate(params, prompt_ids, max_new_tokens=settings.max_new_tokens, eos_ids=stop_ids)
        text = tokenizer.decode([t for t in gen.tokens if t != eos])
        return {"answer": answer_text(text), "text": text, "seconds": time.perf_counter() - t0,
                "reads": [[[format_query(q) for q in qs], list(res)] for qs, res in gen.reads],
                "writes": [list(t) for t in gen.writes], "stop_reason": gen.stop_reason}

    predictions: dict[str, dict] = {}
    stats: dict[str, dict] = {}
    examples = [_Meta({"id": f"zsre-{rec.index}-{kind}", "task": task.name, "kind": kind, "answers": [answer],
                       "record_index": rec.index}) for rec in records for kind, _, answer in _questions(rec, kinds)]
    for system in systems:
        preds, t_system = {}, time.perf_counter()
        params = frozen if system in ("frozen", "in_prompt") else adapted
        store.read_seconds.clear()
        sizes, write_exact, write_seconds = [], [], []
        for rec in records:
            store.reset()
            if system == "memllm_gold_write":
                gold = gold_triple(rec)
                if gold is not None:
                    store.insert([gold])
            elif system == "memllm_model_write":
                write = examples_from_record(rec, ("write",))
                gold = gold_triple(rec)
                if write:
                    w = run(params, _encode(tokenizer, write[0].prompt))
                    write_seconds.append(w["seconds"])
                    preds[f"zsre-{rec.index}-write"] = w
                write_exact.append(float(gold is not None and gold in store))
            sizes.append(len(store))
            context = _encode(tokenizer, " " + rec.statement()) + sep if system == "in_prompt" else []
            for kind, question, _ in _questions(rec, kinds):
                p = run(params, context + _encode(tokenizer, QA_PROMPT.format(question=question.strip())))
                p["store_size"] = len(store)
                preds[f"zsre-{rec.index}-{kind}"] = p
        if log:
            log(f"{system}: {len(records)} records in {time.perf_counter() - t_system:.0f}s")
        answered = [preds[ex.meta["id"]] for ex in examples]
        reads = [r for p in answered for r in p["reads"]]
        stats[system] = {
            "seconds": time.perf_counter() - t_system,
            "seconds_per_question": float(np.mean([p["seconds"] for p in answered])),
            "store_triples": float(np.mean(sizes)),
            "read_rate": float(np.mean([bool(p["reads"]) for p in answered])),
            "reads": len(reads),
            "read_hit_rate": float(np.mean([bool(res) for _, res in reads])) if reads else None,
            "read_ms": 1e3 * float(np.mean(store.read_seconds)) if store.read_seconds else None,
        }
        if system == "memllm_model_write":
            stats[system]["write_exact"] = float(np.mean(write_exact))
            stats[system]["write_seconds"] = float(np.mean(write_seconds)) if write_seconds else None
        predictions[system] = preds
    store.close()

    results = {}
    for system in systems:
        for ex in examples:  # locality: agreement with the frozen model's own answer
            if ex.meta["kind"] == "locality":
                predictions[system][ex.meta["id"]]["reference"] = predictions["frozen"][ex.meta["id"]]["answer"]
        results[system] = task.score(predictions[system], examples)
    return {"results": results, "stats": stats, "predictions": predictions, "records": len(records),
            "split": split, "gold_store_reads": gold_store_reads(records, settings.read_config),
            "settings": dataclasses.asdict(settings)}


def gold_store_reads(records: Sequence[ZsreRecord], read_config: ReadConfig = ReadConfig()) -> dict:
    """All records' gold triples in ONE store; each record's gold read query (subject>>relation>>): how often
    the first result is its own object, how often it is among the results, and ms per read."""
    golds = [t for rec in records if (t := gold_triple(rec)) is not None]
    if not golds:
        return {"store_triples": 0}
    with TripleStore(":memory:", read_config=read_config) as store:
        store.insert(golds)
        top1, anywhere, seconds = [], [], []
        for t in golds:
            t0 = time.perf_counter()
            got = store.read(ReadQuery(t.subject, t.relation, None))
            seconds.append(time.perf_counter() - t0)
            top1.append(float(bool(got) and exact_match(got[0], [t.object]) > 0))
            anywhere.append(float(any(exact_match(g, [t.object]) > 0 for g in got)))
        return {"store_triples": len(store), "queries": len(golds), "hit_at_1": float(np.mean(top1)),
                "hit_any": float(np.mean(anywhere)), "read_ms": 1e3 * float(np.mean(seconds))}


def markdown_table(report: dict) -> str:
    """Metrics (percent) and stats per system, as a markdown table."""
    systems = list(report["results"])
    metrics = sorted({m for s in systems for m in report["results"][s]})
    lines = ["| metric | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for m in metrics:
        cells = [report["results"][s].get(m) for s in systems]
        lines.append(f"| {m} (%) | " + " | ".join("" if c is None else f"{100 * c:.1f}" for c in cells) + " |")
    keys = [k for k in ("store_triples", "write_exact", "read_rate", "read_hit_rate", "read_ms",
                        "seconds_per_question", "write_seconds") if any(k in report["stats"][s] for s in systems)]
    for k in keys:
        cells = [report["stats"][s].get(k) for s in systems]
        lines.append(f"| {k} | " + " | ".join("" if c is None else f"{c:.3g}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from gmem_jax.memllm.train import LORA_EXPORT, add_common_args

    p = argparse.ArgumentParser(prog="python -m gmem_jax.memllm.evaluate", description=__doc__.split("\n")[0])
    add_common_args(p)
    p.add_argument("--split", default="dev", choices=("train", "dev", "all"))
    p.add_argument("--limit", type=int, default=None, help="evaluate the first K records of the split")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated among {','.join(SYSTEMS)}")
    p.add_argument("--max-new-tokens", type=int, default=EvalSettings.max_new_tokens)
    p.add_argument("--lora", default=None, help=f"exported LoRA folder (default: WORKDIR/{LORA_EXPORT})")
    args = p.parse_args(argv)
    try:
        import jax

        from gmem_jax.memllm.lora import merge_lora
        from gmem_jax.memllm.train import load_lora, load_model

        systems = [s for s in args.systems.split(",") if s]
        task = ZsRETask(args.data)
        t0 = time.time()
        cfg, frozen, tokenizer = load_model(args.model, args.dtype)
        adapted = None
        if any(s.startswith("memllm") for s in systems):
            lora, config = load_lora(args.lora or Path(args.workdir) / LORA_EXPORT, cfg)
            adapted = jax.jit(merge_lora, static_argnums=2)(frozen, lora, float(config["lora"]["alpha"]))
        report = evaluate_memllm(task, tokenizer, cfg, frozen=frozen, adapted=adapted, split=args.split,
                                 limit=args.limit, systems=systems,
                                 settings=EvalSettings(max_new_tokens=args.max_new_tokens),
                                 log=lambda msg: print(msg, file=sys.stderr, flush=True))
        report.update(model=args.model, data=args.data, wall_seconds=time.time() - t0)
    except GmemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.workdir) / f"eval_memllm_{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"{report['records']} {args.split} records, model {args.model}; full report: {out}")
    print(markdown_table(report))
    print("gold_store_reads:", json.dumps(report["gold_store_reads"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
