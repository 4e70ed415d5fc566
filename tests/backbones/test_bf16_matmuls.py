"""bf16 frozen backbone: every matmul, forward and backward, takes bf16 operands and accumulates in fp32.

That is what torch's bf16 matmul computes, and on XLA:CPU the only fast bf16 path (a bf16 -> bf16 dot, or an f32
cotangent times bf16 weights, runs at about the fp32 rate: docs/benchmarks.md section 8.6). Oracles: the
fp32 transformers model, and transformers' own bf16 model's distance from it.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.backbones.layers import einsum
from gmem_jax.backbones.loading import load_backbone
from gmem_jax.backbones.model import forward
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import init_memory
from gmem_jax.training.step import init_train_state, make_optimizer, make_train_step
from hf_oracle import hf_logits, torch


def dot_generals(jaxpr):
    """Every dot_general equation in a jaxpr, sub-jaxprs (scan bodies, remat, custom_vjp, pjit) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from dot_generals(sub)


def assert_bf16_dots(eqns):
    for eqn in eqns:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn


@pytest.mark.parametrize("spec,shape_a,shape_b", [
    ("btkge,bske->bkgts", (2, 5, 2, 3, 4), (2, 7, 2, 4)),  # attention scores
    ("bkgts,bske->btkge", (2, 2, 3, 5, 7), (2, 7, 2, 4)),  # attention-weighted values
    ("...d,vd->...v", (2, 5, 8), (11, 8)),  # tied LM head
    ("...i,io->...o", (2, 5, 8), (8, 6)),  # nn.Dense
])
def test_bf16_einsum_gradients(spec, shape_a, shape_b):
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = jax.random.normal(ka, shape_a), jax.random.normal(kb, shape_b)
    loss = lambda a, b: jnp.square(einsum(spec, a, b).astype(jnp.float32)).sum()
    g32 = jax.grad(loss, (0, 1))(a, b)
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    g16 = jax.grad(loss, (0, 1))(a16, b16)
    for x, y in zip(g16, g32, strict=True):
        assert x.dtype == jnp.bfloat16 and x.shape == y.shape
        rel = float(jnp.abs(x.astype(jnp.float32) - y).max() / jnp.abs(y).max())
        assert rel < 2e-2, rel  # bf16 has 8 mantissa bits: ~0.4% per rounding, a few roundings deep
    dots = list(dot_generals(jax.make_jaxpr(jax.grad(loss, (0, 1)))(a16, b16).jaxpr))
    assert len(dots) == 3  # forward, and the two transposes
    assert_bf16_dots(dots)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_forward_is_as_accurate_as_transformers_bf16(arch, gpt2_dir, llama_dir):
    path, model = gpt2_dir if arch == "gpt2" else llama_dir
    cfg, params = load_backbone(path, dtype="bfloat16")
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    fn = lambda p, t: forward(p, t, cfg).logits
    dots = list(dot_generals(jax.make_jaxpr(fn)(params, tokens).jaxpr))
    # the layer scan's body once: q k v o, the MLP's 2 (GPT-2) or 3 (Llama) matrices, 2 attention einsums; the head
    assert len(dots) == (9 if arch == "gpt2" else 10), len(dots)
    assert_bf16_dots(dots)
    ours = np.asarray(jax.jit(fn)(params, tokens))
    ref32 = hf_logits(model, tokens)
    ref16 = hf_logits(copy.deepcopy(model).to(torch.bfloat16), tokens)
    ours_err, torch_err = np.abs(ours - ref32).max(), np.abs(ref16 - ref32).max()
    assert 0 < ours_err <= 1.1 * torch_err, (ours_err, torch_err)


@pytest.mark.parametrize("injection", ["final", "residual"])
def test_bf16_train_step_runs_every_frozen_matmul_in_bf16(injection, gpt2_dir):
    """The whole train step (memory fp32): a dot with a bf16 operand has two, forward and backward; with
    residual injection the gradient flows back through frozen blocks too."""
    cfg, frozen = load_backbone(gpt2_dir[0], dtype="bfloat16")
    mcfg = MemoryConfig(num_slots=8, mem_dim=16, num_heads=2, injection=injection, read_layer=1)
    opt = make_optimizer(learning_rate=1e-3, total_steps=10)
    state = init_train_state(init_memory(jax.random.key(1), cfg, mcfg), opt)
    rng = np.random.RandomState(0)
    batch = {"tokens": rng.randint(0, cfg.vocab_size, (2, 2, 16)).astype(np.int32),
             "labels": rng.randint(0, cfg.vocab_size, (2, 2, 16)).astype(np.int32),
             "token_mask": np.ones((2, 2, 16), bool), "loss_mask": np.ones((2, 2, 16), np.float32)}
    step = make_train_step(cfg, mcfg, opt)
    dots = list(dot_generals(jax.make_jaxpr(step)(state, frozen, batch).jaxpr))
    frozen_dots = [e for e in dots if jnp.bfloat16 in [v.aval.dtype for v in e.invars]]
    assert len(frozen_dots) >= (3 if injection == "final" else 12), len(frozen_dots)
    assert_bf16_dots(frozen_dots)
    _, metrics = step(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"]))
