"""memory.write_key_source="final" and memory.write_value_shift=1: a write whose addresses come from the final hidden
states (made like the read's queries) and whose address at token t carries token t + 1's value (an induction-head
style copy: the key of "... is" stores "Paris")."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.memory.model import init_memory, memory_module
from gmem_jax.memory.modules import GMemory

from memory_testlib import small_memory, tiny_backbone


def _setup(**kw):
    cfg, _ = tiny_backbone("llama")
    mcfg = small_memory("final", write_attention="keyed", write_key_window=3, write_recency=2.0, **kw)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    call = lambda *a, **k: memory_module(cfg, mcfg).apply({"params": mem}, *a, **k)  # noqa: E731
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 6, cfg.hidden_size))  # the write source (values)
    hf = jax.random.normal(jax.random.PRNGKey(4), (2, 6, cfg.hidden_size))  # the final hidden states (keys)
    state = jax.random.normal(jax.random.PRNGKey(3), (2, mcfg.num_slots, mcfg.mem_dim))
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]], bool)  # right and left padding
    return call, h, hf, state, mask


def _write(call, state, h, mask, hf, gate=None):
    return call(state, h, mask, gate, False, hf, True, method=GMemory.write)  # (new, z, provenance)


@pytest.mark.parametrize("key_source", ["write", "final"])
def test_shifted_write_decomposes_over_each_tokens_own_value(key_source):
    """One head, gate forced open: new_s = sum_t P_st (W_o v_t + b_o) + (1 - z_s) Mem_s with v_t token t's own value,
    so P is indexed by the token whose value is stored; the first real token's value is stored nowhere, padding
    owns nothing, and each slot's shares add up to its write strength."""
    call, h, hf, state, mask = _setup(num_heads=1, write_value_shift=1, write_key_source=key_source)
    new, z, prov = _write(call, state, h, mask, hf, 1.0)
    u = np.asarray(call(h, method=lambda m, y: m.write_o(m.write_v(m.encode(y, "write")))))  # [B, T, M]
    zs, prov = np.asarray(z)[..., 0], np.asarray(prov)
    expect = np.einsum("bst,btm->bsm", prov, u) + (1 - zs)[..., None] * np.asarray(state)
    np.testing.assert_allclose(np.asarray(new), expect, rtol=1e-4, atol=1e-4)
    assert np.all(prov[0, :, [0, 4, 5]] == 0) and np.all(prov[1, :, [0, 1]] == 0)
    assert prov[0, :, 1:4].sum() > 0.5 and prov[1, :, 2:].sum() > 0.5
    np.testing.assert_allclose(prov.sum(-1), zs, atol=1e-4)


def test_shift_stores_what_follows_each_address():
    """With the shift, the first real token's features are never stored and the last one's key addresses nothing:
    changing either leaves the memory bitwise unchanged, while the last token's value and the first one's key are
    written. Without it, the first token's value is written."""
    call, h, hf, state, mask = _setup(write_value_shift=1, write_key_source="final")
    base = np.asarray(_write(call, state, h, mask, hf)[0])
    bump = lambda x, b, t: x.at[b, t].add(3.0)  # noqa: E731
    for b, first, last in [(0, 0, 3), (1, 1, 5)]:
        assert np.array_equal(np.asarray(_write(call, state, bump(h, b, first), mask, hf)[0]), base)
        assert np.array_equal(np.asarray(_write(call, state, h, mask, bump(hf, b, last))[0]), base)
        assert not np.allclose(np.asarray(_write(call, state, bump(h, b, last), mask, hf)[0]), base)
        assert not np.allclose(np.asarray(_write(call, state, h, mask, bump(hf, b, first))[0]), base)
    call0, *_ = _setup(write_key_source="final")
    base0 = np.asarray(_write(call0, state, h, mask, hf)[0])
    assert not np.allclose(np.asarray(_write(call0, state, bump(h, 0, 0), mask, hf)[0]), base0)


def test_final_key_source_takes_addresses_from_the_final_states_only():
    """write_key_source='final': which slot gets which token (the provenance) depends on the final hidden states, not
    on the write source, which only changes what is stored (the update gate, which looks at what is stored, is
    forced open); without the final states the write refuses."""
    call, h, hf, state, mask = _setup(write_key_source="final")
    _, _, prov = _write(call, state, h, mask, hf, 1.0)
    h2 = jax.random.normal(jax.random.PRNGKey(9), h.shape)
    np.testing.assert_array_equal(np.asarray(_write(call, state, h2, mask, hf, 1.0)[2]), np.asarray(prov))
    assert not np.allclose(np.asarray(_write(call, state, h, mask, h2, 1.0)[2]), np.asarray(prov))
    # the default key source: the same change of the write source moves the addresses
    call_w, *_ = _setup()
    assert not np.allclose(np.asarray(_write(call_w, state, h2, mask, hf, 1.0)[2]),
                           np.asarray(_write(call_w, state, h, mask, hf, 1.0)[2]))
    with pytest.raises(GmemError, match="write_key_source='final' needs the segment's final hidden states"):
        call(state, h, mask, method=GMemory.write)


def test_induction_write_config_errors():
    with pytest.raises(GmemError, match="write_key_source='nope'"):
        small_memory("final", write_attention="keyed", write_key_source="nope")
    with pytest.raises(GmemError, match="write_key_source='final': use 'write', or 'final' with write_attention"):
        small_memory("residual", write_key_source="final")  # the default write attention is "tokens"
    small_memory("residual", write_attention="keyed", write_key_source="final")  # keys from what the read sees
    with pytest.raises(GmemError, match="write_value_shift=1: use 0, or 1 with write_attention"):
        small_memory("final", write_value_shift=1)  # the default write attention is "tokens"
    with pytest.raises(GmemError, match="write_value_shift=2"):
        small_memory("final", write_attention="keyed", write_value_shift=2)


def test_residual_induction_write_stores_embeddings_under_the_read_layers_keys():
    """Residual injection with write_layer=0 and write_key_source='final' (the ZsRE induction recipe with the read at
    a middle block): `write_context` writes the values of block 0's input (the token embeddings) through the final
    norm, and the keys and scope summary of the residual stream entering read_layer, which the memory's own read
    there does not change. Oracle: `GMemory.write` on those arrays computed by hand, state written with a live
    injection (so a wrong source, e.g. the stream after the injection, would differ)."""
    from gmem_jax.backbones.model import embed, final_norm, forward
    from gmem_jax.memory.model import write_context

    from memory_testlib import perturbed_memory, random_batch
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("residual", read_layer=2, write_attention="keyed", write_layer=0, write_key_source="final",
                        write_value_shift=1, write_key_window=3, standardize_inputs=True, scope_gate=True)
    mem = dict(perturbed_memory(cfg, mcfg, scale=1.0), scope_bias=jnp.float32(3.0))
    b = random_batch(cfg, N=2)
    tokens, mask = jnp.asarray(b["tokens"]), jnp.asarray(b["token_mask"])
    state = np.asarray(jax.jit(write_context, static_argnums=(4, 5))(mem, frozen, tokens, mask, cfg, mcfg))
    call = lambda *a, **k: memory_module(cfg, mcfg).apply({"params": mem}, *a, **k)  # noqa: E731
    expect = call(3, method=GMemory.initial_state)
    for k in range(2):
        tok, msk = tokens[:, k], mask[:, k]
        positions = jnp.broadcast_to(jnp.arange(tok.shape[1]), tok.shape)
        values = final_norm(frozen, embed(frozen, tok, positions, cfg), cfg)
        keys = forward(frozen, tok, cfg, kv_mask=msk, layer_hook=lambda h: (h, h), hook_layer=2).layer_aux
        expect = call(expect, values, msk, None, False, keys, method=GMemory.write)[0]
    np.testing.assert_allclose(state, np.asarray(expect), rtol=1e-5, atol=1e-6)
    assert np.abs(state[:, :-1] - np.asarray(call(3, method=GMemory.initial_state))[:, :-1]).max() > 1e-2
    with pytest.raises(GmemError, match="write_layer=2 is above read_layer=1"):
        small_memory("residual", read_layer=1, write_layer=2)
