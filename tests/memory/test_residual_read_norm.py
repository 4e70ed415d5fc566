"""memory.residual_read_norm: a residual injection's read sees the stream entering read_layer through the frozen final
norm, while its update goes into the raw stream."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.backbones.model import final_norm, forward
from gmem_jax.errors import GmemError
from gmem_jax.memory.model import input_features, memory_hooks
from gmem_jax.memory.modules import GMemory
from gmem_jax.training.evaluation import generation_hooks

from memory_testlib import module_call, perturbed_memory, small_memory, tiny_backbone


def _setup(read_norm=True, **kw):
    cfg, frozen = tiny_backbone("llama")
    # a final norm that weighs channels unequally, as a trained one does (the read's encoder starts with a Linear
    # and a LayerNorm, which undo a per-token scale alone)
    scale = jnp.exp(jax.random.normal(jax.random.PRNGKey(8), frozen["final_norm"]["scale"].shape))
    frozen = dict(frozen, final_norm={"scale": scale})
    mcfg = small_memory("residual", read_layer=1, residual_read_norm=read_norm, **kw)
    mem = perturbed_memory(cfg, mcfg, scale=1.0)
    state = jax.random.normal(jax.random.PRNGKey(5), (2, mcfg.num_slots, mcfg.mem_dim))
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 7), 0, cfg.vocab_size)
    return cfg, frozen, mcfg, mem, state, tokens


def test_read_queries_the_normed_stream_and_adds_to_the_raw_one():
    """Oracle: blocks run with a hand-written hook h -> h + g * D(read(state, final_norm(h))), GMemory.read being the
    plain read and g the injection's per-channel gate. The hook's aux is the normed stream (what the write keys and
    input statistics see), and the option changes the output."""
    cfg, frozen, mcfg, mem, state, tokens = _setup()
    call = module_call(cfg, mcfg, mem)
    out = forward(frozen, tokens, cfg, **memory_hooks(mem, state, cfg, mcfg, frozen))

    def oracle(h):
        r, _ = call(state, final_norm(frozen, h, cfg), method=GMemory.read)
        return h + mem["inject_gate"] * r, h
    expect = forward(frozen, tokens, cfg, layer_hook=oracle, hook_layer=1)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(expect.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.layer_aux[0]), np.asarray(final_norm(frozen, expect.layer_aux, cfg)),
                               rtol=1e-6, atol=1e-6)
    raw_cfg = mcfg.replace(residual_read_norm=False)
    raw = forward(frozen, tokens, cfg, **memory_hooks(mem, state, cfg, raw_cfg, frozen))
    assert np.abs(np.asarray(raw.logits) - np.asarray(out.logits)).max() > 1e-3
    # input_features (the input statistics' and the scope gate's source) see what the read sees
    feats = input_features(frozen, tokens, jnp.ones(tokens.shape, bool), cfg, mcfg)
    np.testing.assert_allclose(np.asarray(feats["read"]), np.asarray(out.layer_aux[0]), rtol=1e-6, atol=1e-6)


def test_residual_read_norm_errors():
    with pytest.raises(GmemError, match="residual_read_norm applies to injection='residual' only"):
        small_memory("final", residual_read_norm=True)
    cfg, frozen, mcfg, mem, state, _ = _setup()
    with pytest.raises(GmemError, match="reads through the frozen final norm: pass memory_hooks"):
        memory_hooks(mem, state, cfg, mcfg)
    hooks = generation_hooks(cfg, mcfg)
    with pytest.raises(GmemError, match="1 entries too many"):
        hooks((mem, state, {"final_norm": frozen["final_norm"]}, None), jnp.int32(0))
