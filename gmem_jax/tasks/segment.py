"""Packing tokenized context sentences into fixed-size segments and laying out one `SegmentedExample`.

Rules (the tests check each one):
- Sentences are tokenized ONE BY ONE, each as " " + sentence.strip() (`sentence_units`): a sentence then has
  the same ids wherever it lands, so a segment boundary never changes its tokens, and byte-level BPEs (GPT-2,
  Llama) see the space that separates it from the previous sentence in running text.
- Packing is greedy in order. A sentence that fits in a segment is never split: it starts a new segment when
  it does not fit in the current one (too many tokens, or all `max_sents` sentence slots used).
- A sentence LONGER than seg_len starts a new segment and is cut into seg_len-token chunks (every token is
  kept); its sentence slot (sent_pos) is its last token, in its last chunk.
- Units sharing a `group` (a paragraph) are kept together: a group that does not fit in the current segment
  starts a new one (and is packed sentence by sentence from there if it is longer than a segment).
- Units with slot=False (e.g. paragraph titles) are context tokens without a sentence slot.
- Concatenating the masked tokens of the context segments gives back every unit's tokens in order.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Hashable, Sequence

import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.tasks.base import LAYOUTS, OVERFLOW_POLICIES, SegmentedExample
from gmem_jax.tasks.tokenizers import encode_batch


@dataclasses.dataclass(frozen=True)
class Unit:
    """One context sentence (or title line) as token ids.

    key:   what a metric calls this sentence, e.g. (title, sent_id) for HotpotQA; None for sentences nobody scores
    label: 1.0 for a supporting fact
    slot:  whether it gets a sentence slot (sent_pos/sent_mask/sent_label); titles and filler do not
    group: paragraph id; consecutive units with the same non-None group are kept in one segment when they fit
    entity: what the sentence is about (SegmentedExample.entity), -1 for nothing known
    """

    tokens: tuple[int, ...]
    key: Hashable | None = None
    label: float = 0.0
    slot: bool = True
    group: int | None = None
    entity: int = -1


@dataclasses.dataclass(frozen=True)
class Piece:
    """A contiguous run of one unit's tokens inside one segment; `last` marks the piece holding its last token."""

    unit: int
    start: int
    end: int
    last: bool


def sentence_units(tokenizer: Any, sentences: Sequence[str], *, keys: Sequence[Hashable | None] | None = None,
                   labels: Sequence[float] | None = None, slots: Sequence[bool] | None = None,
                   groups: Sequence[int | None] | None = None, entities: Sequence[int] | None = None) -> list[Unit]:
    """Units for sentences (per-sentence keys/labels/slots/groups/entities; defaults None/0.0/True/None/-1), each
    tokenized on its own as " " + sentence.strip(), in one batched tokenizer call. Empty sentences are dropped (they
    have no last token to point at)."""
    n = len(sentences)
    keys = list(keys) if keys is not None else [None] * n
    labels = list(labels) if labels is not None else [0.0] * n
    slots = list(slots) if slots is not None else [True] * n
    groups = list(groups) if groups is not None else [None] * n
    entities = list(entities) if entities is not None else [-1] * n
    kept = [i for i, s in enumerate(sentences) if s.strip()]
    ids = encode_batch(tokenizer, [" " + sentences[i].strip() for i in kept])
    return [Unit(tuple(t), keys[i], float(labels[i]), bool(slots[i]), groups[i], int(entities[i]))
            for i, t in zip(kept, ids) if t]


def pack_units(units: Sequence[Unit], *, seg_len: int, max_sents: int) -> list[list[Piece]]:
    """Greedy packing of units into segments of at most seg_len tokens and max_sents slotted sentences
    (max_sents=0: no slots, no slot limit). Returns the pieces of each segment, in order."""
    use_slots = max_sents > 0
    segments: list[list[Piece]] = []
    cur: list[Piece] = []
    cur_len = cur_slots = 0

    def close():
        nonlocal cur, cur_len, cur_slots
        if cur:
            segments.append(cur)
        cur, cur_len, cur_slots = [], 0, 0

    def fits(n_tokens: int, n_slots: int) -> bool:
        return cur_len + n_tokens <= seg_len and (not use_slots or cur_slots + n_slots <= max_sents)

    def place(i: int) -> None:
        nonlocal cur_len, cur_slots
        u = units[i]
        n, s = len(u.tokens), int(u.slot and use_slots)
        if not fits(n, s):
            close()
        if n <= seg_len:
            cur.append(Piece(i, 0, n, True))
            cur_len, cur_slots = cur_len + n, cur_slots + s
            return
        for start in range(0, n, seg_len):  # longer than a segment: full chunks, the remainder stays open
            end = min(start + seg_len, n)
            cur.append(Piece(i, start, end, end == n))
            cur_len = end - start
            if end < n:
                close()
        cur_slots = s

    i = 0
    while i < len(units):
        j = i + 1
        if units[i].group is not None:
            while j < len(units) and units[j].group == units[i].group:
                j += 1
        group = [k for k in range(i, j) if units[k].tokens]
        n_tok = sum(len(units[k].tokens) for k in group)
        n_slot = sum(units[k].slot for k in group) if use_slots else 0
        if j - i > 1 and not fits(n_tok, n_slot):
            close()  # a paragraph that does not fit here starts a fresh segment
        for k in group:
            place(k)
        i = j
    close()
    return segments


def build_example(units: Sequence[Unit], prompt: Sequence[int], answer: Sequence[int], *, n_seg: int, seg_len: int,
                  max_sents: int, pad_id: int, eos_id: int, layout: str = "memory", window: int | None = None,
                  context_sep: Sequence[int] = (), overflow: str = "drop_oldest", meta: dict | None = None,
                  question_entity: int = -1) -> SegmentedExample:
    """Lay out one document: context `units` before the last segment, then prompt + answer + EOS in it.

    layout "memory": units packed into the n_seg - 1 segments before the last (empty segments at the FRONT);
           "none":   no context (the no-memory baseline);
           "prompt": the last `window` context tokens (None: as many as fit) + `context_sep` precede the prompt in
                     the last segment (the frozen model with the context in its window).
    The last segment's targets: loss_mask is 1 at positions prompt_len-1 .. prompt_len+len(answer)-1, whose
    labels are the answer tokens and EOS. If the context needs more than n_seg - 1 segments, overflow
    "drop_oldest" drops the earliest segments, "error" raises. meta 'dropped_tokens' / 'dropped_sentences'
    count the context the example does not contain (for "none": all of it; for "prompt": what is outside the
    window). `entity` carries each context unit's entity to its tokens and question_entity to the prompt's and the
    answer's.
    """
    meta = dict(meta or {})
    name = meta.get("id", "?")
    if layout not in LAYOUTS or overflow not in OVERFLOW_POLICIES:
        raise GmemError(f"example {name}: layout {layout!r} / overflow {overflow!r} unknown; use layout in {LAYOUTS} "
                        f"and overflow in {OVERFLOW_POLICIES}")
    if not prompt:
        raise GmemError(f"example {name}: empty prompt; the question must have at least one token")
    fixed = len(prompt) + len(answer) + 1
    n_context = sum(len(u.tokens) for u in units)
    segments: list[list[Piece]] = []
    dropped_tokens = dropped_sentences = 0
    if layout == "prompt":
        room = seg_len - fixed - len(context_sep)
        keep = room if window is None else window
        if keep > room:
            raise GmemError(f"example {name}: window={window} + separator {len(context_sep)} + prompt {len(prompt)} "
                            f"+ answer {len(answer)} + EOS = {keep + fixed + len(context_sep)} tokens exceed "
                            f"seg_len={seg_len}; lower window or raise seg_len")
        keep = max(0, min(keep, n_context))
        flat = [t for u in units for t in u.tokens]
        head = flat[len(flat) - keep:] if keep else []
        head_entity = [u.entity for u in units for _ in u.tokens][len(flat) - keep:] if keep else []
        last = head + (list(context_sep) if head else []) + list(prompt)
        dropped_tokens = n_context - keep
        dropped_sentences = _sentences_ending_before(units, n_context - keep)
    else:
        last, head_entity = list(prompt), []
        if layout == "memory":
            segments = pack_units(units, seg_len=seg_len, max_sents=max_sents)
            excess = len(segments) - (n_seg - 1)
            if excess > 0:
                if overflow == "error":
                    raise GmemError(f"example {name}: the context needs {len(segments)} segments of {seg_len} tokens "
                                    f"but only n_seg-1={n_seg - 1} precede the question; raise n_seg or seg_len, "
                                    "or use overflow='drop_oldest'")
                dropped_tokens = sum(p.end - p.start for seg in segments[:excess] for p in seg)
                dropped_sentences = sum(p.last and units[p.unit].slot for seg in segments[:excess] for p in seg)
                segments = segments[excess:]
        else:
            dropped_tokens = n_context
            dropped_sentences = sum(u.slot for u in units)
    prompt_len = len(last)
    last += list(answer) + [eos_id]
    if len(last) > seg_len:
        raise GmemError(f"example {name}: prompt ({prompt_len} tokens) + answer ({len(answer)}) + EOS = {len(last)} "
                        f"tokens do not fit in the last segment (seg_len={seg_len}); raise seg_len")

    tokens = np.full((n_seg, seg_len), pad_id, np.int32)
    token_mask = np.zeros((n_seg, seg_len), np.bool_)
    support_mask = np.zeros((n_seg, seg_len), np.bool_)
    entity = np.full((n_seg, seg_len), -1, np.int32)
    sent_pos = np.zeros((n_seg, max_sents), np.int32)
    sent_mask = np.zeros((n_seg, max_sents), np.bool_)
    sent_label = np.zeros((n_seg, max_sents), np.float32)
    sent_keys: list[list[Any]] = [[None] * max_sents for _ in range(n_seg)]
    first = n_seg - 1 - len(segments)  # front padding: context ends right before the last segment
    for s, seg in enumerate(segments, start=first):
        pos = slot = 0
        for p in seg:
            u = units[p.unit]
            tokens[s, pos:pos + p.end - p.start] = u.tokens[p.start:p.end]
            support_mask[s, pos:pos + p.end - p.start] = u.label > 0
            entity[s, pos:pos + p.end - p.start] = u.entity
            pos += p.end - p.start
            if p.last and u.slot and max_sents > 0:
                sent_pos[s, slot], sent_mask[s, slot], sent_label[s, slot] = pos - 1, True, u.label
                sent_keys[s][slot] = u.key
                slot += 1
        token_mask[s, :pos] = True
    tokens[-1, :len(last)] = last
    token_mask[-1, :len(last)] = True
    entity[-1, :len(head_entity)] = head_entity  # the separator after them stays -1
    entity[-1, len(last) - len(answer) - 1 - len(prompt):len(last)] = question_entity

    labels = np.zeros((n_seg, seg_len), np.int32)
    labels[:, :-1] = np.where(token_mask[:, 1:], tokens[:, 1:], 0)  # next token within the same segment
    loss_mask = np.zeros((n_seg, seg_len), np.float32)
    loss_mask[-1, prompt_len - 1:prompt_len + len(answer)] = 1.0
    meta.update(sent_keys=sent_keys, layout=layout, dropped_tokens=int(dropped_tokens),
                dropped_sentences=int(dropped_sentences), n_context_segments=len(segments))
    return SegmentedExample(tokens, token_mask, labels, loss_mask, support_mask, sent_pos, sent_mask, sent_label,
                            prompt_len, meta, entity)


def _sentences_ending_before(units: Sequence[Unit], n_tokens: int) -> int:
    """Slotted units whose last token is among the first n_tokens context tokens (i.e. cut off the window)."""
    end = count = 0
    for u in units:
        end += len(u.tokens)
        count += int(u.slot and end <= n_tokens)
    return count
