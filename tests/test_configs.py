"""Every config file builds, its memory section is a valid MemoryConfig and its task accepts its arguments."""
import importlib.util
import inspect
from pathlib import Path

import pytest

from gmem_jax.memory.config import MemoryConfig
from gmem_jax.tasks import registry

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_is_valid(path):
    config = _load(path)
    MemoryConfig.from_dict(dict(config.memory))
    factory = registry._TASKS[config.task.name]
    target = factory if inspect.isclass(factory) else registry.BabiTask
    inspect.signature(target).bind(**dict(config.task.kwargs))  # raises on an unknown task option
    assert config.task.seg_len + config.eval.max_new_tokens <= 8192
    assert config.train.steps > 0 and config.train.batch_size > 0


def test_every_issue_config_exists():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "demo", "gpt2_hotpotqa", "llama8b", "llama8b_zsre", "smollm2_zsre"} <= names
