"""LoRA adapters: the only trainable tree when teaching a frozen backbone the MemLLM call language.

For a targeted kernel W [L, in, out] (stacked over layers, see gmem_jax/backbones/model.py) the adapter is
a [L, in, r] and b [L, r, out], and the model runs with W + (alpha / r) * a @ b. `b` starts at zero, so the
adapted model is exactly the frozen one until training moves it.

    lora = init_lora(cfg, rank=8, targets=("q", "v"), rng=key)
    def loss(lora, frozen, batch):                      # frozen params: an argument, never a closure constant
        params = merge_lora(frozen, lora, alpha=16.0)   # merged inside the jitted function
        ...
    grads = jax.grad(loss)(lora, frozen, batch)         # gradients (and optimizer state) for LoRA leaves only

The merge costs one [in, r] @ [r, out] product per targeted kernel per step, much less than the forward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.errors import GmemError

# Target name -> where its stacked kernel lives under params['layers'].
_ATTENTION = {name: ("attn", name) for name in ("q", "k", "v", "o")}
_MLP = {"gpt2": {name: ("mlp", name) for name in ("fc", "proj")},
        "llama": {name: ("mlp", name) for name in ("gate", "up", "down")}}


def lora_targets(cfg: BackboneConfig) -> dict[str, tuple[str, ...]]:
    """The target names this architecture offers and the path of each one's kernel in the param tree."""
    return {name: ("layers", *sub, "kernel") for name, sub in {**_ATTENTION, **_MLP[cfg.arch]}.items()}


def _kernel_shape(cfg: BackboneConfig, target: str) -> tuple[int, int]:
    D, F = cfg.hidden_size, cfg.intermediate_size
    H, K = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q": (D, H), "k": (D, K), "v": (D, K), "o": (H, D), "fc": (D, F), "proj": (F, D), "gate": (D, F),
            "up": (D, F), "down": (F, D)}[target]


def init_lora(cfg: BackboneConfig, rank: int, targets=("q", "v"), rng: jax.Array = None, *,
              dtype: str = "float32") -> dict:
    """{'layers/attn/q/kernel': {'a': [L, in, rank], 'b': [L, rank, out]}, ...}: a ~ N(0, 1/in), b = 0."""
    available = lora_targets(cfg)
    unknown = [t for t in targets if t not in available]
    if unknown or not targets:
        raise GmemError(f"LoRA targets {list(targets)} for a {cfg.arch} backbone: choose among {sorted(available)}")
    if rank < 1:
        raise GmemError(f"LoRA rank={rank}; it must be >= 1")
    if rng is None:
        raise GmemError("init_lora needs an rng key, e.g. rng=jax.random.key(0)")
    lora = {}
    for target, key in zip(targets, jax.random.split(rng, len(targets))):
        fan_in, fan_out = _kernel_shape(cfg, target)
        a = jax.random.normal(key, (cfg.num_layers, fan_in, rank), jnp.float32) / jnp.sqrt(fan_in)
        lora["/".join(available[target])] = {"a": a.astype(dtype),
                                             "b": jnp.zeros((cfg.num_layers, rank, fan_out), dtype)}
    return lora


def merge_lora(frozen_params: dict, lora_params: dict, alpha: float) -> dict:
    """A param tree equal to `frozen_params` except W + (alpha / r) * a @ b for each adapted kernel (computed in
    float32, cast to W's dtype). Pure and jit-friendly; the frozen tree is not modified, and every leaf that is
    not adapted is the frozen array itself."""
    merged = frozen_params
    for path, ab in lora_params.items():
        keys = path.split("/")
        kernel = frozen_params
        for k in keys:
            if not isinstance(kernel, dict) or k not in kernel:
                raise GmemError(f"LoRA path {path!r} does not exist in the backbone params; init the adapters "
                                "with init_lora for this backbone config")
            kernel = kernel[k]
        a, b = ab["a"], ab["b"]
        L, fan_in, fan_out = kernel.shape
        if a.shape[:2] != (L, fan_in) or b.shape[0] != L or b.shape[2] != fan_out or a.shape[2] != b.shape[1]:
            raise GmemError(f"LoRA {path}: a {list(a.shape)} @ b {list(b.shape)} does not fit the kernel "
                            f"{list(kernel.shape)}; init the adapters for this backbone config")
        delta = jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32)) * (alpha / a.shape[2])
        merged = _replace(merged, keys, (kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    return merged


def _replace(tree: dict, keys: list[str], value) -> dict:
    """A copy of the dicts along `keys` with the leaf replaced (all other subtrees shared)."""
    if not keys:
        return value
    return {**tree, keys[0]: _replace(tree[keys[0]], keys[1:], value)}
