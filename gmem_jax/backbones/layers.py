"""Transformer building blocks as Flax Linen modules: norms, RoPE, attention with a KV cache, MLPs, one block.

One parameterised block serves GPT-2 (LayerNorm, learned positions, gelu_new, biases) and Llama (RMSNorm,
RoPE, grouped-query attention, SwiGLU). Shapes: B batch, T new tokens, S cache length, D hidden, H query heads,
K key/value heads, G = H // K, E head dim.
"""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmem_jax.backbones.config import BackboneConfig, rope_inv_freq

# A large finite negative instead of -inf: a fully masked row (a left-padding query) stays finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class Norm(nn.Module):
    """LayerNorm (GPT-2) or RMSNorm (Llama), computed in float32 as transformers does."""

    kind: str
    eps: float
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x):  # [..., D] -> [..., D]
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        if self.kind == "layernorm":
            bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
            return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)
        # RMSNorm: transformers casts back to the input dtype *before* the weight multiply.
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def apply_rope(x, positions, inv_freq):
    """Rotate-half RoPE (the Hugging Face layout). x: [B, T, heads, E]; positions: [B, T]; inv_freq: [E/2]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, E/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, E]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """Two-operand `jnp.einsum` (explicit `->`), for the frozen backbone's matmuls.

    float32 operands: plain `jnp.einsum`. bfloat16 operands: accumulated in float32 and rounded once to bf16, in
    the forward and in both transposes of the backward (`_einsum_lowp`). That is what torch's bf16 matmul
    computes, and on XLA:CPU it is the fast path: bf16 x bf16 -> f32 runs on oneDNN at several times the fp32
    rate, while a bf16 -> bf16 dot, or one mixing an f32 cotangent with bf16 weights (JAX's own transpose
    rule), runs at about the fp32 rate (docs/benchmarks.md section 8.6).
    """
    dtype = jnp.result_type(a, b)
    if dtype == jnp.float32:
        return jnp.einsum(spec, a, b)
    return _einsum_lowp(spec, a.astype(dtype), b.astype(dtype))


def _einsum_f32_acc(spec, a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(jnp.result_type(a, b))


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_lowp(spec, a, b):
    return _einsum_f32_acc(spec, a, b)


def _einsum_lowp_fwd(spec, a, b):
    return _einsum_f32_acc(spec, a, b), (a, b)


def _einsum_lowp_bwd(spec, res, ct):
    # "A,B->C": dA = einsum("C,B->A", ct, b), dB = einsum("A,C->B", a, ct). Exact when every index of each operand
    # also appears in the other operand or the output, as in all the backbone's specs.
    a, b = res
    ins, out = spec.split("->")
    sa, sb = ins.split(",")
    ct = ct.astype(a.dtype)  # a bf16 cotangent: the transposed dots stay on the bf16 path
    return _einsum_f32_acc(f"{out},{sb}->{sa}", ct, b), _einsum_f32_acc(f"{sa},{out}->{sb}", a, ct)


_einsum_lowp.defvjp(_einsum_lowp_fwd, _einsum_lowp_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`nn.Dense`'s contraction (last axis of lhs with the first of rhs, no batch axes) through `einsum`."""
    del precision, preferred_element_type  # float32: default precision; bf16: float32 accumulation
    if tuple(map(tuple, dimension_numbers[0])) != ((lhs.ndim - 1,), (0,)) or any(dimension_numbers[1]):
        raise ValueError(f"dot_general {dimension_numbers}: only nn.Dense's contraction (last lhs axis with the "
                         "first rhs axis, no batch axes) is supported")
    return einsum("...i,io->...o", lhs, rhs)


def _dense(features, use_bias, cfg, name):
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                    kernel_init=nn.initializers.normal(0.02), dot_general=dot_general, name=name)


# Query positions per attention chunk when a sequence attends to itself without a cache. Chunk i needs only the
# keys up to its own end (causal), so the masked upper triangle is mostly never computed (4 chunks of a 512-token
# segment: 37.5% fewer score FLOPs) and one chunk's [B, H, C, S] scores stay small. On 2 CPU cores, 4 x 512 tokens:
# one GPT-2 layer's attention ~40 ms vs ~65 ms as one [B, H, T, T] product; the whole SmolLM2-135M forward 3.40 vs
# 4.05 s (docs/benchmarks.md section 8.7).
ATTENTION_CHUNK = 128


def _allowed(q_start, num_q: int, kv_mask):
    """[B, num_q, S] True where query q_start + t may attend key s: s <= its own index and kv_mask[b, s]."""
    S = kv_mask.shape[1]
    q_index = q_start + jnp.arange(num_q)
    return (jnp.arange(S)[None, :] <= q_index[:, None])[None] & kv_mask[:, None, :].astype(bool)


def _attend(q, k, v, allowed, dtype):
    """Softmax attention, heads-major. q [B, T, K, G, E]; k, v [B, S, K, E]; allowed [B, T, S] -> [B, T, K, G, E].

    The G query heads sharing a key head are folded into the rows of one [B, K, G*T, E] x [B, K, E, S] product:
    batched matmuls with the batch axes leading ran ~1.6x faster on XLA:CPU (GPT-2 shape, 4 x 512 tokens: 65 vs
    100-115 ms) than the same einsums over the [B, T, K, G, E] layout, which XLA transposed around every product."""
    B, T, K, G, E = q.shape
    S = k.shape[1]
    qh = q.transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, E)
    kh, vh = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))  # [B, K, S, E]
    scores = einsum("bkre,bkse->bkrs", qh, kh).astype(jnp.float32).reshape(B, K, G, T, S) / jnp.sqrt(E)
    scores = jnp.where(allowed[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype).reshape(B, K, G * T, S)
    out = einsum("bkrs,bkse->bkre", probs, vh.astype(dtype))  # [B, K, G*T, E]
    return out.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4)


class Attention(nn.Module):
    """Causal multi-head / grouped-query attention with an optional preallocated KV cache."""

    cfg: BackboneConfig

    @nn.compact
    def __call__(self, x, positions, kv_mask, cache=None, cache_index=0):
        """x: [B, T, D]; positions: [B, T] (RoPE / unused for GPT-2); kv_mask: [B, S] True where a key is a
        real token (S = T without a cache); cache: {'k','v': [B, S, K, E]} or None; cache_index: where the T new
        tokens go in the cache. Returns ([B, T, D], new cache or None)."""
        cfg = self.cfg
        B, T, _ = x.shape
        H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q = _dense(H * E, cfg.attention_bias, cfg, "q")(x).reshape(B, T, H, E)
        k = _dense(K * E, cfg.attention_bias, cfg, "k")(x).reshape(B, T, K, E)
        v = _dense(K * E, cfg.attention_bias, cfg, "v")(x).reshape(B, T, K, E)
        if cfg.uses_rope:
            inv_freq = rope_inv_freq(cfg)  # a trace-time constant
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
            cache = {"k": k, "v": v}
        q = q.reshape(B, T, K, H // K, E)
        if cache is None and T > ATTENTION_CHUNK:  # training, scoring, feature building: causal query chunks
            out = jnp.concatenate([
                _attend(q[:, i:i + ATTENTION_CHUNK], k[:, :i + ATTENTION_CHUNK], v[:, :i + ATTENTION_CHUNK],
                        _allowed(i, min(ATTENTION_CHUNK, T - i), kv_mask[:, :i + ATTENTION_CHUNK]), cfg.dtype)
                for i in range(0, T, ATTENTION_CHUNK)], axis=1)
        else:
            out = _attend(q, k, v, _allowed(cache_index, T, kv_mask), cfg.dtype)
        return _dense(cfg.hidden_size, cfg.attention_bias, cfg, "o")(out.reshape(B, T, H * E)), cache


class MLP(nn.Module):
    """GPT-2: proj(gelu_tanh(fc(x))). Llama: down(silu(gate(x)) * up(x))."""

    cfg: BackboneConfig

    @nn.compact
    def __call__(self, x):  # [B, T, D] -> [B, T, D]
        cfg = self.cfg
        F, b = cfg.intermediate_size, cfg.mlp_bias
        if cfg.arch == "gpt2":
            return _dense(cfg.hidden_size, b, cfg, "proj")(jax.nn.gelu(_dense(F, b, cfg, "fc")(x), approximate=True))
        return _dense(cfg.hidden_size, b, cfg, "down")(
            jax.nn.silu(_dense(F, b, cfg, "gate")(x)) * _dense(F, b, cfg, "up")(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: BackboneConfig

    @nn.compact
    def __call__(self, x, positions, kv_mask, cache=None, cache_index=0):
        cfg = self.cfg
        norm = lambda name: Norm(cfg.norm_kind, cfg.norm_eps, cfg.dtype, cfg.param_dtype, name=name)
        a, cache = Attention(cfg, name="attn")(norm("attn_norm")(x), positions, kv_mask, cache,
                                                               cache_index)
        x = x + a
        x = x + MLP(cfg, name="mlp")(norm("mlp_norm")(x))
        return x, cache
