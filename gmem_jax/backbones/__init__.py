"""Frozen backbones: GPT-2 and Llama-architecture transformers as pure functions over param trees."""
from gmem_jax.backbones.config import BackboneConfig, config_from_hf
from gmem_jax.backbones.model import BackboneOutput, count_params, forward, init_cache, init_params, lm_logits

__all__ = ["BackboneConfig", "BackboneOutput", "config_from_hf", "count_params", "forward", "init_cache",
           "init_params", "lm_logits"]
