"""Train-state checkpoints (orbax), preemption handling, and export/import of trained memory parameters.

A checkpoint holds two items: 'state' = {'step', 'params' (memory only), 'opt_state'} and 'extra' = a JSON dict
(data-iterator state, resolved config, and `run_identity(...)`: backbone id, backbone fingerprint, memory
shapes). The frozen backbone is never saved: it is reloaded from its own files.

Atomicity comes from orbax: a step is written under '<step>.orbax-checkpoint-tmp' and renamed to '<step>' only
when complete (on GCS, which has no atomic rename, a commit marker written last plays that role), so a crash
mid-save leaves the previous steps intact and the half-written one invisible; leftovers are deleted when the
next store opens. Every process calls `save`; orbax
coordinates multi-host writes.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from gmem_jax.errors import GmemError
from gmem_jax.training.distributed import host_numpy
from gmem_jax.training.sharding import path_str

log = logging.getLogger(__name__)

MEMORY_WEIGHTS = "memory.safetensors"
MEMORY_CONFIG = "memory_config.json"


def shape_tree(tree: Any) -> dict[str, list[int]]:
    """{'a/b/c': [shape...]} for every leaf: a JSON-able description of a tree's layout."""
    return {path_str(p): list(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_identity(backbone_id: str, backbone_fingerprint: str, memory_params: Any) -> dict:
    """What a checkpoint must match to be resumed: put it in `extra` at save time, pass it as `expected`."""
    return {"backbone_id": backbone_id, "backbone_fingerprint": backbone_fingerprint,
            "memory_shapes": shape_tree(memory_params)}


def _abstract(tree: Any) -> Any:
    """Arrays -> ShapeDtypeStruct (keeping their sharding) so a concrete state can serve as the restore target."""
    def one(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(one, tree)


class CheckpointStore:
    """Keeps the last `keep` train-state checkpoints in `directory` (local path or gs://...)."""

    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = str(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True,  # delete half-written steps left by a crash
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extra"))
        # orbax removes those in a background thread started here; a run that stops at once (a refused checkpoint)
        # would exit while it runs, and the thread's shutdown error would follow the one-line error on stderr
        settle = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)  # private: absent in some orbax
        if settle is not None:
            settle()

    def save(self, step: int, train_state: Any, extra: dict) -> bool:
        """Start saving (returns once device arrays are copied; the write finishes in the background). Every
        process calls it; with several processes every leaf must be a global jax.Array. Returns False when
        `step` is already saved (e.g. a preemption save right after a periodic one)."""
        try:
            json.dumps(extra)
        except TypeError as e:
            raise GmemError(f"checkpoint extra metadata is not JSON-serialisable ({e}); pass plain "
                            "dicts/lists/str/numbers") from None
        if jax.process_count() > 1:  # orbax can only write arrays that span the global mesh
            for p, x in jax.tree_util.tree_flatten_with_path(train_state)[0]:
                if not isinstance(x, jax.Array) or x.is_fully_addressable:
                    raise GmemError(f"train state leaf {path_str(p)!r} is a host-local value; in a multi-process run "
                                    "place the state first: jax.device_put(state, tree_shardings(state, mesh, rules))")
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(state=ocp.args.StandardSave(train_state), extra=ocp.args.JsonSave(extra))
        return bool(self._manager.save(step, args=args, force=True))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def restore_latest(self, abstract_state: Any, expected: Optional[dict] = None) -> Optional[tuple[Any, dict]]:
        """(state, extra) of the newest complete checkpoint, or None when there is none. `abstract_state` is a
        tree of jax.ShapeDtypeStruct (with the target shardings) or of arrays shaped like the state. With
        `expected` (a `run_identity`), compatibility is checked before any array is read."""
        step = self._manager.latest_step()
        if step is None:
            return None
        extra = self._manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore())).extra
        if expected is not None:
            self.check_compatible(extra, expected)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(abstract_state)), extra=ocp.args.JsonRestore()))
        return restored.state, restored.extra

    def check_compatible(self, extra: dict, expected: dict) -> None:
        """One-line GmemError when the checkpoint was made for another backbone or memory layout."""
        got_fp, want_fp = extra.get("backbone_fingerprint"), expected.get("backbone_fingerprint")
        if got_fp != want_fp:
            raise GmemError(
                f"checkpoint in {self.directory} was trained on backbone {extra.get('backbone_id')} (fingerprint "
                f"{got_fp}); this run uses {expected.get('backbone_id')} ({want_fp}): use a new --workdir or the "
                "same backbone")
        got, want = extra.get("memory_shapes", {}), expected.get("memory_shapes", {})
        for name in sorted(set(got) | set(want)):
            if got.get(name) != want.get(name):
                raise GmemError(
                    f"checkpoint in {self.directory} has memory tensor {name!r} with shape {got.get(name)} but "
                    f"this run builds {want.get(name)}: use a new --workdir or the same memory config")

    def wait(self) -> None:
        """Block until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionWatcher:
    """Tells the train loop when to save and stop. Single process: a SIGTERM (by default) sets a flag and
    runs `callback`. Multi-host: all hosts must stop at the *same* step, so jax's coordination service (which
    catches SIGTERM itself; no Python handler is installed) decides via `reached_preemption_sync_point`. Call
    `should_stop(step)` after every step on every host, starting from the same step everywhere."""

    def __init__(self, callback: Optional[Callable[[], None]] = None, signals=(signal.SIGTERM,)):
        self._event = threading.Event()
        self._callback = callback
        self._previous = {}
        self._multihost = jax.process_count() > 1
        if not self._multihost:  # do not override the coordination service's own SIGTERM handler
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        log.warning("received signal %d: will save a checkpoint and stop after this step", signum)
        self.request()

    def request(self) -> None:
        self._event.set()
        if self._callback is not None:
            self._callback()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def should_stop(self, step: int) -> bool:
        if self._multihost:
            from jax.experimental import multihost_utils

            # never OR in a local flag here: hosts deciding on their own would stop at different steps
            return multihost_utils.reached_preemption_sync_point(step)
        return self._event.is_set()

    def uninstall(self) -> None:
        """Restore the previous signal handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def install_preemption_handler(callback: Optional[Callable[[], None]] = None,
                               signals=(signal.SIGTERM,)) -> PreemptionWatcher:
    """Catch preemption (SIGTERM) so the loop can save and exit cleanly. `callback` runs inside the signal
    handler (keep it tiny: log, set a flag). Must be called from the main thread."""
    return PreemptionWatcher(callback, signals)


def export_params(params: dict, config: dict, path_dir: str | Path) -> Path:
    """Write trained memory params as `memory.safetensors` ('/'-joined names, e.g. 'gate/kernel') plus
    `memory_config.json` (the memory config needed to rebuild the module). Only process 0 writes; every
    process must call it (gathering sharded params is collective)."""
    from safetensors.numpy import save_file

    flat = {}
    for p, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        keys = [getattr(k, "key", None) for k in p]
        if any(not isinstance(k, str) or "/" in k or not k for k in keys):
            raise GmemError(f"cannot export memory parameter at {p}: export needs nested dicts with non-empty "
                            "string keys without '/'")
        flat["/".join(keys)] = host_numpy(x)
    try:
        config_json = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as e:
        raise GmemError(f"memory config is not JSON-serialisable ({e}); pass plain dicts/lists/str/numbers") from None
    path_dir = Path(path_dir)
    if jax.process_index() == 0:
        path_dir.mkdir(parents=True, exist_ok=True)
        save_file(flat, str(path_dir / MEMORY_WEIGHTS))
        (path_dir / MEMORY_CONFIG).write_text(config_json + "\n")
    return path_dir


def import_params(path_dir: str | Path) -> tuple[dict, dict]:
    """Read what `export_params` wrote: (nested dict of numpy arrays, memory config dict)."""
    from safetensors.numpy import load_file

    path_dir = Path(path_dir)
    for name in (MEMORY_WEIGHTS, MEMORY_CONFIG):
        if not (path_dir / name).is_file():
            raise GmemError(f"{path_dir / name} not found: point to a directory written by export_params "
                            f"(it holds {MEMORY_WEIGHTS} and {MEMORY_CONFIG})")
    config = _read_json(path_dir / MEMORY_CONFIG, "re-export the memory")
    params: dict = {}
    for name, value in load_file(str(path_dir / MEMORY_WEIGHTS)).items():
        node = params
        *parents, leaf = name.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return params, config


def load_exported_memory(workdir: str | Path, cfg) -> tuple[dict, Any]:
    """(memory params, MemoryConfig) exported at the end of a training run, checked against the backbone config
    `cfg` (the memory only fits the backbone it was trained on). `workdir` is a run's directory or its
    memory_export folder."""
    from gmem_jax.memory.config import MemoryConfig

    workdir = Path(workdir)
    export = workdir / "memory_export" if (workdir / "memory_export").is_dir() else workdir
    params, meta = import_params(export)
    if meta.get("backbone_fingerprint") != cfg.fingerprint():
        raise GmemError(f"the memory in {workdir} was trained on backbone {meta.get('backbone_id')} (fingerprint "
                        f"{meta.get('backbone_fingerprint')}), not this config's ({cfg.fingerprint()}); use it "
                        "with the config it was trained with")
    return params, MemoryConfig.from_dict(meta["memory"])


def trained_with_memory(workdir: str | Path) -> bool:
    """Whether the run in `workdir` (a run's directory or its memory_export folder) trained with its memory
    (train.use_memory), or is a no-memory twin whose parameters mean nothing with a memory written. Read from the
    export (runs since 2026-12-07), else from the run's resolved config.json; True when neither says."""
    workdir = Path(workdir)
    export = workdir / "memory_export" if (workdir / "memory_export").is_dir() else workdir
    meta_file, run_config = export / MEMORY_CONFIG, export.parent / "config.json"
    meta = _read_json(meta_file, "re-export the memory") if meta_file.is_file() else {}
    if "use_memory" in meta:
        return bool(meta["use_memory"])
    if run_config.is_file():
        return bool(_read_json(run_config, "restore it from the run").get("train", {}).get("use_memory", True))
    return True


def _read_json(path: Path, fix: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise GmemError(f"{path} is not valid JSON ({e}); {fix}") from None
