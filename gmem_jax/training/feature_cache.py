"""Frozen-feature cache: run the frozen backbone once per distinct training segment, not once per step.

With the final injection the memory sits after the backbone's last layer: the backbone's hidden states of a
segment (run alone) do not depend on the memory, so the train step only needs them, not the backbone. Caching
them makes a step cost the memory and the LM head at the loss positions alone, and epochs after the first free
of backbone work. Identical segments (the same question under several edits, the same edit under several
questions) are computed and stored once.

The cache fills lazily, batch by batch: a segment is computed the first time a batch contains it. A run of a few
hundred steps over a large training set therefore pays only for the segments it visits (not the whole set up
front; plus the segments the input statistics are estimated from, `trainer._initial_params`), a resumed run
refills only what it meets again, and any batch (the trainer's end-of-run probe included) can be served.

Cost: one float array [distinct segments seen, seg_len, H] (two with a write_layer) in host RAM (all of ZsRE
counterfactual at SmolLM2: ~1.3 GB). Single process only: with several processes each would need its own shard.
"""
from __future__ import annotations

import jax
import numpy as np

from gmem_jax.errors import GmemError
from gmem_jax.memory.model import frozen_features
from gmem_jax.tasks.base import collate


class FeatureCache:
    """Frozen features (`frozen_features`: 'features', and 'write_features' with a write_layer) per distinct
    segment, where two segments are the same when their tokens and mask are equal everywhere."""

    def __init__(self, frozen, cfg, *, write_layer: int = -1, chunk: int = 16):
        """`frozen` is held only to pass it to the jitted backbone call; `chunk` segments run per call (the last
        chunk padded, so one compile)."""
        if jax.process_count() > 1:
            raise GmemError("train.feature_cache works in a single process only; set train.feature_cache=False "
                            "for multi-host runs")
        self._frozen, self._cfg, self._write_layer, self._chunk = frozen, cfg, write_layer, chunk
        self._run = jax.jit(frozen_features, static_argnums=(3, 4))
        self._rows: dict[bytes, int] = {}  # segment key -> row of the tables
        self._tables: dict[str, np.ndarray] = {}  # name -> [capacity, T, H]; the first _filled rows are valid
        self._filled = 0
        self.served = 0  # segments handed out, repeats included

    def features(self, tokens: np.ndarray, token_mask: np.ndarray) -> dict:
        """tokens, token_mask [B, N, T] -> {key: [B, N, T, H]}, computing the segments not seen before."""
        B, N, T = tokens.shape
        tok, msk = tokens.reshape(-1, T).astype(np.int32), token_mask.reshape(-1, T).astype(bool)
        keys = [t.tobytes() + m.tobytes() for t, m in zip(tok, msk)]
        new: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            if key not in self._rows and key not in new:
                new[key] = i
        if new:
            self._compute(list(new), tok[list(new.values())], msk[list(new.values())])
        rows = np.fromiter((self._rows[k] for k in keys), np.int64, len(keys))
        self.served += len(keys)
        return {k: t[rows].reshape(B, N, T, -1) for k, t in self._tables.items()}

    def segments(self, tokens: np.ndarray, token_mask: np.ndarray) -> dict:
        """tokens, token_mask [b, T] (single segments) -> {key: [b, T, H]}; `features` without the N axis."""
        return {k: v[:, 0] for k, v in self.features(tokens[:, None], token_mask[:, None]).items()}

    def _compute(self, keys: list, tok: np.ndarray, msk: np.ndarray) -> None:
        for lo in range(0, len(keys), self._chunk):
            t, m = tok[lo:lo + self._chunk], msk[lo:lo + self._chunk]
            n = len(t)
            if n < self._chunk:  # pad with copies of the first row: same shape, results dropped
                t = np.concatenate([t, np.repeat(t[:1], self._chunk - n, 0)])
                m = np.concatenate([m, np.repeat(m[:1], self._chunk - n, 0)])
            out = self._run(self._frozen, t, m, self._cfg, self._write_layer)
            for name, v in out.items():
                self._append(name, np.asarray(v)[:n])
            for key in keys[lo:lo + n]:
                self._rows[key] = self._filled
                self._filled += 1

    def _append(self, name: str, rows: np.ndarray) -> None:
        """Write rows after the filled ones, growing the table by doubling (amortised O(1) copies per row)."""
        table, used = self._tables.get(name), self._filled
        if table is None or used + len(rows) > len(table):
            grown = np.empty((max(2 * used, used + len(rows), 64),) + rows.shape[1:], rows.dtype)
            if table is not None:
                grown[:used] = table[:used]
            self._tables[name] = table = grown
        table[used:used + len(rows)] = rows

    @property
    def num_segments(self) -> int:
        """Distinct segments computed so far (each ran through the backbone exactly once)."""
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        return int(sum(t[:self._filled].nbytes for t in self._tables.values()))


def cached_collate(cache: FeatureCache):
    """collate_fn for a BatchIterator: the task arrays plus the frozen features of their segments."""

    def collate_fn(examples):
        arrays = collate(list(examples))
        return dict(arrays, **cache.features(arrays["tokens"], arrays["token_mask"]))

    return collate_fn
