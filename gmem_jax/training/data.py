"""A deterministic, resumable batch iterator over an indexable dataset, and optional background prefetch.

Global batch b of epoch e is `perm_e[b*G : (b+1)*G]` with `perm_e = default_rng([seed, e]).permutation(N)`:
a pure function of (seed, epoch, position), so the iterator state is two integers and resuming reproduces the
uninterrupted sequence exactly. Each host takes its contiguous 1/process_count slice of every global batch (the
slices concatenated in process order are the global batch). The last partial batch of an epoch is dropped so
every step sees the same shapes (no recompiles).
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from gmem_jax.errors import GmemError


def stack_collate(examples: list) -> Any:
    """Default collate: stack a list of equally shaped pytrees (dicts of arrays, tuples, arrays) along a new
    leading batch axis: leaves [...] -> [batch, ...]."""
    return jax.tree.map(lambda *xs: np.stack(xs), *examples)


class BatchIterator:
    """Iterates host-local batches forever (or for `num_epochs`); `state()` / `restore()` make it resumable."""

    def __init__(self, examples: Sequence, global_batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 collate_fn: Callable[[list], Any] = stack_collate, num_epochs: Optional[int] = None,
                 process_index: Optional[int] = None, process_count: Optional[int] = None):
        self.examples = examples
        self.global_batch_size = int(global_batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.collate_fn = collate_fn
        self.num_epochs = num_epochs
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        n, g, pc = len(examples), self.global_batch_size, self.process_count
        if g <= 0 or g % pc:
            raise GmemError(f"global batch size {g} must be a positive multiple of the process count {pc}; "
                            "change the batch size")
        if n < g:
            raise GmemError(f"the dataset has {n} examples, fewer than one global batch of {g}; use a smaller "
                            "batch size or more data")
        self.batches_per_epoch = n // g
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = -1, None

    def _permutation(self) -> np.ndarray:
        if self._order_epoch != self.epoch:  # cached: one permutation per epoch
            n = len(self.examples)
            self._order = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                           else np.arange(n))
            self._order_epoch = self.epoch
        return self._order

    def __iter__(self) -> Iterator:
        return self

    def __next__(self) -> Any:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        g, local = self.global_batch_size, self.global_batch_size // self.process_count
        start = self.position * g + self.process_index * local
        indices = self._permutation()[start:start + local]
        batch = self.collate_fn([self.examples[int(i)] for i in indices])
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state(self) -> dict:
        """A small JSON dict: where the next batch comes from, plus what it is only valid for."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples), "global_batch_size": self.global_batch_size}

    def restore(self, state: dict) -> None:
        """Continue from a `state()` taken by an iterator over the same data, seed and global batch size."""
        for key, have in (("seed", self.seed), ("num_examples", len(self.examples)),
                          ("global_batch_size", self.global_batch_size)):
            if state.get(key) != have:
                raise GmemError(f"data iterator state was saved with {key}={state.get(key)} but this run has "
                                f"{key}={have}: resume with the same data and batch settings or use a new --workdir")
        if not 0 <= int(state["position"]) < self.batches_per_epoch:
            raise GmemError(f"data iterator state position {state['position']} is outside [0, "
                            f"{self.batches_per_epoch}); the state does not belong to this dataset")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


_DONE = object()


class Prefetcher:
    """Runs `transform(next(iterator))` (e.g. host->device transfer) `size` batches ahead in a thread.

    `state()` is the wrapped iterator's state as of the last batch *handed out* (not the ones queued), so a
    checkpoint taken between steps resumes exactly where training was."""

    def __init__(self, iterator: BatchIterator, size: int = 2, transform: Callable[[Any], Any] = lambda b: b):
        self._iterator = iterator
        self._state = iterator.state()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(transform,), daemon=True)
        self._thread.start()

    def _run(self, transform):
        try:
            for batch in self._iterator:
                if not self._put((transform(batch), self._iterator.state())):
                    return
            self._put(_DONE)
        except BaseException as e:  # surfaced in the consumer's thread
            self._put(e)

    def _put(self, item) -> bool:
        """Queue `item`, waiting while the queue is full; False when closed meanwhile."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is _DONE:
            self._queue.put(_DONE)  # keep raising StopIteration on later calls
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._state = item
        return batch

    def state(self) -> dict:
        return dict(self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
