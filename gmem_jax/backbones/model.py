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

Decoding uses a second layout of the same tree: `unstack_layers` turns 'layers' (and the KV cache) into a tuple
of per-layer trees, which `run_layers` then runs with a Python loop over static indices (the same `Block`). On
XLA:CPU the scan's dynamic index is a copy of the layer's weights at every step; a one-token decode step reads
each weight once, so the copy made it ~1.7x slower (bench/decode_layout.py). `generation` unstacks once per
call, outside its decode loop; training and prefill keep the scan.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.layers import Block, Norm, einsum
from gmem_jax.training.sharding import constrain_batch

Hook = Callable[[jax.Array], tuple[jax.Array, Any]]  # h [B, T, D] -> (h' [B, T, D], aux pytree)

_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class BackboneOutput(NamedTuple):
    logits: Optional[jax.Array]  # [B, T, V] float32, or None when compute_logits=False
    hidden: jax.Array  # [B, T, D] the final-norm hidden states the LM head reads (after final_hook)
    cache: Optional[dict | tuple]  # {'k','v': [L, B, S, K, E]} when a cache was given (a tuple of per-layer
    # {'k','v': [B, S, K, E]} when params['layers'] and the cache were given per layer: see `unstack_layers`)
    layer_aux: Any  # what layer_hook returned as aux (None without a hook)
    final_aux: Any  # what final_hook returned as aux (None without a hook)


def init_params(cfg: BackboneConfig, rng: jax.Array) -> dict:
    """Random parameters (normal(0.02) kernels) for a config: used for tiny test/smoke models. Compiled as one
    program (eagerly, every initialiser op compiles on its own: ~10 s for a tiny model on 2 CPU cores)."""
    return _init_params(cfg, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(cfg: BackboneConfig, rng: jax.Array) -> dict:
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
    return constrain_batch(h.astype(cfg.dtype))


def lm_logits(params: dict, hidden: jax.Array, cfg: BackboneConfig) -> jax.Array:
    """hidden [..., D] -> logits [..., V] float32 (tied heads reuse the token embedding)."""
    if cfg.tie_word_embeddings:
        w = params["embed"]["embedding"].astype(cfg.dtype)
        out = einsum("...d,vd->...v", hidden.astype(cfg.dtype), w)
    else:
        out = einsum("...d,dv->...v", hidden.astype(cfg.dtype), params["lm_head"]["kernel"].astype(cfg.dtype))
    return constrain_batch(out.astype(jnp.float32))


def unstack_layers(tree) -> tuple:
    """A tree whose leaves are stacked on a leading layer axis [L, ...] (params['layers'] or a KV cache) -> a
    tuple of L trees with leaves [...]. Each slice is a copy: do it once, outside a loop (see `run_layers`)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return tuple(jax.tree.map(lambda x: x[i], tree) for i in range(n))


def stack_layers(trees: tuple):
    """The inverse of `unstack_layers`: a tuple of L trees with leaves [...] -> one tree with leaves [L, ...]."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def run_layers(
    params: dict,
    h: jax.Array,
    cfg: BackboneConfig,
    start: int,
    end: int,
    *,
    positions: jax.Array,
    kv_mask: jax.Array,
    cache: Optional[dict | tuple] = None,
    cache_index: jax.Array | int = 0,
) -> tuple[jax.Array, Optional[dict | tuple]]:
    """Blocks start..end-1 over the residual stream h [B, T, D]; returns (h, cache).

    Stacked params['layers'] (leaves [L, ...]; cache {'k','v': [L, B, S, K, E]}): a scan over layer *indices*
    that reads each layer's slice with a dynamic index, so running a sub-range never copies the whole stack, and
    the cache stays in the carry where XLA updates it in place.
    Per-layer params['layers'] (a tuple from `unstack_layers`; the cache then a tuple of {'k','v': [B, S, K, E]}
    or None): a Python loop over static indices, unrolled into L copies of the block, that reads the weights
    where they are. For decoding, where the scan's per-step weight copy costs more than the matmuls.
    """
    if start >= end:
        return h, cache

    def block(layer, h, layer_cache):  # one layer's params / cache [B, S, K, E] -> (h [B, T, D], new layer cache)
        h, layer_cache = Block(cfg).apply({"params": layer}, constrain_batch(h), positions, kv_mask, layer_cache,
                                          cache_index)
        return constrain_batch(h), layer_cache

    policy = None if cfg.remat_policy == "none" else _POLICIES[cfg.remat_policy]
    per_layer = isinstance(params["layers"], tuple)
    if cache is not None and isinstance(cache, tuple) != per_layer:
        raise ValueError("params['layers'] and the cache must both be stacked or both per-layer (unstack_layers)")
    if per_layer:
        if cfg.remat_policy != "none":  # same activation saving as the scan if someone differentiates this
            block = jax.checkpoint(block, policy=policy, prevent_cse=False)
        cache = None if cache is None else list(cache)
        for i in range(start, end):
            h, new_layer_cache = block(params["layers"][i], h, None if cache is None else cache[i])
            if cache is not None:
                cache[i] = new_layer_cache
        return h, None if cache is None else tuple(cache)

    def body(carry, i):
        h, cache = carry
        layer = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), params["layers"])
        layer_cache = None if cache is None else jax.tree.map(
            lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), cache)
        h, new_layer_cache = block(layer, h, layer_cache)
        if cache is not None:
            cache = jax.tree.map(lambda c, n: jax.lax.dynamic_update_index_in_dim(c, n, i, 0), cache, new_layer_cache)
        return (h, cache), None

    if cfg.remat_policy != "none":  # around the slicing too, so the backward re-slices rather than saving slices
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
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
    cache: Optional[dict | tuple] = None,
    cache_index: jax.Array | int = 0,
    layer_hook: Optional[Hook | tuple[Hook, ...]] = None,
    hook_layer: int | tuple[int, ...] = 0,
    final_hook: Optional[Hook] = None,
    compute_logits: bool = True,
) -> BackboneOutput:
    """Run the transformer.

    tokens: [B, T] int; positions: [B, T] (default cache_index + arange(T)); kv_mask: [B, S] bool, True where a
    key slot holds a real token (S = T without a cache, else the cache length; default all True);
    cache / cache_index: a preallocated KV cache and where the T new tokens are written. params['layers'] and
    the cache may both be per-layer tuples (`unstack_layers`) instead of stacked: same result, for decoding.
    layer_hook is applied to the residual stream entering block `hook_layer` (0 <= hook_layer < L); a tuple of
    hooks with a tuple of non-decreasing layers applies each at its layer in that order (layer_aux is then the
    tuple of their auxes), e.g. one that captures what a memory writes below the one that injects what it reads.
    final_hook to the final-norm output before the LM head. Hooks return (h', aux); aux comes back in the output.
    """
    B, T = tokens.shape
    if positions is None:
        positions = jnp.broadcast_to(cache_index + jnp.arange(T), (B, T))
    if kv_mask is None:  # the cache length S: [L, B, S, K, E] stacked, or [B, S, K, E] per layer
        kv_mask = jnp.ones((B, T if cache is None else jax.tree.leaves(cache)[0].shape[-3]), bool)
    run = functools.partial(run_layers, params, cfg=cfg, positions=positions, kv_mask=kv_mask,
                            cache_index=cache_index)
    h = embed(params, tokens, positions, cfg)
    several = isinstance(layer_hook, tuple)
    hooks = () if layer_hook is None else tuple(zip(hook_layer, layer_hook)) if several else ((hook_layer, layer_hook),)
    if several and len(hook_layer) != len(layer_hook):
        raise ValueError(f"{len(layer_hook)} layer hooks but {len(hook_layer)} hook layers; give one layer per hook")
    start, auxes = 0, []
    for layer, fn in hooks:
        if not start <= layer < cfg.num_layers:
            raise ValueError(f"hook_layer={hook_layer} outside [0, {cfg.num_layers}) or not non-decreasing")
        h, cache = run(h, start=start, end=layer, cache=cache)
        h, aux = fn(h)
        auxes.append(aux)
        start = layer
    h, cache = run(h, start=start, end=cfg.num_layers, cache=cache)
    layer_aux = tuple(auxes) if several else auxes[0] if auxes else None
    final_aux = None
    h = constrain_batch(final_norm(params, h, cfg))
    if final_hook is not None:
        h, final_aux = final_hook(h)
    logits = lm_logits(params, h, cfg) if compute_logits else None
    return BackboneOutput(logits, h, cache, layer_aux, final_aux)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))
