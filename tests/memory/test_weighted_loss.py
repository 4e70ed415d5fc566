"""Per-kind loss weights (train.kind_loss_weights): the loss_mask of the named kinds is scaled, and the segment
loop's cross-entropy is then the token-weighted mean, checked against the unweighted per-example sums."""
import numpy as np
import pytest
from memory_testlib import perturbed_memory, random_batch, small_memory, tiny_backbone

from gmem_jax.errors import GmemError
from gmem_jax.memory import model as memory_model
from gmem_jax.tasks.base import SegmentedExample
from gmem_jax.training.builders import weight_kinds


def _example(kind, mask):
    z = np.zeros((1, 4), np.int32)
    return SegmentedExample(z, z > -1, z, np.asarray([mask], np.float32), z < 0, np.zeros((1, 1), np.int32),
                            np.ones((1, 1), bool), np.zeros((1, 1), np.float32), 2, {"id": kind, "kind": kind})


def test_weight_kinds_scales_only_the_named_kinds():
    exs = [_example("reliability", [0, 1, 1, 0]), _example("locality", [0, 1, 1, 1]), _example(None, [1, 0, 0, 0])]
    assert all(a is b for a, b in zip(weight_kinds(exs, ""), exs))
    out = weight_kinds(exs, "locality=4, reliability=0.5")
    np.testing.assert_array_equal(out[0].loss_mask, [[0, 0.5, 0.5, 0]])
    np.testing.assert_array_equal(out[1].loss_mask, [[0, 4, 4, 4]])
    assert out[2] is exs[2] and out[1].loss_mask.dtype == np.float32
    np.testing.assert_array_equal(exs[1].loss_mask, [[0, 1, 1, 1]])  # the inputs are not modified
    with pytest.raises(GmemError, match=r"kinds \['portability'\] that no training example has"):
        weight_kinds(exs, "portability=2")
    with pytest.raises(GmemError, match="kind_loss_weights: 'locality' is not NAME=FACTOR"):
        weight_kinds(exs, "locality")


def test_weighted_mask_gives_the_token_weighted_mean_cross_entropy():
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory()
    mem = perturbed_memory(cfg, mcfg)
    batch = random_batch(cfg)  # 3 documents
    plain = memory_model.forward_segments(mem, frozen, batch, cfg, mcfg)
    nll, ntok = np.asarray(plain.per_example["nll_sum"]), np.asarray(plain.per_example["tokens"])
    w = np.array([4.0, 1.0, 0.25], np.float32)
    weighted = dict(batch, loss_mask=batch["loss_mask"] * w[:, None, None])
    got = memory_model.forward_segments(mem, frozen, weighted, cfg, mcfg).metrics["ce"]
    np.testing.assert_allclose(got, (w * nll).sum() / (w * ntok).sum(), rtol=1e-5)
    assert abs(float(got) - nll.sum() / ntok.sum()) > 1e-3  # the weights did change the loss
