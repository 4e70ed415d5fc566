"""Teacher-forced bAbI scores of trained memories, including ones trained with memory.address_oracle (an analysis
script for docs/results.md, not part of the package).

    PYTHONPATH=. python docs/analysis/babi_oracle_address.py [--entity_ids=name] \
        configs/smollm2_babilong.py:1,1024 W [W ...]

An address-oracle memory reads by the batch's entity labels, which generation does not have, so `evaluate`
refuses it. This scores every run the way `evaluate` scores teacher-forced (write the context segments, then read
the question segment on top), with the labels in the batch. Per run: answer-token accuracy (answer tokens and EOS,
per example, then averaged over examples, as `evaluate`), first-token accuracy, and "all targets" (every answer
token and the EOS right), which is exactly "greedy decoding emits the answer's tokens and then EOS": a token-level
exact match, at most the normalised em `evaluate` prints (which also accepts, say, different casing). For an oracle
run it also prints the share of the read, at the answer's first position, that lands in the asked person's slot
block (with memory.address_oracle_read=False the read is not biased there, so this is where it learned to look),
and the same for a run trained with memory.address_weight, whose read is never biased: pass the entity numbering
it was trained with (--entity_ids=name; the config's default is "story").
"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from babi_report import load_config  # this folder (python puts it first on sys.path)
from gmem_jax.memory.model import forward_segments, frozen_features, memory_module, write_context
from gmem_jax.memory.modules import GMemory
from gmem_jax.tasks.base import collate
from gmem_jax.training import builders
from gmem_jax.training.checkpoint import load_exported_memory


def scores(params, mcfg, cfg, frozen, examples, batch_size=8):
    """{token_acc, first_acc, all_targets, block_read (oracle and address_weight runs; else None)} in %, over the
    examples."""
    module = memory_module(cfg, mcfg)

    @jax.jit
    def run(p, f, b):  # params and frozen weights are arguments, not constants baked into the program
        # as `evaluate` scores teacher-forced (evaluation._memory_pass): write the context, then read the question
        entity = b["entity"][:, :-1] if mcfg.address_oracle else None
        state = write_context(p, f, b["tokens"][:, :-1], b["token_mask"][:, :-1], cfg, mcfg, entity=entity)
        last = {k: v[:, -1:] if v.ndim >= 2 else v for k, v in b.items()}
        out = forward_segments(p, f, last, cfg, mcfg, state=state)
        alpha = None
        if mcfg.reads_entity:  # the question's read weights [B, T, S], for the block share
            h = frozen_features(f, b["tokens"][:, -1], b["token_mask"][:, -1], cfg)["features"]
            alpha = module.apply({"params": p}, state, h, b["entity"][:, -1], method=GMemory.read)[1]
        return out.predictions[:, -1], out.positions[:, -1], alpha

    hits, firsts, alls, block = [], [], [], []
    for lo in range(0, len(examples), batch_size):
        b = collate(examples[lo:lo + batch_size])
        preds, pos, alpha = run(params, frozen, jax.tree.map(jnp.asarray, b))
        preds, pos = np.asarray(preds), np.asarray(pos)
        labels = np.take_along_axis(b["labels"][:, -1], pos, 1)
        weight = np.take_along_axis(b["loss_mask"][:, -1] > 0, pos, 1)  # loss positions first, in order
        for i in range(len(preds)):
            hit = (preds[i] == labels[i])[weight[i]]
            hits.append(hit.mean())  # per example, then averaged: evaluate's answer_token_acc
            firsts.append(hit[0])
            alls.append(hit.all())
        if alpha is not None:
            block += block_share(np.asarray(alpha), b, mcfg)
    pct = lambda v: 100.0 * float(np.mean(v))  # noqa: E731
    return dict(token_acc=pct(hits), first_acc=pct(firsts), all_targets=pct(alls), n=len(alls),
                block_read=pct(block) if block else None)


def block_share(alpha: np.ndarray, b: dict, mcfg) -> list:
    """Per example: the head-averaged read weight alpha [B, T, S] at the answer's first target position on the slot
    block of the asked person (memory.address_oracle's block 1 + e mod (blocks - 1))."""
    nb, S = mcfg.address_oracle_blocks, mcfg.num_slots
    block = np.arange(S) * nb // S
    out = []
    for i in range(alpha.shape[0]):
        t0 = int(np.argmax(b["loss_mask"][i, -1] > 0))
        e = int(b["entity"][i, -1, t0])
        if e >= 0:
            out.append(float(alpha[i, t0][block == 1 + e % (nb - 1)].sum()))
    return out


def main(args):
    entity_ids = [a.split("=", 1)[1] for a in args if a.startswith("--entity_ids=")]
    config_arg, *workdirs = [a for a in args if not a.startswith("--entity_ids=")]
    config = load_config(config_arg)
    if entity_ids:
        config.task.kwargs.entity_ids = entity_ids[0]
    _, _, cfg, frozen, examples = builders.eval_setup(config)
    print("| run | address oracle | answer-token acc | first-token acc | all targets (token-level em) | read on the "
          "asked person's block |")
    print("|---|---|---|---|---|---|")
    for wd in workdirs:
        params, mcfg = load_exported_memory(wd, cfg)
        s = scores(params, mcfg, cfg, frozen, examples)
        block = "" if s["block_read"] is None else f"{s['block_read']:.1f}%"
        oracle = (f"{mcfg.address_oracle:g}" + ("" if mcfg.address_oracle_read else ", write only")
                  if mcfg.address_oracle else "off") + (f"; address loss {mcfg.address_weight:g}"
                                                        if mcfg.address_weight else "")
        print(f"| {Path(wd).name} | {oracle} | {s['token_acc']:.1f}% | {s['first_acc']:.1f}% | "
              f"{s['all_targets']:.1f}% (of {s['n']}) | {block} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
