"""Tokenizers the tasks accept: any Hugging Face tokenizer, or the built-in word-level `WordTokenizer`.

Both are used the same way: `tokenizer(text_or_texts, add_special_tokens=False)["input_ids"]` and
`tokenizer.decode(ids)`, with `eos_token_id` / `pad_token_id` attributes. The WordTokenizer needs no files and
has a small vocabulary, so tiny random backbones (e.g. vocab 512) can train on the synthetic and bAbI tasks.
"""
from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from gmem_jax.errors import GmemError

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>", "<bos>")
# A word is a run of letters/digits/underscore; every other non-space character is a token of its own.
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
# Decoding glues these to the previous token ("Paris." not "Paris .") and glues the next token to "'" and "-"
# ("Sana'a", "so-called") so that decode(encode(x)) normalises like x under the answer metrics.
_NO_SPACE_BEFORE = set(".,!?;:)]}'%-/")
_NO_SPACE_AFTER = set("([{'-/$")


class WordTokenizer:
    """Word-level tokenizer with a fixed vocabulary: ids 0..3 are <pad>, <eos>, <unk>, <bos>, then the words.

    Whitespace is not a token (so a sentence tokenizes the same alone and in context); case is kept; words
    outside the vocabulary map to <unk>. `vocab_size` (if given) is the size the model's embedding needs; it
    may exceed the number of known words (the extra ids are never produced).
    """

    pad_token_id, eos_token_id, unk_token_id, bos_token_id = 0, 1, 2, 3

    def __init__(self, words: Iterable[str], *, vocab_size: int | None = None):
        vocab = list(SPECIAL_TOKENS)
        index = {w: i for i, w in enumerate(vocab)}
        for w in words:
            if not _TOKEN_RE.fullmatch(w):
                raise GmemError(f"WordTokenizer: {w!r} is not a single word or punctuation mark; pass words as "
                                "split by WordTokenizer.split (or build with WordTokenizer.from_texts)")
            if w not in index:
                index[w] = len(vocab)
                vocab.append(w)
        if vocab_size is not None and len(vocab) > vocab_size:
            raise GmemError(f"WordTokenizer: {len(vocab)} tokens (4 special + words) exceed vocab_size={vocab_size}; "
                            "raise vocab_size or use WordTokenizer.from_texts, which keeps the most frequent words")
        self._vocab, self._index = vocab, index
        self.vocab_size = vocab_size if vocab_size is not None else len(vocab)

    @staticmethod
    def split(text: str) -> list[str]:
        """The word/punctuation pieces of a text (whitespace dropped)."""
        return _TOKEN_RE.findall(text)

    @classmethod
    def from_texts(cls, texts: Iterable[str], *, vocab_size: int | None = None) -> "WordTokenizer":
        """Vocabulary of the words in `texts`, most frequent first (ties alphabetical); with `vocab_size`, only
        the vocab_size - 4 most frequent words are kept and the rest become <unk>."""
        counts = collections.Counter(w for t in texts for w in cls.split(t))
        words = sorted(counts, key=lambda w: (-counts[w], w))
        if vocab_size is not None:
            if vocab_size <= len(SPECIAL_TOKENS):
                raise GmemError(f"WordTokenizer: vocab_size={vocab_size} leaves no room for words; use > 4")
            words = words[: vocab_size - len(SPECIAL_TOKENS)]
        return cls(words, vocab_size=vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        unk = self.unk_token_id
        return [self._index.get(w, unk) for w in self.split(text)]

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = False) -> dict[str, Any]:
        """Same call shape as a Hugging Face tokenizer; never adds special tokens."""
        if isinstance(text, str):
            return {"input_ids": self.encode(text)}
        return {"input_ids": [self.encode(t) for t in text]}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i < len(SPECIAL_TOKENS):
                continue
            w = self._vocab[i] if 0 <= i < len(self._vocab) else "<unk>"
            if out and w not in _NO_SPACE_BEFORE and out[-1] not in _NO_SPACE_AFTER:
                out.append(" ")
            out.append(w)
        return "".join(out)

    def save(self, path: str | os.PathLike) -> None:
        """JSON {'type': 'word', 'words': [...], 'vocab_size': n}; `load_tokenizer(path)` reads it back."""
        Path(path).write_text(json.dumps({"type": "word", "words": self._vocab[len(SPECIAL_TOKENS):],
                                          "vocab_size": self.vocab_size}), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(data["words"], vocab_size=data["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise GmemError(f"cannot read a WordTokenizer from {path} ({type(e).__name__}: {e}); "
                            "pass a file written by WordTokenizer.save") from None


def load_tokenizer(spec: str | os.PathLike) -> Any:
    """A tokenizer from a WordTokenizer JSON file (written by `WordTokenizer.save`), or from any model source
    `gmem_jax.backbones.tokenizer.load_tokenizer` takes (a .gguf file, a tokenizer/model folder, a hub id)."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        return WordTokenizer.load(path)
    from gmem_jax.backbones.tokenizer import load_tokenizer as load_model_tokenizer

    return load_model_tokenizer(spec)


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(pad_id, eos_id). Tokenizers without a pad token (GPT-2) pad with EOS: padding is always masked."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise GmemError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; the answer must end with EOS, "
                        "so set tokenizer.eos_token or use a tokenizer that has one")
    pad = getattr(tokenizer, "pad_token_id", None)
    return (int(eos) if pad is None else int(pad)), int(eos)


def encode_batch(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (one batched call: fast tokenizers run it in Rust)."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [[int(i) for i in row] for row in ids]
