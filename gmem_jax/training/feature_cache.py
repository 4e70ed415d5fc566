"""Frozen-feature cache: run the frozen backbone once per distinct training segment, not once per step.

With the final injection the memory sits after the backbone's last layer: the backbone's hidden states of a
segment (run alone) do not depend on the memory, so the train step only needs them, not the backbone. Caching
them makes a step cost the memory and the LM head at the loss positions alone, and epochs after the first free
of backbone work. Identical segments (the same question under several edits, the same edit under several
questions) are computed and stored once.

Cost: one float array [distinct segments, seg_len, H] (two with a write_layer) in host RAM (ZsRE counterfactual at SmolLM2: ~1 GB).
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
    """`tables[key][index[e, k]]` holds segment k of example e as the frozen backbone sees it: [T, H], for each
    batch key of `frozen_features` ('features', and 'write_features' with a write_layer)."""

    def __init__(self, tables: dict, index: np.ndarray):
        self.tables, self.index = tables, index

    @classmethod
    def build(cls, examples: Sequence, frozen, cfg, *, write_layer: int = -1, batch_size: int = 16,
              progress=None) -> "FeatureCache":
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
        run = jax.jit(frozen_features, static_argnums=(3, 4))
        tables = None
        for start in range(0, len(rows), batch_size):
            tok, msk = seg_tokens[start:start + batch_size], seg_mask[start:start + batch_size]
            n = len(tok)
            if n < batch_size:  # pad with copies of the first row: same shape, results dropped
                tok = np.concatenate([tok, np.repeat(tok[:1], batch_size - n, 0)])
                msk = np.concatenate([msk, np.repeat(msk[:1], batch_size - n, 0)])
            out = {k: np.asarray(v)[:n] for k, v in run(frozen, tok, msk, cfg, write_layer).items()}
            if tables is None:
                tables = {k: np.empty((len(rows),) + v.shape[1:], v.dtype) for k, v in out.items()}
            for k, v in out.items():
                tables[k][start:start + n] = v
            if progress is not None:
                progress(start + n, len(rows))
        return cls(tables, index)

    def features(self, example_ids: Sequence[int]) -> dict:
        """{key: [len(example_ids), N, T, H]} for a batch of example positions."""
        rows = self.index[np.asarray(example_ids)]
        return {k: t[rows] for k, t in self.tables.items()}

    @property
    def num_segments(self) -> int:
        return int(len(next(iter(self.tables.values()))))

    @property
    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.tables.values()))


class IndexedExamples:
    """A sequence view yielding (position, example), so a batch's collate can look up cached features."""

    def __init__(self, examples: Sequence):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return i, self.examples[i]


def cached_collate(cache: FeatureCache):
    """collate_fn for a BatchIterator over IndexedExamples: the task arrays plus the cached features."""

    def collate_fn(items):
        ids = [i for i, _ in items]
        return dict(collate([ex for _, ex in items]), **cache.features(ids))

    return collate_fn
