"""ZsRE knowledge editing (the MEND/EasyEdit edit set): write an edit into memory, then query it.

Each record (subject, src, pred, rephrase, alt, answers, loc, loc_ans, cond, portability) gives up to four
examples, meta['kind']:
  reliability     query src             -> alt          (the edit itself)
  generalization  query rephrase        -> alt          (a paraphrase of it)
  locality        query loc             -> loc_ans      (unrelated: at eval compare with the frozen model's own
                                                         output, see `score`; the leading "nq question: " is cut)
  portability     query "New Question"  -> "New Answer" (a consequence of the edit)
and, for training only,
  mismatched      query another record's src or rephrase -> its true answer: a ZsRE-style question the written
                  edit does not concern (an in-style negative beside locality's NQ questions, for the scope gate;
                  the trainer's 'frozen_argmax' turns its labels into the frozen model's own predictions)
The edit is the statement "{src} {alt}." in the context; the query is the last segment. Layouts (Task):
"memory" (edit in a segment before the query, which the query never sees directly), "none" (no-memory
baseline: query only) and "prompt" (edit-in-prompt baseline: edit statement + query in the last segment).
`n_distractor_edits` other edits of the same split can share the context (batch editing).

Training options (train split only; evaluation always uses the real edits):
  counterfactual_alts=k  each record gives k variants whose new answer is another record's alt (seeded), so
                         the answer cannot be memorised from the question and only the written edit carries it;
                         portability is skipped (its answer follows from the real edit).
  counterfactual_pool    where those new answers come from: 'alts' (the split's alts, ~670 strings, each seen
                         several times, so a memory can learn them as a closed set of classes) or 'answers' (every
                         answer string of the split, alts, true answers, preds, locality and portability answers,
                         no longer in words than its longest alt: ~2,200, each seen about once per run, so only
                         copying from the edit pays).
  locality_targets       {record index: answer} (or a JSON file of it): the locality target becomes this answer,
                         e.g. the frozen model's own (`training.builders.frozen_locality_targets`), so training
                         teaches the memory to leave unrelated questions alone. (The trainer also accepts
                         'frozen_argmax': gold answers here, labels replaced by the frozen model's argmax,
                         `training.builders.frozen_argmax_labels`.)

Scores split out the dev edits whose answer is "novel": not among the train split's answer strings (the widest
counterfactual pool), so no training recipe ever had it as a target; a memory that learned the training answers as
classes instead of copying from the edit scores ~0 there (docs/results.md).

Split: dev is a fixed 20% (`dev_fraction`) chosen by ranking records by sha256(split_seed, subject, src, alt),
so it is the same on every machine and does not depend on the records' order; train is the rest.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.tasks.base import QA_PROMPT, SegmentedExample, Task, check_dims, record_error, resolve_records
from gmem_jax.tasks.metrics import answer_em, exact_match, grouped_mean, normalize_answer
from gmem_jax.tasks.segment import sentence_units

KINDS = ("reliability", "generalization", "locality", "portability")  # the evaluation kinds
TRAIN_KINDS = KINDS + ("mismatched",)
OUT_OF_SCOPE_KINDS = ("locality", "mismatched")  # questions the written edit does not concern
SPLITS = ("train", "dev", "all")
POOLS = ("alts", "answers")  # counterfactual_pool choices
_NQ_PREFIX = re.compile(r"^\s*nq question:\s*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class ZsreRecord:
    index: int  # position in the source file: the stable record id
    subject: str
    src: str
    rephrase: str
    alt: str  # the new (edited) answer
    pred: str  # the unedited model's answer in the original set
    answers: tuple[str, ...]  # the true answers before the edit
    loc: str
    loc_ans: str
    portability: tuple[str, str] | None  # (New Question, New Answer)

    def statement(self) -> str:
        """The edit as a context sentence."""
        return f"{self.src.strip()} {self.alt.strip()}."

    def answer_strings(self) -> set[str]:
        """Every answer this record holds (alt, pred, true answers, locality and portability answers), stripped."""
        out = {self.alt, self.pred, self.loc_ans, *self.answers, *(self.portability or ("", ""))[1:]}
        return {a.strip() for a in out} - {""}

    def query(self, kind: str) -> tuple[str, str] | None:
        """(question, answer) of an example kind; None when the record has no portability question."""
        if kind == "reliability":
            return self.src, self.alt
        if kind == "generalization":
            return self.rephrase, self.alt
        if kind == "locality":
            return _NQ_PREFIX.sub("", self.loc), self.loc_ans
        return self.portability


def normalize_zsre_records(records: Iterable[Mapping], source: str = "records") -> list[ZsreRecord]:
    """Dicts in the MEND/EasyEdit layout -> ZsreRecords; GmemError names the record index and field."""
    out = []
    for index, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise GmemError(f"{source}: record {index} is a {type(rec).__name__}, not an object")
        bad = functools.partial(record_error, source, index, rec.get("subject"))  # bad(field, problem) -> GmemError

        for field in ("subject", "src", "rephrase", "alt", "loc", "loc_ans"):
            if not isinstance(rec.get(field), str) or not rec[field].strip():
                raise bad(field, "is missing or not a non-empty string")
        answers = rec.get("answers", [])
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, Sequence) or not all(isinstance(a, str) for a in answers):
            raise bad("answers", "must be a list of strings")
        port = rec.get("portability")
        if port is not None:
            if not isinstance(port, Mapping) or not all(isinstance(port.get(k), str) and port[k].strip()
                                                        for k in ("New Question", "New Answer")):
                raise bad("portability", "must have 'New Question' and 'New Answer' strings")
            port = (port["New Question"], port["New Answer"])
        out.append(ZsreRecord(index, rec["subject"], rec["src"], rec["rephrase"], rec["alt"], str(rec.get("pred", "")),
                              tuple(answers), rec["loc"], rec["loc_ans"], port))
    return out


def split_zsre(records: Sequence[ZsreRecord], split: str, *, dev_fraction: float = 0.2, split_seed: int = 0
               ) -> list[ZsreRecord]:
    """The train / dev / all records, in source order (see the module docstring for the rule)."""
    if split not in SPLITS:
        raise GmemError(f"zsre: unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if split == "all":
        return list(records)
    if not 0.0 < dev_fraction < 1.0:
        raise GmemError(f"zsre: dev_fraction={dev_fraction} must be in (0, 1)")

    def rank(r: ZsreRecord) -> tuple[str, int]:
        text = "\x1f".join((str(split_seed), r.subject, r.src, r.alt))
        return hashlib.sha256(text.encode("utf-8")).hexdigest(), r.index

    dev = {r.index for r in sorted(records, key=rank)[:math.ceil(dev_fraction * len(records))]}
    return [r for r in records if (r.index in dev) == (split == "dev")]


class ZsRETask(Task):
    """ZsRE edits as SegmentedExamples. source: the JSON file, or any iterable of records (no hub layout is
    standard for this set)."""

    name = "zsre"

    def __init__(self, source: Any, *, kinds: Sequence[str] = KINDS, n_distractor_edits: int = 0,
                 dev_fraction: float = 0.2, split_seed: int = 0, layout: str = "memory", window: int | None = None,
                 overflow: str = "drop_oldest", counterfactual_alts: int = 0, counterfactual_pool: str = "alts",
                 locality_targets: Mapping[Any, str] | str | None = None):
        super().__init__(layout=layout, window=window, overflow=overflow)
        unknown = set(kinds) - set(TRAIN_KINDS)
        if unknown or not kinds:
            raise GmemError(f"zsre: unknown kinds {sorted(unknown)}; choose from {', '.join(TRAIN_KINDS)}")
        if n_distractor_edits < 0:
            raise GmemError(f"zsre: n_distractor_edits={n_distractor_edits} must be >= 0")
        if counterfactual_alts < 0:
            raise GmemError(f"zsre: counterfactual_alts={counterfactual_alts} must be >= 0")
        self.source, self.kinds, self.n_distractor_edits = source, tuple(kinds), n_distractor_edits
        if counterfactual_pool not in POOLS:
            raise GmemError(f"zsre: counterfactual_pool={counterfactual_pool!r}; choose from {', '.join(POOLS)}")
        self.counterfactual_alts, self.counterfactual_pool = counterfactual_alts, counterfactual_pool
        if locality_targets in ("frozen", "frozen_argmax"):
            raise GmemError(f"zsre: locality_targets={locality_targets!r} needs the frozen model; it is resolved by "
                            "the trainer (gmem_jax.training.builders.build_train_examples), pass a mapping here")
        if isinstance(locality_targets, (str, Path)):
            locality_targets = json.loads(Path(locality_targets).read_text())
        self.locality_targets = None if locality_targets is None else {int(k): str(v)
                                                                        for k, v in locality_targets.items()}
        self.dev_fraction, self.split_seed = dev_fraction, split_seed
        self._records: list[ZsreRecord] | None = None
        self._train_answers: set[str] | None = None  # normalized, for answer_is_novel

    def records(self, split: str) -> list[ZsreRecord]:
        if self._records is None:  # one file holds every split
            raw, name = resolve_records(self.source, "all")
            self._records = normalize_zsre_records(raw, name)
        return split_zsre(self._records, split, dev_fraction=self.dev_fraction, split_seed=self.split_seed)

    def examples(self, split: str, tokenizer: Any, *, n_seg: int, seg_len: int, max_sents: int, seed: int = 0,
                 limit: int | None = None) -> list[SegmentedExample]:
        """For each record (the first `limit`), one example per kind in `kinds`. The distractor edits and the
        edit's place among them are drawn from (seed, record index)."""
        check_dims(self.name, n_seg, seg_len, max_sents)
        records = self.records(split)
        pool = self._answer_pool(records) if self.counterfactual_alts else []
        out = []
        for rec in records[:limit]:
            for variant, edited in enumerate(self._variants(rec, pool, seed)):
                out.extend(self._record_examples(edited, records, tokenizer, seed, variant, n_seg=n_seg,
                                                 seg_len=seg_len, max_sents=max_sents))
        return out

    def _answer_pool(self, records: Sequence[ZsreRecord]) -> list[str]:
        """The sorted strings counterfactual answers are drawn from: the split's alts, or every answer string of
        the split no longer in words than its longest alt (some NQ answers are whole sentences that would not fit a
        segment)."""
        if self.counterfactual_pool == "alts":
            return sorted({r.alt.strip() for r in records})
        words = max(len(r.alt.split()) for r in records)
        return sorted({a for r in records for a in r.answer_strings() if len(a.split()) <= words})

    def _variants(self, rec: ZsreRecord, pool: Sequence[str], seed: int) -> list[ZsreRecord]:
        """The record itself, or `counterfactual_alts` copies whose alt is drawn from `pool` (`_answer_pool`) less
        this record's own alt ('alts') or own answer strings ('answers')."""
        if not self.counterfactual_alts:
            return [rec]
        own = {rec.alt.strip()} if self.counterfactual_pool == "alts" else rec.answer_strings()
        pool = [a for a in pool if a not in own]
        if not pool:
            raise GmemError("zsre: counterfactual_alts needs at least two different answers in the split")
        rng = np.random.default_rng([seed, rec.index, 1])
        return [dataclasses.replace(rec, alt=pool[i]) for i in rng.choice(len(pool), self.counterfactual_alts)]

    def _record_examples(self, rec: ZsreRecord, records: Sequence[ZsreRecord], tokenizer: Any, seed: int,
                         variant: int, **dims: int) -> list[SegmentedExample]:
        """One example per kind of one (possibly counterfactual) record; distractor edits drawn from
        (seed, record index, variant)."""
        edits = [rec]
        if self.n_distractor_edits:
            rng = np.random.default_rng([seed, rec.index] + ([variant] if self.counterfactual_alts else []))
            others = [r for r in records if r.index != rec.index]
            if len(others) < self.n_distractor_edits:
                raise GmemError(f"zsre: {self.n_distractor_edits} distractor edits requested but the split "
                                f"has only {len(others)} other records; lower n_distractor_edits")
            edits = [others[i] for i in rng.choice(len(others), self.n_distractor_edits, replace=False)]
            edits.insert(int(rng.integers(len(edits) + 1)), rec)
        units = sentence_units(tokenizer, [e.statement() for e in edits], keys=[("edit", e.index) for e in edits],
                               labels=[float(e is rec) for e in edits])
        out = []
        suffix = f"-cf{variant}" if self.counterfactual_alts else ""
        for kind in self.kinds:
            qa = self._mismatched_query(rec, records, edits, seed, variant) if kind == "mismatched" else rec.query(kind)
            if qa is None or (kind == "portability" and self.counterfactual_alts):
                continue
            if kind == "locality" and self.locality_targets is not None:
                if rec.index not in self.locality_targets:
                    raise GmemError(f"zsre: locality_targets has no answer for record {rec.index}; rebuild it "
                                    "for this split")
                qa = (qa[0], self.locality_targets[rec.index])
            meta = {"id": f"zsre-{rec.index}-{kind}{suffix}", "task": self.name, "kind": kind, "answers": [qa[1]],
                    "record_index": rec.index, "subject": rec.subject}
            out.append(self.build(tokenizer, units, qa[0], qa[1], meta, **dims))
        return out

    def _mismatched_query(self, rec: ZsreRecord, records: Sequence[ZsreRecord], written: Sequence[ZsreRecord],
                          seed: int, variant: int) -> tuple[str, str]:
        """(question, true answer) of a record none of whose edits is `written`: its src or rephrase, both drawn
        from (seed, record index, variant). The true answer (the edit's `answers`, else the set's `pred`) is only
        the teacher-forced input: the trainer replaces its labels by the frozen model's argmax."""
        skip = {e.index for e in written}
        others = [r for r in records if r.index not in skip]
        if not others:
            raise GmemError("zsre: kind 'mismatched' needs a record besides the written edits; use a larger split")
        rng = np.random.default_rng([seed, rec.index, variant, 2])
        other = others[int(rng.integers(len(others)))]
        question = other.src if rng.integers(2) == 0 else other.rephrase
        return question, (other.answers[0] if other.answers else other.pred)

    def score(self, predictions: Mapping[str, Mapping[str, Any]], examples: Sequence[SegmentedExample]
              ) -> dict[str, float]:
        """Per kind, over all examples of that kind (a missing prediction counts 0):
          '{kind}_em'        generation exact match (normalized) against the gold answer;
          'locality'         for locality examples whose prediction has 'reference' (the frozen model's own
                             answer without memory): normalized agreement of 'answer' with it;
          'locality_token_agreement'  EasyEdit's locality: for locality examples whose prediction has
                             'reference_preds' (the frozen model's teacher-forced argmax tokens on the gold
                             answer), the fraction of answer positions where 'answer_preds' equals them, averaged
                             per example then over examples; 'locality' above compares whole generations instead;
          '{kind}_token_em'  mean of predictions' 'token_em' (teacher-forced token accuracy against the gold
                             answer, see metrics.token_em) where given;
          '{kind}_em_novel', '{kind}_token_em_novel'  the same two over the examples whose gold answer is novel
                             (normalized, not among the train split's answer strings); absent when none is.
        """
        kind = lambda ex: ex.meta["kind"]  # noqa: E731

        def em_and_token_em(exs, suffix=""):  # '{kind}_em{suffix}', '{kind}_token_em{suffix}' over exs
            em = grouped_mean(exs, lambda ex: answer_em(predictions, ex), kind)
            token = grouped_mean(exs, lambda ex: predictions.get(ex.meta["id"], {}).get("token_em"), kind)
            return {**{f"{k}_em{suffix}": v for k, v in em.items()},
                    **{f"{k}_token_em{suffix}": v for k, v in token.items()}}

        out = em_and_token_em(examples)

        def reference_agreement(ex):
            p = predictions.get(ex.meta["id"], {})
            if kind(ex) != "locality" or "reference" not in p:
                return None
            return exact_match(p.get("answer", ""), [p["reference"]])

        def token_agreement(ex):
            p = predictions.get(ex.meta["id"], {})
            if kind(ex) != "locality" or p.get("reference_preds") is None or "answer_preds" not in p:
                return None
            # Both lists hold the answer positions in ascending order; a memory pass limited to
            # memory.loss_positions may hold only the first K of them, so compare the common prefix.
            n = min(len(p["answer_preds"]), len(p["reference_preds"]))
            return float(np.mean(np.equal(p["answer_preds"][:n], p["reference_preds"][:n]))) if n else None

        out.update(grouped_mean(examples, reference_agreement, kind))
        out.update({f"{k}_token_agreement": v for k, v in grouped_mean(examples, token_agreement, kind).items()})
        out.update(em_and_token_em([ex for ex in examples if self.answer_is_novel(ex)], "_novel"))
        return out

    def answer_is_novel(self, example: SegmentedExample) -> bool:
        """True for a non-locality example none of whose gold answers (normalized) is an answer string of the train
        split, i.e. no training recipe had it as a target."""
        return example.meta["kind"] != "locality" and not {normalize_answer(a)
                                                           for a in example.meta["answers"]} & self.train_answers()

    def train_answers(self) -> set[str]:
        """Every answer string of the train split, normalized (cached)."""
        if self._train_answers is None:
            self._train_answers = {normalize_answer(a) for r in self.records("train") for a in r.answer_strings()}
        return self._train_answers

    def texts(self, split: str) -> Iterable[str]:
        yield QA_PROMPT.format(question="")
        for r in self.records(split):
            yield r.statement()
            for kind in KINDS:
                if r.query(kind):
                    yield from r.query(kind)
