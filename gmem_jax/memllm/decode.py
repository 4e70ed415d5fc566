"""Generation that executes the memory calls the model writes (MemLLM inference).

The device loop is `gmem_jax.generation` (jitted prefill + while-loop decode with a KV cache). It stops on any
token that may complete a call delimiter (`call_stop_ids`: the read arrow `-->` or the write closer `})`);
the host then decodes the text and
  - executes every newly completed MEM_WRITE call (so later reads in the same generation see it),
  - if the text ends with an open MEM_READ(...)-->, queries the store and splices " result1;result2})" into
    the same KV cache with `extend`, and decoding continues after it.
A stop token that completes nothing just resumes decoding (nothing is recomputed). Results are tokenized on their
own and fed as a block padded to `max_result_tokens` (masked), so a generation compiles three programs (prompt,
resume, resume-with-results) however many calls it makes; every segment decodes with the same static
`max_new_tokens` and the host truncates to the overall budget.

One example at a time (batch 1): rows of a batch would stop at different tokens and need different splices.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.errors import GmemError
from gmem_jax.generation import extend, generate
from gmem_jax.memllm.calls import ARROW, CLOSE, WriteCall, clean_field, format_results, parse_calls, pending_read
from gmem_jax.memllm.store import ReadConfig, ReadQuery, Triple, TripleStore

log = logging.getLogger(__name__)


def call_stop_ids(token_texts: Sequence[str]) -> tuple[int, ...]:
    """Ids of tokens that can complete a call delimiter ("-->" or "})"): the token contains it, or starts with
    its tail (">", "->", ")") so that it finishes one begun by earlier tokens. token_texts[i] = decode([i])."""
    def completes(text: str) -> bool:
        return any(d in text or any(text.startswith(d[k:]) for k in range(1, len(d))) for d in (ARROW, CLOSE))

    return tuple(i for i, t in enumerate(token_texts) if completes(t))


@dataclasses.dataclass
class MemoryGeneration:
    tokens: list[int]  # generated and spliced-in ids in order (prompt excluded)
    text: str  # tokenizer.decode(tokens)
    reads: list[tuple[tuple[ReadQuery, ...], tuple[str, ...]]]  # each executed read: its queries and results
    writes: list[Triple]  # each triple the model wrote (already present or not)
    num_generated: int  # tokens the model sampled (spliced results not counted)
    stop_reason: str  # "eos" | "max_new_tokens" | "max_calls"


class MemoryDecoder:
    """Generation with a `TripleStore` behind the model's MEM_READ / MEM_WRITE calls.

    tokenizer: `tokenizer(text, add_special_tokens=False)["input_ids"]` and `tokenizer.decode(ids)` (any
    Hugging Face tokenizer, or gmem_jax.tasks.tokenizers.WordTokenizer). The stop ids are computed once here
    from the vocabulary. max_calls bounds the reads + writes of one generation (a model stuck in a call loop
    ends with stop_reason "max_calls"); max_result_tokens bounds a splice (results that do not fit are dropped).
    """

    def __init__(self, cfg: BackboneConfig, tokenizer, store: TripleStore, *, read_config: Optional[ReadConfig] = None,
                 max_calls: int = 16, max_result_tokens: int = 32, execute_writes: bool = True):
        self.cfg, self.tokenizer, self.store = cfg, tokenizer, store
        self.read_config = read_config
        self.max_calls, self.max_result_tokens, self.execute_writes = max_calls, max_result_tokens, execute_writes
        # Embedding rows past the tokenizer's vocabulary (padded vocabularies) are never real tokens.
        n = min(cfg.vocab_size, len(tokenizer) if hasattr(tokenizer, "__len__") else cfg.vocab_size)
        self.stop_ids = call_stop_ids([tokenizer.decode([i]) for i in range(n)])
        if len(self._encode(format_results([]))) > max_result_tokens:
            raise GmemError(f"max_result_tokens={max_result_tokens} cannot hold even an empty result "
                            f"{format_results([])!r}; raise it")

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _answer(self, queries: Sequence[ReadQuery]) -> tuple[tuple[str, ...], list[int]]:
        """Run a read's queries -> (results, the tokens of " r1;r2})"), dropping results that cannot be
        written in a call or do not fit in max_result_tokens."""
        results: list[str] = []
        for q in queries:
            for answer in self.store.read(q, self.read_config):
                clean = clean_field(answer)
                if clean is None:
                    log.warning("memory result %r cannot be written in a call; dropped", answer[:80])
                elif clean not in results:
                    results.append(clean)
        ids = self._encode(format_results(results))
        while len(ids) > self.max_result_tokens:
            log.warning("memory results %r exceed max_result_tokens=%d; dropping the last", results,
                        self.max_result_tokens)
            results.pop()
            ids = self._encode(format_results(results))
        return tuple(results), ids

    def cache_len(self, prompt_len: int, max_new_tokens: int) -> int:
        """KV-cache slots a generation uses: the prompt, every generated token, every padded splice, and one
        more full segment (each resume may decode max_new_tokens into the cache before the host truncates)."""
        return prompt_len + 2 * max_new_tokens + self.max_calls * self.max_result_tokens + 1

    def generate(self, params: dict, prompt: Union[str, Sequence[int]], *, max_new_tokens: int,
                 rng: Optional[jax.Array] = None, temperature: float = 0.0, top_p: float = 1.0,
                 eos_ids: Optional[Sequence[int]] = None, hooks=None, hook_state: Any = None) -> MemoryGeneration:
        """Generate up to max_new_tokens model tokens after `prompt` (text or token ids), executing calls.
        Sampling arguments, eos_ids, hooks and hook_state are those of `gmem_jax.generation.generate`."""
        prompt_ids = self._encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not prompt_ids:
            raise GmemError("the prompt encodes to zero tokens; give it some text")
        eos = set(self.cfg.eos_token_ids if eos_ids is None else eos_ids)
        R, seg = self.max_result_tokens, int(max_new_tokens)
        common = dict(max_new_tokens=seg, temperature=temperature, top_p=top_p, eos_ids=tuple(eos),
                      hooks=hooks, hook_state=hook_state, stop_ids=self.stop_ids)

        def next_rng():
            nonlocal rng
            if rng is None:
                return None
            rng, sub = jax.random.split(rng)
            return sub

        res = generate(params, self.cfg, np.asarray([prompt_ids], np.int32), np.ones((1, len(prompt_ids)), bool),
                       cache_len=self.cache_len(len(prompt_ids), seg), rng=next_rng(), **common)
        out: list[int] = []
        reads, writes = [], []
        n_generated, n_calls, done_chars = 0, 0, 0  # done_chars: text before it holds only handled calls
        while True:
            # slice on the host: a device slice would compile once per distinct length
            new = np.asarray(res.tokens)[0, :int(res.lengths[0])].tolist()[:max_new_tokens - n_generated]
            out += new
            n_generated += len(new)
            text = self.tokenizer.decode(out)
            # Complete calls since the last one handled: execute writes; reads were answered when they opened.
            calls = parse_calls(text[done_chars:], final=False)
            for call in calls:
                if isinstance(call, WriteCall):
                    writes.extend(call.triples)
                    n_calls += 1
                    if self.execute_writes:
                        self.store.insert(call.triples)
            done_chars += max((c.end for c in calls), default=0)
            ended_by_eos = bool(new) and new[-1] in eos
            if ended_by_eos or n_generated >= max_new_tokens or n_calls >= self.max_calls:
                stop_reason = "eos" if ended_by_eos else "max_new_tokens" if n_generated >= max_new_tokens \
                    else "max_calls"
                break
            pending = pending_read(text)
            splice, mask = np.zeros((1, 0), np.int32), np.zeros((1, 0), bool)
            if pending is not None and pending.start >= done_chars:
                results, ids = self._answer(pending.queries)
                reads.append((pending.queries, results))
                n_calls += 1
                out += ids
                done_chars = len(self.tokenizer.decode(out))
                splice, mask = np.zeros((1, R), np.int32), np.zeros((1, R), bool)
                splice[0, :len(ids)], mask[0, :len(ids)] = ids, True
            res = extend(params, self.cfg, res.state, splice, mask, rng=next_rng(), **common)
        return MemoryGeneration(out, self.tokenizer.decode(out), reads, writes, n_generated, stop_reason)
