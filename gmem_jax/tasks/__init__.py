"""Tasks, datasets and metrics: documents as fixed-shape `SegmentedExample`s (see base.py for the contract),
HotpotQA / ZsRE / bAbI(-Long) / synthetic multi-hop recall, tokenizers, and a registry (`get_task`)."""
from gmem_jax.tasks.base import QA_PROMPT, SegmentedExample, Task, collate
from gmem_jax.tasks.registry import get_task, task_names
from gmem_jax.tasks.segment import Unit, build_example, pack_units, sentence_units
from gmem_jax.tasks.tokenizers import WordTokenizer, encode_batch, load_tokenizer, special_ids

__all__ = ["QA_PROMPT", "SegmentedExample", "Task", "Unit", "WordTokenizer", "build_example", "collate",
           "encode_batch", "get_task", "load_tokenizer", "pack_units", "sentence_units", "special_ids",
           "task_names"]
