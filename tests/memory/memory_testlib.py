"""Tiny models and batches for the memory tests."""
import jax
import numpy as np

from gmem_jax.backbones import BackboneConfig, init_params
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import init_memory, memory_module


def tiny_backbone(arch="llama", **kw):
    base = dict(arch=arch, vocab_size=97, hidden_size=32, num_layers=3, num_heads=4,
                num_kv_heads=2 if arch == "llama" else 4, head_dim=8, intermediate_size=64,
                max_position_embeddings=64, norm_eps=1e-5, tie_word_embeddings=arch == "gpt2",
                attention_bias=arch == "gpt2", mlp_bias=arch == "gpt2")
    base.update(kw)
    cfg = BackboneConfig(**base)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def random_batch(cfg, B=3, N=4, T=8, seed=0, loss_frac=0.5):
    rng = np.random.default_rng(seed)
    mask = np.ones((B, N, T), bool)
    mask[:, :, -2:] = rng.random((B, N, 2)) < 0.5  # some right padding
    return dict(tokens=rng.integers(0, cfg.vocab_size, (B, N, T)).astype(np.int32), token_mask=mask,
                labels=rng.integers(0, cfg.vocab_size, (B, N, T)).astype(np.int32),
                loss_mask=((rng.random((B, N, T)) < loss_frac) & mask).astype(np.float32))


def perturbed_memory(cfg, mcfg, seed=1, scale=0.3):
    """Memory params with the zero-initialised injection weights randomised, so memory changes outputs."""
    params = init_memory(jax.random.PRNGKey(seed), cfg, mcfg)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 64))
    return jax.tree_util.tree_map_with_path(
        lambda p, x: scale * jax.random.normal(next(keys), x.shape) if "inject" in jax.tree_util.keystr(p) else x,
        params)


def small_memory(injection="final", **kw):
    return MemoryConfig(**{**dict(num_slots=8, mem_dim=16, num_heads=2, injection=injection, read_layer=1), **kw})


def module_call(cfg, mcfg, mem):
    """GMemory's methods on params `mem`: module_call(...)(*args, method=GMemory.write)."""
    return lambda *a, **kw: memory_module(cfg, mcfg).apply({"params": mem}, *a, **kw)  # noqa: E731


def count_dot_generals(jaxpr, select) -> int:
    """Number of dot_general equations for which select(eqn) holds, nested jaxprs included (each scan / cond /
    checkpoint body counted once): how many times a differentiated program runs a given product."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == "dot_general" and bool(select(eqn))
        for v in eqn.params.values():
            for x in (v if isinstance(v, (tuple, list)) else (v,)):
                sub = x.jaxpr if hasattr(x, "jaxpr") and hasattr(x, "consts") else x  # ClosedJaxpr or Jaxpr
                if hasattr(sub, "eqns"):
                    n += count_dot_generals(sub, select)
    return n
