"""MemLLM's memory API-call language: parse calls out of generated text and format them back.

    write:  ({MEM_WRITE--> subject>>relation>>object;subject2>>relation2>>object2})
    read:   ({MEM_READ(subject>>relation>>;>>relation>>object)--> result1;result2})

A read query leaves exactly one entity slot empty: `s>>r>>` asks for objects, `>>r>>o` for subjects. During
generation the model writes a read up to its `-->`; the host then runs the queries (`pending_read`) and appends
`format_results(...)`, i.e. " result1;result2})". A write is executed once its `})` has been generated.

The parser runs on untrusted model output, so it never raises and never evaluates anything: it scans with
`str.find` in time linear in the text, caps sizes (`MAX_CALL_CHARS`, `MAX_ITEMS`, `MAX_FIELD_CHARS`) and skips
anything malformed with a logged warning. A call extends from its opener `({MEM_...` to the first `})`; if
another call opener appears first, the earlier call is abandoned as unterminated/nested and scanning resumes at
the later one. Whitespace around keywords, arrows, separators and names is ignored. A name may not contain
`{ } > ;` or control characters (so every formatted call parses back to the same names) and has at most
`MAX_FIELD_CHARS` characters.
"""
from __future__ import annotations

import dataclasses
import logging
import unicodedata
from typing import Optional, Sequence, Union

from gmem_jax.errors import GmemError
from gmem_jax.memllm.store import MAX_FIELD_CHARS, ReadQuery, Triple

log = logging.getLogger(__name__)

OPEN, CLOSE, ARROW, SEP, SLOT = "({", "})", "-->", ";", ">>"
WRITE, READ = "MEM_WRITE", "MEM_READ"
MAX_CALL_CHARS = 4096  # a call longer than this is runaway generation, not a memory operation
MAX_ITEMS = 32  # triples per write / queries or results per read
_MAX_LOGGED = 5  # warnings logged per parse; the rest are counted
_FORBIDDEN = frozenset("{}>;")


@dataclasses.dataclass(frozen=True)
class WriteCall:
    triples: tuple[Triple, ...]
    start: int  # text[start:end] is the whole call, from "({" to "})"
    end: int


@dataclasses.dataclass(frozen=True)
class ReadCall:
    queries: tuple[ReadQuery, ...]
    results: tuple[str, ...]
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class PendingRead:
    """A read whose `-->` ends the text: the host must answer `queries` now. `queries` is empty when the call
    was malformed; the host should still close it (with `format_results([])`) so generation can go on."""

    queries: tuple[ReadQuery, ...]
    start: int


Call = Union[WriteCall, ReadCall]


def clean_field(value: str) -> Optional[str]:
    """A name as it appears in a call: stripped; None if empty, too long or containing `{ } > ;` / controls."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value or len(value) > MAX_FIELD_CHARS:
        return None
    if any(ch in _FORBIDDEN or unicodedata.category(ch) == "Cc" for ch in value):
        return None
    return value


class _Warnings:
    """Collects a parse's problems and logs the first few (a flood of garbage must not flood the log)."""

    def __init__(self):
        self.count = 0

    def __call__(self, problem: str, snippet: str) -> None:
        self.count += 1
        if self.count <= _MAX_LOGGED:
            shown = snippet if len(snippet) <= 80 else snippet[:77] + "..."
            log.warning("ignoring memory call: %s: %r", problem, shown)

    def flush(self) -> None:
        if self.count > _MAX_LOGGED:
            log.warning("ignored %d more memory-call problems", self.count - _MAX_LOGGED)


def _opener_at(text: str, i: int) -> Optional[tuple[str, int]]:
    """If text[i:] starts a call ("({" + spaces + "MEM_..."), its keyword and the index just after it."""
    j = i + len(OPEN)
    while j < len(text) and text[j].isspace() and j - i < 64:
        j += 1
    for kw in (WRITE, READ):
        if text.startswith(kw, j):
            return kw, j + len(kw)
    if text.startswith("MEM_", j):
        return "MEM_?", j + 4  # an unknown call kind: still a call (so it is reported and skipped)
    return None


def _next_opener(text: str, start: int, stop: int) -> tuple[int, Optional[str], int]:
    """The first call opener in text[start:stop] -> (index, keyword, index after keyword), or (-1, None, -1)."""
    i = text.find(OPEN, start, stop)
    while i >= 0:
        hit = _opener_at(text, i)
        if hit is not None:
            return i, hit[0], hit[1]
        i = text.find(OPEN, i + 1, stop)
    return -1, None, -1


def _split_items(body: str, warn: _Warnings, call_text: str) -> Optional[list[str]]:
    items = [x for x in body.split(SEP) if x.strip()]
    if len(items) > MAX_ITEMS:
        warn(f"more than {MAX_ITEMS} items", call_text)
        return None
    return items


def _parse_triple(item: str) -> Optional[Triple]:
    parts = item.split(SLOT)
    if len(parts) != 3:
        return None
    fields = [clean_field(p) for p in parts]
    return None if None in fields else Triple(*fields)


def _parse_query(item: str) -> Optional[ReadQuery]:
    parts = item.split(SLOT)
    if len(parts) != 3:
        return None
    s, r, o = (p.strip() for p in parts)
    if (not s) == (not o) or clean_field(r) is None:
        return None  # exactly one entity slot must be asked for
    if s and clean_field(s) is None or o and clean_field(o) is None:
        return None
    return ReadQuery(clean_field(s) if s else None, clean_field(r), clean_field(o) if o else None)


def _parse_queries(segment: str, warn: _Warnings, call_text: str) -> Optional[tuple[ReadQuery, ...]]:
    """The text between MEM_READ and --> ("  (q1;q2) ") -> its valid queries, or None if it is malformed."""
    segment = segment.strip()
    if not (segment.startswith("(") and segment.endswith(")")):
        warn("read queries must be written as (query;query)", call_text)
        return None
    items = _split_items(segment[1:-1], warn, call_text)
    if items is None:
        return None
    queries = []
    for item in items:
        q = _parse_query(item)
        if q is None:
            warn("bad read query (want subject>>relation>> or >>relation>>object)", item)
        else:
            queries.append(q)
    return tuple(queries)


def _parse_body(kind: str, body: str, start: int, end: int, warn: _Warnings, call_text: str) -> Optional[Call]:
    """body: the text after the keyword up to (not including) "})"."""
    if kind == WRITE:
        rest = body.lstrip()
        if not rest.startswith(ARROW):
            warn("MEM_WRITE must be followed by -->", call_text)
            return None
        items = _split_items(rest[len(ARROW):], warn, call_text)
        if items is None:
            return None
        triples = []
        for item in items:
            t = _parse_triple(item)
            if t is None:
                warn("bad triple (want subject>>relation>>object)", item)
            else:
                triples.append(t)
        return WriteCall(tuple(triples), start, end) if triples else None
    if kind == READ:
        # The last arrow: results cannot contain ">", but a query name ending in "--" followed by ">>" can.
        arrow = body.rfind(ARROW)
        if arrow < 0:
            warn("MEM_READ(...) must be followed by -->", call_text)
            return None
        queries = _parse_queries(body[:arrow], warn, call_text)
        results = _split_items(body[arrow + len(ARROW):], warn, call_text)
        if not queries or results is None:
            return None
        return ReadCall(queries, tuple(r for r in (clean_field(x) for x in results) if r), start, end)
    warn("unknown call kind", call_text)
    return None


def parse_calls(text: str, *, final: bool = True) -> list[Call]:
    """All complete, well-formed calls in `text`, in order. Malformed ones are skipped with a warning; an
    unclosed call at the end is reported only when `final` (mid-generation it may still be being written)."""
    warn = _Warnings()
    calls: list[Call] = []
    pos, close = 0, -1
    while True:
        start, kind, after_kw = _next_opener(text, pos, len(text))
        if start < 0:
            break
        if close < after_kw:  # the cached closer is behind us: find the next one (keeps the scan linear)
            close = text.find(CLOSE, after_kw)
        if close < 0:
            if final:
                warn("unterminated call", text[start:start + 120])
            break
        inner, _, _ = _next_opener(text, after_kw, close)
        if inner >= 0:
            warn("call abandoned before its })", text[start:inner])
            pos = inner
            continue
        end = close + len(CLOSE)
        if end - start > MAX_CALL_CHARS:
            warn(f"call longer than {MAX_CALL_CHARS} characters", text[start:start + 120])
        else:
            call = _parse_body(kind, text[after_kw:close], start, end, warn, text[start:end])
            if call is not None:
                calls.append(call)
        pos = end
    warn.flush()
    return calls


def pending_read(text: str) -> Optional[PendingRead]:
    """If `text` ends (ignoring trailing spaces) with the `-->` of an open MEM_READ call, that read; else None.

    Only the last MAX_CALL_CHARS characters are examined, so the cost per call is bounded."""
    tail_start = max(0, len(text) - MAX_CALL_CHARS)
    t = text.rstrip()
    if not t.endswith(ARROW):
        return None
    i = t.rfind(OPEN, tail_start)
    while i >= 0 and _opener_at(t, i) is None:
        i = t.rfind(OPEN, tail_start, i)
    if i < 0:
        return None
    kind, after_kw = _opener_at(t, i)
    if kind != READ or t.find(CLOSE, i) >= 0:
        return None  # a write's arrow, or an already closed call
    warn = _Warnings()
    queries = _parse_queries(t[after_kw:len(t) - len(ARROW)], warn, t[i:])
    warn.flush()
    return PendingRead(queries or (), i)


def _field(value: str, what: str) -> str:
    clean = clean_field(value)
    if clean is None:
        raise GmemError(f"{what} {value!r} cannot be written in a memory call: it must be non-empty, at most "
                        f"{MAX_FIELD_CHARS} characters, without {{ }} > ; or control characters")
    return clean


def format_write(triples: Sequence[Sequence[str]]) -> str:
    """({MEM_WRITE--> s>>r>>o;s2>>r2>>o2})"""
    if not triples:
        raise GmemError("format_write needs at least one triple")
    body = SEP.join(SLOT.join(_field(x, f"triple #{i} {slot}") for x, slot in zip(t, Triple._fields))
                    for i, t in enumerate(triples))
    return f"{OPEN}{WRITE}{ARROW} {body}{CLOSE}"


def format_query(query: ReadQuery) -> str:
    """s>>r>> or >>r>>o"""
    if (query.subject is None) == (query.object is None):
        raise GmemError(f"read query {query} must leave exactly one of subject/object unknown (None)")
    s = "" if query.subject is None else _field(query.subject, "query subject")
    o = "" if query.object is None else _field(query.object, "query object")
    return f"{s}{SLOT}{_field(query.relation, 'query relation')}{SLOT}{o}"


def format_results(results: Sequence[str]) -> str:
    """What the host appends after a read's -->: " r1;r2})" (" })" when nothing was found)."""
    return " " + SEP.join(_field(r, "read result") for r in results) + CLOSE


def format_read(queries: Sequence[ReadQuery], results: Optional[Sequence[str]] = None) -> str:
    """({MEM_READ(q1;q2)--> r1;r2}), or only up to the --> when `results` is None (what the model generates)."""
    if not queries:
        raise GmemError("format_read needs at least one query")
    head = f"{OPEN}{READ}({SEP.join(format_query(q) for q in queries)}){ARROW}"
    return head if results is None else head + format_results(results)
