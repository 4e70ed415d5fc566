"""Multi-process (multi-host) start-up and host-local -> global batch assembly.

How a launch is recognised (first match wins):
  1. JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (what launch/slurm_gpu.sbatch exports; also
     handy by hand). JAX_LOCAL_DEVICE_IDS, if set, is honoured by jax itself.
  2. GMEM_DISTRIBUTED=1: jax's own cluster auto-detection (Cloud TPU pod slices via the VM metadata, GKE, ...;
     launch/tpu_pod.sh sets it).
  3. SLURM with more than one task in the current srun step: jax's SLURM detection (one process per GPU).
  4. A GKE/TPU environment listing several worker hosts (TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES).
Otherwise it is a single process and nothing is initialised.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from gmem_jax.errors import GmemError
from gmem_jax.training.sharding import batch_sharding

log = logging.getLogger(__name__)

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def launch_kwargs(env: Mapping[str, str]) -> Optional[dict]:
    """The `jax.distributed.initialize` keyword arguments this environment asks for, or None for a single
    process. Pure (reads only `env`), so it is testable without launching anything."""
    given = [k for k in _EXPLICIT if env.get(k)]
    if given:
        if len(given) < len(_EXPLICIT):
            missing = [k for k in _EXPLICIT if k not in given]
            raise GmemError(f"{', '.join(given)} set but {', '.join(missing)} not: set all of {', '.join(_EXPLICIT)} "
                            "for a multi-process launch, or none")
        try:
            n, pid = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except ValueError:
            raise GmemError(f"JAX_NUM_PROCESSES={env['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                            f"{env['JAX_PROCESS_ID']!r} must be integers") from None
        if not 0 <= pid < n:
            raise GmemError(f"JAX_PROCESS_ID={pid} is outside [0, JAX_NUM_PROCESSES={n}); fix the launch env")
        if n == 1:
            return None
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": n, "process_id": pid}
    if env.get("GMEM_DISTRIBUTED", "").lower() in ("1", "true", "yes", "auto"):
        return {}
    if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
        return {"cluster_detection_method": "slurm"}
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h]) > 1:
        return {}
    return None


def maybe_initialize(env: Optional[Mapping[str, str]] = None) -> bool:
    """Call `jax.distributed.initialize` when launched as several processes; a no-op for one process (and when
    already initialised). Must run before anything touches jax devices. Returns True when multi-process."""
    if jax.distributed.is_initialized():
        return True
    kwargs = launch_kwargs(os.environ if env is None else env)
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialised: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_main_process() -> bool:
    """Process 0 writes logs, plots and exports; every process takes part in collectives and checkpoints."""
    return jax.process_index() == 0


def host_local_batch_to_global(batch: Any, mesh: Mesh, sharding: Optional[NamedSharding] = None) -> Any:
    """Each process's slice of the global batch (leaves [B_local, ...], numpy) -> global jax.Arrays
    [B_local * process_count, ...] laid out by `sharding` (default: batch axis over ('data', 'fsdp'))."""
    sharding = batch_sharding(mesh) if sharding is None else sharding
    lead = sharding.spec[0] if len(sharding.spec) else None
    ways = math.prod(mesh.shape[a] for a in ((lead,) if isinstance(lead, str) else tuple(lead or ())))

    def one(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        if global_shape[0] % ways:
            raise GmemError(f"global batch of {global_shape[0]} does not split {ways} ways over the mesh's batch "
                            f"axes {dict(mesh.shape)}; make the global batch size a multiple of {ways}")
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, batch)


def host_numpy(x) -> np.ndarray:
    """A jax.Array (or anything array-like) as one numpy array on this host. An array sharded over several
    processes is gathered first: a collective, so every process must call this at the same point."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))
