"""write_attention="slots" / "keyed": slots compete for each token. Checked against a NumPy transcription of the
rule (and of the keyed read), and for the properties a write must keep (padding writes nothing, examples do not see
each other)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.memory.model import init_memory
from gmem_jax.memory.modules import GMemory

from memory_testlib import module_call, small_memory, tiny_backbone


def _setup(gate="update", write_attention="slots", **kw):
    cfg, _ = tiny_backbone("llama")
    mcfg = small_memory("final", gate=gate, write_attention=write_attention, **kw)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    if mcfg.write_key_window > 1:  # a key mix other than the identity it starts at, so the shifts are checked
        mem = {**mem, "write_key_mix": jax.random.normal(jax.random.PRNGKey(4), mem["write_key_mix"].shape)}
    if mcfg.write_key_select:  # and a query that picks, not the 0 it starts at
        mem = {**mem, "write_key_query": 3 * jax.random.normal(jax.random.PRNGKey(5), mem["write_key_query"].shape)}
    call = module_call(cfg, mcfg, mem)
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 5, cfg.hidden_size))
    state = jax.random.normal(jax.random.PRNGKey(3), (2, mcfg.num_slots, mcfg.mem_dim))
    return mcfg, mem, call, h, state


def _numpy_write(mem, mcfg, state, x, mask):
    """The rule written out per example, per head, per slot with plain NumPy loops."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), mem)
    lin = lambda name, y: y @ p[name]["kernel"] + p[name]["bias"]  # noqa: E731
    B, S, M = state.shape
    nh, d = mcfg.num_heads, M // mcfg.num_heads
    out = np.zeros_like(state)
    keyed = mcfg.write_attention == "keyed"
    for b in range(B):
        q = p["slot_keys"] if keyed else lin("write_q", state[b])
        k, v = lin("write_k", x[b]), lin("write_v", x[b])
        weight = mask[b] * (1 / (1 + np.exp(-lin("write_strength", x[b])[:, 0])) if keyed else 1.0)
        T, last = x.shape[1], np.flatnonzero(mask[b]).max()
        # write_recency: in what a slot stores, token t of T also weighs exp(beta (t - last real token) / (T - 1))
        recency = np.exp(p.get("write_recency", 0.0) * np.minimum(np.arange(T) - last, 0) / (T - 1))
        a = np.zeros((S, M))
        strength = np.zeros(S)
        for hd in range(nh):
            cols = slice(hd * d, (hd + 1) * d)
            kh = k[:, cols] * mask[b][:, None]
            if mcfg.write_key_select:  # token t's key: softmax_j(c[j] + u.k_(t-j) / sqrt d) over real t - j
                mixed = np.zeros_like(kh)
                for t in range(len(kh)):
                    js = [j for j in range(mcfg.write_key_window) if t - j >= 0 and mask[b][t - j]]
                    if not js:  # front padding: no key (and no share, below)
                        continue
                    pick = np.array([p["write_key_mix"][j, hd] + kh[t - j] @ p["write_key_query"][hd] / np.sqrt(d)
                                     for j in js])
                    a_t = np.exp(pick - pick.max()) / np.exp(pick - pick.max()).sum()
                    mixed[t] = sum(a * kh[t - j] for a, j in zip(a_t, js))
                kh = mixed
            elif mcfg.write_key_window > 1:  # token t's key: sum_j c[j, head] * key of token t - j (none before 0)
                kh = sum(p["write_key_mix"][j, hd] * np.concatenate([np.zeros((j, d)), kh[:len(kh) - j]])
                         for j in range(mcfg.write_key_window))
            logits = q[:, cols] @ kh.T * (mcfg.address_scale if keyed else 1.0) / np.sqrt(d)  # [S, T]
            share = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)  # softmax over slots
            share = share * weight[None, :]
            won = share.sum(1)
            top = won >= np.sort(won)[-mcfg.write_top_k] if mcfg.write_top_k else np.ones(S, bool)
            for s in range(S):
                a[s, cols] = (share[s] * recency) @ v[:, cols] / ((share[s] * recency).sum() + 1e-6)
            strength += (top * won / (won.max() + 1e-6) if keyed else np.minimum(won, 1.0)) / nh
        a = lin("write_o", a)
        z = 1 / (1 + np.exp(-lin("gate", np.concatenate([state[b], a], -1))))
        z = z * strength[:, None] * mask[b].any()
        out[b] = z * a + (1 - z) * state[b]
    return out


@pytest.mark.parametrize("write_attention,recency,key_window,top_k,select,scale",
                         [("slots", 0.0, 0, 0, False, 1.0), ("keyed", 0.0, 0, 0, False, 1.0),
                          ("keyed", 2.5, 0, 0, False, 1.0), ("keyed", 0.0, 3, 0, False, 1.0),
                          ("keyed", 0.0, 0, 2, False, 1.0), ("keyed", 0.0, 3, 0, True, 1.0),
                          ("keyed", 0.0, 3, 0, False, 4.0)])
def test_slot_competitive_write_matches_a_numpy_transcription(write_attention, recency, key_window, top_k, select,
                                                              scale):
    mcfg, mem, call, h, state = _setup(write_attention=write_attention, write_recency=recency,
                                       write_key_window=key_window, write_top_k=top_k, write_key_select=select,
                                       address_scale=scale)
    # front padding too: a selecting window must skip it, not give it a share
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], bool)
    new, _ = call(state, h, jnp.asarray(mask), method=GMemory.write)
    x = np.asarray(call(h, method=GMemory.encode), np.float64)
    np.testing.assert_allclose(np.asarray(new), _numpy_write(mem, mcfg, np.asarray(state, np.float64), x, mask),
                               rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(new - state).max()) > 1e-2


def test_key_mix_starts_at_the_own_key_or_the_window_mean():
    cfg, _ = tiny_backbone("llama")
    for start, want in (("self", [1.0, 0.0, 0.0]), ("uniform", [1 / 3] * 3)):
        mcfg = small_memory("final", write_attention="keyed", write_key_window=3, write_key_mix_init=start)
        mix = np.asarray(init_memory(jax.random.PRNGKey(1), cfg, mcfg)["write_key_mix"])
        np.testing.assert_allclose(mix, np.repeat(np.array(want)[:, None], mcfg.num_heads, 1), rtol=1e-6)
    mcfg = small_memory("final", write_attention="keyed", write_key_window=3, write_key_select=True)
    query = np.asarray(init_memory(jax.random.PRNGKey(1), cfg, mcfg)["write_key_query"])
    assert query.shape == (mcfg.num_heads, mcfg.mem_dim // mcfg.num_heads) and not query.any()  # picks by position
    with pytest.raises(GmemError, match="write_key_mix_init='mean'"):
        small_memory("final", write_attention="keyed", write_key_window=3, write_key_mix_init="mean")
    for bad in (dict(write_attention="slots", address_scale=2.0), dict(write_attention="keyed", address_scale=0.0)):
        with pytest.raises(GmemError, match="address_scale"):
            small_memory("final", **bad)
    with pytest.raises(GmemError, match="write_key_select.*write_key_window > 1"):
        small_memory("final", write_attention="keyed", write_key_select=True)


def test_write_top_k_changes_at_most_k_slots_per_head():
    """write_top_k=1: each head writes only its most-won slot, so an example changes at most num_heads slots (the
    bank has more); without it, every slot changes; and k must come with the keyed write."""
    mcfg, mem, call, h, state = _setup(write_attention="keyed", write_top_k=1)
    assert mcfg.num_slots > mcfg.num_heads
    mask = jnp.ones(h.shape[:2], bool)
    new, _ = call(state, h, mask, method=GMemory.write)
    changed = np.asarray(jnp.any(new != state, axis=-1)).sum(-1)
    assert (changed >= 1).all() and (changed <= mcfg.num_heads).all(), changed
    mcfg0, _, call0, _, _ = _setup(write_attention="keyed")
    assert (np.asarray(jnp.any(call0(state, h, mask, method=GMemory.write)[0] != state, axis=-1)).sum(-1)
            == mcfg0.num_slots).all()
    with pytest.raises(Exception, match="write_top_k"):
        small_memory("final", write_attention="slots", write_top_k=2)


@pytest.mark.parametrize("write_attention,recency,key_window,select",
                         [("slots", 0.0, 0, False), ("keyed", 0.0, 0, False), ("keyed", 2.5, 0, False),
                          ("keyed", 0.0, 3, False), ("keyed", 0.0, 3, True)])
def test_slot_competitive_write_ignores_padding_and_other_examples(write_attention, recency, key_window, select):
    mcfg, mem, call, h, state = _setup(gate="gru", write_attention=write_attention, write_recency=recency,
                                       write_key_window=key_window, write_key_select=select)
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    new, _ = call(state, h, mask, method=GMemory.write)
    # What sits under padding does not matter.
    h_pad = h.at[0, 3:].set(100.0)
    np.testing.assert_array_equal(np.asarray(call(state, h_pad, mask, method=GMemory.write)[0]), np.asarray(new))
    front = jnp.array([[0, 0, 1, 1, 1]], bool)  # nor before the real tokens (a key window reaches back over it)
    written = call(state[:1], h[:1], front, method=GMemory.write)[0]
    moved = call(state[:1], h[:1].at[0, :2].set(100.0), front, method=GMemory.write)[0]
    np.testing.assert_array_equal(np.asarray(moved), np.asarray(written))
    # Each example's write depends on that example alone.
    for b in range(2):
        alone, _ = call(state[b:b + 1], h[b:b + 1], mask[b:b + 1], method=GMemory.write)
        np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(new[b]), rtol=1e-6, atol=1e-6)
    # A segment with no real tokens leaves the memory bit for bit, even with the gate forced open.
    empty, _ = call(state, h, jnp.zeros_like(mask), 1.0, method=GMemory.write)
    np.testing.assert_array_equal(np.asarray(empty), np.asarray(state))


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_keyed_read_matches_a_numpy_transcription(scale):
    """keyed: each head matches the token's query against the fixed slot addresses (times address_scale, plus log
    importance) and reads that head's part of the slots' contents; alpha is the head average."""
    mcfg, mem, call, h, state = _setup(write_attention="keyed", address_scale=scale)
    r, alpha = call(state, h, method=GMemory.read)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), mem)
    x = np.asarray(call(h, method=GMemory.encode), np.float64)
    s = np.asarray(call(state, method=GMemory.importance), np.float64)
    B, S, M = state.shape
    nh, d = mcfg.num_heads, M // mcfg.num_heads
    q = x @ p["read_q"]["kernel"] + p["read_q"]["bias"]  # [B, T, M]
    retrieved, mean_alpha = np.zeros(x.shape), np.zeros(np.asarray(alpha).shape)
    for b in range(B):
        for hd in range(nh):
            cols = slice(hd * d, (hd + 1) * d)
            logits = q[b][:, cols] @ p["slot_keys"][:, cols].T * scale / np.sqrt(d) + np.log(s[b] + 1e-6)[None, :]
            a = np.exp(logits - logits.max(1, keepdims=True))
            a /= a.sum(1, keepdims=True)
            retrieved[b][:, cols] = a @ np.asarray(state[b], np.float64)[:, cols]
            mean_alpha[b] += a / nh
    np.testing.assert_allclose(np.asarray(alpha), mean_alpha, rtol=1e-4, atol=1e-6)
    expected = call(jnp.asarray(retrieved, jnp.float32), method=lambda m, y: m.decoder(y))
    np.testing.assert_allclose(np.asarray(r), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_write_recency_lets_the_later_of_two_tokens_fill_a_slot():
    """Two tokens aimed at the same slot: without recency the slot stores their mean; with a steep recency rate
    it stores (almost) the later one, and the earlier one alone no longer moves it."""
    mcfg, mem, call, h, state = _setup(write_attention="keyed", write_recency=40.0)
    h2 = h[:1, :2]  # a segment of two tokens
    mask = jnp.ones((1, 2), bool)
    x = call(h2, method=GMemory.encode)
    a_rec = call(state[:1], x, mask, method=GMemory._slot_competitive_write)[0]
    later = call(state[:1], x[:, 1:], mask[:, 1:], method=GMemory._slot_competitive_write)[0]
    earlier = call(state[:1], x[:, :1], mask[:, :1], method=GMemory._slot_competitive_write)[0]
    # exp(-40) ~ 4e-18: the earlier token's share is gone from every slot the later one also won.
    np.testing.assert_allclose(np.asarray(a_rec), np.asarray(later), rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(later - earlier).max()) > 1e-2  # the two tokens store different things
    with pytest.raises(Exception, match="write_recency"):
        small_memory("final", write_attention="slots", write_recency=1.0)
