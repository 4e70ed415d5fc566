"""The data contract between tasks and the memory model / trainer, and what every task shares.

A document becomes one `SegmentedExample`: `n_seg` segments of `seg_len` tokens. The memory model reads
segment k from the memory written by segments < k, so the question (and the answer) always sit in the LAST
segment and the context in the segments before it. Empty segments go at the FRONT, so the last segment is
always the question whatever the document length.

Everything here is numpy with fixed shapes for a given (n_seg, seg_len, max_sents): no JAX, no model.
"""
from __future__ import annotations

import abc
import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gmem_jax.errors import GmemError

#: The question prompt every QA task puts at the start of its last segment; the answer follows as " {answer}".
QA_PROMPT = "Question: {question}\nAnswer:"

LAYOUTS = ("memory", "none", "prompt")
OVERFLOW_POLICIES = ("drop_oldest", "error")

ARRAY_FIELDS = ("tokens", "token_mask", "labels", "loss_mask", "support_mask", "sent_pos", "sent_mask", "sent_label",
                "entity")
_DTYPES = {"tokens": np.int32, "token_mask": np.bool_, "labels": np.int32, "loss_mask": np.float32,
           "support_mask": np.bool_, "sent_pos": np.int32, "sent_mask": np.bool_, "sent_label": np.float32,
           "entity": np.int32}


@dataclasses.dataclass
class SegmentedExample:
    """One document, numpy, fixed shapes for a given (n_seg, seg_len, max_sents).

    tokens     int32   [n_seg, seg_len]    right-padded within each segment with pad_id
    token_mask bool    [n_seg, seg_len]    True on real tokens
    labels     int32   [n_seg, seg_len]    labels[s, t] = the next token, predicted AT position t, wherever
                                           position t+1 holds a real token of the same segment; 0 elsewhere
    loss_mask  float32 [n_seg, seg_len]    1.0 where the cross-entropy counts (the answer + EOS targets)
    support_mask bool  [n_seg, seg_len]    True on the tokens of supporting-fact sentences (label > 0), what
                                           memory.pointer_support lets the pointer loss point at
    sent_pos   int32   [n_seg, max_sents]  position of the LAST token of each context sentence in its segment
    sent_mask  bool    [n_seg, max_sents]  True where sent_pos is a real sentence
    sent_label float32 [n_seg, max_sents]  1.0 for supporting-fact sentences, else 0
    prompt_len int                         tokens of the last segment that form the prompt; the answer
                                           starts at tokens[-1, prompt_len]
    meta       dict                        host-side: 'id', 'task', 'answers' (gold strings), 'sent_keys'
                                           ([[key or None] * max_sents] * n_seg), 'layout', 'dropped_tokens',
                                           'dropped_sentences', plus whatever the task's metric needs
    entity     int32   [n_seg, seg_len]    which entity (e.g. bAbI's person, numbered per story) a token's
                                           sentence, or the question, is about; -1 where none or unknown (the
                                           default); what memory.address_oracle files tokens by
    """

    tokens: np.ndarray
    token_mask: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    support_mask: np.ndarray
    sent_pos: np.ndarray
    sent_mask: np.ndarray
    sent_label: np.ndarray
    prompt_len: int
    meta: dict
    entity: np.ndarray | None = None  # None: no entity labels, all -1

    def __post_init__(self):
        if self.entity is None:
            self.entity = np.full(np.shape(self.tokens), -1, np.int32)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_seg, seg_len, max_sents)."""
        return (*self.tokens.shape, self.sent_pos.shape[1])

    def validate(self) -> None:
        """Raise GmemError if a field has the wrong dtype or a shape that disagrees with `tokens`."""
        name = self.meta.get("id", "?")
        if self.tokens.ndim != 2 or self.sent_pos.ndim != 2:
            raise GmemError(f"example {name}: tokens must be [n_seg, seg_len] and sent_pos [n_seg, max_sents], "
                            f"got {self.tokens.shape} and {self.sent_pos.shape}; build examples with "
                            "gmem_jax.tasks.segment.build_example")
        n_seg, seg_len, max_sents = self.shape
        for field in ARRAY_FIELDS:
            arr = getattr(self, field)
            want = (n_seg, max_sents) if field.startswith("sent_") else (n_seg, seg_len)
            if arr.shape != want or arr.dtype != _DTYPES[field]:
                raise GmemError(f"example {name}: field {field} is {arr.dtype}{list(arr.shape)}, expected "
                                f"{np.dtype(_DTYPES[field])}{list(want)}; build examples with "
                                "gmem_jax.tasks.segment.build_example")
        if not 0 < self.prompt_len <= seg_len:
            raise GmemError(f"example {name}: prompt_len {self.prompt_len} is outside [1, seg_len={seg_len}]")


def collate(examples: Sequence[SegmentedExample], *, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Stack examples on a new leading batch axis: {'tokens': [B, n_seg, seg_len], ..., 'sent_pos': [B, n_seg,
    max_sents], ..., 'prompt_len': int32 [B], 'example_mask': bool [B]}.

    Only arrays go in (the result can be fed to a jitted step as is); the metas stay on the host:
    `[e.meta for e in examples]`; a meta's 'in_scope' (bool) becomes 'scope' float32 [B] (1 / 0, -1 where absent).
    `pad_to` appends all-masked dummy examples (example_mask False, prompt_len 0) up to that batch size so a last
    partial batch keeps the static shape.
    """
    if not examples:
        raise GmemError("collate got no examples; pass at least one SegmentedExample")
    shape = examples[0].shape
    for ex in examples:
        ex.validate()
        if ex.shape != shape:
            raise GmemError(f"collate: example {ex.meta.get('id', '?')} has (n_seg, seg_len, max_sents)={ex.shape} "
                            f"but example {examples[0].meta.get('id', '?')} has {shape}; build a batch from "
                            "examples made with the same n_seg, seg_len and max_sents")
    n_pad = 0 if pad_to is None else pad_to - len(examples)
    if n_pad < 0:
        raise GmemError(f"collate: {len(examples)} examples do not fit pad_to={pad_to}; "
                        "raise pad_to or split the batch")
    batch = {}
    for field in ARRAY_FIELDS:
        arrs = [getattr(ex, field) for ex in examples]
        arrs += [np.zeros_like(arrs[0])] * n_pad
        batch[field] = np.stack(arrs)
    batch["prompt_len"] = np.array([ex.prompt_len for ex in examples] + [0] * n_pad, np.int32)
    batch["example_mask"] = np.array([True] * len(examples) + [False] * n_pad)
    if any("in_scope" in ex.meta for ex in examples):  # memory.scope_weight's label; -1 = unknown
        batch["scope"] = np.array([float(ex.meta.get("in_scope", -1)) for ex in examples] + [-1.0] * n_pad,
                                  np.float32)
    return batch


class Task(abc.ABC):
    """One dataset: turns its records into SegmentedExamples and scores predictions on them.

    Subclasses set `name` and implement `examples`, `score` and `texts`. The constructor options shared by all
    tasks choose where the context goes (`layout`):
      "memory"  context in the segments before the last (what the memory model reads), question last;
      "none"    no context at all: the no-memory baseline (only the question in the last segment);
      "prompt"  the last `window` context tokens (None: as many as fit) in the last segment before the
                question: the frozen model with the context in its prompt / window.
    and what to do when the context needs more than n_seg - 1 segments (`overflow`): "drop_oldest" drops the
    earliest context (counted in meta['dropped_tokens'] / ['dropped_sentences']) or "error".
    """

    name: str = "task"

    def __init__(self, *, layout: str = "memory", window: int | None = None, overflow: str = "drop_oldest"):
        if layout not in LAYOUTS:
            raise GmemError(f"{self.name}: unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
        if overflow not in OVERFLOW_POLICIES:
            raise GmemError(f"{self.name}: unknown overflow {overflow!r}; use one of {', '.join(OVERFLOW_POLICIES)}")
        if window is not None and (layout != "prompt" or window < 0):
            raise GmemError(f"{self.name}: window={window} needs layout='prompt' and window >= 0")
        self.layout, self.window, self.overflow = layout, window, overflow

    @abc.abstractmethod
    def examples(self, split: str, tokenizer: Any, *, n_seg: int, seg_len: int, max_sents: int, seed: int = 0,
                 limit: int | None = None) -> list[SegmentedExample]:
        """The split's examples, in source order, deterministic for a given seed."""

    @abc.abstractmethod
    def score(self, predictions: Mapping[str, Mapping[str, Any]], examples: Sequence[SegmentedExample]
              ) -> dict[str, float]:
        """Metrics over ALL examples; predictions[id] holds 'answer' (text) and task-specific extras.
        A missing prediction counts 0."""

    @abc.abstractmethod
    def texts(self, split: str) -> Iterable[str]:
        """Every string the task can put into an example of this split: the corpus to build a WordTokenizer
        vocabulary from (`WordTokenizer.from_texts(task.texts('train'))`)."""

    def build(self, tokenizer: Any, units, question: str, answer: str, meta: dict, *, n_seg: int, seg_len: int,
              max_sents: int, question_entity: int = -1) -> SegmentedExample:
        """Tokenize the question prompt and answer and lay the example out with this task's layout/overflow
        (question_entity: the `entity` label of the prompt and answer tokens)."""
        from gmem_jax.tasks.segment import build_example
        from gmem_jax.tasks.tokenizers import encode_batch, special_ids

        pad_id, eos_id = special_ids(tokenizer)
        prompt, ans, sep = encode_batch(tokenizer, [QA_PROMPT.format(question=question.strip()),
                                                    " " + answer.strip(), "\n"])
        return build_example(units, prompt, ans if answer.strip() else [], n_seg=n_seg, seg_len=seg_len,
                             max_sents=max_sents, pad_id=pad_id, eos_id=eos_id, layout=self.layout,
                             window=self.window, context_sep=sep, overflow=self.overflow, meta=meta,
                             question_entity=question_entity)


def check_dims(task: str, n_seg: int, seg_len: int, max_sents: int) -> None:
    """GmemError unless the example shape is usable."""
    if n_seg < 1 or seg_len < 2 or max_sents < 0:
        raise GmemError(f"{task}: need n_seg >= 1, seg_len >= 2 and max_sents >= 0, got n_seg={n_seg}, "
                        f"seg_len={seg_len}, max_sents={max_sents}")


# ----------------------------------------------------------------------------------------------- data sources

def read_json_records(path: str | os.PathLike) -> list[Any]:
    """A JSON list (`.json`) or one JSON object a line (`.jsonl`, or any file whose first character is '{')."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise GmemError(f"cannot read {path}: {e.strerror}; pass an existing .json/.jsonl file") from None
    stripped = text.lstrip()
    try:
        if path.suffix == ".jsonl" or stripped.startswith("{"):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise GmemError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); "
                        "fix the file or pass a valid .json list / .jsonl file") from None
    if not isinstance(data, list):
        raise GmemError(f"{path}: expected a JSON list of records, got a {type(data).__name__}; "
                        "pass a JSON list or a .jsonl file")
    return data


def load_hub(dataset_id: str, config: str | None, split: str) -> Iterable[Mapping]:
    """A split of a Hugging Face hub dataset through `datasets.load_dataset` (never remote code)."""
    import datasets

    try:
        return datasets.load_dataset(dataset_id, config, split=split)
    except Exception as e:  # datasets raises many types (offline, missing config, missing split...)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GmemError(f"cannot load hub dataset {dataset_id!r} (config {config!r}, split {split!r}): {msg}; "
                        "check the id/config/split or pass a local file") from None


def resolve_records(source: Any, split: str, *, hub_config: str | None = None,
                    hub_splits: Mapping[str, str] | None = None) -> tuple[Iterable[Mapping], str]:
    """Raw records of one split and a name for error messages, from any of:
      - a mapping {split: source} (e.g. a `datasets.DatasetDict`, or {'dev': 'path.json'}): picks `split`;
      - a local .json/.jsonl file: used as the requested split as is (the file IS the split you chose);
      - a hub dataset id 'owner/name' (not an existing path): `datasets.load_dataset(id, hub_config,
        split=hub_splits.get(split, split))`;
      - any other iterable of dicts (a list, a `datasets.Dataset`).
    """
    if isinstance(source, Mapping):
        if split not in source:
            raise GmemError(f"no split {split!r} in the given source; it has {', '.join(map(str, source))}")
        return resolve_records(source[split], split, hub_config=hub_config, hub_splits=hub_splits)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return read_json_records(path), str(path)
        looks_like_file = path.suffix in (".json", ".jsonl") or source.startswith((".", "/", "~"))
        if isinstance(source, str) and source.count("/") == 1 and not looks_like_file and not path.exists():
            hub_split = (hub_splits or {}).get(split, split)
            return load_hub(source, hub_config, hub_split), f"{source}[{hub_split}]"
        raise GmemError(f"data source {source} is not a file; pass a .json/.jsonl file or a hub id 'owner/name'")
    if isinstance(source, Iterable):
        return source, f"{type(source).__name__} records"
    raise GmemError(f"cannot read records from a {type(source).__name__}; pass a path, a hub id or a list of dicts")


def record_error(source: str, index: int, record_id: Any, field: str, problem: str,
                 fix: str = "fix the record or drop it") -> GmemError:
    """The one-line error for a malformed record: where it is, which field, what is wrong, how to fix it."""
    rid = f" (id {record_id})" if record_id not in (None, "") else ""
    return GmemError(f"{source}: record {index}{rid}: field {field!r} {problem}; {fix}")
