"""Smoke test: a random tiny Llama-architecture backbone, the synthetic one-hop recall task, < 1 minute on 2 CPU
cores. `python -m gmem_jax.train --config configs/tiny.py --workdir /tmp/tiny`."""
from gmem_jax.configs_base import base_config


def get_config():
    c = base_config()
    c.memory.update(num_slots=16, mem_dim=64, num_heads=4, loss_positions=4)
    c.task.update(name="synthetic", n_seg=3, seg_len=16, max_sents=4, train_limit=2048, eval_limit=64,
                  kwargs=dict(hops=(1,), n_people=3, n_distractors=0, lexicon_sizes=(16, 8, 4, 2)))
    c.train.update(steps=60, batch_size=16, learning_rate=3e-3, warmup_steps=10, log_every=10, checkpoint_every=30)
    c.eval.update(batch_size=32, max_new_tokens=4)
    return c
