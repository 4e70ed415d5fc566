"""MemLLM (Modarressi et al. 2024): an explicit (subject, relation, object) memory the LM reads and writes
through API calls in its own text.

- `store`: the SQLite triple store and MemLLM read resolution (`TripleStore`, `ReadQuery`, `ReadConfig`).
- `embed`: embedders for approximate name matching (`HashedNgramEmbedder` default, `BackboneEmbedder`).
- `calls`: the call language: `parse_calls`, `pending_read`, `format_write`, `format_read`, `format_results`.
- `decode`: generation that executes the calls (`MemoryDecoder`; imports JAX).
- `lora`: LoRA adapters as the trainable tree (`init_lora`, `merge_lora`; imports JAX).
- `data`: training examples from ZsRE records (`build_examples`, `encode_examples`).

Only the JAX-free parts are imported here, so a store can be inspected without loading JAX.
"""
from gmem_jax.memllm.calls import (PendingRead, ReadCall, WriteCall, clean_field, format_read, format_results,
                                   format_write, parse_calls, pending_read)
from gmem_jax.memllm.embed import BackboneEmbedder, Embedder, HashedNgramEmbedder, normalize_text
from gmem_jax.memllm.store import ReadConfig, ReadHit, ReadQuery, Triple, TripleStore

__all__ = ["BackboneEmbedder", "Embedder", "HashedNgramEmbedder", "PendingRead", "ReadCall", "ReadConfig", "ReadHit",
           "ReadQuery", "Triple", "TripleStore", "WriteCall", "clean_field", "format_read", "format_results",
           "format_write", "normalize_text", "parse_calls", "pending_read"]
