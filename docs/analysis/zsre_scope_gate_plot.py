"""How a trained scope gate (memory.scope_gate) splits ZsRE dev questions: per question, the gate reading its own
edit and another record's (an analysis script for docs/results.md, not part of the package).

    PYTHONPATH=. python docs/analysis/zsre_scope_gate_plot.py <workdir> [<workdir> ...] \
        --out docs/analysis/zsre_scope_gate.png [--list_open]

For each workdir (a run trained with the scope gate): the dev examples of configs/smollm2_zsre.py, the edit written
into memory, g of the question segment with its own memory and with the nearest other record's (the reliance
probe's "other"), printed as AUCs and drawn as histograms per question kind.
"""
import argparse
from pathlib import Path

import jax
import numpy as np

from configs.smollm2_zsre import get_config
from gmem_jax.memory.model import write_context
from gmem_jax.tasks.base import collate
from gmem_jax.training import builders
from gmem_jax.training.checkpoint import load_exported_memory
from gmem_jax.training.evaluation import _last_segment_predictions, other_context


def auc(pos, neg):
    """P(a positive scores above a negative), ties counted half."""
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def gates(workdir: Path, batch_size: int = 16):
    config = get_config("distill")
    task, _, cfg, frozen, examples = builders.eval_setup(config)
    params, mcfg = load_exported_memory(workdir, cfg)
    if not mcfg.scope_gate:
        raise SystemExit(f"error: {workdir} was not trained with memory.scope_gate")
    write = jax.jit(write_context, static_argnums=(4, 5))
    out = {"own": [], "other": []}
    kinds, pairs = [], []  # pairs: (question's record index, the other memory's record index or -1)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = {k: v for k, v in collate(chunk).items() if k != "example_mask"}
        state = write(params, frozen, batch["tokens"][:, :-1], batch["token_mask"][:, :-1], cfg, mcfg)
        partner = other_context(np.asarray(batch["tokens"][:, :-1]))
        keep = partner >= 0
        for name, s in (("own", state), ("other", state[np.where(keep, partner, np.arange(len(chunk)))])):
            g = np.asarray(_last_segment_predictions(params, frozen, batch, s, cfg, mcfg)[4])
            out[name].append(np.where(keep | (name == "own"), g, np.nan))
        kinds += [ex.meta["kind"] for ex in chunk]
        pairs += [(ex.meta["record_index"], chunk[j].meta["record_index"] if j >= 0 else -1)
                  for ex, j in zip(chunk, partner)]
    return {k: np.concatenate(v) for k, v in out.items()}, np.array(kinds), pairs, task.records("dev")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("workdirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/analysis/zsre_scope_gate.png"))
    ap.add_argument("--list_open", action="store_true",
                    help="print each reliability question whose gate is >= 0.5 over another record's edit")
    args = ap.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.workdirs), figsize=(6 * len(args.workdirs), 4), squeeze=False)
    bins = np.linspace(0, 1, 41)
    for ax, wd in zip(axes[0], args.workdirs):
        g, kinds, pairs, records = gates(wd)
        by_index = {r.index: r for r in records}
        if args.list_open:
            for i in np.flatnonzero((kinds == "reliability") & (np.nan_to_num(g["other"]) >= 0.5)):
                own, other = (by_index[k] for k in pairs[i])
                print(f"  g={g['other'][i]:.2f} | {own.src} -> {own.alt} | written: {other.statement()}")
        in_scope = np.isin(kinds, ["reliability", "generalization"])
        rel = kinds == "reliability"
        other = g["other"][rel & ~np.isnan(g["other"])]
        loc = g["own"][kinds == "locality"]
        print(f"{wd.name}: AUC own-edit in-scope vs locality {auc(g['own'][in_scope], loc):.3f}; "
              f"reliability own vs other record's edit {auc(g['own'][rel], other):.3f}; "
              f"g >= 0.5: reliability own {np.mean(g['own'][rel] >= 0.5):.3f}, other {np.mean(other >= 0.5):.3f}, "
              f"locality own {np.mean(g['own'][kinds == 'locality'] >= 0.5):.3f}")
        # ZsRE holds some facts twice (same subject, another new answer): over such an edit opening is right.
        same = np.array([b >= 0 and by_index[a].subject.strip() == by_index[b].subject.strip() for a, b in pairs])
        distinct = g["other"][rel & ~np.isnan(g["other"]) & ~same]
        print(f"  another record's edit with the same subject: {int((rel & same).sum())} reliability questions; "
              f"with another subject: g >= 0.5 for {np.mean(distinct >= 0.5):.3f} of {len(distinct)}")
        for label, values in (("reliability + generalization, own edit", g["own"][in_scope]),
                              ("locality, own edit", g["own"][kinds == "locality"]),
                              ("reliability, another record's edit", other)):
            ax.hist(values, bins=bins, alpha=0.55, label=f"{label} (n={len(values)})")
        ax.set(title=wd.name, xlabel="scope gate g", ylabel="questions", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
