"""Backbone configuration: one frozen dataclass for every supported architecture.

GPT-2 and Llama differ only in a handful of switches (norm kind, position scheme, MLP kind, biases), so one
parameterised transformer serves both; `arch` names the family for weight-name mapping.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Optional

from gmem_jax.errors import GmemError

SUPPORTED_ARCHS = ("gpt2", "llama")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Shape and numerics of a decoder-only transformer.

    `rope_scaling` is a tuple of (key, value) pairs (hashable, so the config can be a static jit argument),
    e.g. (("rope_type", "llama3"), ("factor", 8.0), ...); None means plain RoPE.
    `dtype` is the compute dtype, `param_dtype` the dtype parameters are created/loaded in.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()
    pad_token_id: Optional[int] = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise GmemError(f"unsupported architecture {self.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        if self.num_heads % self.num_kv_heads:
            raise GmemError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise GmemError(f"unknown remat_policy {self.remat_policy!r}; choose one of {REMAT_POLICIES}")

    @property
    def uses_rope(self) -> bool:
        return self.arch == "llama"

    @property
    def norm_kind(self) -> str:
        return "layernorm" if self.arch == "gpt2" else "rmsnorm"

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    def architecture_dict(self) -> dict[str, Any]:
        """Fields that define the function (not dtype/remat): used to identify a backbone in checkpoints."""
        d = dataclasses.asdict(self)
        for k in ("dtype", "param_dtype", "remat_policy"):
            d.pop(k)
        d["rope_scaling"] = [list(kv) for kv in (self.rope_scaling or ())]
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    def fingerprint(self) -> str:
        """A short stable hash of the architecture (not of the weights)."""
        blob = json.dumps(self.architecture_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def replace(self, **kw) -> "BackboneConfig":
        return dataclasses.replace(self, **kw)


def _eos_tuple(v) -> tuple:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def _rope_from_hf(hf: dict) -> tuple[float, Optional[tuple]]:
    """Read RoPE settings from both the old (`rope_theta` + `rope_scaling`) and transformers 5's
    (`rope_parameters`) config keys."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", "default") != "default":
            scaling = params
    theta = float(theta if theta is not None else 10000.0)
    if not scaling:
        return theta, None
    scaling = dict(scaling)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ("llama3", "linear"):
        raise GmemError(f"unsupported rope scaling type {rope_type!r}; supported: llama3, linear")
    keep = {"rope_type": rope_type, "factor": float(scaling["factor"])}
    if rope_type == "llama3":
        for k in ("low_freq_factor", "high_freq_factor"):
            keep[k] = float(scaling[k])
        keep["original_max_position_embeddings"] = int(scaling["original_max_position_embeddings"])
    return theta, tuple(sorted(keep.items()))


def config_from_hf(hf: dict, **overrides) -> BackboneConfig:
    """Build a BackboneConfig from a Hugging Face `config.json` dict (GPT-2 or Llama-architecture)."""
    model_type = hf.get("model_type")
    try:
        if model_type == "gpt2":
            d = hf["n_embd"]
            heads = hf["n_head"]
            act = hf.get("activation_function", "gelu_new")
            if act not in ("gelu_new", "gelu_pytorch_tanh"):
                raise GmemError(f"unsupported GPT-2 activation {act!r}; supported: gelu_new")
            cfg = dict(
                arch="gpt2", vocab_size=hf["vocab_size"], hidden_size=d, num_layers=hf["n_layer"],
                num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                intermediate_size=hf.get("n_inner") or 4 * d, max_position_embeddings=hf["n_positions"],
                norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=True,
                attention_bias=True, mlp_bias=True, bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_eos_tuple(hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"),
            )
        elif model_type in ("llama", "mistral", "qwen2") or "LlamaForCausalLM" in (hf.get("architectures") or []):
            if model_type == "qwen2":
                raise GmemError("qwen2 checkpoints need q/k/v biases, which the Llama path does not have; "
                                "use a Llama-architecture checkpoint")
            if hf.get("hidden_act", "silu") != "silu":
                raise GmemError(f"unsupported Llama activation {hf.get('hidden_act')!r}; supported: silu")
            heads = hf["num_attention_heads"]
            theta, scaling = _rope_from_hf(hf)
            cfg = dict(
                arch="llama", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                num_layers=hf["num_hidden_layers"], num_heads=heads,
                num_kv_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
                intermediate_size=hf["intermediate_size"],
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                rope_theta=theta, rope_scaling=scaling, attention_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)), bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=_eos_tuple(hf.get("eos_token_id")), pad_token_id=hf.get("pad_token_id"),
            )
        else:
            raise GmemError(f"unsupported model_type {model_type!r} in config.json; supported: gpt2, llama "
                            "(and Llama-architecture checkpoints)")
    except KeyError as e:
        raise GmemError(f"config.json for model_type {model_type!r} lacks the key {e.args[0]!r}") from None
    cfg.update(overrides)
    return BackboneConfig(**cfg)


def rope_inv_freq(cfg: BackboneConfig):
    """Inverse RoPE frequencies [head_dim // 2] (float32 numpy), with llama3/linear scaling applied."""
    import numpy as np

    # float32 throughout, as transformers computes it, so long positions agree to the last bit we can get.
    f32 = np.float32
    inv = f32(1.0) / (f32(cfg.rope_theta) ** (np.arange(0, cfg.head_dim, 2).astype(f32) / f32(cfg.head_dim)))
    s = cfg.rope_scaling_dict
    if not s:
        return inv
    if s["rope_type"] == "linear":
        return inv / s["factor"]
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = old / lo, old / hi
    scaled = np.where(wavelen > low_wl, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return np.where(medium, smoothed, scaled).astype(f32)
