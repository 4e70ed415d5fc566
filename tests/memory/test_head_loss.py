"""The LM-head loss with a saved input gradient (`losses.frozen_head_cross_entropy`): same values and gradients
as plain autodiff of head + cross-entropy, and the rematerialised backward no longer runs the head again."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from memory_testlib import count_dot_generals, perturbed_memory, random_batch, small_memory, tiny_backbone

from gmem_jax import losses
from gmem_jax.backbones import lm_logits
from gmem_jax.memory import model as memory_model


def _plain_head_ce(head_fn, params, hidden, labels):
    return losses.cross_entropy(head_fn(params, hidden), labels)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # tied and untied head
def test_values_and_gradients_equal_plain_autodiff(arch):
    cfg, frozen = tiny_backbone(arch)
    head = lambda p, h: lm_logits(p, h, cfg)  # noqa: E731
    h = jax.random.normal(jax.random.PRNGKey(1), (2, 5, cfg.hidden_size))
    y = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, cfg.vocab_size)
    w = jax.random.normal(jax.random.PRNGKey(3), (2, 5))  # distinct per-position cotangents

    def loss(fn, h):
        nll, pred = fn(head, frozen, h, y)
        return (nll * w).sum(), pred

    (got, got_pred), got_grad = jax.value_and_grad(lambda h: loss(losses.frozen_head_cross_entropy, h),
                                                   has_aux=True)(h)
    (want, want_pred), want_grad = jax.value_and_grad(lambda h: loss(_plain_head_ce, h), has_aux=True)(h)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(got_pred, want_pred)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("injection, remat", [("final", True), ("residual", False)])
def test_memory_gradients_equal_plain_head_autodiff(injection, remat, monkeypatch):
    """The whole segment loop's gradients w.r.t. the memory params, against the same loop with the head loss
    swapped for plain autodiff (the oracle)."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory(injection, remat=remat)
    mem = perturbed_memory(cfg, mcfg)
    batch = jax.tree.map(jnp.asarray, random_batch(cfg))

    def grads():
        return jax.jit(jax.grad(lambda p: memory_model.forward_segments(p, frozen, batch, cfg, mcfg).loss))(mem)

    got = grads()
    monkeypatch.setattr(memory_model.losses, "frozen_head_cross_entropy", _plain_head_ce)
    want = grads()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got, want)


def _head_matmuls(jaxpr, vocab: int) -> int:
    """Number of dot_generals producing a [..., vocab] output (LM-head forwards)."""
    return count_dot_generals(jaxpr, lambda eqn: eqn.outvars[0].aval.shape[-1] == vocab)


def test_remat_backward_does_not_rerun_the_head(monkeypatch):
    """Final injection, remat on: the differentiated segment step runs the head once (the forward). With plain
    autodiff under the remat policy it ran again in the backward."""
    cfg, frozen = tiny_backbone("llama", vocab_size=211)  # a vocab size no other dimension has
    mcfg = small_memory("final", remat=True)
    mem = perturbed_memory(cfg, mcfg)
    batch = jax.tree.map(jnp.asarray, random_batch(cfg))

    def count():
        grad = jax.grad(lambda p: memory_model.forward_segments(p, frozen, batch, cfg, mcfg).loss)
        return _head_matmuls(jax.make_jaxpr(grad)(mem).jaxpr, cfg.vocab_size)

    saved = count()
    monkeypatch.setattr(memory_model.losses, "frozen_head_cross_entropy", _plain_head_ce)
    plain = count()
    assert (saved, plain) == (1, 2)


@pytest.mark.parametrize("vocab", [50257, 49152, 2048, 97])  # blocks of 1733, 192, 32; 97 is prime: jnp.argmax
def test_blockwise_argmax_equals_jnp_argmax_with_ties(vocab):
    """losses.argmax_last (block maxima, then inside the first block holding the max) returns jnp.argmax's index,
    the first of tied maxima included: a tie across blocks, a tie inside one block, a max in the last block."""
    x = np.random.RandomState(vocab).randn(3, 5, vocab).astype(np.float32)
    x[0, 0, [3, vocab - 2]] = 50.0  # tie across blocks: the first wins
    x[0, 1, [vocab - 3, vocab - 2]] = 50.0  # tie inside the last block
    x[1, 2, vocab - 1] = 50.0  # the very last index
    ours = np.asarray(jax.jit(losses.argmax_last)(jnp.asarray(x)))
    assert ours.dtype == np.int32
    np.testing.assert_array_equal(ours, np.argmax(x, axis=-1))
    assert ours[0, 0] == 3 and ours[0, 1] == vocab - 3 and ours[1, 2] == vocab - 1
