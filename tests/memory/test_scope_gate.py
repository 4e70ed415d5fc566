"""memory.scope_gate: the whole injected update of a segment is scaled by g = sigmoid(a cos(q, u) + c), u the sum of
the written segments' unit(P standardise(mean final hidden state)), q the same of the segment's prompt; g = 0 while
nothing is written. Checked against NumPy, for exactness on an empty memory, the scope loss and generation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.backbones import forward
from gmem_jax.errors import GmemError
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import forward_segments, frozen_features, initial_state, memory_hooks, write_context
from gmem_jax.memory.modules import GMemory

from memory_testlib import perturbed_memory, random_batch, small_memory, tiny_backbone


def _scoped(injection="final", **kw):
    return small_memory(injection, write_attention="keyed", standardize_inputs=True, scope_gate=True, **kw)


def _read_features(frozen, tokens, mask, cfg, mcfg):
    """What the read sees, [B, T, H] float64: the final hidden states, or the residual stream entering read_layer."""
    if mcfg.injection == "final":
        return np.asarray(frozen_features(frozen, tokens, mask, cfg)["features"], np.float64)
    out = forward(frozen, tokens, cfg, kv_mask=mask, layer_hook=lambda h: (h, h), hook_layer=mcfg.read_layer)
    return np.asarray(out.layer_aux, np.float64)


def _memory(cfg, mcfg, scale=2.0, bias=-0.5):
    mem = perturbed_memory(cfg, mcfg, scale=1.0)
    rng = np.random.default_rng(3)
    H = cfg.hidden_size
    # statistics of the size of what the read sees: the tiny model's residual stream is ~0.02 per channel, its
    # final (normed) states ~1; a mean of another scale would dominate every pooled vector alike
    size = 0.02 if mcfg.injection == "residual" else 1.0
    return dict(mem, read_mean=jnp.asarray(size * rng.normal(size=H), jnp.float32),
                read_inv_std=jnp.asarray(rng.uniform(0.5, 2.0, H) / size, jnp.float32),
                scope_scale=jnp.float32(scale), scope_bias=jnp.float32(bias))


def _unit_proj(mem, h, w):
    """NumPy: unit(P (mean_w(h) - mu) * inv_std), h [B, T, H], w [B, T] -> [B, M]."""
    x = (h * w[..., None]).sum(1) / np.maximum(w.sum(1), 1.0)[:, None]
    z = ((x - np.asarray(mem["read_mean"])) * np.asarray(mem["read_inv_std"])) @ np.asarray(mem["scope_proj"]["kernel"])
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


@pytest.mark.parametrize("injection", ["final", "residual"])
def test_summary_row_and_gate_match_numpy(injection):
    """With a residual injection the summary and the question pool the residual stream the read sees (read_layer's
    input), as the write does with write_layer=0 below it."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = _scoped(injection, **(dict(write_layer=0) if injection == "residual" else {}))
    mem = _memory(cfg, mcfg)
    b = random_batch(cfg)
    b["token_mask"][0, 1] = False  # an empty context segment adds nothing to the summary
    state = np.asarray(jax.jit(write_context, static_argnums=(4, 5))(mem, frozen, b["tokens"][:, :2],
                                                                   b["token_mask"][:, :2], cfg, mcfg))
    assert state.shape == (3, mcfg.num_slots + 1, mcfg.mem_dim)
    feats = [_read_features(frozen, b["tokens"][:, k], b["token_mask"][:, k], cfg, mcfg) for k in range(3)]
    u = sum(np.where(b["token_mask"][:, k].any(-1)[:, None], _unit_proj(mem, feats[k], b["token_mask"][:, k]), 0.0)
            for k in range(2))
    np.testing.assert_allclose(state[:, -1], u, rtol=1e-4, atol=1e-5)
    # the question segment's gate, from its prompt (real tokens before its first loss target)
    lm, tm = b["loss_mask"][:, 2], b["token_mask"][:, 2]
    prompt = tm & ((np.cumsum(lm, -1) - lm) == 0)
    q = _unit_proj(mem, feats[2], prompt)
    cos = (q * u).sum(-1) / np.linalg.norm(u, axis=-1)
    expect = 1 / (1 + np.exp(-(2.0 * cos - 0.5)))
    _, _, g = GMemory(mcfg, cfg.hidden_size).apply({"params": mem}, jnp.asarray(state),
                                                  jnp.asarray(feats[2], jnp.float32), scope_mask=jnp.asarray(prompt),
                                                  method=GMemory.read_and_inject)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(expect[:, None], g.shape), rtol=1e-4)
    assert np.ptp(expect) > 0.05  # the gate differs between examples: the test can tell them apart


@pytest.mark.parametrize("injection", ["final", "residual"])
def test_empty_memory_is_exactly_the_frozen_model_even_with_a_live_injection(injection):
    cfg, frozen = tiny_backbone("llama")
    mcfg = _scoped(injection)
    mem = _memory(cfg, mcfg, scale=0.0, bias=10.0)  # g = sigmoid(10) once anything is written
    tokens = jnp.asarray(random_batch(cfg)["tokens"][:, 2])
    mask = jnp.ones(tokens.shape, bool)
    run = jax.jit(lambda m, s: forward(frozen, tokens, cfg, **memory_hooks(m, s, cfg, mcfg, scope_mask=mask)).logits)
    empty = initial_state(mem, cfg, mcfg, 3)
    identity = {k: (lambda h: (h, None)) if k.endswith("hook") else v  # the same program minus the memory
                for k, v in memory_hooks(mem, empty, cfg, mcfg).items()}
    plain = np.asarray(jax.jit(lambda t: forward(frozen, t, cfg, **identity).logits)(tokens))
    if injection == "final":
        np.testing.assert_array_equal(np.asarray(run(mem, empty)), plain)
    else:  # the hook adds exactly 0; the blocks above it, fused with that add, round differently (~1e-7)
        h = jnp.asarray(np.random.default_rng(5).normal(size=(3, tokens.shape[1], cfg.hidden_size)), jnp.float32)
        hook = memory_hooks(mem, empty, cfg, mcfg, scope_mask=mask)["layer_hook"]
        np.testing.assert_array_equal(np.asarray(hook(h)[0]), np.asarray(h))
        np.testing.assert_allclose(np.asarray(run(mem, empty)), plain, rtol=0, atol=1e-6)
    b = random_batch(cfg)
    written = write_context(mem, frozen, b["tokens"][:, :1], b["token_mask"][:, :1], cfg, mcfg)
    assert np.abs(np.asarray(run(mem, written)) - plain).max() > 1e-2
    # gate shut (c -> -inf): the frozen model again, up to float rounding of 0 * update
    np.testing.assert_allclose(np.asarray(run(dict(mem, scope_bias=jnp.float32(-1e4)), written)), plain, atol=1e-5)


def test_scope_loss_trains_the_gate():
    """scope_weight with scope_gate: scope_bce = the mean BCE of g at the labelled examples' loss positions (NumPy,
    from the returned per-position gate) and an in-scope label pushes the gate's bias up."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = _scoped(scope_weight=0.5)
    mem = _memory(cfg, mcfg)
    b = jax.tree.map(jnp.asarray, random_batch(cfg))
    labels = jnp.array([1.0, 0.0, -1.0])
    out = forward_segments(mem, frozen, dict(b, scope=labels), cfg, mcfg)
    plain = forward_segments(mem, frozen, b, cfg, mcfg)
    # the gate of each segment, from the tokens it read: metric read_gate is its mean over the loss positions
    g = jax.jit(lambda m: _segment_gates(m, frozen, b, cfg, mcfg))(mem)  # [B, N]
    w = np.asarray(b["loss_mask"]) > 0  # [B, N, T]
    y = np.asarray(labels)
    p = np.clip(np.asarray(g, np.float64), 1e-6, 1 - 1e-6)[..., None]
    bce = -(y[:, None, None] * np.log(p) + (1 - y[:, None, None]) * np.log1p(-p))
    valid = w & (y >= 0)[:, None, None]
    expect = np.broadcast_to(bce, valid.shape)[valid].mean()
    np.testing.assert_allclose(float(out.metrics["scope_bce"]), expect, rtol=1e-5)
    np.testing.assert_allclose(float(out.loss), float(plain.loss) + 0.5 * float(out.metrics["scope_bce"]), rtol=1e-5)
    grad = jax.grad(lambda m: forward_segments(m, frozen, dict(b, scope=jnp.array([1.0, -1.0, -1.0])), cfg,
                                               mcfg).metrics["scope_bce"])(mem)
    assert float(grad["scope_bias"]) < 0


def _segment_gates(mem, frozen, b, cfg, mcfg):
    """g of every segment [B, N], by writing segment by segment through the public functions."""
    B, N, _ = b["tokens"].shape
    state, gates = initial_state(mem, cfg, mcfg, B), []
    module = GMemory(mcfg, cfg.hidden_size)
    for k in range(N):
        h = frozen_features(frozen, b["tokens"][:, k], b["token_mask"][:, k], cfg)["features"]
        lm, tm = b["loss_mask"][:, k], b["token_mask"][:, k]
        prompt = tm & ((jnp.cumsum(lm, -1) - lm) == 0)
        _, _, g = module.apply({"params": mem}, state, h, scope_mask=prompt, method=GMemory.read_and_inject)
        gates.append(g[:, 0])
        state, _ = module.apply({"params": mem}, state, h, tm, final_h=h, method=GMemory.write)
    return jnp.stack(gates, 1)


def test_scope_gate_config_and_call_errors():
    with pytest.raises(GmemError, match="scope_gate needs standardize_inputs=True"):
        MemoryConfig(scope_gate=True)  # standardize_inputs off
    with pytest.raises(GmemError, match="scope_gate needs"):
        MemoryConfig(scope_gate=True, standardize_inputs=True, token_gate=True)
    with pytest.raises(GmemError, match="write_layer=2 is above read_layer=1"):
        _scoped("residual", write_layer=2)
    MemoryConfig(scope_gate=True, standardize_inputs=True, scope_weight=1.0)  # the scope loss trains the gate
    cfg, frozen = tiny_backbone("llama")
    mcfg = _scoped()
    mem = _memory(cfg, mcfg)
    state = initial_state(mem, cfg, mcfg, 2)
    h = jnp.zeros((2, 4, cfg.hidden_size))
    with pytest.raises(GmemError, match="scope_mask= or scope_query="):
        GMemory(mcfg, cfg.hidden_size).apply({"params": mem}, state, h, method=GMemory.read_and_inject)
    with pytest.raises(GmemError, match="final_h="):
        GMemory(mcfg, cfg.hidden_size).apply({"params": mem}, state, h, jnp.ones((2, 4), bool), method=GMemory.write)


def test_threshold_injects_nothing_below_it_and_the_soft_update_above_it():
    """memory.scope_gate_threshold: a segment whose g is below it gets h back bitwise (the frozen model), one at
    or above it the soft gate's h' bitwise; g itself, and so the scope loss, is unchanged."""
    cfg, frozen = tiny_backbone("llama")
    soft = _scoped(scope_weight=0.5)
    mem = _memory(cfg, soft)
    b = random_batch(cfg)
    state = write_context(mem, frozen, b["tokens"][:, :2], b["token_mask"][:, :2], cfg, soft)
    h = frozen_features(frozen, b["tokens"][:, 2], b["token_mask"][:, 2], cfg)["features"]
    prompt = jnp.asarray(b["token_mask"][:, 2])

    def inject(mcfg):
        return GMemory(mcfg, cfg.hidden_size).apply({"params": mem}, state, h, scope_mask=prompt,
                                                    method=GMemory.read_and_inject)

    h_soft, _, g = map(np.asarray, inject(soft))
    g0 = np.sort(g[:, 0])
    threshold = float((g0[0] + g0[1]) / 2)  # the lowest-gated example falls below it, the others not
    hard = _scoped(scope_weight=0.5, scope_gate_threshold=threshold)
    h_hard, _, g_hard = map(np.asarray, inject(hard))
    np.testing.assert_array_equal(g_hard, g)
    below = g[:, 0] < threshold
    assert below.sum() == 1 and np.abs(h_soft[below] - np.asarray(h)[below]).max() > 1e-3
    np.testing.assert_array_equal(h_hard[below], np.asarray(h)[below])
    np.testing.assert_array_equal(h_hard[~below], h_soft[~below])
    batch = dict(jax.tree.map(jnp.asarray, b), scope=jnp.array([1.0, 0.0, 1.0]))
    bce = [float(forward_segments(mem, frozen, batch, cfg, m).metrics["scope_bce"]) for m in (soft, hard)]
    assert bce[0] == bce[1]


def test_threshold_config_and_eval_override():
    from ml_collections import ConfigDict

    from gmem_jax.training.evaluation import eval_memory_config

    with pytest.raises(GmemError, match="scope_gate_threshold=0.5 needs scope_gate=True"):
        MemoryConfig(scope_gate_threshold=0.5)
    with pytest.raises(GmemError, match=r"in \[0, 1\)"):
        _scoped(scope_gate_threshold=1.0)
    mcfg = _scoped()
    assert eval_memory_config(ConfigDict(dict(eval=dict(scope_gate_threshold=None))), mcfg) is mcfg
    assert eval_memory_config(ConfigDict(dict(eval=dict(scope_gate_threshold=0.5))),
                              mcfg) == _scoped(scope_gate_threshold=0.5)
    with pytest.raises(GmemError, match="needs scope_gate=True"):
        eval_memory_config(ConfigDict(dict(eval=dict(scope_gate_threshold=0.5))), MemoryConfig())
