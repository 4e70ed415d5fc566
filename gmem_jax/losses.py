"""Loss terms of the composite objective: task cross-entropy, importance sparsity and entropy, supporting-fact BCE.

Terms are per position / per example (not means) where the caller aggregates over segments and devices, so
the average is over tokens, not over segments of unequal size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_EPS = 1e-9


def cross_entropy(logits: jax.Array, labels: jax.Array):
    """logits [..., V] float32, labels [...] int -> (negative log-likelihood [...], argmax ids [...])."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - target, jnp.argmax(logits, axis=-1).astype(jnp.int32)


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
