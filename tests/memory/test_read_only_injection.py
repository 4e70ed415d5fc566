"""memory.inject_read_only: h' = h + W_r r from an all-zero initial memory through a bias-free decoder, so a read
that finds nothing written injects exactly nothing (the structural answer to ZsRE locality, docs/results.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.backbones import forward
from gmem_jax.errors import GmemError
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import forward_segments, init_memory, initial_state, memory_hooks, write_context
from gmem_jax.memory.modules import GMemory

from memory_testlib import perturbed_memory, random_batch, small_memory, tiny_backbone


def _read_only(**kw):
    return small_memory("final", write_attention="keyed", inject_read_only=True, **kw)


def test_empty_memory_injects_exactly_nothing_and_a_written_one_does():
    cfg, frozen = tiny_backbone("llama")
    mcfg = _read_only()
    mem = perturbed_memory(cfg, mcfg)  # W_r random: the injection is live
    b = random_batch(cfg)
    tokens = jnp.asarray(b["tokens"][:, 2])
    logits = jax.jit(lambda m, s, fz, t: forward(fz, t, cfg, **memory_hooks(m, s, cfg, mcfg)).logits)
    identity = {k: (lambda h: (h, None)) if k.endswith("hook") else v
                for k, v in memory_hooks(mem, initial_state(mem, cfg, mcfg, 3), cfg, mcfg).items()}
    plain = np.asarray(jax.jit(lambda fz, t: forward(fz, t, cfg, **identity).logits)(frozen, tokens))
    empty = initial_state(mem, cfg, mcfg, 3)
    assert not np.asarray(empty).any()
    np.testing.assert_array_equal(np.asarray(logits(mem, empty, frozen, tokens)), plain)
    written = jax.jit(write_context, static_argnums=(4, 5))(mem, frozen, b["tokens"][:, :2],
                                                            b["token_mask"][:, :2], cfg, mcfg)
    assert np.abs(np.asarray(logits(mem, written, frozen, tokens)) - plain).max() > 1e-2
    # The no-memory ablation reads the empty memory at every segment: exactly the frozen model's losses.
    f = jax.jit(lambda m, fz, bb, use: forward_segments(m, fz, bb, cfg, mcfg, use_memory=use).segment_nll,
                static_argnums=3)
    zero = jax.tree.map(jnp.zeros_like, mem)  # W_r = 0: the frozen model through the same program
    np.testing.assert_array_equal(np.asarray(f(mem, frozen, b, False)), np.asarray(f(zero, frozen, b, True)))
    assert not np.allclose(np.asarray(f(mem, frozen, b, True)), np.asarray(f(zero, frozen, b, True)))


@pytest.mark.parametrize("read_only", [True, False])
def test_a_faint_read_injects_little(read_only):
    """Scaling what is stored by 1e-3 scales the read-only injection down with it; the default decoder's LayerNorm
    rescales a faint read to full size (the failure this option exists to avoid)."""
    cfg, _ = tiny_backbone("llama")
    mcfg = small_memory("final", write_attention="keyed", inject_read_only=read_only, token_gate=not read_only)
    mem = perturbed_memory(cfg, mcfg)
    if not read_only:  # compare the memory's own half W_r r alone (W_h h + b does not depend on the read)
        mem = dict(mem, inject_fuse=jax.tree.map(jnp.zeros_like, mem["inject_fuse"]),
                   inject_token_gate=dict(kernel=jnp.zeros_like(mem["inject_token_gate"]["kernel"]),
                                          bias=jnp.full_like(mem["inject_token_gate"]["bias"], 30.0)))
    h = jax.random.normal(jax.random.PRNGKey(3), (2, 5, cfg.hidden_size))
    state = jax.random.normal(jax.random.PRNGKey(4), (2, mcfg.num_slots, mcfg.mem_dim))
    module = GMemory(mcfg, cfg.hidden_size)
    update = lambda s: module.apply({"params": mem}, s, h, method=GMemory.read_and_inject)[0] - h  # noqa: E731
    ratio = float(jnp.linalg.norm(update(1e-3 * state)) / jnp.linalg.norm(update(state)))
    if read_only:
        assert 1e-4 < ratio < 1e-2  # measured 1.07e-3: linear in what is stored
    else:
        assert ratio > 0.1  # measured 0.35


def test_param_tree_and_config_checks():
    cfg, _ = tiny_backbone("llama")
    mem = init_memory(jax.random.PRNGKey(0), cfg, _read_only())
    assert "slots" not in mem and "inject_fuse" not in mem and "inject_read" in mem
    assert set(mem["decoder"]) == {"in", "out"} and all(set(v) == {"kernel"} for v in mem["decoder"].values())
    for bad in (dict(write_attention="slots"), dict(write_attention="keyed", injection="residual")):
        with pytest.raises(GmemError, match="inject_read_only needs"):
            MemoryConfig(inject_read_only=True, **bad)


def test_the_read_map_gets_a_gradient_at_init():
    """W_r = 0 at init, but r != 0 once something is written, so training can start."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = _read_only()
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    b = jax.tree.map(jnp.asarray, random_batch(cfg))
    grads = jax.grad(lambda m: forward_segments(m, frozen, b, cfg, mcfg).loss)(mem)
    assert float(jnp.abs(grads["inject_read"]["kernel"]).max()) > 1e-6


@pytest.mark.parametrize("address", ["slot_keys", "content", "write_key"])
def test_read_written_only_weights_match_numpy(address):
    """Per head: softmax over the slots that head wrote plus a null slot of logit n_h; unwritten slots get 0. The
    query meets the slots' fixed keys, with read_by_content what they hold, with read_by_write_key (its first half)
    the first half of what they hold."""
    cfg, _ = tiny_backbone("llama")
    mcfg = _read_only(read_written_only=True, importance_in_read=False, read_by_content=address == "content",
                      read_by_write_key=address == "write_key")
    mem = perturbed_memory(cfg, mcfg)
    mem = dict(mem, read_null=jnp.array([0.7, -1.3]))
    S, nh, d = mcfg.num_slots, mcfg.num_heads, mcfg.mem_dim // mcfg.num_heads
    state = np.array(jax.random.normal(jax.random.PRNGKey(5), (2, S, nh, d)))
    written = np.zeros((2, S, nh), bool)
    written[0, [1, 4], 0] = True  # example 0: head 0 wrote slots 1 and 4, head 1 slot 6
    written[0, 6, 1] = True
    written[1, :, 0] = True  # example 1: head 0 wrote everything, head 1 nothing
    state = jnp.asarray(np.where(written[..., None], state, 0.0).reshape(2, S, nh * d))
    h = jax.random.normal(jax.random.PRNGKey(6), (2, 3, cfg.hidden_size))
    module = GMemory(mcfg, cfg.hidden_size)
    weights = np.asarray(module.apply({"params": mem}, state, h, method=GMemory._read_weights)[0])  # [B, T, nh, S]
    x = module.apply({"params": mem}, h, method=GMemory.encode)
    q = np.asarray(module.apply({"params": mem}, x, method=lambda m, x: m.read_q(x))).reshape(2, 3, nh, d)
    if address == "content":
        logits = np.einsum("bthd,bshd->bths", q, np.asarray(state).reshape(2, S, nh, d)) / np.sqrt(d)
    elif address == "write_key":
        half = d // 2
        stored = np.asarray(state).reshape(2, S, nh, d)[..., :half]
        logits = np.einsum("bthd,bshd->bths", q[..., :half], stored) / np.sqrt(half)
    else:
        logits = np.einsum("bthd,shd->bths", q, np.asarray(mem["slot_keys"]).reshape(S, nh, d)) / np.sqrt(d)
    for b in range(2):
        for hd in range(nh):
            idx = np.flatnonzero(written[b, :, hd])
            z = np.concatenate([logits[b, :, hd, idx].T, np.full((3, 1), float(mem["read_null"][hd]))], -1)
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            expect = np.zeros((3, S))
            expect[:, idx] = p[:, :-1]
            np.testing.assert_allclose(weights[b, :, hd], expect, rtol=1e-5, atol=1e-7)
    assert not weights[1, :, 1].any()  # a head with nothing written reads only the null slot


def test_read_written_only_trains_without_nans_and_needs_read_only():
    cfg, frozen = tiny_backbone("llama")
    mcfg = _read_only(read_written_only=True, write_top_k=2)  # most slots stay unwritten (logit -inf)
    mem = perturbed_memory(cfg, mcfg)
    b = jax.tree.map(jnp.asarray, random_batch(cfg))
    grads = jax.grad(lambda m: forward_segments(m, frozen, b, cfg, mcfg).loss)(mem)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["read_null"]).min()) > 0 and float(jnp.abs(grads["read_q"]["kernel"]).max()) > 0
    with pytest.raises(GmemError, match="read_written_only needs inject_read_only"):
        MemoryConfig(write_attention="keyed", read_written_only=True)
    with pytest.raises(GmemError, match="read_by_content needs read_written_only"):
        MemoryConfig(write_attention="keyed", inject_read_only=True, read_by_content=True)
    for bad in (dict(), dict(read_written_only=True, gate="gru"), dict(read_written_only=True, read_by_content=True)):
        with pytest.raises(GmemError, match="read_by_write_key needs read_written_only"):
            MemoryConfig(write_attention="keyed", inject_read_only=True, read_by_write_key=True, **bad)


def test_read_by_write_key_stores_the_write_key_and_reads_only_values():
    """A segment with one real token: every slot it wins stores z_s [k_h[:d/2]; o_h[d/2:]] per head (k the token's
    write key, o = write_o(write_v(x)), z_s the slot's gate); the read returns only value halves."""
    cfg, _ = tiny_backbone("llama")
    mcfg = _read_only(read_written_only=True, read_by_write_key=True, importance_in_read=False)
    mem = perturbed_memory(cfg, mcfg)
    module, S, nh = GMemory(mcfg, cfg.hidden_size), mcfg.num_slots, mcfg.num_heads
    d, half = mcfg.mem_dim // nh, mcfg.mem_dim // nh // 2
    h = jax.random.normal(jax.random.PRNGKey(3), (1, 4, cfg.hidden_size))
    mask = jnp.array([[False, False, True, False]])
    state0 = jnp.zeros((1, S, mcfg.mem_dim))
    state, _ = module.apply({"params": mem}, state0, h, mask, 1.0, method=GMemory.write)
    x = module.apply({"params": mem}, h, "write", method=GMemory.encode)
    k = np.asarray(module.apply({"params": mem}, x, method=lambda m, x: m.write_k(x)))[0, 2].reshape(nh, d)
    o = np.asarray(module.apply({"params": mem}, x, method=lambda m, x: m.write_o(m.write_v(x))))[0, 2]
    expect = np.concatenate([k[:, :half], o.reshape(nh, d)[:, half:]], -1).reshape(-1)
    got = np.asarray(state)[0]  # [S, M]
    z = got @ expect / (expect @ expect)
    assert (z > 1e-3).sum() >= 1
    np.testing.assert_allclose(got, z[:, None] * expect[None], rtol=1e-4, atol=1e-6)
    weights = jnp.full((1, 2, nh, S), 1.0 / S)
    read = np.asarray(module.apply({"params": mem}, weights, state, method=GMemory._gather)).reshape(2, nh, d)
    assert not read[..., :half].any()
    np.testing.assert_allclose(read[0, :, half:], np.asarray(state)[0].reshape(S, nh, d)[:, :, half:].mean(0),
                               rtol=1e-5, atol=1e-7)


def test_read_written_only_null_slot_decides_what_is_read():
    """A null logit far above every slot's reads nothing (read mass 0, exactly the frozen model's losses); far
    below, all the read weight lands on written slots (mass 1)."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = _read_only(read_written_only=True, write_top_k=2)
    mem = perturbed_memory(cfg, mcfg)
    b = jax.tree.map(jnp.asarray, random_batch(cfg))
    f = jax.jit(lambda m: forward_segments(m, frozen, b, cfg, mcfg))
    frozen_nll = np.asarray(jax.jit(lambda m: forward_segments(m, frozen, b, cfg, mcfg, use_memory=False))(mem)
                            .segment_nll)
    shut, open_ = f(dict(mem, read_null=jnp.full((2,), 1e4))), f(dict(mem, read_null=jnp.full((2,), -1e4)))
    assert not np.asarray(shut.read_mass).any() and not np.asarray(shut.read_spread).any()
    np.testing.assert_array_equal(np.asarray(shut.segment_nll), frozen_nll)
    later = np.asarray(open_.read_mass)[:, 1:]  # segment 0 reads the empty memory: nothing written yet
    np.testing.assert_allclose(later, 1.0, rtol=1e-6)
    assert not np.asarray(open_.read_mass)[:, 0].any()
    assert not np.allclose(np.asarray(open_.segment_nll)[:, 1:], frozen_nll[:, 1:])


def test_scope_loss_is_the_bce_of_the_read_weight_on_slots():
    """memory.scope_weight: loss = the plain loss + weight * the mean, over the loss positions of labelled examples,
    of -(y log m + (1 - y) log(1 - m)), m the read weight on slots (NumPy, from the returned read mass); unlabelled
    examples (-1) and a batch without `scope` add nothing. An out-of-scope label pushes the null logit up."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = _read_only(read_written_only=True, write_top_k=2, scope_weight=0.5)
    mem = dict(perturbed_memory(cfg, mcfg), read_null=jnp.array([0.3, -0.2]))
    b = jax.tree.map(jnp.asarray, random_batch(cfg))
    plain = forward_segments(mem, frozen, b, cfg, mcfg)
    out = forward_segments(mem, frozen, dict(b, scope=jnp.array([1.0, 0.0, -1.0])), cfg, mcfg)
    m = np.clip(np.asarray(out.read_mass, np.float64), 1e-6, 1 - 1e-6)  # [B, N, K]
    w = np.take_along_axis(np.asarray(b["loss_mask"]), np.asarray(out.positions), 2) > 0
    y = np.broadcast_to(np.array([1.0, 0.0, -1.0])[:, None, None], m.shape)
    valid = w & (y >= 0)
    expect = (-(y * np.log(m) + (1 - y) * np.log1p(-m)))[valid].mean()
    assert valid.sum() > 4 and (m[:, 1:][valid[:, 1:]] > 1e-3).all()  # later segments read written slots
    np.testing.assert_allclose(float(out.metrics["scope_bce"]), expect, rtol=1e-5)
    np.testing.assert_allclose(float(out.loss), float(plain.loss) + 0.5 * expect, rtol=1e-5)
    assert "scope_bce" not in plain.metrics
    only_out = dict(b, scope=jnp.array([-1.0, 0.0, -1.0]))
    g = jax.grad(lambda p: forward_segments(p, frozen, only_out, cfg, mcfg).metrics["scope_bce"])(mem)
    assert (np.asarray(g["read_null"]) < 0).all()
    with pytest.raises(GmemError, match="scope_weight needs read_written_only"):
        MemoryConfig(write_attention="keyed", inject_read_only=True, scope_weight=1.0)
