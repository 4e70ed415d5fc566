"""The decoder-only transformer as pure functions over a parameter tree.

Parameter tree (layers stacked on a leading axis of size num_layers, scanned with `jax.lax.scan`):

    {'embed': {'embedding': [V, D]},
     'pos_embed': {'embedding': [P, D]},          # GPT-2 only
     'layers': <Block params, every leaf [L, ...]>,
     'final_norm': {'scale': [D], 'bias': [D]},   # bias: GPT-2 only
     'lm_head': {'kernel': [D, V]}}               # untied heads only

The layer stack is a `lax.scan` over layer indices applying a Linen `Block` to one layer's slice of the tree,
rather than a Linen `nn.scan`, because the memory must run the stack in two parts (up to a chosen layer, then
the rest) and hook into the residual stream between them (`layer_hook`) or after the final norm
(`final_hook`) without slicing (copying) the frozen weights.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.layers import Block, Norm

Hook = Callable[[jax.Array], tuple[jax.Array, Any]]  # h [B, T, D] -> (h' [B, T, D], aux pytree)

_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class BackboneOutput(NamedTuple):
    logits: Optional[jax.Array]  # [B, T, V] float32, or None when compute_logits=False
    hidden: jax.Array  # [B, T, D] the final-norm hidden states the LM head reads (after final_hook)
    cache: Optional[dict]  # {'k','v': [L, B, S, K, E]} when a cache was given
    layer_aux: Any  # what layer_hook returned as aux (None without a hook)
    final_aux: Any  # what final_hook returned as aux (None without a hook)


def init_params(cfg: BackboneConfig, rng: jax.Array) -> dict:
    """Random parameters (normal(0.02) kernels) for a config: used for tiny test/smoke models."""
    k_emb, k_pos, k_layers, k_head = jax.random.split(rng, 4)
    D, V = cfg.hidden_size, cfg.vocab_size
    pd = jnp.dtype(cfg.param_dtype)
    x = jnp.zeros((1, 1, D), cfg.dtype)
    pos, mask = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool)
    layers = jax.vmap(lambda r: Block(cfg).init(r, x, pos, mask)["params"])(jax.random.split(k_layers, cfg.num_layers))
    params = {
        "embed": {"embedding": (0.02 * jax.random.normal(k_emb, (V, D))).astype(pd)},
        "layers": layers,
        "final_norm": Norm(cfg.norm_kind, cfg.norm_eps, cfg.dtype, cfg.param_dtype).init(k_pos, x)["params"],
    }
    if cfg.arch == "gpt2":
        params["pos_embed"] = {"embedding": (0.01 * jax.random.normal(k_pos, (cfg.max_position_embeddings, D))).astype(pd)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": (0.02 * jax.random.normal(k_head, (D, V))).astype(pd)}
    return params


def init_cache(cfg: BackboneConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty preallocated KV cache {'k','v': [L, B, S, K, E]}."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dt = dtype or cfg.dtype
    return {"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)}


def embed(params: dict, tokens: jax.Array, positions: jax.Array, cfg: BackboneConfig) -> jax.Array:
    """tokens, positions: [B, T] -> [B, T, D] in the compute dtype."""
    h = jnp.take(params["embed"]["embedding"], tokens, axis=0)
    if cfg.arch == "gpt2":
        h = h + jnp.take(params["pos_embed"]["embedding"], positions, axis=0)
    return h.astype(cfg.dtype)


def lm_logits(params: dict, hidden: jax.Array, cfg: BackboneConfig) -> jax.Array:
    """hidden [..., D] -> logits [..., V] float32 (tied heads reuse the token embedding)."""
    if cfg.tie_word_embeddings:
        w = params["embed"]["embedding"].astype(cfg.dtype)
        out = jnp.einsum("...d,vd->...v", hidden.astype(cfg.dtype), w)
    else:
        out = hidden.astype(cfg.dtype) @ params["lm_head"]["kernel"].astype(cfg.dtype)
    return out.astype(jnp.float32)


def run_layers(
    params: dict,
    h: jax.Array,
    cfg: BackboneConfig,
    start: int,
    end: int,
    *,
    positions: jax.Array,
    kv_mask: jax.Array,
    cache: Optional[dict] = None,
    cache_index: jax.Array | int = 0,
) -> tuple[jax.Array, Optional[dict]]:
    """Blocks start..end-1 over the residual stream h [B, T, D]; returns (h, cache).

    The scan runs over layer *indices* and reads each layer's slice of the stacked params (and cache) with a
    dynamic index, so running a sub-range never copies the frozen weights, and the cache stays in the carry where
    XLA updates it in place.
    """
    if start >= end:
        return h, cache

    def body(carry, i):
        h, cache = carry
        layer = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), params["layers"])
        layer_cache = None if cache is None else jax.tree.map(
            lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), cache)
        h, new_layer_cache = Block(cfg).apply({"params": layer}, h, positions, kv_mask, layer_cache, cache_index)
        if cache is not None:
            cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_index_in_dim(c, n, i, 0), cache, new_layer_cache)
        return (h, cache), None

    if cfg.remat_policy != "none":
        body = jax.checkpoint(body, policy=_POLICIES[cfg.remat_policy], prevent_cse=False)
    (h, cache), _ = jax.lax.scan(body, (h, cache), jnp.arange(start, end))
    return h, cache


def final_norm(params: dict, h: jax.Array, cfg: BackboneConfig) -> jax.Array:
    """The final LayerNorm/RMSNorm: [B, T, D] -> [B, T, D]."""
    return Norm(cfg.norm_kind, cfg.norm_eps, cfg.dtype, cfg.param_dtype).apply({"params": params["final_norm"]}, h)


def forward(
    params: dict,
    tokens: jax.Array,
    cfg: BackboneConfig,
    *,
    positions: Optional[jax.Array] = None,
    kv_mask: Optional[jax.Array] = None,
    cache: Optional[dict] = None,
    cache_index: jax.Array | int = 0,
    layer_hook: Optional[Hook] = None,
    hook_layer: int = 0,
    final_hook: Optional[Hook] = None,
    compute_logits: bool = True,
) -> BackboneOutput:
    """Run the transformer.

    tokens: [B, T] int; positions: [B, T] (default cache_index + arange(T)); kv_mask: [B, S] bool, True where a
    key slot holds a real token (S = T without a cache, else the cache length; default all True);
    cache / cache_index: a preallocated KV cache and where the T new tokens are written.
    layer_hook is applied to the residual stream entering block `hook_layer` (0 <= hook_layer < L);
    final_hook to the final-norm output before the LM head. Hooks return (h', aux); aux comes back in the output.
    """
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
    if kv_mask is None:
        kv_mask = jnp.ones((B, T if cache is None else cache["k"].shape[2]), bool)
    run = functools.partial(run_layers, params, cfg=cfg, positions=positions, kv_mask=kv_mask,
                            cache_index=cache_index)
    h = embed(params, tokens, positions, cfg)
    layer_aux = final_aux = None
    split = cfg.num_layers
    if layer_hook is not None:
        if not 0 <= hook_layer < cfg.num_layers:
            raise ValueError(f"hook_layer={hook_layer} outside [0, {cfg.num_layers})")
        split = hook_layer
    h, cache = run(h, start=0, end=split, cache=cache)
    if layer_hook is not None:
        h, layer_aux = layer_hook(h)
        h, cache = run(h, start=split, end=cfg.num_layers, cache=cache)
    h = final_norm(params, h, cfg)
    if final_hook is not None:
        h, final_aux = final_hook(h)
    logits = lm_logits(params, h, cfg) if compute_logits else None
    return BackboneOutput(logits, h, cache, layer_aux, final_aux)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
