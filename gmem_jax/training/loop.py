"""The step loop shared by every trainer (latent memory and MemLLM LoRA): step, log, stop on non-finite
metrics without saving them, checkpoint, save and stop on preemption."""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax

from gmem_jax.errors import GmemError
from gmem_jax.training import checkpoint


def run_steps(state: Any, frozen: Any, train_step: Callable, next_batch: Callable[[], Any], *, start_step: int,
              total_steps: int, log_every: int, checkpoint_every: int, schedule: Callable[[int], float], monitor,
              store: checkpoint.CheckpointStore, extra: Callable[[], dict], lr_option: str) -> tuple[Any, int, float]:
    """Run `train_step(state, frozen, batch)` from start_step to total_steps. `extra()` is the JSON saved beside
    each checkpoint (data-iterator state, config, run identity); lr_option names the learning-rate setting in
    the non-finite error. Returns (state, last step, seconds in the loop)."""
    watcher = checkpoint.install_preemption_handler()
    step, t0 = start_step, time.time()

    def save(step):
        store.save(step, state, extra())

    try:
        while step < total_steps:
            state, metrics = train_step(state, frozen, next_batch())
            step += 1
            if step % log_every == 0 or step == total_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                bad = sorted(k for k, v in values.items() if not math.isfinite(v))
                if bad:
                    raise GmemError(f"non-finite {', '.join(bad)} at step {step}; stopped without saving it (the last "
                                    f"good checkpoint, step {store.latest_step()}, is kept): lower {lr_option} or "
                                    "check the data")
                monitor.write(step, dict(values, learning_rate=float(schedule(step))))
            if step % checkpoint_every == 0 or step == total_steps:
                save(step)
            if watcher.should_stop(step):
                save(step)
                store.wait()
                raise GmemError(f"preempted at step {step}: checkpoint saved; rerun the same command to resume")
    except BaseException:
        monitor.close()  # close the progress bar first, so the error is the last line the user sees
        raise
    finally:
        store.wait()
        watcher.uninstall()
    return state, step, time.time() - t0
