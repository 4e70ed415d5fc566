"""memory.address_oracle (a diagnostic): the write files each token in its entity's slot block (filler in block 0),
the read of a labelled token looks in its entity's block, and forward_segments / write_context pass the batch's
labels to both."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.memory.model import forward_segments, frozen_features, init_memory, write_context
from gmem_jax.memory.modules import GMemory
from gmem_jax.training.evaluation import check_scorable

from memory_testlib import module_call, random_batch, small_memory, tiny_backbone

BLOCK = np.arange(8) * 4 // 8  # 8 slots in 4 blocks of 2: block of slot s


def _oracle(**kw):
    return small_memory("final", **{**dict(write_attention="keyed", write_key_window=2, address_oracle=40.0,
                                           address_oracle_blocks=4), **kw})


def test_the_write_changes_only_the_entitys_block_and_filler_goes_to_block_zero():
    """Gate forced open: a segment whose real tokens are all entity e rewrites block 1 + e mod 3 and leaves every other
    slot bit-for-bit as it was (to float precision); unlabelled tokens land in block 0; without the bias the same
    write touches every block."""
    cfg, _ = tiny_backbone("llama")
    mcfg = _oracle()
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    call = module_call(cfg, mcfg, mem)
    h = jax.random.normal(jax.random.PRNGKey(2), (3, 5, cfg.hidden_size))
    state = jax.random.normal(jax.random.PRNGKey(3), (3, 8, mcfg.mem_dim))
    mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], bool)
    entity = jnp.array([[4, 4, 4, 0, 0], [-1] * 5, [0, 0, 2, 2, 2]], jnp.int32)  # padding's label is never used
    new, _ = call(state, h, mask, 1.0, entity=entity, method=GMemory.write)
    changed = np.abs(np.asarray(new) - np.asarray(state)).max(-1) > 1e-4  # [B, S]
    np.testing.assert_array_equal(changed[0], BLOCK == 1 + 4 % 3)
    np.testing.assert_array_equal(changed[1], BLOCK == 0)
    np.testing.assert_array_equal(changed[2], (BLOCK == 1) | (BLOCK == 3))  # two people in one segment
    free, _ = module_call(cfg, mcfg.replace(address_oracle=0.0), mem)(state, h, mask, 1.0, method=GMemory.write)
    assert (np.abs(np.asarray(free) - np.asarray(state)).max(-1) > 1e-4).all()
    with pytest.raises(GmemError, match="address_oracle needs the batch's entity labels"):
        call(state, h, mask, 1.0, method=GMemory.write)


def test_a_labelled_read_looks_in_its_block_and_an_unlabelled_one_is_unbiased():
    cfg, _ = tiny_backbone("llama")
    mcfg = _oracle()
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 4, cfg.hidden_size))
    state = jax.random.normal(jax.random.PRNGKey(3), (2, 8, mcfg.mem_dim))
    entity = jnp.array([[0, 1, -1, 5], [-1, -1, 2, 2]], jnp.int32)
    _, alpha = module_call(cfg, mcfg, mem)(state, h, entity, method=GMemory.read)  # [B, T, S]
    _, plain = module_call(cfg, mcfg.replace(address_oracle=0.0), mem)(state, h, method=GMemory.read)
    alpha, plain = np.asarray(alpha), np.asarray(plain)
    for b, t in zip(*np.nonzero(np.asarray(entity) >= 0)):
        assert alpha[b, t][BLOCK == 1 + int(entity[b, t]) % 3].sum() > 0.999
    unlabelled = np.asarray(entity) < 0
    np.testing.assert_allclose(alpha[unlabelled], plain[unlabelled], rtol=1e-6, atol=1e-7)
    assert np.abs(alpha - plain).max() > 0.1
    _, write_only = module_call(cfg, mcfg.replace(address_oracle_read=False), mem)(state, h, entity, method=GMemory.read)
    np.testing.assert_array_equal(np.asarray(write_only), plain)  # address_oracle_read=False: an unbiased read


def test_forward_segments_and_write_context_pass_the_labels_on():
    """The state forward_segments ends with equals write_context's over the same segments and labels (with and
    without cached frozen features), the labels change it, and a batch without them is refused."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = _oracle(write_layer=1)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    b = random_batch(cfg, B=2, N=3, T=6, seed=4)
    b["entity"] = np.random.default_rng(0).integers(-1, 3, b["tokens"].shape).astype(np.int32)
    jb = jax.tree.map(jnp.asarray, b)
    out = forward_segments(mem, frozen, jb, cfg, mcfg)
    ctx = write_context(mem, frozen, jb["tokens"], jb["token_mask"], cfg, mcfg, entity=jb["entity"])
    np.testing.assert_allclose(np.asarray(out.state), np.asarray(ctx), rtol=1e-5, atol=1e-6)
    feats = [frozen_features(frozen, jb["tokens"][:, n], jb["token_mask"][:, n], cfg, 1) for n in range(3)]
    cached = dict(jb, **{k: jnp.stack([f[k] for f in feats], 1) for k in ("features", "write_features")})
    via_cache = forward_segments(mem, frozen, cached, cfg, mcfg)
    np.testing.assert_allclose(float(via_cache.loss), float(out.loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(via_cache.state), np.asarray(out.state), rtol=1e-5, atol=1e-6)
    other = forward_segments(mem, frozen, dict(jb, entity=(jb["entity"] + 1) % 3), cfg, mcfg)
    assert np.abs(np.asarray(other.state) - np.asarray(out.state)).max() > 1e-3
    for use_memory in (True, False):  # the no-memory twin's read of the slot bank is biased the same way
        with pytest.raises(GmemError, match="address_oracle needs the batch's entity labels"):
            forward_segments(mem, frozen, {k: v for k, v in jb.items() if k != "entity"}, cfg, mcfg,
                             use_memory=use_memory)


def test_config_and_scoring_refuse_what_the_oracle_cannot_do():
    with pytest.raises(GmemError, match="address_oracle=1.0 needs write_attention='keyed'"):
        small_memory("final", write_attention="slots", address_oracle=1.0)
    with pytest.raises(GmemError, match="address_oracle_blocks"):
        _oracle(address_oracle_blocks=1)
    with pytest.raises(GmemError, match="score it teacher-forced"):
        check_scorable(_oracle())
    check_scorable(_oracle(address_oracle=0.0))
