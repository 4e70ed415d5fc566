"""distributed.py: launch detection (pure), single-process behaviour, and a real 2-process run on loopback."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gmem_jax.errors import GmemError
from gmem_jax.training.checkpoint import import_params
from gmem_jax.training.distributed import host_local_batch_to_global, is_main_process, launch_kwargs, maybe_initialize
from gmem_jax.training.sharding import make_mesh
from trainer_testlib import run_env

HERE = Path(__file__).resolve().parent


def test_launch_detection():
    assert launch_kwargs({}) is None
    assert launch_kwargs({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                          "JAX_PROCESS_ID": "2"}) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                                      "process_id": 2}
    assert launch_kwargs({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    with pytest.raises(GmemError, match="JAX_COORDINATOR_ADDRESS set but JAX_NUM_PROCESSES, JAX_PROCESS_ID not"):
        launch_kwargs({"JAX_COORDINATOR_ADDRESS": "h:1"})
    with pytest.raises(GmemError, match=r"JAX_PROCESS_ID=4 is outside \[0, JAX_NUM_PROCESSES=4\)"):
        launch_kwargs({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "4"})
    assert launch_kwargs({"GMEM_DISTRIBUTED": "1"}) == {}
    slurm = {"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_NTASKS": "8"}
    assert launch_kwargs({**slurm, "SLURM_STEP_NUM_TASKS": "8"}) == {"cluster_detection_method": "slurm"}
    assert launch_kwargs(slurm) is None  # the batch script itself (not inside an srun step): single process
    assert launch_kwargs({**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert launch_kwargs({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}) == {}
    assert launch_kwargs({"TPU_WORKER_HOSTNAMES": "localhost"}) is None


def test_single_process_is_a_no_op_and_batches_are_placed():
    assert maybe_initialize({}) is False and is_main_process() and jax.process_count() == 1
    mesh = make_mesh({"data": 2, "fsdp": 4})
    local = {"tokens": np.arange(8 * 5).reshape(8, 5), "mask": np.ones((8, 2, 5), bool)}
    batch = host_local_batch_to_global(local, mesh)
    assert batch["tokens"].sharding.spec == P(("data", "fsdp")) and batch["mask"].shape == (8, 2, 5)
    assert batch["tokens"].addressable_shards[0].data.shape == (1, 5)
    np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
    with pytest.raises(GmemError, match="global batch of 6 does not split 8 ways"):
        host_local_batch_to_global(np.zeros((6, 2)), mesh)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, *mode):
    port = _free_port()
    procs = []
    for pid in range(2):
        # the worker is a script, not `-m`: run_env makes the package importable without relying on the install
        env = run_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(tmp_path), *mode],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _results(procs):
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


def test_two_processes_on_loopback(tmp_path):
    results = _results(_launch(tmp_path))

    # oracle: the global batch is the first 16 of the seed-0 permutation of 40 examples; row i sums to 3*i
    first = np.random.default_rng([0, 0]).permutation(40)[:16]
    expected_sum = 3.0 * first.sum()
    for pid, r in enumerate(results):
        assert r["process_index"] == pid and r["process_count"] == 2 and r["is_main"] == (pid == 0)
        assert r["device_count"] == 8 and r["local_device_count"] == 4
        assert r["mesh"] == {"data": 2, "fsdp": 4}
        assert r["local_shape"] == [8, 3] and r["global_shape"] == [16, 3]
        assert r["jit_sum"] == expected_sum and r["psum"] == expected_sum
        assert r["restored_step"] == 7 and r["restored_extra"] == {"data": {"epoch": 0, "position": 1}}
        assert r["host_local_error"].startswith("train state leaf 'params/bias' is a host-local value")
        assert r["preemption_should_stop"] is False
        assert r["restored_shards_ok"] and r["restored_spec"] == str(P("fsdp"))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["7"]
    params, config = import_params(tmp_path / "export")
    np.testing.assert_array_equal(params["slots"], np.arange(128, dtype=np.float32).reshape(16, 8))
    np.testing.assert_array_equal(params["bias"], np.full(8, 0.5, np.float32))
    assert config == {"num_slots": 16}


def test_sigterm_on_one_host_stops_both_at_the_same_step(tmp_path):
    procs = _launch(tmp_path, "preempt")
    try:
        while (line := procs[1].stdout.readline()) and line.strip() != "ready":  # skip gloo's chatter
            pass
        assert line.strip() == "ready", procs[1].stderr.read()[-3000:]
    except BaseException:
        for p in procs:
            p.kill()
        raise
    procs[1].send_signal(signal.SIGTERM)  # only host 1 is told; jax's coordination service tells host 0
    first, second = _results(procs)
    assert first["stopped_at"] == second["stopped_at"] > 3
    step = first["stopped_at"]
    assert first["total"] == second["total"] == 8.0 * step
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [str(step)]
