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


@pytest.mark.parametrize("recipe", ["counterfactual", "distill", "plain", "scoped", "scoped_mismatched",
                                    "scoped_open", "scoped_induction"])
def test_zsre_recipes_build_valid_memories(recipe):
    """Every recipe of configs/smollm2_zsre.py gives a valid MemoryConfig whose lr multipliers name parameters the
    memory has (the trainer's check), on a tiny 24-layer backbone (write_layer 16 must exist)."""
    import jax

    from gmem_jax.backbones import BackboneConfig
    from gmem_jax.memory.model import init_memory
    from gmem_jax.training.trainer import _lr_multipliers

    path = Path(__file__).resolve().parents[1] / "configs" / "smollm2_zsre.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config(recipe)
    mcfg = MemoryConfig.from_dict(dict(config.memory), num_slots=8, mem_dim=16, num_heads=2)
    cfg = BackboneConfig(arch="llama", vocab_size=97, hidden_size=32, num_layers=24, num_heads=4, num_kv_heads=2,
                         head_dim=8, intermediate_size=64, max_position_embeddings=64, norm_eps=1e-5,
                         tie_word_embeddings=False)
    params = init_memory(jax.random.PRNGKey(0), cfg, mcfg)
    factors = _lr_multipliers(config.train.lr_multipliers, params)
    assert mcfg.scope_gate == recipe.startswith("scoped")
    if recipe.startswith("scoped"):
        assert factors == {"write_key_mix": 25.0, "scope_scale": 100.0, "scope_bias": 100.0}
        assert config.train.steps == 900 and config.train.feature_cache and config.train.checkpoint_every == 300
        # the command of docs/results.md's scope-gate run, option by option (distill data)
        distill = mod.get_config("distill").task.train_kwargs.to_dict()
        extra = ("mismatched",) if recipe == "scoped_mismatched" else ()
        pool = dict(counterfactual_pool="answers") if recipe in ("scoped_open", "scoped_induction") else {}
        assert config.task.train_kwargs.to_dict() == dict(distill, kinds=distill["kinds"] + extra, **pool)
        induction = recipe == "scoped_induction"  # docs/results.md's induction-write run, option by option
        assert (mcfg.write_attention, mcfg.write_layer, mcfg.write_recency, mcfg.write_key_window, mcfg.scope_weight,
                mcfg.write_key_source, mcfg.write_value_shift, mcfg.gate_bias) \
            == ("keyed", 0 if induction else 16, 1.0, 8, 1.0, "final" if induction else "write", int(induction),
                2.0 if induction else -1.0)
