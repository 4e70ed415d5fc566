"""Llama-3.1-8B (hub, gated: accept the licence and `huggingface-cli login`) + 1024-slot memory on HotpotQA.
bf16 frozen weights FSDP-sharded over all devices, remat inside the backbone, supporting-fact head.

    python -m gmem_jax.train --config configs/llama8b.py --workdir gs://BUCKET/runs/llama8b_hotpotqa
See launch/README.md for TPU pods and SLURM.
"""
from gmem_jax.configs_base import base_config


def get_config():
    c = base_config()
    c.backbone.update(source="meta-llama/Llama-3.1-8B", dtype="bfloat16", param_dtype="bfloat16",
                      remat_policy="dots_with_no_batch_dims_saveable")
    c.tokenizer = "backbone"
    c.memory.update(num_slots=1024, mem_dim=1024, num_heads=8, injection="final", sp_head=True, loss_positions=32,
                    dtype="float32")
    c.task.update(name="hotpotqa", n_seg=8, seg_len=512, max_sents=24, train_split="train",
                  eval_split="validation", kwargs=dict(source="hotpotqa/hotpot_qa", hub_config="distractor"))
    c.train.update(steps=10000, batch_size=64, learning_rate=5e-4, warmup_steps=300, log_every=20,
                   checkpoint_every=500, keep_checkpoints=3)
    c.eval.update(batch_size=64, max_new_tokens=24, baselines=True)
    c.mesh.update(data=1, fsdp=-1)  # all devices on FSDP: weights and batch split over them
    return c
