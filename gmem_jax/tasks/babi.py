"""bAbI tasks qa1-qa5 and their BABILong-style long-context version.

Files (`qa{N}_*_{train,test}.txt`, e.g. bAbI v1.2 en-10k): a story is numbered lines whose ids restart at 1;
a question line is `question\\tanswer\\tsupporting line ids`. Every question becomes one example whose context
is the story's facts so far (earlier questions are not context), each fact a sentence slot with key
(f"qa{N}", line id) and label 1 if it supports the answer. The hub `facebook/babi_qa` layout
({"story": {"id", "type" (0 fact, 1 question), "text", "supporting_ids", "answer"}}) is read too.

BABILong-style (`target_tokens`): the facts are spread, in order, at seeded random places through filler
sentences (consecutive sentences of a text file from a seeded random start, e.g. WikiText-2; headings and empty
lines skipped; filler gets no sentence slot) until the context holds `target_tokens` tokens: a filler sentence
that would overshoot is skipped, so the length ends within one short sentence below the target, never above
(if the facts alone exceed the target there is no filler). The window baseline is layout="prompt".
"""
from __future__ import annotations

import dataclasses
import re
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.tasks.base import QA_PROMPT, SegmentedExample, Task, check_dims, load_hub
from gmem_jax.tasks.metrics import answer_em, grouped_mean
from gmem_jax.tasks.segment import Unit, sentence_units
from gmem_jax.tasks.tokenizers import encode_batch

#: Tasks whose facts each start with the person they are about ("Mary went to the hallway.", "John got the milk
#: there."): these label tokens with SegmentedExample.entity (`story_entities`); qa4's facts start with "The".
ENTITY_TASKS = (1, 2, 3)
#: The people of bAbI qa1-qa3 (en and en-10k), for entity_ids="name": one fixed number per name, so a model can learn
#: the label from the name itself (a number by order of appearance needs the story so far).
PEOPLE = ("Daniel", "John", "Mary", "Sandra")
ENTITY_IDS = ("story", "name")
SPLIT_ALIASES = {"train": "train", "test": "test", "dev": "test", "validation": "test"}  # bAbI has no dev split
HUB_ID = "facebook/babi_qa"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WIKITEXT_JOINS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))


@dataclasses.dataclass(frozen=True)
class BabiQuestion:
    task: int
    story: int  # story index in its file (0-based)
    line: int  # the question's line id
    facts: tuple[tuple[int, str], ...]  # (line id, sentence) of the story's facts before the question
    question: str
    answer: str
    supporting: tuple[int, ...]  # line ids of the supporting facts


def parse_babi(lines: Iterable[str], *, task: int, source: str = "babi") -> list[BabiQuestion]:
    """Questions of a bAbI file's lines; GmemError names the line for a malformed one."""
    out: list[BabiQuestion] = []
    facts: list[tuple[int, str]] = []
    story, prev = -1, 0
    for n, raw in enumerate(lines, start=1):
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        head, _, rest = line.partition(" ")
        if not head.isdigit() or not rest.strip():
            raise GmemError(f"{source}:{n}: expected 'ID text', got {line[:60]!r}; fix the line")
        lid = int(head)
        if lid == 1:
            story, facts = story + 1, []
        elif lid != prev + 1:
            raise GmemError(f"{source}:{n}: line id {lid} follows {prev}; ids must count up from 1 in a story")
        prev = lid
        if "\t" not in rest:
            facts.append((lid, rest.strip()))
            continue
        parts = rest.split("\t")
        if len(parts) != 3 or not parts[1].strip() or not all(p.isdigit() for p in parts[2].split()):
            raise GmemError(f"{source}:{n}: a question line needs 'question<TAB>answer<TAB>supporting ids', "
                            f"got {line[:80]!r}")
        out.append(BabiQuestion(task, story, lid, tuple(facts), parts[0].strip(), parts[1].strip(),
                                tuple(int(s) for s in parts[2].split())))
    return out


def normalize_babi_stories(records: Iterable[Mapping], *, task: int, source: str = "records") -> list[BabiQuestion]:
    """Questions from hub-layout story records {"story": {"id", "type", "text", "supporting_ids", "answer"}}."""
    out = []
    for index, rec in enumerate(records):
        story = rec.get("story") if isinstance(rec, Mapping) else None
        fields = ("id", "type", "text", "supporting_ids", "answer")
        if not isinstance(story, Mapping) or not all(isinstance(story.get(f), Sequence) for f in fields) \
                or len({len(story[f]) for f in fields}) != 1:
            raise GmemError(f"{source}: record {index}: field 'story' must hold equal-length lists {', '.join(fields)}")
        lines = []
        for lid, kind, text, sup, ans in zip(*(story[f] for f in fields)):
            lines.append(f"{lid} {text}" if int(kind) == 0 else f"{lid} {text}\t{ans}\t{' '.join(map(str, sup))}")
        qs = parse_babi(lines, task=task, source=f"{source}: record {index}: line")
        out += [dataclasses.replace(q, story=index) for q in qs]
    return out


def babi_file(directory: str | Path, task: int, split: str) -> Path:
    """The file of task N and split in a bAbI folder (`qa{N}_*_{split}.txt`)."""
    matches = sorted(Path(directory).glob(f"qa{task}_*_{split}.txt"))
    if len(matches) != 1:
        found = ", ".join(sorted(p.name for p in Path(directory).glob(f"qa{task}_*"))) or "none"
        raise GmemError(f"no single qa{task}_*_{split}.txt in {directory} (qa{task} files: {found}); "
                        f"pick tasks/splits that exist there")
    return matches[0]


def read_filler(path: str | Path) -> list[str]:
    """Sentences of a text file for BABILong filler: empty lines and '= heading =' lines skipped, WikiText's
    ' @-@ ' style joins undone, paragraphs split after . ! ?"""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise GmemError(f"cannot read filler text {path}: {e.strerror}; pass a readable text file") from None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or (line.startswith("=") and line.endswith("=")):
            continue
        for a, b in _WIKITEXT_JOINS:
            line = line.replace(a, b)
        out += [s for s in _SENTENCE_END.split(line) if s.strip()]
    if not out:
        raise GmemError(f"filler text {path} has no sentences; pass a text file with prose")
    return out


# tokenizer -> {filler file: token ids of each sentence}; tokenizing a whole filler file takes ~1 s, once
_FILLER_CACHE: "weakref.WeakKeyDictionary[Any, dict[str, list[list[int]]]]" = weakref.WeakKeyDictionary()


def filler_token_ids(path: str | Path, tokenizer: Any) -> list[list[int]]:
    """Token ids of each filler sentence (" " + sentence, like every context sentence), cached per tokenizer."""
    try:
        per_file = _FILLER_CACHE.setdefault(tokenizer, {})
    except TypeError:  # a tokenizer that cannot be weakly referenced: no cache
        per_file = {}
    key = str(Path(path).resolve())
    if key not in per_file:
        per_file[key] = encode_batch(tokenizer, [" " + s.strip() for s in read_filler(path)])
    return per_file[key]


def story_entities(facts: Sequence[str], question: str, ids: str = "story") -> tuple[list[int], int]:
    """Entity labels of a qa1-qa3 story (`ENTITY_TASKS`): each fact's person and the question's, the person it
    names (-1 if it names none, as qa2's "Where is the football?"). ids="story": people numbered in order of first
    appearance in the story (0, 1, ...); ids="name": each name's index in PEOPLE (-1 for a name not in it)."""
    people = list(dict.fromkeys(f.split()[0] for f in facts))
    number = people.index if ids == "story" else (lambda w: PEOPLE.index(w) if w in PEOPLE else -1)
    named = [number(w) for w in re.findall(r"[A-Za-z]+", question) if w in people]
    return [number(f.split()[0]) for f in facts], (named[0] if named else -1)


class BabiTask(Task):
    """bAbI qa tasks (default 1-5), optionally BABILong-style (`target_tokens` + `filler`).

    source: a folder of bAbI files, a hub id ('facebook/babi_qa', config `hub_config.format(task=N)`), or a
    {task number: iterable of hub-layout story records} mapping. Splits: 'train', 'test' ('dev' = 'test').
    entity_ids: how qa1-qa3 number the people in SegmentedExample.entity, "story" or "name" (`story_entities`).
    """

    name = "babi"

    def __init__(self, source: Any, *, tasks: Sequence[int] = (1, 2, 3, 4, 5), target_tokens: int | None = None,
                 filler: str | Path | None = None, hub_config: str = "en-10k-qa{task}", layout: str = "memory",
                 window: int | None = None, overflow: str = "drop_oldest", entity_ids: str = "story"):
        super().__init__(layout=layout, window=window, overflow=overflow)
        if not tasks:
            raise GmemError("babi: tasks is empty; pass task numbers such as (1, 2, 3, 4, 5)")
        if entity_ids not in ENTITY_IDS:
            raise GmemError(f"babi: entity_ids={entity_ids!r} unknown; choose one of {ENTITY_IDS} (see story_entities)")
        self.entity_ids = entity_ids
        if target_tokens is not None and (target_tokens <= 0 or filler is None):
            raise GmemError(f"babi: target_tokens={target_tokens} needs a positive length and filler=PATH "
                            "(a text file, e.g. WikiText-2 valid.txt)")
        self.source, self.tasks, self.target_tokens, self.hub_config = source, tuple(tasks), target_tokens, hub_config
        self.filler_path = filler

    def questions(self, split: str, task: int) -> list[BabiQuestion]:
        if split not in SPLIT_ALIASES:
            raise GmemError(f"babi: unknown split {split!r}; use train or test")
        split = SPLIT_ALIASES[split]
        if isinstance(self.source, Mapping):
            if task not in self.source:
                raise GmemError(f"babi: no records for task {task} in the given mapping (has {sorted(self.source)})")
            return normalize_babi_stories(self.source[task], task=task, source=f"qa{task} records")
        path = Path(self.source)
        if path.is_dir():
            file = babi_file(path, task, split)
            with open(file, encoding="utf-8") as f:
                return parse_babi(f, task=task, source=str(file))
        if isinstance(self.source, str) and self.source.count("/") == 1 and not path.exists():
            config = self.hub_config.format(task=task)
            return normalize_babi_stories(load_hub(self.source, config, split), task=task,
                                          source=f"{self.source}[{config}/{split}]")
        raise GmemError(f"babi: source {self.source} is not a folder of bAbI files or a hub id")

    def examples(self, split: str, tokenizer: Any, *, n_seg: int, seg_len: int, max_sents: int, seed: int = 0,
                 limit: int | None = None) -> list[SegmentedExample]:
        """Questions of every task in `tasks`, task by task in file order; `limit` applies per task. Filler
        placement is drawn from (seed, task, question index)."""
        check_dims(self.name, n_seg, seg_len, max_sents)
        out = []
        for task in self.tasks:
            for qi, q in enumerate(self.questions(split, task)[:limit]):
                entities, asked = (story_entities([t for _, t in q.facts], q.question, self.entity_ids)
                                   if task in ENTITY_TASKS else (None, -1))
                facts = sentence_units(tokenizer, [t for _, t in q.facts],
                                       keys=[(f"qa{task}", lid) for lid, _ in q.facts],
                                       labels=[float(lid in q.supporting) for lid, _ in q.facts], entities=entities)
                if self.target_tokens is not None:
                    facts = self._with_filler(facts, tokenizer, np.random.default_rng([seed, task, qi]))
                meta = {"id": f"qa{task}-{split}-{q.story}-{q.line}", "task": self.name, "babi_task": task,
                        "answers": [q.answer], "target_tokens": self.target_tokens,
                        "context_tokens": sum(len(u.tokens) for u in facts),
                        "supporting_facts": [[f"qa{task}", s] for s in q.supporting]}
                out.append(self.build(tokenizer, facts, q.question, q.answer, meta, n_seg=n_seg, seg_len=seg_len,
                                      max_sents=max_sents, question_entity=asked))
        return out

    def _with_filler(self, facts: list[Unit], tokenizer: Any, rng: np.random.Generator) -> list[Unit]:
        """The facts spread in order through consecutive filler sentences up to target_tokens context tokens."""
        ids = filler_token_ids(self.filler_path, tokenizer)
        budget = self.target_tokens - sum(len(u.tokens) for u in facts)
        shortest = min(len(t) for t in ids if t)
        chosen: list[tuple[int, ...]] = []
        start = int(rng.integers(len(ids)))
        for k in range(len(ids)):
            if budget < shortest:
                break
            t = ids[(start + k) % len(ids)]
            if 0 < len(t) <= budget:
                chosen.append(tuple(t))
                budget -= len(t)
        places = np.sort(rng.integers(0, len(chosen) + 1, size=len(facts)))  # fact i goes before filler places[i]
        out: list[Unit] = []
        f = 0
        for j in range(len(chosen) + 1):
            while f < len(facts) and places[f] == j:
                out.append(facts[f])
                f += 1
            if j < len(chosen):
                out.append(Unit(chosen[j], slot=False))
        return out

    def score(self, predictions: Mapping[str, Mapping[str, Any]], examples: Sequence[SegmentedExample]
              ) -> dict[str, float]:
        """Exact-match accuracy overall ('em') and per task and length ('qa1_em', or 'qa1_len4096_em' for
        BABILong); a missing prediction counts 0."""
        def group(ex):
            length = ex.meta["target_tokens"]
            return f"qa{ex.meta['babi_task']}" + (f"_len{length}" if length else "")

        em = lambda ex: answer_em(predictions, ex)  # noqa: E731
        out = {f"{k}_em": v for k, v in grouped_mean(examples, em, group).items()}
        out.update(grouped_mean(examples, em, lambda ex: "em"))
        return out

    def texts(self, split: str) -> Iterable[str]:
        yield QA_PROMPT.format(question="")
        if self.target_tokens is not None:
            yield from read_filler(self.filler_path)
        for task in self.tasks:
            for q in self.questions(split, task):
                yield from (t for _, t in q.facts)
                yield q.question
                yield q.answer
