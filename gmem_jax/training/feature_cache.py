"""Frozen-feature cache: run the frozen backbone once per distinct training segment, not once per step.

With the final injection the memory sits after the backbone's last layer: the backbone's hidden states of a
segment (run alone) do not depend on the memory, so the train step only needs them, not the backbone. Caching
them makes a step cost the memory and the LM head at the loss positions alone, and epochs after the first free
of backbone work. Identical segments (the same question under several edits, the same edit under several
questions) are computed and stored once.

Cost: one float array [distinct segments, seg_len, H] in host RAM (ZsRE counterfactual at SmolLM2: ~1 GB).
Single process only: with several processes each would need its own shard of the table.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.memory.model import frozen_features
from gmem_jax.tasks.base import collate


def distinct_segments(tokens: np.ndarray, token_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tokens/token_mask [E, N, T] -> (rows [U] into the flattened [E*N] segments, one per distinct segment;
    index [E, N] into those U rows). Two segments are the same when tokens and mask are equal everywhere."""
    E, N, T = tokens.shape
    flat = np.concatenate([tokens.reshape(E * N, T).astype(np.int64),
                           token_mask.reshape(E * N, T).astype(np.int64)], axis=1)
    _, first, inverse = np.unique(flat, axis=0, return_index=True, return_inverse=True)
    return first, inverse.reshape(E, N)


class FeatureCache:
    """`table[index[e, k]]` holds segment k of example e as the frozen backbone sees it: [T, H]."""

    def __init__(self, table: np.ndarray, index: np.ndarray):
        self.table, self.index = table, index

    @classmethod
    def build(cls, examples: Sequence, frozen, cfg, *, batch_size: int = 16, progress=None) -> "FeatureCache":
        """Run `frozen_features` over every distinct segment of `examples`, `batch_size` segments at a time (the
        last batch padded, so one compile). `progress(done, total)` is called after each batch, in segments."""
        if jax.process_count() > 1:
            raise GmemError("train.feature_cache works in a single process only; set train.feature_cache=False "
                            "for multi-host runs")
        arrays = collate(list(examples))
        tokens, mask = arrays["tokens"], arrays["token_mask"]
        rows, index = distinct_segments(tokens, mask)
        T = tokens.shape[-1]
        seg_tokens, seg_mask = tokens.reshape(-1, T)[rows], mask.reshape(-1, T)[rows].astype(bool)
        run = jax.jit(frozen_features, static_argnums=(3,))
        table = None
        for start in range(0, len(rows), batch_size):
            tok, msk = seg_tokens[start:start + batch_size], seg_mask[start:start + batch_size]
            n = len(tok)
            if n < batch_size:  # pad with copies of the first row: same shape, results dropped
                tok = np.concatenate([tok, np.repeat(tok[:1], batch_size - n, 0)])
                msk = np.concatenate([msk, np.repeat(msk[:1], batch_size - n, 0)])
            h = np.asarray(run(frozen, tok, msk, cfg))[:n]
            if table is None:
                table = np.empty((len(rows),) + h.shape[1:], h.dtype)
            table[start:start + n] = h
            if progress is not None:
                progress(start + n, len(rows))
        return cls(table, index)

    def features(self, example_ids: Sequence[int]) -> np.ndarray:
        """[len(example_ids), N, T, H] for a batch of example positions."""
        return self.table[self.index[np.asarray(example_ids)]]

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes)


class IndexedExamples:
    """A sequence view yielding (position, example), so a batch's collate can look up cached features."""

    def __init__(self, examples: Sequence):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return i, self.examples[i]


def cached_collate(cache: FeatureCache):
    """collate_fn for a BatchIterator over IndexedExamples: the task arrays plus 'features' [B, N, T, H]."""

    def collate_fn(items):
        ids = [i for i, _ in items]
        return dict(collate([ex for _, ex in items]), features=cache.features(ids))

    return collate_fn
