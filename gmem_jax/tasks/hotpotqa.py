"""HotpotQA: multi-hop QA over Wikipedia paragraphs, with supporting-fact labels per sentence.

Sources: the original JSON list (e.g. distractor dev), JSONL (one record a line, e.g. a fullwiki slice), or
the hub `hotpotqa/hotpot_qa` layout (context = {"title": [...], "sentences": [[...]]}, supporting_facts =
{"title": [...], "sent_id": [...]}); `normalize_hotpot_records` accepts any iterable of such dicts.

Layout: each paragraph is a title line (" {title}:", no sentence slot) followed by its sentences (one slot
each, key (title, sent_id), label 1 for gold supporting facts), paragraph-aligned in segments (a paragraph
that does not fit in the current segment starts a new one; sentences are never split unless longer than a
segment). The question is the last segment: "Question: ...\\nAnswer:" + " {answer}" + EOS.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.tasks import hotpot_metrics
from gmem_jax.tasks.base import QA_PROMPT, SegmentedExample, Task, check_dims, record_error, resolve_records
from gmem_jax.tasks.segment import Unit, sentence_units

HUB_ID = "hotpotqa/hotpot_qa"
HUB_SPLITS = {"dev": "validation", "valid": "validation"}


@dataclasses.dataclass(frozen=True)
class HotpotRecord:
    id: str
    question: str
    answer: str
    context: tuple[tuple[str, tuple[str, ...]], ...]  # ((title, (sentence, ...)), ...) in source order
    supporting_facts: tuple[tuple[str, int], ...]  # ((title, sent_id), ...)
    type: str = ""
    level: str = ""


def normalize_hotpot_records(records: Iterable[Mapping], source: str = "records") -> list[HotpotRecord]:
    """Original / JSONL / hub-layout dicts -> HotpotRecords. A malformed record raises GmemError naming the
    source, the record index and id, and the field. Records without an answer (test sets) get answer ''."""
    out = []
    for index, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise GmemError(f"{source}: record {index} is a {type(rec).__name__}, not an object; "
                            "each record must be a HotpotQA JSON object")
        rid = rec.get("_id", rec.get("id"))
        bad = functools.partial(record_error, source, index, rid)  # bad(field, problem[, fix]) -> GmemError

        if not isinstance(rid, str) or not rid:
            raise bad("_id", "is missing or not a string", "every record needs an '_id' (or hub 'id') string")
        if not isinstance(rec.get("question"), str) or not rec["question"].strip():
            raise bad("question", "is missing or empty")
        answer = rec.get("answer", "")
        if not isinstance(answer, str):
            raise bad("answer", f"is a {type(answer).__name__}, not a string")
        out.append(HotpotRecord(rid, rec["question"], answer, _context(rec.get("context"), bad),
                                _supporting_facts(rec.get("supporting_facts", []), bad),
                                str(rec.get("type", "")), str(rec.get("level", ""))))
    return out


def _context(ctx: Any, bad) -> tuple:
    if isinstance(ctx, Mapping):  # hub layout
        titles, sentences = ctx.get("title"), ctx.get("sentences")
        if not isinstance(titles, Sequence) or not isinstance(sentences, Sequence) or len(titles) != len(sentences):
            raise bad("context", "hub layout needs 'title' and 'sentences' lists of equal length")
        pairs = list(zip(titles, sentences))
    elif isinstance(ctx, Sequence) and not isinstance(ctx, str):
        if not all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in ctx):
            raise bad("context", "must be a list of [title, [sentences]] pairs")
        pairs = [tuple(p) for p in ctx]
    else:
        raise bad("context", f"is a {type(ctx).__name__}; expected [[title, [sentences]], ...] or "
                             "{'title': [...], 'sentences': [[...]]}")
    out = []
    for p, (title, sents) in enumerate(pairs):
        if not isinstance(title, str) or isinstance(sents, str) or not isinstance(sents, Sequence) \
                or not all(isinstance(s, str) for s in sents):
            raise bad(f"context[{p}]", "must be a title string and a list of sentence strings")
        out.append((title, tuple(sents)))
    return tuple(out)


def _supporting_facts(sp: Any, bad) -> tuple:
    if isinstance(sp, Mapping):  # hub layout
        titles, ids = sp.get("title"), sp.get("sent_id")
        if not isinstance(titles, Sequence) or not isinstance(ids, Sequence) or len(titles) != len(ids):
            raise bad("supporting_facts", "hub layout needs 'title' and 'sent_id' lists of equal length")
        pairs = list(zip(titles, ids))
    elif isinstance(sp, Sequence) and not isinstance(sp, str):
        pairs = [tuple(p) if isinstance(p, Sequence) and not isinstance(p, str) else (p,) for p in sp]
    else:
        raise bad("supporting_facts", f"is a {type(sp).__name__}; expected [[title, sent_id], ...]")
    for p in pairs:
        if len(p) != 2 or not isinstance(p[0], str) or not isinstance(p[1], (int, np.integer)) \
                or isinstance(p[1], bool):
            raise bad("supporting_facts", f"has entry {list(p)!r}; each must be [title, integer sent_id]")
    return tuple((t, int(i)) for t, i in pairs)


def load_hotpot_file(path: str) -> list[HotpotRecord]:
    """Records of one local HotpotQA file (JSON list or JSONL)."""
    records, name = resolve_records(path, "file")
    return normalize_hotpot_records(records, name)


class HotpotQATask(Task):
    """HotpotQA as SegmentedExamples; `score` gives the official 12 metrics.

    source: a local file, a {split: file} mapping, a hub id (default: hotpotqa/hotpot_qa, config `hub_config`;
    'dev' means the hub's 'validation') or an iterable of records. `include_titles` adds a " {title}:" line
    before each paragraph (context tokens, no sentence slot). `exclude_ids`: question ids to drop, or a HotpotQA
    file whose ids are dropped (train on one file while evaluating on another that shares questions).
    """

    name = "hotpotqa"

    def __init__(self, source: Any = HUB_ID, *, hub_config: str = "distractor", include_titles: bool = True,
                 layout: str = "memory", window: int | None = None, overflow: str = "drop_oldest",
                 exclude_ids: Sequence[str] | str | None = None):
        super().__init__(layout=layout, window=window, overflow=overflow)
        self.source, self.hub_config, self.include_titles = source, hub_config, include_titles
        if isinstance(exclude_ids, str):
            exclude_ids = [r.id for r in load_hotpot_file(exclude_ids)]
        self.exclude_ids = frozenset(exclude_ids or ())

    def records(self, split: str) -> list[HotpotRecord]:
        raw, name = resolve_records(self.source, split, hub_config=self.hub_config, hub_splits=HUB_SPLITS)
        return [r for r in normalize_hotpot_records(raw, name) if r.id not in self.exclude_ids]

    def examples(self, split: str, tokenizer: Any, *, n_seg: int, seg_len: int, max_sents: int, seed: int = 0,
                 limit: int | None = None) -> list[SegmentedExample]:
        """One example per question in source order (no randomness: `seed` is unused)."""
        check_dims(self.name, n_seg, seg_len, max_sents)
        records = self.records(split)[:limit]
        return [self.build(tokenizer, self.units(r, tokenizer), r.question, r.answer,
                           {"id": r.id, "task": self.name, "answers": [r.answer],
                            "supporting_facts": [list(f) for f in r.supporting_facts], "type": r.type,
                            "level": r.level},
                           n_seg=n_seg, seg_len=seg_len, max_sents=max_sents) for r in records]

    def units(self, record: HotpotRecord, tokenizer: Any) -> list[Unit]:
        """Title line + sentences of each paragraph, grouped by paragraph."""
        gold = set(record.supporting_facts)
        rows = []  # (text, key, slot, group)
        for p, (title, sents) in enumerate(record.context):
            if self.include_titles:
                rows.append((f"{title}:", None, False, p))
            rows += [(sent, (title, i), True, p) for i, sent in enumerate(sents)]
        texts, keys, slots, groups = (list(col) for col in zip(*rows)) if rows else ([], [], [], [])
        return sentence_units(tokenizer, texts, keys=keys, labels=[float(k in gold) for k in keys], slots=slots,
                              groups=groups)

    def score(self, predictions: Mapping[str, Mapping[str, Any]], examples: Sequence[SegmentedExample]
              ) -> dict[str, float]:
        """Official metrics over all examples: predictions[id] = {'answer': text, 'sp': [[title, sent_id], ...]};
        a missing id (or a missing 'sp') counts 0."""
        pred = {"answer": {}, "sp": {}}
        for qid, p in predictions.items():
            if "answer" in p:
                pred["answer"][qid] = p["answer"]
            if "sp" in p:
                pred["sp"][qid] = [list(f) for f in p["sp"]]
        gold = [{"_id": ex.meta["id"], "answer": ex.meta["answers"][0],
                 "supporting_facts": ex.meta["supporting_facts"]} for ex in examples]
        return hotpot_metrics.evaluate(pred, gold, quiet=True)

    def texts(self, split: str) -> Iterable[str]:
        yield QA_PROMPT.format(question="")
        for r in self.records(split):
            yield r.question
            yield r.answer
            for title, sents in r.context:
                yield title
                yield from sents


def supporting_facts_from_scores(example: SegmentedExample, scores: np.ndarray, threshold: float = 0.5,
                                 top_k: int = 0) -> list[list]:
    """[[title, sent_id], ...] of the sentence slots whose score ([n_seg, max_sents], e.g. sigmoid of the
    memory's sentence logits) is >= threshold, in document order; for HotpotQA predictions' 'sp'. top_k > 0
    instead takes the top_k highest-scored real sentences (ties in document order), still listed in document
    order: a rule with no threshold to set (every HotpotQA question has at least two supporting facts, so
    top_k=2 always predicts some), for a head whose scores rank sentences but stay below the threshold."""
    scores = np.asarray(scores)
    if scores.shape != example.sent_mask.shape:
        raise GmemError(f"example {example.meta.get('id')}: scores shape {scores.shape} != sent_mask shape "
                        f"{example.sent_mask.shape}; pass one score per sentence slot")
    if top_k < 0:
        raise GmemError(f"top_k={top_k}: use 0 (the threshold) or a positive number of sentences")
    keys = example.meta["sent_keys"]
    real = example.sent_mask.copy()  # a slot with a (title, sent_id) to name
    for s, k in zip(*np.nonzero(real)):
        real[s, k] = keys[s][k] is not None
    chosen = real & (scores >= threshold)
    if top_k:
        ranked = np.argsort(-np.where(real, scores, -np.inf).ravel(), kind="stable")
        chosen = np.zeros(scores.size, bool)
        chosen[ranked[:min(top_k, int(real.sum()))]] = True
        chosen = chosen.reshape(scores.shape)
    return [list(keys[s][k]) for s, k in zip(*np.nonzero(chosen))]
