"""Training progress: a tqdm bar, metrics.jsonl, TensorBoard, and end-of-run PNG plots (main process only).

metrics.jsonl has one JSON object per logged step: {'step': int, 'time': unix seconds, <metric>: float, ...}.
On resume at step s the lines with step > s (written after the checkpoint being resumed) are dropped first, so
the file ends up as an uninterrupted run's would (TensorBoard gets the same via `purge_step`).
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from gmem_jax.errors import GmemError

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: str | Path, last_step: int) -> None:
    """Keep only the records with step <= last_step (atomically: write a temp file, then rename)."""
    path = Path(path)
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("step", -1) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX tries `import torch` at import time (to
    accept torch tensors, which we never pass), which costs ~2.5 CPU-seconds per run wherever torch is installed."""
    block = "torch" not in sys.modules  # already imported by the caller: nothing to save
    if block:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class Monitor:
    """`write(step, metrics)` after a step; `plot(...)` and `close()` at the end.

    tokens_per_step: tokens in one global batch (shapes are fixed), for the tokens/s readout.
    resume_step: the checkpoint step being resumed (None for a fresh run)."""

    def __init__(self, workdir: str | Path, total_steps: int, is_main_process: bool = True, *,
                 tokens_per_step: int = 0, resume_step: Optional[int] = None):
        self.workdir = Path(workdir)
        self.total_steps = total_steps
        self.active = is_main_process
        self.tokens_per_step = tokens_per_step
        self._bar = self._tb = None
        start = resume_step or 0
        self._last = (start, time.perf_counter())
        if not self.active:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.workdir / METRICS_FILE
        if resume_step is None:
            self.metrics_path.unlink(missing_ok=True)  # a fresh run starts a fresh log
        else:
            truncate_metrics(self.metrics_path, resume_step)
        SummaryWriter = _summary_writer_class()
        from tqdm.auto import tqdm

        # purge_step: TensorBoard hides events at steps >= it written by the run being resumed.
        self._tb = SummaryWriter(str(self.workdir / "tb"), purge_step=None if resume_step is None else start + 1)
        self._bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        values = {k: float(v) for k, v in metrics.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        for k, v in values.items():
            self._tb.add_scalar(k, v, int(step))
        last_step, last_time = self._last
        now = time.perf_counter()
        postfix = {k: f"{v:.4g}" for k, v in values.items() if "loss" in k}
        if self.tokens_per_step and step > last_step:
            postfix["tok/s"] = f"{(step - last_step) * self.tokens_per_step / max(now - last_time, 1e-9):.4g}"
        self._last = (step, now)
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)  # tqdm's own rate gives the ETA

    def plot(self, slot_usage: Optional[Sequence[float]] = None,
             gate_values: Optional[np.ndarray] = None) -> list[Path]:
        """PNGs in the workdir: 'loss_<key>.png' per metric whose name contains 'loss'; 'slot_usage.png' (bar
        per memory slot, e.g. mean read weight [slots]); 'gate_openness.png' (histogram of gate values in
        [0, 1], any shape). Returns the written paths."""
        if not self.active:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        written = []
        records = read_metrics(self.metrics_path)
        loss_keys = sorted({k for r in records for k in r if "loss" in k})
        for key in loss_keys:
            pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot([s for s, _ in pts], [v for _, v in pts])
            ax.set(xlabel="step", ylabel=key, title=key)
            written.append(self._save(fig, "loss_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", key)))
        if slot_usage is not None:
            usage = np.asarray(slot_usage, dtype=np.float64)
            if usage.ndim != 1:
                raise GmemError(f"slot_usage must be one value per slot [slots], got shape {usage.shape}")
            fig, ax = plt.subplots(figsize=(max(6, len(usage) / 16), 4))
            ax.bar(np.arange(len(usage)), usage, width=1.0)
            ax.set(xlabel="memory slot", ylabel="usage", title="memory slot usage")
            written.append(self._save(fig, "slot_usage"))
        if gate_values is not None:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.hist(np.asarray(gate_values, dtype=np.float64).ravel(), bins=50, range=(0.0, 1.0))
            ax.set(xlabel="gate value", ylabel="count", title="gate openness")
            written.append(self._save(fig, "gate_openness"))
        return written

    def _save(self, fig, name: str) -> Path:
        import matplotlib.pyplot as plt

        path = self.workdir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def plot_systems(reports: dict[str, dict], metric: str, path: str | Path, *, xlabel: str = "context tokens",
                 title: str = "") -> Path:
    """One line per system of `metric` (a fraction, drawn as %) across several evaluations, e.g. the same memory
    evaluated at several context lengths. reports: {x label: eval_results.json dict}; numeric labels are placed
    on a log2 axis in numeric order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = all(k.replace(".", "", 1).isdigit() for k in reports)
    labels = sorted(reports, key=float) if numeric else list(reports)
    systems = sorted({s for r in reports.values() for s in r["results"]})
    fig, ax = plt.subplots(figsize=(6, 4))
    for system in systems:
        pts = [(float(x) if numeric else i, reports[x]["results"].get(system, {}).get(metric))
               for i, x in enumerate(labels)]
        pts = [(x, 100 * v) for x, v in pts if v is not None]
        if not pts:
            continue
        ax.plot([x for x, _ in pts], [v for _, v in pts], marker="o", label=system)
    if numeric:
        ax.set_xscale("log", base=2)
        ax.set_xticks([float(x) for x in labels], labels)
    else:
        ax.set_xticks(range(len(labels)), labels)
    ax.set(xlabel=xlabel, ylabel=f"{metric} (%)", title=title or metric, ylim=(0, 100))
    ax.legend()
    return _save_figure(fig, path)


def plot_run_curves(runs: dict[str, list[dict]], metric: str, path: str | Path, *, title: str = "") -> Path:
    """One line per training run of `metric` against the step, e.g. the same recipe at two learning rates.
    runs: {label: the run's metrics.jsonl records (dicts with 'step' and `metric`)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, records in runs.items():
        pts = [(r["step"], r[metric]) for r in records if metric in r and "step" in r]
        if not pts:
            raise GmemError(f"run {label!r} logged no {metric!r}; logged keys: {sorted(records[0]) if records else []}")
        ax.plot([x for x, _ in pts], [v for _, v in pts], label=label, linewidth=1.2)
    ax.set(xlabel="step", ylabel=metric, title=title or metric)
    ax.legend()
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    """Lay out, write as PNG (creating the folder) and free a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
