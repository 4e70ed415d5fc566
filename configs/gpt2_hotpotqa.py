"""GPT-2 124M (hub) + 1024-slot memory on HotpotQA distractor: answer generation + supporting-fact head.

    python -m gmem_jax.train --config configs/gpt2_hotpotqa.py --workdir runs/gpt2_hotpotqa
Offline, with the local files: --config.backbone.source=/path/to/gpt2 \
    --config.task.kwargs.source=../shared/data/hotpotqa/fullwiki_dev500.jsonl
"""
from gmem_jax.configs_base import base_config


def get_config():
    c = base_config()
    c.backbone.source = "openai-community/gpt2"
    c.tokenizer = "backbone"
    c.memory.update(num_slots=1024, mem_dim=512, num_heads=8, injection="final", sp_head=True, sp_weight=1.0,
                    loss_positions=32)
    # GPT-2 sees 1024 positions; 8 segments of 256 tokens read ~2K context tokens, the question in the last one.
    c.task.update(name="hotpotqa", n_seg=8, seg_len=256, max_sents=16, train_split="train", eval_split="validation",
                  kwargs=dict(source="hotpotqa/hotpot_qa", hub_config="distractor"))
    c.train.update(steps=20000, batch_size=16, learning_rate=1e-3, warmup_steps=500, log_every=50,
                   checkpoint_every=1000)
    c.eval.update(batch_size=16, max_new_tokens=24, baselines=True)
    return c
