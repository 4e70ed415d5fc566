"""Loss terms of the composite objective: task cross-entropy, importance sparsity and entropy, supporting-fact BCE.

Terms are per position / per example (not means) where the caller aggregates over segments and devices, so
the average is over tokens, not over segments of unequal size.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

_EPS = 1e-9
HEAD_GRAD_NAME = "head_ce_grad"


def cross_entropy(logits: jax.Array, labels: jax.Array):
    """logits [..., V] float32, labels [...] int -> (negative log-likelihood [...], argmax ids [...])."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - target, argmax_last(logits)


def _argmax_block(v: int):
    """The divisor of v in [32, 4096] closest to sqrt(v), or None (then argmax_last uses jnp.argmax)."""
    divisors = [d for d in range(32, min(v, 4096) + 1) if v % d == 0 and d < v]
    return min(divisors, key=lambda d: abs(d - v ** 0.5)) if divisors else None


def argmax_last(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, axis=-1) as int32 (the first index of the max), in two stages: the max of each block of the
    last axis, then the argmax inside the first block holding the overall max. XLA:CPU runs jnp.argmax's (value,
    index) reduction unvectorised, 0.23 s on GPT-2 logits [2048, 50257], ~4% of a train step, against 22 ms this
    way (docs/benchmarks.md section 8.7). x [..., V] -> [...]."""
    V = x.shape[-1]
    block = _argmax_block(V)
    if block is None:
        return jnp.argmax(x, axis=-1).astype(jnp.int32)
    xb = x.reshape(*x.shape[:-1], V // block, block)
    b = jnp.argmax(xb.max(-1), axis=-1)  # [...]: the first block holding the max
    inner = jnp.take_along_axis(xb, b[..., None, None], axis=-2)[..., 0, :]  # [..., block]
    return (b * block + jnp.argmax(inner, axis=-1)).astype(jnp.int32)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def frozen_head_cross_entropy(head_fn, head_params, hidden: jax.Array, labels: jax.Array):
    """`cross_entropy(head_fn(head_params, hidden), labels)` for a frozen, position-wise head (the LM head).

    hidden [..., D], labels [...] int -> (nll [...], argmax ids [...]). Same values as the plain composition;
    the difference is the backward pass. The forward already computes d nll / d hidden [..., D] (one extra
    [..., V] x [V, D] matmul, the one the backward needs anyway) and keeps only that, tagged HEAD_GRAD_NAME for
    remat policies: the [..., V] logits are neither kept nor recomputed in a rematerialised backward, which
    otherwise re-runs the head (+19% of a GPT-2 train step, docs/benchmarks.md section 8). This is exact because
    nll[i] depends on hidden[i] alone, so the backward is a per-position scaling of the saved gradient. No
    gradient reaches head_params (frozen) or labels.
    """
    return cross_entropy(head_fn(head_params, hidden), labels)


def _frozen_head_ce_fwd(head_fn, head_params, hidden, labels):
    nll, vjp, pred = jax.vjp(lambda h: cross_entropy(head_fn(head_params, h), labels), hidden, has_aux=True)
    (grad,) = vjp(jnp.ones_like(nll))  # [..., D]: row i is d nll[i] / d hidden[i]
    return (nll, pred), checkpoint_name(grad, HEAD_GRAD_NAME)


def _frozen_head_ce_bwd(head_fn, grad, cotangents):
    g_nll, _ = cotangents  # the argmax ids are integers: no cotangent
    return None, (g_nll[..., None] * grad).astype(grad.dtype), None


frozen_head_cross_entropy.defvjp(_frozen_head_ce_fwd, _frozen_head_ce_bwd)


def importance_sparsity(s: jax.Array) -> jax.Array:
    """Mean |s| over slots: s [B, S] in (0, 1) -> [B] (the paper's L1 term)."""
    return jnp.abs(s).mean(-1)


def importance_entropy(s: jax.Array) -> jax.Array:
    """Entropy of the normalised importance distribution p = s / sum(s): [B, S] -> [B]."""
    p = s / (s.sum(-1, keepdims=True) + _EPS)
    return -(p * jnp.log(p + _EPS)).sum(-1)


def binary_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Numerically stable BCE with logits: -> (sum over masked entries, count)."""
    m = mask.astype(jnp.float32)
    loss = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return (loss * m).sum(), m.sum()
