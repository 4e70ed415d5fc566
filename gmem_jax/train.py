"""`python -m gmem_jax.train --config configs/X.py --workdir DIR [--config.key=value ...]`

Trains the memory of a frozen backbone; resumes automatically from the newest checkpoint in DIR.
"""
from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from gmem_jax.errors import GmemError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/X.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config, metrics, checkpoints, summary).")


def run(argv) -> int:
    del argv
    from absl import logging

    from gmem_jax.training.trainer import train

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO

    try:
        summary = train(_CONFIG.value, _WORKDIR.value)
    except GmemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("steps", "final_train", "eval", "memory_params", "wall_seconds")},
                     indent=1, default=str))
    if summary.get("eval_baselines"):
        from gmem_jax.training.evaluation import markdown_table

        print(markdown_table({"results": summary["eval_baselines"], "task": summary["task"],
                              "split": _CONFIG.value.task.eval_split, "examples": summary["eval_examples"],
                              "backbone": summary["backbone_id"]}))
    return 0


def main():
    flags.mark_flags_as_required(["config", "workdir"])
    try:
        app.run(lambda argv: sys.exit(run(argv)))
    except GmemError as e:  # a config file that fails to build
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
