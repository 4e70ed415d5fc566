"""Text embedders for resolving memory entities and relations by meaning rather than exact spelling.

An `Embedder` maps strings to L2-normalised float32 vectors [n, dim]; cosine distance (1 - dot) between them
decides whether a read query's "born in" finds a stored "was born in". Two implementations:

- `HashedNgramEmbedder` (the default): signed feature hashing of character n-grams and words. No model, no
  download, deterministic across processes and machines, and spelling variants share most n-grams, so they land
  close together. It knows nothing about synonyms ("born in" vs "birthplace").
- `BackboneEmbedder`: the mean final hidden state of the frozen backbone — a hook for semantic matching when a
  real checkpoint is loaded (random test models give meaningless geometry).

`name` identifies the embedding function (including its settings): a store records it and re-embeds its
entities when opened with a different embedder, because vectors from two functions are not comparable.
"""
from __future__ import annotations

import hashlib
import unicodedata
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from gmem_jax.errors import GmemError


def normalize_text(text: str) -> str:
    """The case/spacing-insensitive form used for exact matching and hashing: NFKC, casefolded, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; all-zero rows (e.g. the empty string) stay zero, i.e. similar to nothing."""
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(norms > 0, x / np.maximum(norms, 1e-12), 0.0).astype(np.float32)


@runtime_checkable
class Embedder(Protocol):
    """Anything with a stable `name`, a `dim` and `embed(texts) -> [len(texts), dim]` float32, rows L2-normalised."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class HashedNgramEmbedder:
    """Signed hashed bag of character n-grams (of the normalised text padded with spaces) plus whole words.

    Hashing uses blake2b with a fixed key, not Python's per-process salted `hash`, so vectors stored in a
    database file stay valid in the next process. Word features give "born in" and "was born in" a shared
    component beyond their n-grams; the sign bit halves the bias hash collisions add to dot products.
    """

    def __init__(self, dim: int = 512, ngram_sizes: Sequence[int] = (2, 3, 4), word_weight: float = 1.0):
        if dim < 8:
            raise GmemError(f"HashedNgramEmbedder dim={dim} is too small; use dim >= 8 (default 512)")
        if not ngram_sizes or min(ngram_sizes) < 1:
            raise GmemError(f"HashedNgramEmbedder ngram_sizes={tuple(ngram_sizes)} must be positive integers")
        self.dim = int(dim)
        self.ngram_sizes = tuple(int(n) for n in ngram_sizes)
        self.word_weight = float(word_weight)
        self.name = f"hashed-ngram-v1/dim={self.dim}/n={','.join(map(str, self.ngram_sizes))}/w={self.word_weight}"
        self._cache: dict[str, np.ndarray] = {}

    def _bucket(self, feature: str) -> tuple[int, float]:
        digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8, key=b"gmem-memllm").digest()
        h = int.from_bytes(digest, "little")
        return (h >> 1) % self.dim, (1.0 if h & 1 else -1.0)

    def _embed_one(self, text: str) -> np.ndarray:
        norm = normalize_text(text)
        vec = np.zeros(self.dim, np.float32)
        if not norm:
            return vec
        padded = f" {norm} "
        for n in self.ngram_sizes:
            for i in range(len(padded) - n + 1):
                idx, sign = self._bucket("c:" + padded[i:i + n])
                vec[idx] += sign
        if self.word_weight:
            for word in norm.split():
                idx, sign = self._bucket("w:" + word)
                vec[idx] += sign * self.word_weight
        return l2_normalize(vec)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """texts -> [len(texts), dim] float32, unit rows (zero rows for texts with no characters)."""
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            if text not in self._cache:
                if len(self._cache) > 100_000:  # a bounded memo: names repeat across reads, but not unboundedly
                    self._cache.clear()
                self._cache[text] = self._embed_one(text)
            out[i] = self._cache[text]
        return out


class BackboneEmbedder:
    """Mean of the frozen backbone's final hidden states over a text's tokens, L2-normalised.

    `tokenize(str) -> list[int]`. Texts are right-padded to a power-of-two length bucket (>= 8) and the batch to
    a multiple of `batch_size`, so only a handful of shapes ever compile; right padding leaves the real tokens'
    hidden states unchanged under causal attention. `name` should identify the checkpoint (e.g. its path).
    """

    def __init__(self, params: dict, cfg, tokenize: Callable[[str], list[int]], *, name: str,
                 max_tokens: int = 64, batch_size: int = 16):
        import jax

        from gmem_jax.backbones.model import forward

        self.params, self.cfg, self.tokenize = params, cfg, tokenize
        self.dim = cfg.hidden_size
        self.max_tokens, self.batch_size = int(max_tokens), int(batch_size)
        self.name = f"backbone-mean/{name}/{cfg.fingerprint()}/max_tokens={self.max_tokens}"

        def mean_hidden(params, tokens, mask):  # tokens, mask [B, T] -> [B, D]
            hidden = forward(params, tokens, cfg, kv_mask=mask, compute_logits=False).hidden.astype("float32")
            m = mask[..., None].astype("float32")
            return (hidden * m).sum(1) / m.sum(1).clip(1.0)

        self._mean_hidden = jax.jit(mean_hidden)  # params stay an argument, not a baked-in constant

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        ids = [list(self.tokenize(t))[: self.max_tokens] for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            longest = max([len(x) for x in chunk] + [1])
            T = max(8, 1 << (longest - 1).bit_length())
            tokens = np.zeros((self.batch_size, T), np.int32)
            mask = np.zeros((self.batch_size, T), bool)
            for i, x in enumerate(chunk):
                tokens[i, :len(x)], mask[i, :len(x)] = x, True
            vecs = np.asarray(self._mean_hidden(self.params, tokens, mask))
            out[start:start + len(chunk)] = vecs[:len(chunk)]
        # An empty text has no tokens: its row is all zero and stays zero after normalisation.
        return l2_normalize(out)
