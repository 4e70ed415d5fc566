"""Running `python -m gmem_jax.train` as a subprocess for the trainer tests."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.py")
# Small and fast: few steps, no evaluation unless a test turns it on.
FAST = ["--config.train.steps=12", "--config.train.log_every=2", "--config.train.checkpoint_every=4",
        "--config.task.train_limit=256", "--config.task.eval_limit=8", "--config.eval.enabled=False",
        "--config.train.batch_size=8", "--config.train.async_checkpoint=False"]

# The one plain run several tests compare against (conftest's `standard_run` fixture runs it once per session).
STANDARD = ("--config.memory.standardize_inputs=True",)


def train_cmd(workdir, *overrides):
    return [sys.executable, "-m", "gmem_jax.train", f"--config={TINY}", f"--workdir={workdir}", *FAST, *overrides]


def run_env(devices=1, **extra):
    """The environment of a JAX child process: `devices` simulated CPU devices, unoptimised XLA code like the
    test process (tests/conftest.py says why), and the repo importable."""
    flags = f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), **extra)


def run_train(workdir, *overrides, devices=1, check=True, timeout=600):
    proc = subprocess.run(train_cmd(workdir, *overrides), env=run_env(devices), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def metrics(workdir, drop=("time",)):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in lines if l.strip()]


def exported(workdir):
    from safetensors.numpy import load_file

    return load_file(str(Path(workdir) / "memory_export" / "memory.safetensors"))
