"""MemLLM training examples from ZsRE edit records: when to write a triple, when and how to read one.

Per record (subject, src, alt, rephrase, loc, loc_ans):
  write     prompt "The answer to '{src}' is {alt}."
            target " ({MEM_WRITE--> {subject}>>{relation}>>{alt}})"
  read      prompt "Question: {src}\\nAnswer:"   (and the same for `rephrase`: a paraphrase must produce the
            target " ({MEM_READ({subject}>>{relation}>>)-->"  same canonical query)
                   + " {alt}})"  (spliced in by the host at inference: not trained on)
                   + " {alt}"
  locality  prompt "Question: {loc}\\nAnswer:"   target " {loc_ans}"  (unrelated question: answer, no call)

The relation is the question's template: `src` with the subject cut out, casefolded, without the final "?"
("What artist created Call the Doctor?" -> "what artist created"), so all records asked the same way share one
relation string. Records whose subject is not in `src`, or whose names cannot be written in a call (they
contain `{ } > ;`), are skipped with a logged count.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.memllm.calls import clean_field, format_read, format_results, format_write
from gmem_jax.memllm.store import ReadQuery
from gmem_jax.tasks.base import QA_PROMPT
from gmem_jax.tasks.zsre import ZsreRecord, normalize_zsre_records

log = logging.getLogger(__name__)

KINDS = ("write", "read", "locality")


@dataclasses.dataclass(frozen=True)
class MemExample:
    kind: str  # "write" | "read" | "locality"
    record_index: int
    prompt: str  # context the model reads (never a training target)
    segments: tuple[tuple[str, bool], ...]  # the continuation: (text, trained on?) in order

    @property
    def target(self) -> str:
        return "".join(text for text, _ in self.segments)


def relation_from_question(subject: str, question: str) -> Optional[str]:
    """The question with the subject removed (first case-insensitive match), casefolded, spaces collapsed,
    trailing "?" / "." dropped; None when the subject does not occur or nothing is left."""
    m = re.search(re.escape(subject.strip()), question, flags=re.IGNORECASE)
    if m is None:
        return None
    template = question[:m.start()] + " " + question[m.end():]
    relation = " ".join(template.casefold().split()).rstrip(" ?.!")
    return relation or None


def examples_from_record(rec: ZsreRecord, kinds: Sequence[str] = KINDS) -> list[MemExample]:
    """The examples of one record (empty if its names cannot be written in a call)."""
    subject, alt = clean_field(rec.subject), clean_field(rec.alt)
    relation = relation_from_question(rec.subject, rec.src)
    relation = clean_field(relation) if relation else None
    if subject is None or alt is None or relation is None:
        return []
    out = []
    if "write" in kinds:
        out.append(MemExample("write", rec.index, f"The answer to '{rec.src.strip()}' is {alt}.",
                              ((" " + format_write([(subject, relation, alt)]), True),)))
    if "read" in kinds:
        call = " " + format_read([ReadQuery(subject, relation, None)])
        for question in dict.fromkeys([rec.src.strip(), rec.rephrase.strip()]):  # once if identical
            out.append(MemExample("read", rec.index, QA_PROMPT.format(question=question),
                                  ((call, True), (format_results([alt]), False), (" " + alt, True))))
    if "locality" in kinds:
        question, answer = rec.query("locality")
        out.append(MemExample("locality", rec.index, QA_PROMPT.format(question=question.strip()),
                              ((" " + answer.strip(), True),)))
    return out


def build_examples(records: Iterable[Union[Mapping, ZsreRecord]], kinds: Sequence[str] = KINDS,
                   source: str = "zsre records") -> list[MemExample]:
    """Examples for every record, in record order (raw dicts are validated by gmem_jax.tasks.zsre)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise GmemError(f"example kinds {list(kinds)}: choose among {', '.join(KINDS)}")
    records = list(records)
    if records and not isinstance(records[0], ZsreRecord):
        records = normalize_zsre_records(records, source)
    out, skipped = [], 0
    for rec in records:
        ex = examples_from_record(rec, kinds)
        skipped += not ex
        out.extend(ex)
    if skipped:
        log.warning("%s: skipped %d of %d records whose subject is not in the question or whose names contain "
                    "{ } > ;", source, skipped, len(records))
    return out


def encode_examples(examples: Sequence[MemExample], tokenizer, *, max_len: int, pad_id: int = 0,
                    eos_id: Optional[int] = None) -> dict[str, np.ndarray]:
    """Right-padded arrays for teacher forcing: tokens [N, max_len] int32, mask [N, max_len] (real tokens) and
    loss_mask [N, max_len] (True where the token is a training target, i.e. predict tokens[:, t] from t-1).

    Prompt and segments are tokenized separately and concatenated, exactly as the decode loop sees them
    (spliced results are tokenized on their own). eos_id, if given, ends every example as a target. Examples
    longer than max_len are dropped with a logged count."""
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])
    rows = []
    for ex in examples:
        toks, targets = encode(ex.prompt), []
        targets = [False] * len(toks)
        for text, trained in ex.segments:
            piece = encode(text)
            toks += piece
            targets += [trained] * len(piece)
        if eos_id is not None:
            toks.append(eos_id)
            targets.append(True)
        if len(toks) <= max_len:
            rows.append((toks, targets))
    if len(rows) < len(examples):
        log.warning("dropped %d of %d examples longer than max_len=%d tokens", len(examples) - len(rows),
                    len(examples), max_len)
    tokens = np.full((len(rows), max_len), pad_id, np.int32)
    mask = np.zeros((len(rows), max_len), bool)
    loss_mask = np.zeros((len(rows), max_len), bool)
    for i, (toks, targets) in enumerate(rows):
        tokens[i, :len(toks)], mask[i, :len(toks)], loss_mask[i, :len(toks)] = toks, True, targets
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask}
