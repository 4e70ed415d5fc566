"""The demo (configs/demo.py) with 3x the training documents (12,000) and 10x the steps (3,000 x 8): the budget of
the binding runs in docs/results.md ("Binding with the EOS target kept"), which add memory.* overrides to

    python -m gmem_jax.train --config configs/demo_big.py --workdir runs/demo_big

About an hour on 2 idle CPU cores with 64 slots (--config.memory.num_slots=64); the first epoch computes the frozen
features, the rest reuse them.
"""
import importlib.util
from pathlib import Path


def get_config():
    spec = importlib.util.spec_from_file_location("demo", Path(__file__).with_name("demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    c = demo.get_config()
    c.task.train_limit = 12000
    c.task.kwargs.n_examples = dict(train=12000)  # the synthetic task's train split holds 10,000 by default
    c.train.steps = 3000
    return c
