"""gmem_jax: a trainable latent memory (G-MemLLM) and an explicit triple memory (MemLLM) for frozen LLMs.

The functional API (pure functions over parameter trees; names resolve lazily so `import gmem_jax` stays cheap):

    cfg, frozen = gmem_jax.load_backbone("path/or/hub-id/or/model.gguf")    # frozen tree, never trained
    mcfg = gmem_jax.MemoryConfig(num_slots=1024, mem_dim=512)
    mem = gmem_jax.init_memory(rng, cfg, mcfg)                             # the trainable tree
    state = gmem_jax.initial_state(mem, cfg, mcfg, batch)                   # [B, slots, mem_dim]
    state = gmem_jax.write_context(mem, frozen, tokens, mask, cfg, mcfg)    # write segments [B, N, T]
    out = gmem_jax.forward(frozen, tokens, cfg, **gmem_jax.memory_hooks(mem, state, cfg, mcfg))  # read + inject
    seg = gmem_jax.forward_segments(mem, frozen, batch, cfg, mcfg)          # the segment loop + composite loss
    gen = gmem_jax.generate(frozen, cfg, prompt, prompt_mask, max_new_tokens=16,
                            hooks=gmem_jax.generation_hooks(cfg, mcfg),
                            hook_state=gmem_jax.decode_hook_state(mem, state, frozen, cfg, mcfg, prompt, prompt_mask))
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "GmemError": "gmem_jax.errors",
    "BackboneConfig": "gmem_jax.backbones.config",
    "config_from_hf": "gmem_jax.backbones.config",
    "forward": "gmem_jax.backbones.model",
    "init_params": "gmem_jax.backbones.model",
    "init_cache": "gmem_jax.backbones.model",
    "lm_logits": "gmem_jax.backbones.model",
    "count_params": "gmem_jax.backbones.model",
    "unstack_layers": "gmem_jax.backbones.model",
    "load_backbone": "gmem_jax.backbones.loading",
    "load_tokenizer": "gmem_jax.tasks.tokenizers",
    "MemoryConfig": "gmem_jax.memory.config",
    "GMemory": "gmem_jax.memory.modules",
    "init_memory": "gmem_jax.memory.model",
    "initial_state": "gmem_jax.memory.model",
    "memory_hooks": "gmem_jax.memory.model",
    "forward_segments": "gmem_jax.memory.model",
    "write_context": "gmem_jax.memory.model",
    "count_memory_params": "gmem_jax.memory.model",
    "generate": "gmem_jax.generation",
    "generation_hooks": "gmem_jax.training.evaluation",
    "decode_hook_state": "gmem_jax.training.evaluation",
    "make_optimizer": "gmem_jax.training.step",
    "init_train_state": "gmem_jax.training.step",
    "make_train_step": "gmem_jax.training.step",
    "make_eval_step": "gmem_jax.training.step",
    "get_task": "gmem_jax.tasks.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gmem_jax' has no attribute {name!r}")
