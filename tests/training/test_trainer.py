"""The trainer end to end: smoke run, resume after SIGKILL, 1 vs 8 devices, bad input."""
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from trainer_testlib import STANDARD, TINY, exported, metrics, run_env, run_train, train_cmd


def test_tiny_config_trains_end_to_end_and_writes_summary(tmp_path):
    from gmem_jax.training.trainer import train

    config = _tiny_config()

    summary = train(config, tmp_path)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["steps"] == summary["steps"] == 8
    assert set(saved["eval"]) >= {"em", "chance", "answer_token_acc"}
    assert 0 < saved["memory_params"] and saved["memory_overhead"] > 0
    assert [m["step"] for m in metrics(tmp_path)] == [2, 4, 6, 8]
    for name in ("config.json", "memory_export/memory.safetensors", "memory_export/memory_config.json",
                 "eval_dev.json"):
        assert (tmp_path / name).is_file(), name
    assert list(tmp_path.glob("*.png")), "plots missing"


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, standard_run):
    straight, killed = standard_run, tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, *STANDARD), env=run_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=Path(TINY).parents[1])
    deadline = time.time() + 300
    ckpts = killed / "checkpoints"
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name == "8" for p in ckpts.iterdir())):
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    run_train(killed, *STANDARD)  # the same command resumes from the newest complete checkpoint
    a, b = exported(straight), exported(killed)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert metrics(straight) == metrics(killed)
    assert json.loads((killed / "summary.json").read_text())["resumed_from_step"] in (4, 8)


def test_eight_devices_fsdp_match_one_device(tmp_path, standard_run):
    one, eight = standard_run, tmp_path / "eight"  # one device: the mesh is data=1, fsdp=1
    run_train(eight, *STANDARD, "--config.mesh.data=2", "--config.mesh.fsdp=4", devices=8)
    m1, m8 = metrics(one), metrics(eight)
    assert [m["step"] for m in m1] == [m["step"] for m in m8]
    for a, b in zip(m1, m8):
        for key in ("loss", "ce", "sparsity", "entropy", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])


def _error_line(proc):
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("override, needle", [
    ("--config.train.not_a_key=1", "not_a_key"),
    ("--config.backbone.source=/nonexistent/model", "/nonexistent/model"),
    ("--config.task.seg_len=400", "max_position_embeddings"),
    ("--config.train.lr_multipliers=injection=0.1", "injection"),
])
def test_bad_input_fails_with_one_line(tmp_path, override, needle):
    proc = run_train(tmp_path / "run", override, check=False)
    assert proc.returncode != 0
    assert needle in _error_line(proc), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr or needle == "not_a_key"


def test_checkpoint_from_other_backbone_is_refused_and_kept(tmp_path, standard_run):
    run = tmp_path / "run"
    shutil.copytree(standard_run, run)  # a finished run with checkpoints at steps 8 and 12
    before = exported(run)
    proc = run_train(run, *STANDARD, "--config.train.steps=16", "--config.backbone.random.hidden_size=32",
                     check=False)
    assert proc.returncode == 2 and "fingerprint" in _error_line(proc), proc.stderr[-2000:]
    assert _checkpoint_steps(run) == [8, 12]
    after = exported(run)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def _checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def test_warm_start_continues_from_an_exported_memory(tmp_path, standard_run):
    """train.init_memory_from: with a zero learning rate the second run exports exactly the first run's memory,
    input statistics included (not re-estimated on its own, different training data); a memory of another shape
    is refused in one line naming the config field that differs."""
    first, second = standard_run, tmp_path / "second"  # first: 12 steps with standardised inputs
    run_train(second, "--config.train.steps=2", "--config.memory.standardize_inputs=True",
              "--config.task.seed=1", "--config.train.learning_rate=0.0", f"--config.train.init_memory_from={first}")
    a, b = exported(first), exported(second)
    assert a.keys() == b.keys() and any(k.endswith("read_mean") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    fresh = tmp_path / "fresh"  # the same run without the warm start estimates its own statistics
    run_train(fresh, "--config.train.steps=2", "--config.memory.standardize_inputs=True", "--config.task.seed=1",
              "--config.train.learning_rate=0.0")
    assert not np.array_equal(exported(fresh)["read_mean"], a["read_mean"])
    proc = run_train(tmp_path / "bad", "--config.train.steps=2", "--config.memory.standardize_inputs=True",
                     "--config.memory.num_slots=5", f"--config.train.init_memory_from={first}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "init_memory_from" in _error_line(proc) and "num_slots" in _error_line(proc), proc.stderr[-2000:]


def test_partial_warm_start_loads_what_the_source_has_and_starts_the_rest_fresh(tmp_path, standard_run):
    """train.init_memory_partial: a memory with parameters the source lacks (here the scope gate's) takes every
    shared parameter from the source bitwise and the new ones as a fresh run of the same seed has them; without
    the flag the same command is refused in one line that names the flag, as is a source with extra parameters."""
    first, gated = standard_run, ("--config.train.steps=2", "--config.memory.standardize_inputs=True",
                                  "--config.memory.scope_gate=True", "--config.train.learning_rate=0.0")
    proc = run_train(tmp_path / "strict", *gated, f"--config.train.init_memory_from={first}", check=False)
    assert proc.returncode == 2 and "init_memory_partial" in _error_line(proc), proc.stderr[-2000:]
    run_train(tmp_path / "partial", *gated, f"--config.train.init_memory_from={first}",
              "--config.train.init_memory_partial=True")
    run_train(tmp_path / "fresh", *gated)
    source, partial, fresh = exported(first), exported(tmp_path / "partial"), exported(tmp_path / "fresh")
    new = sorted(partial.keys() - source.keys())
    assert new and all("scope" in k for k in new), new
    assert partial.keys() == fresh.keys() and source.keys() < partial.keys()
    for k in partial:
        np.testing.assert_array_equal(partial[k], (fresh if k in new else source)[k], err_msg=k)
    assert any(not np.array_equal(source[k], fresh[k]) for k in source), "source and fresh runs coincide"
    # the other way round, a source with parameters this memory lacks: refused unless partial
    proc = run_train(tmp_path / "extra", "--config.train.steps=2", "--config.memory.standardize_inputs=True",
                     f"--config.train.init_memory_from={tmp_path / 'partial'}", check=False)
    assert proc.returncode == 2 and "init_memory_partial" in _error_line(proc), proc.stderr[-2000:]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, standard_run):
    run = tmp_path / "run"
    shutil.copytree(standard_run, run)
    good = exported(run)
    proc = run_train(run, *STANDARD, "--config.train.steps=24", "--config.train.learning_rate=1e30",
                     "--config.train.clip_norm=1e30", "--config.train.warmup_steps=0", check=False)
    assert proc.returncode == 2 and "non-finite" in _error_line(proc), proc.stderr[-2000:]
    assert _checkpoint_steps(run) == [8, 12]  # nothing written after the loss went non-finite
    for k, v in exported(run).items():  # the export of the good run is untouched too
        np.testing.assert_array_equal(v, good[k])


def test_malformed_dataset_file_is_named(tmp_path):
    from gmem_jax.errors import GmemError
    from gmem_jax.training.trainer import train

    bad = tmp_path / "bad.json"
    bad.write_text('[{"_id": "x1", "question": "q?", "answer": "a", "supporting_facts": [], "context": 7}]')
    config = _tiny_config()
    config.task.update(name="hotpotqa", n_seg=4, seg_len=32)
    config.task.kwargs = {"source": str(bad)}
    with pytest.raises(GmemError, match="x1"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_an_eval_setting_the_memory_cannot_take_fails_before_step_one(tmp_path):
    from gmem_jax.errors import GmemError
    from gmem_jax.training.trainer import train

    config = _tiny_config()
    config.eval.scope_gate_threshold = 0.5  # the tiny config's memory has no scope gate
    with pytest.raises(GmemError, match="scope_gate_threshold=0.5 needs scope_gate=True"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def _tiny_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_cfg", TINY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.train.update(steps=8, log_every=2, checkpoint_every=4, batch_size=8, async_checkpoint=False)
    config.task.update(train_limit=128, eval_limit=8)
    config.eval.update(batch_size=8)
    return config


@pytest.mark.slow  # five training processes: ~1-2 min on 2 quiet cores
def test_two_processes_train_checkpoint_and_resume(tmp_path):
    """Two processes on loopback, 4 CPU devices each (one 8-device mesh): train, checkpoint, then resume to a
    longer run; the result equals a single-process 8-device run of the same length. With standardised memory
    inputs, so the input statistics (estimated by a collective forward of the sharded backbone) agree too."""
    import socket

    STD = "--config.memory.standardize_inputs=True"

    def launch(steps):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        procs = []
        for pid in range(2):
            env = run_env(4, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                          JAX_PROCESS_ID=str(pid))
            procs.append(subprocess.Popen(train_cmd(tmp_path / "multi", f"--config.train.steps={steps}",
                                                    "--config.mesh.data=2", "--config.mesh.fsdp=4", STD),
                                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                          cwd=Path(TINY).parents[1]))
        for p in procs:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err[-3000:]

    launch(8)
    assert _checkpoint_steps(tmp_path / "multi") == [4, 8]
    launch(12)  # resumes from step 8
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["devices"] == 8 and summary["resumed_from_step"] == 8
    run_train(tmp_path / "single", "--config.mesh.data=2", "--config.mesh.fsdp=4", STD, devices=8)
    m_multi, m_single = metrics(tmp_path / "multi"), metrics(tmp_path / "single")
    assert [m["step"] for m in m_multi] == [m["step"] for m in m_single]
    for a, b in zip(m_multi, m_single):
        for key in ("loss", "ce", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    # Params agree to float noise. (Leaves with a zero true gradient, e.g. the attention key bias, move by
    # Adam-normalised rounding noise, so an absolute tolerance of a few lr-sized steps is the right scale.)
    a, b = exported(tmp_path / "multi"), exported(tmp_path / "single")
    assert {"read_mean", "read_inv_std", "write_mean", "write_inv_std"} <= set(a)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-4, err_msg=k)
