"""BatchIterator: exact batches against a hand-built oracle, per-host slicing, resume == uninterrupted, prefetch."""
import json

import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.training.data import BatchIterator, Prefetcher


def _examples(n):
    # dicts of fixed-shape arrays, like the tasks' examples; 'id' lets us see exactly which examples were picked
    return [{"id": np.int64(i), "tokens": np.full((2, 3), i, np.int32)} for i in range(n)]


def test_batches_follow_the_seeded_permutation_and_drop_the_remainder():
    it = BatchIterator(_examples(10), global_batch_size=4, seed=7, process_index=0, process_count=1)
    got = [next(it)["id"].tolist() for _ in range(5)]
    p0 = np.random.default_rng([7, 0]).permutation(10)
    p1 = np.random.default_rng([7, 1]).permutation(10)
    p2 = np.random.default_rng([7, 2]).permutation(10)
    # 10 // 4 = 2 batches per epoch; the last 2 examples of each epoch are dropped
    assert got == [p0[0:4].tolist(), p0[4:8].tolist(), p1[0:4].tolist(), p1[4:8].tolist(), p2[0:4].tolist()]
    assert it.state() == {"epoch": 2, "position": 1, "seed": 7, "num_examples": 10, "global_batch_size": 4}


def test_collate_and_no_shuffle():
    it = BatchIterator(_examples(6), 3, shuffle=False, process_index=0, process_count=1)
    b = next(it)
    assert b["tokens"].shape == (3, 2, 3) and b["tokens"].dtype == np.int32
    np.testing.assert_array_equal(b["tokens"][:, 0, 0], [0, 1, 2])
    custom = BatchIterator(list(range(6)), 3, shuffle=False, collate_fn=sum, process_index=0, process_count=1)
    assert [next(custom), next(custom), next(custom)] == [0 + 1 + 2, 3 + 4 + 5, 0 + 1 + 2]


def test_hosts_take_disjoint_slices_that_make_up_the_global_batch():
    data = _examples(24)
    single = BatchIterator(data, 8, seed=3, process_index=0, process_count=1)
    hosts = [BatchIterator(data, 8, seed=3, process_index=i, process_count=4) for i in range(4)]
    for _ in range(6):  # two epochs of 3 batches
        parts = [next(h)["id"] for h in hosts]
        assert all(p.shape == (2,) for p in parts)
        assert np.concatenate(parts).tolist() == next(single)["id"].tolist()


def test_resume_gives_the_same_batches_as_uninterrupted():
    data = _examples(13)
    uninterrupted = BatchIterator(data, 4, seed=11, process_index=1, process_count=2)
    expected = [next(uninterrupted)["id"].tolist() for _ in range(10)]

    first = BatchIterator(data, 4, seed=11, process_index=1, process_count=2)
    got = [next(first)["id"].tolist() for _ in range(4)]
    saved = json.loads(json.dumps(first.state()))  # goes through the checkpoint's JSON
    resumed = BatchIterator(data, 4, seed=11, process_index=1, process_count=2)
    resumed.restore(saved)
    got += [next(resumed)["id"].tolist() for _ in range(6)]
    assert got == expected


def test_num_epochs_and_errors():
    it = BatchIterator(_examples(5), 2, num_epochs=2, process_index=0, process_count=1)
    assert len(list(it)) == 4
    with pytest.raises(GmemError, match="multiple of the process count 4"):
        BatchIterator(_examples(8), 6, process_index=0, process_count=4)
    with pytest.raises(GmemError, match="3 examples, fewer than one global batch of 4"):
        BatchIterator(_examples(3), 4, process_index=0, process_count=1)
    it = BatchIterator(_examples(8), 4, seed=1, process_index=0, process_count=1)
    with pytest.raises(GmemError, match="seed=2 but this run has seed=1"):
        it.restore({**it.state(), "seed": 2})


def test_prefetcher_state_tracks_consumed_batches_and_resumes_exactly():
    data = _examples(12)
    expected = [b["id"].tolist() for b, _ in zip(BatchIterator(data, 3, seed=5, process_index=0, process_count=1),
                                                 range(9))]
    pre = Prefetcher(BatchIterator(data, 3, seed=5, process_index=0, process_count=1), size=3,
                     transform=lambda b: b["id"].tolist())
    got = [next(pre) for _ in range(4)]
    state = pre.state()  # the producer thread is ahead; the state must not be
    assert state["epoch"] == 1 and state["position"] == 0
    pre.close()
    resumed = BatchIterator(data, 3, seed=5, process_index=0, process_count=1)
    resumed.restore(state)
    got += [b["id"].tolist() for b in (next(resumed) for _ in range(5))]
    assert got == expected


def test_prefetcher_propagates_errors_and_end():
    def bad_collate(items):
        raise ValueError("broken example")

    with pytest.raises(ValueError, match="broken example"):
        next(Prefetcher(BatchIterator(list(range(4)), 2, collate_fn=bad_collate, process_index=0, process_count=1)))
    pre = Prefetcher(BatchIterator(list(range(4)), 2, collate_fn=list, num_epochs=1, shuffle=False,
                                   process_index=0, process_count=1))
    assert list(pre) == [[0, 1], [2, 3]]
