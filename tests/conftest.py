"""Test-wide setup: 8 simulated CPU devices (so sharding tests run in-process) and the shared data folder."""
import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Must happen before jax is imported anywhere. Most tests compile many small programs and run each a few times, so
# LLVM's optimisation passes cost more than they save: without them the memory-generation tests took 83 instead of
# 125 CPU-seconds, while the 600-step memory-learns test took 144 instead of 130 (2-core AMD EPYC, 2026-12-02).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache per test process (each pytest-xdist worker has its own, so no two processes
# write one cache), inherited by the trainer subprocesses: they compile the same tiny programs over and over (a
# 2-step tiny run drops from ~30 to ~8 CPU-seconds with a warm cache). Fresh per session so no stale entry
# outlives the code; a cached executable is keyed on its HLO, flags and devices.
_CACHE = tempfile.mkdtemp(prefix="gmem-jax-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import pytest  # noqa: E402

SHARED_DATA = Path(os.environ.get("GMEM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only ../shared/data folder; tests that need it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def highest_precision():
    """fp32 matmuls at full precision for oracle comparisons."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield
