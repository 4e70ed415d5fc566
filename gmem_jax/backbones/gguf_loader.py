"""Reading llama.cpp GGUF files: the config from GGUF metadata and dequantized tensors in Hugging Face layout.

`GGUFTensors` presents every tensor as the matching Hugging Face `nn.Linear`-style array ([out, in] for
projections), so `loading.py` maps GGUF names with the same machinery as safetensors names. Two conversions
happen here:

- dequantization (`gguf.quants.dequantize`, Q4/Q8/K-quants/F16/BF16 -> float32);
- undoing llama.cpp's q/k row permutation. llama.cpp's converter reorders each head's q/k output rows from
  Hugging Face's rotate-half layout (first half / second half of the head dim) to interleaved pairs
  (0, E/2, 1, E/2+1, ...) because its RoPE rotates adjacent pairs. Our RoPE is rotate-half, so we invert it.

GGUF tensors are quantized blocks along rows, so a slice cannot be read without dequantizing the tensor; the
loader therefore dequantizes whole tensors (a bounded LRU cache keeps one stacked leaf's worth of them).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import numpy as np

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.errors import GmemError

# Our module path -> GGUF tensor name ('{i}' = layer index); the leaf suffix is '.weight' / '.bias'.
GGUF_LLAMA_NAMES = {
    "embed": "token_embd",
    "final_norm": "output_norm",
    "lm_head": "output",
    "layers/attn_norm": "blk.{i}.attn_norm",
    "layers/attn/q": "blk.{i}.attn_q",
    "layers/attn/k": "blk.{i}.attn_k",
    "layers/attn/v": "blk.{i}.attn_v",
    "layers/attn/o": "blk.{i}.attn_output",
    "layers/mlp_norm": "blk.{i}.ffn_norm",
    "layers/mlp/gate": "blk.{i}.ffn_gate",
    "layers/mlp/up": "blk.{i}.ffn_up",
    "layers/mlp/down": "blk.{i}.ffn_down",
}


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k permutation: w [n_heads * E, ...] with interleaved rotary pairs in each head
    -> rotate-half layout (row 2j of a head goes to j, row 2j+1 to E/2 + j)."""
    E = w.shape[0] // n_heads
    return w.reshape(n_heads, E // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a truncated/foreign file: gguf raises ValueError/struct errors
        raise GmemError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}); "
                        "re-download it or pass a Hugging Face folder instead") from None


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class GGUFTensors:
    """Dequantized tensors of a GGUF file by name, in Hugging Face layout ([out, in] for projections)."""

    def __init__(self, path: Path, reader, num_heads: int, num_kv_heads: int, cache_size: int = 64):
        self.path = Path(path)
        self._tensors = {t.name: t for t in reader.tensors}
        self._num_heads, self._num_kv_heads = num_heads, num_kv_heads
        self._full = functools.lru_cache(maxsize=cache_size)(self._dequantize)

    def where(self) -> str:
        return str(self.path)

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        t = self._tensors.get(name)
        # GGUF lists dims fastest-first (ne0 = columns); numpy order is the reverse.
        return None if t is None else tuple(int(d) for d in reversed(t.shape))

    def read(self, name: str, index: tuple) -> np.ndarray:
        return self._full(name)[index]

    def _dequantize(self, name: str) -> np.ndarray:
        from gguf.quants import dequantize

        t = self._tensors[name]
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise GmemError(f"tensor {name!r} in {self.path} uses quantization {t.tensor_type.name}, which the "
                            "installed gguf package cannot dequantize; upgrade gguf or use another quantization"
                            ) from None
        w = np.asarray(w).reshape(self.shape(name))
        if name.endswith("attn_q.weight"):
            w = unpermute_rope_rows(w, self._num_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_rope_rows(w, self._num_kv_heads)
        return w


def open_gguf(path: Path, **overrides) -> tuple[BackboneConfig, GGUFTensors]:
    """Open a GGUF file: (config from its metadata, its tensors). `overrides` replace config fields (dtype...)."""
    path = Path(path)
    reader = _reader(path)
    cfg = _gguf_config(path, reader, **overrides)
    return cfg, GGUFTensors(path, reader, cfg.num_heads, cfg.num_kv_heads, cache_size=cfg.num_layers + 2)


def _int_or_none(v):
    return None if v is None else int(v)


def _gguf_config(path: Path, reader, **overrides) -> BackboneConfig:
    """BackboneConfig from the `llama.*` / `tokenizer.ggml.*` metadata of a GGUF file."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GmemError(f"GGUF file {path} has general.architecture={arch!r}; only 'llama' GGUF files are "
                        "supported (use the Hugging Face safetensors checkpoint for other models)")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GmemError(f"GGUF file {path} stores per-frequency RoPE factors (llama3 rope scaling), which this "
                        "loader does not read; load the Hugging Face safetensors checkpoint instead")

    def need(key):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise GmemError(f"GGUF file {path} lacks the metadata key 'llama.{key}'; it is not a complete "
                            "llama.cpp model file")
        return v

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else int(need("vocab_size"))
    scaling = None
    scaling_type = _field(reader, "llama.rope.scaling.type")
    if scaling_type not in (None, "none"):
        if scaling_type != "linear":
            raise GmemError(f"GGUF file {path} uses rope scaling {scaling_type!r}; supported: linear")
        scaling = (("factor", float(need("rope.scaling.factor"))), ("rope_type", "linear"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    cfg = dict(
        arch="llama", vocab_size=vocab, hidden_size=hidden, num_layers=int(need("block_count")),
        num_heads=heads, num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.attention.key_length", hidden // heads)),
        intermediate_size=int(need("feed_forward_length")),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in names,
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)), rope_scaling=scaling,
        bos_token_id=_int_or_none(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_ids=() if eos is None else (int(eos),),
        pad_token_id=_int_or_none(_field(reader, "tokenizer.ggml.padding_token_id")),
    )
    cfg.update(overrides)
    return BackboneConfig(**cfg)
