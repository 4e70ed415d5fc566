"""One of two processes started by test_multihost.py (not a test itself): 2 processes x 4 CPU devices = a global
mesh of 8. Prints one JSON line of results computed across both processes; the parent checks them.

    multihost_worker.py WORKDIR           batches, collectives, sharded checkpoint save/restore, export
    multihost_worker.py WORKDIR preempt   a toy train loop that the parent SIGTERMs on process 1 only
"""
import json
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from gmem_jax.errors import GmemError
from gmem_jax.training.checkpoint import CheckpointStore, export_params, install_preemption_handler
from gmem_jax.training.data import BatchIterator
from gmem_jax.training.distributed import host_local_batch_to_global, is_main_process, maybe_initialize
from gmem_jax.training.sharding import make_mesh, memory_rules, tree_shardings


def main(workdir: str) -> None:
    assert maybe_initialize(), "expected a multi-process launch"
    mesh = make_mesh({"data": -1, "fsdp": 4})
    out = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
           "is_main": is_main_process(), "mesh": dict(mesh.shape)}

    # host-local slices of a global batch of 16 examples (example i is the row [i, i, i]) -> one global array
    examples = [np.full((3,), i, np.float32) for i in range(40)]
    local = next(BatchIterator(examples, 16, seed=0))
    batch = host_local_batch_to_global(local, mesh)
    out["local_shape"], out["global_shape"] = list(local.shape), list(batch.shape)
    out["jit_sum"] = float(jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))(batch))
    psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x.sum(), ("data", "fsdp")), mesh=mesh,
                                 in_specs=P(("data", "fsdp")), out_specs=P()))
    out["psum"] = float(psum(batch))

    # a train state whose slot bank is sharded across both processes: save from both, restore in both
    values = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
    state = {"step": np.int32(7), "params": {"slots": values, "bias": np.full((8,), 0.5, np.float32)}}
    try:  # host-local leaves are refused with a clear error before orbax sees them
        CheckpointStore(f"{workdir}/refused", async_save=False).save(1, state, {})
    except GmemError as e:
        out["host_local_error"] = str(e)
    state = jax.device_put(state, tree_shardings(state, mesh, memory_rules(shard_slots=True)))
    store = CheckpointStore(f"{workdir}/checkpoints", keep=2, async_save=True)
    store.save(7, state, {"data": {"epoch": 0, "position": 1}})
    store.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, extra = store.restore_latest(abstract)
    store.close()
    r = restored["params"]["slots"]
    out["restored_step"] = int(restored["step"])
    out["restored_extra"] = extra
    out["restored_shards_ok"] = all(np.array_equal(np.asarray(s.data), values[s.index]) for s in r.addressable_shards)
    out["restored_spec"] = str(r.sharding.spec)
    export_params(restored["params"], {"num_slots": 16}, f"{workdir}/export")  # gathers across processes
    out["preemption_should_stop"] = install_preemption_handler().should_stop(7)  # the sync-point path
    print(json.dumps(out), flush=True)


def preempt(workdir: str) -> None:
    """Steps until the preemption sync point; both processes must stop at the same step and save it."""
    assert maybe_initialize(), "expected a multi-process launch"
    mesh = make_mesh({"data": -1, "fsdp": 4})
    watcher = install_preemption_handler()
    store = CheckpointStore(f"{workdir}/checkpoints", async_save=True)
    count = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
    w = jax.device_put(np.zeros(8, np.float32), NamedSharding(mesh, P("fsdp")))
    for step in range(1, 2000):
        w = w + 1.0
        total = float(count(w))  # a collective every step keeps the hosts in lock-step, as training would
        if step == 3:
            print("ready", flush=True)
        time.sleep(0.02)
        if watcher.should_stop(step):
            state = {"step": jax.device_put(np.int32(step), NamedSharding(mesh, P())), "w": w}
            store.save(step, state, {"stopped_at": step})
            store.close()
            print(json.dumps({"stopped_at": step, "total": total}), flush=True)
            return
    raise SystemExit("never saw the preemption sync point")


if __name__ == "__main__":
    preempt(sys.argv[1]) if sys.argv[2:] == ["preempt"] else main(sys.argv[1])
