"""Tokenizer loading for the same sources as `load_backbone`, and left-padded batch encoding for generation."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np

from gmem_jax.backbones.loading import resolve_source
from gmem_jax.errors import GmemError

# Files that carry a vocabulary (transformers 5 otherwise builds an EMPTY tokenizer from config.json alone).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


# Files that carry a vocabulary (transformers 5 otherwise builds an EMPTY tokenizer from config.json alone).
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(source: Union[str, Path]):
    """A transformers tokenizer for a Hugging Face folder (tokenizer.json / tokenizer_config.json, or GPT-2 style
    vocab.json + merges.txt), a hub id or a .gguf file (never remote code).

    Note: in transformers 5, `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently builds an EMPTY
    tokenizer (the arguments are now `vocab`/`merges`); loading the folder with from_pretrained is correct."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    resolved = resolve_source(source)
    path = resolved.path
    if resolved.kind == "folder" and not any((path / f).is_file() for f in VOCAB_FILES):
        raise GmemError(f"{path} has no tokenizer files (one of {', '.join(VOCAB_FILES)}); save the "
                        "tokenizer into the model folder (tokenizer.save_pretrained)")
    try:
        if resolved.kind == "gguf":
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        has_config = (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
        if not has_config and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return GPT2TokenizerFast.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GmemError(f"could not load a tokenizer from {path} ({first}); the folder needs "
                        "tokenizer.json or the slow tokenizer files (e.g. vocab.json + merges.txt)") from None


def encode_left_padded(tokenizer, texts: Sequence[str], *, pad_id: int = 0, add_special_tokens: bool = True
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Encode texts into (tokens [B, P] int32, mask [B, P] bool), LEFT-padded with `pad_id` to the longest.

    Left padding keeps every prompt's last real token in the last column, which is where generation starts.
    """
    ids = [list(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]
    if not ids or min(len(x) for x in ids) == 0:
        raise GmemError("a prompt encodes to zero tokens; give every prompt some text")
    P = max(len(x) for x in ids)
    tokens = np.full((len(ids), P), pad_id, np.int32)
    mask = np.zeros((len(ids), P), bool)
    for b, x in enumerate(ids):
        tokens[b, P - len(x):] = x
        mask[b, P - len(x):] = True
    return tokens, mask
