"""Where does a trained ZsRE memory's read land, relative to the written answer? (An analysis script for
docs/results.md, not part of the package.)

    PYTHONPATH=. python docs/analysis/zsre_pointer_mass.py <workdir> [<workdir> ...]

For each trained keyed-write memory (update gate; either injection), on the dev reliability and generalization
questions of configs/smollm2_zsre.py, teacher-forced: at each answer position whose target token occurs in the
written edit, the share of what the read retrieves that is that token's value (beta = alpha P, the quantity
memory.pointer_weight trains; `gmem_jax.memory.model._pointer_terms`), averaged over the positions, for all answer
tokens and for the first one alone; beside it the share a uniform read over the slots would get (P's column mass /
S). Works for runs trained without the pointer loss too (the share is a property of the read and the write).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

from configs.smollm2_zsre import get_config
from gmem_jax.memory.model import forward_segments
from gmem_jax.tasks.base import collate
from gmem_jax.training import builders
from gmem_jax.training.checkpoint import load_exported_memory

KINDS = ("reliability", "generalization")


def first_target_only(loss_mask):
    """[B, N, T] -> the same with only each segment's first target kept."""
    lm = loss_mask > 0
    return (lm & (np.cumsum(lm, -1) == 1)).astype(loss_mask.dtype)


def counted(b, loss_mask):
    """How many positions the pointer terms count: a loss in segment 1 whose target is a real token of segment 0."""
    written = np.where(b["token_mask"][:, 0], b["tokens"][:, 0], -1)  # [B, T]
    hit = (b["labels"][:, 1, :, None] == written[:, None, :]).any(-1)  # [B, T]
    return float(np.sum((loss_mask[:, 1] > 0) & hit))


def main(workdirs):
    config = get_config("scoped")
    _, _, cfg, frozen, examples = builders.eval_setup(config)
    print("| run | kind | answer tokens: share of the read on the target's token | first token | uniform read |")
    print("|---|---|---|---|---|")
    for wd in workdirs:
        params, mcfg = load_exported_memory(wd, cfg)
        mcfg = mcfg.replace(pointer_weight=1.0)
        # the frozen tree is an argument, not a constant baked into the compiled graph
        metrics = jax.jit(lambda p, f, b: forward_segments(p, f, b, cfg, mcfg).metrics)
        run = lambda p, b: metrics(p, frozen, b)  # noqa: E731
        # a uniform read: no query and equal importance make the read logits constant -> alpha = 1 / S everywhere
        uni = dict(params, read_q=jax.tree.map(jnp.zeros_like, params["read_q"]),
                   importance_mlp=jax.tree.map(jnp.zeros_like, params["importance_mlp"]))
        for kind in KINDS:
            exs = [e for e in examples if e.meta["kind"] == kind]
            sums = {"all": [0.0, 0.0], "first": [0.0, 0.0], "uniform": [0.0, 0.0]}
            for start in range(0, len(exs), 16):
                b = collate(exs[start:start + 16])
                batch = {k: jnp.asarray(b[k]) for k in ("tokens", "token_mask", "labels", "loss_mask")}
                for key, lm in (("all", b["loss_mask"]), ("first", first_target_only(b["loss_mask"]))):
                    m = run(params, dict(batch, loss_mask=jnp.asarray(lm)))
                    n = counted(b, lm)  # pointer_mass is a mean over these; weight it back by their number
                    sums[key][0] += float(m["pointer_mass"]) * n
                    sums[key][1] += n
                m = run(uni, batch)
                n = counted(b, b["loss_mask"])
                sums["uniform"][0] += float(m["pointer_mass"]) * n
                sums["uniform"][1] += n
            cells = [f"{100 * s / max(n, 1):.1f}%" for s, n in (sums["all"], sums["first"], sums["uniform"])]
            print(f"| {wd} | {kind} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
