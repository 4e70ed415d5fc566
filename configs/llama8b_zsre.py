"""Llama-3.1-8B + 1024-slot memory on ZsRE knowledge editing (the edit written into memory, queried later).

    python -m gmem_jax.train --config configs/llama8b_zsre.py --workdir gs://BUCKET/runs/llama8b_zsre \
        --config.task.kwargs.source=/path/to/zsre_mend_edit.json
"""
from gmem_jax.configs_base import base_config


def get_config():
    c = base_config()
    c.backbone.update(source="meta-llama/Llama-3.1-8B", dtype="bfloat16", param_dtype="bfloat16",
                      remat_policy="dots_with_no_batch_dims_saveable")
    c.tokenizer = "backbone"
    c.memory.update(num_slots=1024, mem_dim=1024, num_heads=8, injection="final", loss_positions=48)
    c.task.update(name="zsre", n_seg=2, seg_len=64, max_sents=4, train_split="train", eval_split="dev",
                  kwargs=dict(source="../shared/data/zsre/zsre_mend_edit_837.json"),
                  train_kwargs=dict(kinds=("reliability", "generalization")))
    c.train.update(steps=2000, batch_size=64, learning_rate=5e-4, warmup_steps=100, log_every=20,
                   checkpoint_every=500)
    c.eval.update(batch_size=64, max_new_tokens=16, baselines=True)
    c.mesh.update(data=1, fsdp=-1)
    return c
