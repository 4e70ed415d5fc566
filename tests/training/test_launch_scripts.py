"""launch/ scripts: bash syntax, and the dry runs print exactly the expected gcloud / srun commands."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TPU = REPO / "launch" / "tpu_pod.sh"
SLURM = REPO / "launch" / "slurm_gpu.sbatch"
# a clean environment: no inherited SLURM/TPU variables, no scontrol on PATH (the fallback parser is tested)
BASE_ENV = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}


def _run(script, *args, **env):
    return subprocess.run(["bash", str(script), *args], env={**BASE_ENV, **env}, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("script", [TPU, SLURM], ids=["tpu", "slurm"])
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_tpu_dry_runs():
    common = ["--project", "my-proj", "--zone", "us-central2-b", "--name", "pod1"]
    where = ["--project=my-proj", "--zone=us-central2-b"]
    gc = ["gcloud", "compute", "tpus", "tpu-vm"]

    r = _run(TPU, "--dry-run", "create", *common, "--accelerator", "v4-64", "--spot")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == gc + ["create", "pod1", *where, "--accelerator-type=v4-64",
                                          "--version=tpu-ubuntu2204-base", "--spot"]

    r = _run(TPU, "run", *common, "--config", "configs/gpt2.py", "--workdir", "gs://b/run1", "--", "--steps=5",
             "--note=a b", DRY_RUN="1")
    assert r.returncode == 0, r.stderr
    words = shlex.split(r.stdout)
    assert words[:-1] == gc + ["ssh", "pod1", *where, "--worker=all"]
    remote = words[-1].removeprefix("--command=")
    assert shlex.split(remote) == ["cd", "gmem_jax", "&&", "GMEM_DISTRIBUTED=1", "python3", "-m", "gmem_jax.train",
                                   "--config=configs/gpt2.py", "--workdir=gs://b/run1", "--steps=5", "--note=a b"]

    r = _run(TPU, "--dry-run", "setup", *common)
    lines = [shlex.split(line) for line in r.stdout.splitlines()]
    assert lines[0] == ["tar", "--exclude=.git", "--exclude=__pycache__", "-czf", "/tmp/gmem_jax_src.tgz", "-C",
                        str(REPO), "."]
    assert lines[1] == gc + ["scp", "/tmp/gmem_jax_src.tgz", "pod1:gmem_jax_src.tgz", *where, "--worker=all"]
    assert lines[2][:-1] == gc + ["ssh", "pod1", *where, "--worker=all"]
    assert "pip install -q -e .[tpu]" in " ".join(shlex.split(lines[2][-1].removeprefix("--command=")))

    r = _run(TPU, "--dry-run", "delete", *common)
    assert shlex.split(r.stdout) == gc + ["delete", "pod1", *where, "--quiet"]


def test_tpu_errors():
    r = _run(TPU, "--dry-run", "run", "--project", "p", "--zone", "z", "--config", "c.py", "--workdir", "/local")
    assert r.returncode == 2 and r.stderr.strip() == (
        "tpu_pod.sh: --workdir must be a gs:// path that every TPU host can reach (got '/local')")
    r = _run(TPU, "--dry-run", "create", "--zone", "z")
    assert r.returncode == 2 and "no GCP project" in r.stderr and r.stdout == ""


def _slurm_task(words):
    assert words[-3:-1] == ["bash", "-c"]
    return words[:-3], words[-1]


def test_slurm_dry_run_per_gpu():
    r = _run(SLURM, "--dry-run", "--config", "configs/x.py", "--workdir", "/shared/run 1", "--", "--steps=10",
             SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[003-004,007]", SLURM_JOB_NUM_NODES="3",
             SLURM_GPUS_ON_NODE="4")
    assert r.returncode == 0, r.stderr
    env_line, srun_line = r.stdout.splitlines()
    assert env_line == "export JAX_COORDINATOR_ADDRESS=gpu003:24242"
    srun, task = _slurm_task(shlex.split(srun_line))
    assert srun == ["srun", "--nodes=3", "--ntasks=12", "--ntasks-per-node=4", "--kill-on-bad-exit=1"]
    assert task == ("export JAX_NUM_PROCESSES=12 JAX_PROCESS_ID=$SLURM_PROCID JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID; "
                    r"exec python3 -m gmem_jax.train --config=configs/x.py --workdir=/shared/run\ 1 --steps=10")


def test_slurm_dry_run_per_node_and_task_env():
    r = _run(SLURM, "--per-node", "--config", "c.py", "--workdir", "/w", DRY_RUN="1", SLURM_JOB_ID="7",
             SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_NNODES="2", JAX_COORDINATOR_PORT="5555")
    assert r.returncode == 0, r.stderr
    env_line, srun_line = r.stdout.splitlines()
    assert env_line == "export JAX_COORDINATOR_ADDRESS=nodeA:5555"
    srun, task = _slurm_task(shlex.split(srun_line))
    assert srun == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    # run the per-task wrapper as task 1 would (python replaced by env) to see what each process gets
    probe = task.replace("exec python3 -m gmem_jax.train", "env; : ")
    out = subprocess.run(["bash", "-c", probe], env={**BASE_ENV, "SLURM_PROCID": "1", "SLURM_LOCALID": "0"},
                         capture_output=True, text=True).stdout.splitlines()
    assert "JAX_NUM_PROCESSES=2" in out and "JAX_PROCESS_ID=1" in out
    assert not any(line.startswith("JAX_LOCAL_DEVICE_IDS=") for line in out)


def test_slurm_errors():
    r = _run(SLURM, "--dry-run", "--config", "c.py", "--workdir", "/w")
    assert r.returncode == 2 and "SLURM_JOB_ID / SLURM_JOB_NODELIST not set" in r.stderr
    r = _run(SLURM, "--dry-run", "--config", "c.py", SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1")
    assert r.returncode == 2 and "no workdir" in r.stderr
