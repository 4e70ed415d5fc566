"""SmolLM2-135M + memory on BABILong-style bAbI (facts spread through WikiText filler), question at the end.
The argument picks the bAbI task and the context length in tokens: configs/smollm2_babilong.py:1,2048

    python -m gmem_jax.train --config configs/smollm2_babilong.py:1,2048 --workdir runs/babilong_qa1_2k
"""
from gmem_jax.configs_base import smollm2_config


def get_config(arg: str = "1,1024"):
    task_id, length = (int(x) for x in arg.split(","))
    c = smollm2_config()
    c.memory.update(loss_positions=8)
    seg_len = 128
    c.task.update(name="babilong", n_seg=length // seg_len + 2, seg_len=seg_len, max_sents=16, train_split="train",
                  eval_split="test", train_limit=2000, eval_limit=100,
                  kwargs=dict(source="../shared/data/babi/en-10k", tasks=(task_id,), target_tokens=length,
                              filler="../shared/data/text/wikitext-2/valid.txt", entity_ids="story"))
    c.train.update(steps=300, batch_size=4, warmup_steps=30, log_every=10, checkpoint_every=100)
    c.eval.update(batch_size=8, max_new_tokens=4, baselines=True)
    return c
