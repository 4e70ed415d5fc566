"""CheckpointStore round trip, compatibility errors, crash atomicity, preemption, memory export/import."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.training.checkpoint import (CheckpointStore, export_params, import_params, install_preemption_handler,
                                         trained_with_memory,
                                          run_identity)
from gmem_jax.training.sharding import make_mesh, memory_rules, tree_shardings
from trainer_testlib import run_env

REPO = Path(__file__).resolve().parents[2]


def _state(seed=0, step=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"memory": {"slots": jax.random.normal(k1, (16, 8)), "gate": {"kernel": jax.random.normal(k2, (8, 4)),
                                                                           "bias": jnp.zeros((4,))}}}
    opt_state = optax.adam(1e-3).init(params)
    # take one real optimizer step so the moments are non-trivial
    grads = jax.tree.map(lambda x: x * 0.5 + 1.0, params)
    _, opt_state = optax.adam(1e-3).update(grads, opt_state, params)
    return {"step": jnp.asarray(step, jnp.int32), "params": params, "opt_state": opt_state}


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_round_trip_with_shardings_and_retention(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=2, async_save=True)
    assert store.restore_latest(_state()) is None
    ident = run_identity("tiny-gpt2", "abc123", _state()["params"])
    states = {s: _state(seed=s, step=s) for s in (10, 20, 30)}
    for s, st in states.items():
        extra = {"data": {"epoch": 0, "position": s}, "config": {"lr": 1e-3}, **ident}
        assert store.save(s, st, extra)
    assert not store.save(30, states[30], {})  # same step again (preemption right after a periodic save)
    store.wait()
    assert store.all_steps() == [20, 30]

    # restore into a sharded abstract state: the slot bank (and its Adam moments) split over 'fsdp'
    mesh = make_mesh({"data": 2, "fsdp": 4})
    shardings = tree_shardings(states[30], mesh, memory_rules(shard_slots=True))
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), states[30], shardings)
    state, extra = CheckpointStore(tmp_path / "checkpoints").restore_latest(abstract, expected=ident)
    _assert_trees_equal(state, states[30])
    assert state["params"]["memory"]["slots"].sharding == shardings["params"]["memory"]["slots"]
    assert state["params"]["memory"]["slots"].addressable_shards[0].data.shape == (4, 8)
    assert extra == {"data": {"epoch": 0, "position": 30}, "config": {"lr": 1e-3}, **ident}
    assert extra["memory_shapes"] == {"memory/gate/bias": [4], "memory/gate/kernel": [8, 4], "memory/slots": [16, 8]}
    store.close()


def test_check_compatible_errors(tmp_path):
    store = CheckpointStore(tmp_path / "ck", async_save=False)
    st = _state()
    store.save(5, st, run_identity("gpt2", "aaaa", st["params"]))
    d = str(tmp_path / "ck")
    with pytest.raises(GmemError) as e:
        store.restore_latest(st, expected=run_identity("llama-tiny", "bbbb", st["params"]))
    assert str(e.value) == (f"checkpoint in {d} was trained on backbone gpt2 (fingerprint aaaa); this run uses "
                            "llama-tiny (bbbb): use a new --workdir or the same backbone")
    bigger = {"memory": {**st["params"]["memory"], "slots": jnp.zeros((32, 8))}}
    with pytest.raises(GmemError) as e:
        store.check_compatible(run_identity("gpt2", "aaaa", st["params"]), run_identity("gpt2", "aaaa", bigger))
    assert str(e.value) == (f"checkpoint in {d} has memory tensor 'memory/slots' with shape [16, 8] but this run "
                            "builds [32, 8]: use a new --workdir or the same memory config")
    with pytest.raises(GmemError, match="not JSON-serialisable"):
        store.save(6, st, {"bad": object()})
    store.close()


def _run_child(code: str, *args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=run_env(), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    # The child saves step 1 completely, then dies (os._exit: no cleanup, no atexit) at the worst moment of
    # saving step 2: every file written, the commit (orbax's rename of the tmp dir) not yet done.
    child = _run_child("""
        import os, sys, jax.numpy as jnp
        from gmem_jax.training.checkpoint import CheckpointStore
        store = CheckpointStore(sys.argv[1], keep=3, async_save=True)
        store.save(1, {"step": jnp.int32(1), "params": {"w": jnp.full((4,), 1.0)}}, {"n": 1})
        store.wait()
        rename = os.rename
        def crash_before_commit(src, dst, *a, **k):
            if os.path.basename(os.fspath(dst)) == "2":
                print(sorted(os.listdir(sys.argv[1])), sorted(os.listdir(src)), flush=True)
                os._exit(17)
            return rename(src, dst, *a, **k)
        os.rename = crash_before_commit
        store.save(2, {"step": jnp.int32(2), "params": {"w": jnp.full((4,), 2.0)}}, {"n": 2})
        store.wait()
    """, tmp_path / "ck")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 17, err
    # step 2 fully written (even its commit marker), only the rename missing
    assert out.strip() == ("['1', '2.orbax-checkpoint-tmp'] "
                           "['_CHECKPOINT_METADATA', 'commit_success.txt', 'extra', 'state']")

    store = CheckpointStore(tmp_path / "ck")
    assert store.all_steps() == [1]
    state, extra = store.restore_latest({"step": jnp.int32(0), "params": {"w": jnp.zeros((4,))}})
    assert int(state["step"]) == 1 and extra == {"n": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((4,), 1.0, np.float32))
    # the resumed run saves again; by then orbax's background cleanup has removed the half-written step
    store.save(3, {"step": jnp.int32(3), "params": {"w": jnp.full((4,), 3.0)}}, {"n": 3})
    store.close()
    assert sorted(os.listdir(tmp_path / "ck")) == ["1", "3"]


def test_preemption_flag_and_callback():
    calls = []
    before = signal.getsignal(signal.SIGTERM)
    watcher = install_preemption_handler(lambda: calls.append(1))
    try:
        assert not watcher.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not watcher.requested and time.time() < deadline:
            time.sleep(0.01)
        assert watcher.should_stop(1) and calls == [1]
    finally:
        watcher.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    # A toy train loop: on SIGTERM it finishes the step, saves, and exits 0; the saved step is resumable.
    child = _run_child("""
        import sys, time, jax.numpy as jnp
        from gmem_jax.training.checkpoint import CheckpointStore, install_preemption_handler
        store = CheckpointStore(sys.argv[1], keep=2)
        watcher = install_preemption_handler()
        state = {"step": jnp.int32(0), "params": {"w": jnp.zeros((3,))}}
        for step in range(1, 100000):
            state = {"step": jnp.int32(step), "params": {"w": state["params"]["w"] + 1.0}}
            if step == 3:
                print("ready", flush=True)
            time.sleep(0.01)
            if watcher.should_stop(step):
                store.save(step, state, {"stopped_at": step})
                store.close()
                print("saved", step, flush=True)
                sys.exit(0)
        sys.exit(3)
    """, tmp_path / "ck")
    assert child.stdout.readline().strip() == "ready"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    step = int(out.split()[-1])
    target = {"step": jnp.int32(0), "params": {"w": jnp.zeros(3)}}
    state, extra = CheckpointStore(tmp_path / "ck").restore_latest(target)
    assert int(state["step"]) == step and extra == {"stopped_at": step}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full(3, float(step), np.float32))


def test_export_import_round_trip(tmp_path):
    params = {"memory": {"slots": np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32),
                         "gate": {"kernel": jnp.arange(12.0).reshape(3, 4), "bias": jnp.zeros((4,))},
                         "count": np.arange(5, dtype=np.int32)}}
    config = {"num_slots": 16, "mem_dim": 8, "hook_layer": 2, "names": ["a", "b"]}
    export_params(params, config, tmp_path / "export")
    assert sorted(os.listdir(tmp_path / "export")) == ["memory.safetensors", "memory_config.json"]
    assert json.loads((tmp_path / "export" / "memory_config.json").read_text()) == config
    from safetensors.numpy import load_file  # names are the '/'-joined tree paths
    assert sorted(load_file(str(tmp_path / "export" / "memory.safetensors"))) == [
        "memory/count", "memory/gate/bias", "memory/gate/kernel", "memory/slots"]
    loaded, loaded_config = import_params(tmp_path / "export")
    assert loaded_config == config
    _assert_trees_equal(loaded, jax.tree.map(np.asarray, params))

    with pytest.raises(GmemError, match="memory.safetensors not found"):
        import_params(tmp_path / "nowhere")
    with pytest.raises(GmemError, match="without '/'"):
        export_params({"a/b": np.zeros(2)}, {}, tmp_path / "bad")


@pytest.mark.parametrize("exported, resolved, want", [
    (True, False, True), (False, True, False),  # the export's record wins over the run's config
    (None, False, False), (None, True, True),  # exports before 2026-12-07 lack it: the run's config.json says
    (None, None, True)])  # an export on its own (no run around it): a memory run
def test_trained_with_memory_reads_the_export_then_the_runs_config(tmp_path, exported, resolved, want):
    meta = {"memory": {}} if exported is None else {"memory": {}, "use_memory": exported}
    export_params({"w": np.zeros(2)}, meta, tmp_path / "memory_export")
    if resolved is not None:
        (tmp_path / "config.json").write_text(json.dumps({"train": {"use_memory": resolved}}))
    assert trained_with_memory(tmp_path) is want
    assert trained_with_memory(tmp_path / "memory_export") is want
    if resolved is not None:  # a damaged file is a one-line error, not a traceback
        (tmp_path / "memory_export" / "memory_config.json").write_text("{")
        with pytest.raises(GmemError, match="memory_config.json is not valid JSON"):
            trained_with_memory(tmp_path)
