"""memory.pointer_weight: the write's provenance (which token's value each slot now holds) and the pointer loss built
from it (-log of the share of what a read retrieves that is the written token equal to its target)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.memory.model import forward_segments, init_memory, input_features
from gmem_jax.memory.modules import GMemory

from memory_testlib import module_call, random_batch, small_memory, tiny_backbone


def _keyed(injection="final", **kw):
    return small_memory(injection, write_attention="keyed", write_key_window=3, write_recency=2.0, **kw)


@pytest.mark.parametrize("top_k", [0, 2])
def test_provenance_decomposes_one_head_write_exactly(top_k):
    """One head, gate forced open: each slot's change is exactly sum_t P_st (W_o v_t + b_o) - z_s Mem_s, so P says
    which token's value a slot holds and how much of it; padding owns nothing."""
    cfg, _ = tiny_backbone("llama")
    mcfg = _keyed(num_heads=1, write_top_k=top_k)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    call = module_call(cfg, mcfg, mem)
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 5, cfg.hidden_size))
    state = jax.random.normal(jax.random.PRNGKey(3), (2, mcfg.num_slots, mcfg.mem_dim))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    new, z, prov = call(state, h, mask, 1.0, provenance=True, method=GMemory.write)
    plain, _ = call(state, h, mask, 1.0, method=GMemory.write)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(plain))  # provenance changes nothing written
    u = call(h, method=lambda m, y: m.write_o(m.write_v(m.encode(y, "write"))))  # [B, T, M]
    zs = np.asarray(z)[..., 0]  # gate forced open: z is the slot's write strength, the same on every channel
    expect = np.einsum("bst,btm->bsm", np.asarray(prov), np.asarray(u)) + (1 - zs)[..., None] * np.asarray(state)
    np.testing.assert_allclose(np.asarray(new), expect, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(prov)[0, :, 3:] == 0)
    # each slot's shares add up to how much of it was rewritten (1e-6 of a slot that won ~nothing stays unowned)
    np.testing.assert_allclose(np.asarray(prov).sum(-1), zs, atol=1e-4)
    assert zs.max() > 0.99 and (top_k == 0 or (zs > 0).sum(-1).max() <= top_k)


def test_provenance_needs_keyed_write_and_update_gate():
    with pytest.raises(GmemError, match="pointer_weight=1.0 needs write_attention='keyed'"):
        small_memory("final", write_attention="slots", pointer_weight=1.0)
    with pytest.raises(GmemError, match="gate='update'"):
        _keyed(gate="gru", pointer_weight=1.0)
    with pytest.raises(GmemError, match="needs write_attention='keyed'"):
        _keyed(pointer_weight=-0.1)
    with pytest.raises(GmemError, match="pointer_support restricts the pointer loss; it needs pointer_weight > 0"):
        _keyed(pointer_support=True)


def _copy_batch(cfg, B=3, N=3, T=8):
    """Random documents whose later segments have some targets equal to tokens of an earlier segment (the one just
    before for half of them, else any earlier one)."""
    b = random_batch(cfg, B=B, N=N, T=T, seed=3, loss_frac=0.6)
    rng = np.random.default_rng(5)
    for n in range(1, N):
        copy = rng.random((B, T)) < 0.5
        seg = np.where(rng.random((B, T)) < 0.5, n - 1, rng.integers(0, n, (B, T)))
        src = b["tokens"][np.arange(B)[:, None], seg, rng.integers(0, 5, (B, T))]  # real tokens (t < 6)
        b["labels"][:, n] = np.where(copy, src, b["labels"][:, n])
    return b


@pytest.mark.parametrize("variant", [{}, dict(write_key_source="final", write_value_shift=1),
                                     dict(pointer_segments=0), dict(pointer_segments=2),
                                     dict(pointer_segments=0, pointer_support=True),
                                     # a residual injection: the read (and the write's final-key source) sees the
                                     # stream entering read_layer; the write's values come from write_layer's input
                                     dict(injection="residual", read_layer=2, write_key_source="final",
                                          write_value_shift=1, pointer_segments=0)])
def test_pointer_loss_matches_a_recomputation_from_the_public_pieces(variant):
    """pointer = mean over loss positions whose target was written in one of the pointer_segments segments just
    before (and not across a reset) of -log sum_{t: token_t = target} (alpha P)_t, alpha the head-averaged read
    weights there (GMemory.read), P the provenance of those segments' writes, each older one faded by the channel
    mean of (1 - z) of every later write's gate; with pointer_support only written tokens the batch's support_mask
    marks count. The loss adds pointer_weight x pointer."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = _keyed(pointer_weight=0.5, write_layer=1, **variant)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    call = module_call(cfg, mcfg, mem)
    b = _copy_batch(cfg, N=4)
    lookback = mcfg.pointer_segments or 4
    b["reset"] = np.zeros((3, 4), bool)
    b["reset"][1, 3] = True  # example 1's last segment starts from a fresh memory: nothing to point at
    b["support_mask"] = np.random.default_rng(9).random(b["tokens"].shape) < 0.5
    support = b["support_mask"] if mcfg.pointer_support else np.ones_like(b["support_mask"])
    out = forward_segments(mem, frozen, jax.tree.map(jnp.asarray, b), cfg, mcfg)
    off = forward_segments(mem, frozen, jax.tree.map(jnp.asarray, b), cfg,
                           mcfg.replace(pointer_weight=0.0, pointer_support=False))

    B, N, T = b["tokens"].shape
    state = np.asarray(call(B, method=GMemory.initial_state))
    nll, mass, count, history = 0.0, 0.0, 0, []  # history: (P, tokens, mask) per written segment, newest last
    for n in range(N):
        if b["reset"][:, n].any():
            state = np.where(b["reset"][:, n, None, None], np.asarray(call(B, method=GMemory.initial_state)), state)
        f = input_features(frozen, jnp.asarray(b["tokens"][:, n]), jnp.asarray(b["token_mask"][:, n]), cfg, mcfg)
        _, alpha = call(jnp.asarray(state), f["read"], method=GMemory.read)  # [B, T, S]
        if history:
            recent = history[-lookback:]
            prov = np.concatenate([p for p, _, _ in recent], -1)  # [B, S, W * T]
            written = np.concatenate([w for _, w, _ in recent], -1)
            wmask = np.concatenate([m for _, _, m in recent], -1)
            beta = np.einsum("bts,bsu->btu", np.asarray(alpha, np.float64), prov)  # [B, T(read), W * T(written)]
            for i in range(B):
                if b["reset"][i, n]:
                    continue
                for t in range(T):
                    hit = (written[i] == b["labels"][i, n, t]) & wmask[i]
                    if b["loss_mask"][i, n, t] > 0 and hit.any():
                        m = beta[i, t][hit].sum()
                        nll, mass, count = nll - np.log(m + 1e-6), mass + m, count + 1
        new, z, p = call(jnp.asarray(state), f["write"], jnp.asarray(b["token_mask"][:, n]), None, False,
                         f["read"], True, method=GMemory.write)
        keep = 1.0 - np.asarray(z, np.float64).mean(-1)[..., None]  # [B, S, 1]
        history = [(q * keep, w, m) for q, w, m in history]
        history.append((np.asarray(p, np.float64), b["tokens"][:, n], b["token_mask"][:, n] & support[:, n]))
        state = np.asarray(new)
    assert count >= 5
    np.testing.assert_allclose(float(out.metrics["pointer"]), nll / count, rtol=1e-4)
    np.testing.assert_allclose(float(out.metrics["pointer_mass"]), mass / count, rtol=1e-4)
    np.testing.assert_allclose(float(out.loss), float(off.loss) + 0.5 * nll / count, rtol=1e-5)
    assert "pointer" not in off.metrics
    if mcfg.pointer_support:  # the restriction changes what counts; without the mask there is nothing to restrict by
        every = forward_segments(mem, frozen, jax.tree.map(jnp.asarray, b), cfg, mcfg.replace(pointer_support=False))
        assert abs(float(every.metrics["pointer"]) - float(out.metrics["pointer"])) > 1e-3
        with pytest.raises(GmemError, match="pointer_support needs the batch's support_mask"):
            forward_segments(mem, frozen, {k: jnp.asarray(v) for k, v in b.items() if k != "support_mask"}, cfg, mcfg)
    # questions the written segment does not concern (scope 0) point at nothing
    unscoped = forward_segments(mem, frozen, jax.tree.map(jnp.asarray, dict(b, scope=np.zeros(3, np.float32))), cfg,
                                mcfg)
    assert float(unscoped.metrics["pointer"]) == 0.0 and float(unscoped.loss) == float(off.loss)


def test_pointer_loss_trains_the_read_to_find_the_written_target():
    """Twenty Adam steps on the pointer loss alone raise the share of the read that lands on the target's token, and
    the gradient reaches both the read's queries and the write's keys."""
    import optax

    cfg, frozen = tiny_backbone("llama")
    mcfg = _keyed(pointer_weight=1.0, num_slots=16)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    batch = jax.tree.map(jnp.asarray, _copy_batch(cfg, N=2))
    # the frozen tree and the batch are arguments of the jitted functions, not constants baked into them
    loss = jax.jit(lambda m, f, b: forward_segments(m, f, b, cfg, mcfg).metrics["pointer"])
    grad = jax.grad(loss)(mem, frozen, batch)
    assert float(jnp.abs(grad["read_q"]["kernel"]).max()) > 0 and float(jnp.abs(grad["write_k"]["kernel"]).max()) > 0
    opt = optax.adam(3e-2)
    st = opt.init(mem)
    start = float(loss(mem, frozen, batch))

    @jax.jit
    def step(m, s, f, b):
        updates, s = opt.update(jax.grad(loss)(m, f, b), s, m)
        return optax.apply_updates(m, updates), s

    for _ in range(20):
        mem, st = step(mem, st, frozen, batch)
    assert float(loss(mem, frozen, batch)) < start - 0.5
