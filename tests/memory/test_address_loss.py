"""memory.address_weight: a supervised address. In training, an auxiliary loss pulls each token's keyed write
address into its entity's slot block (the address oracle's blocks) and each labelled loss position's read toward
its block; at evaluation nothing needs labels. Checked against NumPy recomputations, through forward_segments, and
for learning what it asks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.memory.model import forward_segments, frozen_features, init_memory, initial_state
from gmem_jax.memory.modules import GMemory

from memory_testlib import module_call, random_batch, small_memory, tiny_backbone

BLOCK = np.arange(8) * 4 // 8  # 8 slots in 4 blocks of 2: block of slot s


def _supervised(**kw):
    return small_memory("final", **{**dict(write_attention="keyed", write_key_window=2, address_weight=0.5,
                                           address_oracle_blocks=4), **kw})


def _log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _numpy_write_terms(mem, mcfg, x, mask, entity):
    """Per example: sum over tokens that offer a value of -mean_heads log(sum of the token's address softmax over
    its entity's block (filler: block 0)), and how many such tokens; plain loops over the keyed address."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), mem)
    nh, d = mcfg.num_heads, mcfg.mem_dim // mcfg.num_heads
    k = x @ p["write_k"]["kernel"] + p["write_k"]["bias"]  # [B, T, M]
    nll, count = np.zeros(len(x)), np.zeros(len(x))
    for b in range(len(x)):
        offers = mask[b].copy()
        if mcfg.write_value_shift:  # token t offers t + 1's value: only tokens followed by a real one
            offers[:-1] &= mask[b][1:]
            offers[-1] = False
        for t in np.flatnonzero(offers):
            target = 1 + entity[b, t] % 3 if entity[b, t] >= 0 else 0
            per_head = []
            for hd in range(nh):
                cols = slice(hd * d, (hd + 1) * d)
                key = sum(p["write_key_mix"][j, hd] * k[b, t - j, cols] * mask[b, t - j]
                          for j in range(mcfg.write_key_window) if t - j >= 0)
                logp = _log_softmax(p["slot_keys"][:, cols] @ key * mcfg.address_scale / np.sqrt(d))
                per_head.append(np.log(np.exp(logp[BLOCK == target]).sum()))
            nll[b] -= np.mean(per_head)
            count[b] += 1
    return nll, count


@pytest.mark.parametrize("value_shift", [0, 1])
def test_write_terms_match_a_numpy_recomputation(value_shift):
    cfg, _ = tiny_backbone("llama")
    mcfg = _supervised(write_value_shift=value_shift, address_scale=3.0)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    mem = {**mem, "write_key_mix": jax.random.normal(jax.random.PRNGKey(4), mem["write_key_mix"].shape)}
    call = module_call(cfg, mcfg, mem)
    h = jax.random.normal(jax.random.PRNGKey(2), (3, 5, cfg.hidden_size))
    state = jax.random.normal(jax.random.PRNGKey(3), (3, 8, mcfg.mem_dim))
    mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)
    entity = np.array([[4, 4, -1, 0, 0], [-1, 2, 2, 1, 1], [0, 1, 2, 3, -1]], np.int32)
    new, z, (nll, count) = call(state, h, jnp.asarray(mask), None, False, None, False, jnp.asarray(entity), True,
                                method=GMemory.write)
    x = np.asarray(call(h, "write", method=GMemory.encode), np.float64)
    want_nll, want_count = _numpy_write_terms(mem, mcfg, x, mask, entity)
    np.testing.assert_allclose(np.asarray(nll), want_nll, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(count), want_count)
    # the loss changes nothing the write does: same state, same gate as without it
    plain_new, plain_z = call(state, h, jnp.asarray(mask), entity=jnp.asarray(entity), method=GMemory.write)
    np.testing.assert_array_equal(np.asarray(new), np.asarray(plain_new))
    np.testing.assert_array_equal(np.asarray(z), np.asarray(plain_z))
    with pytest.raises(GmemError, match="address_weight's write loss needs the batch's entity labels"):
        call(state, h, jnp.asarray(mask), None, False, None, False, None, True, method=GMemory.write)


def test_forward_segments_adds_both_terms_recomputed_segment_by_segment():
    """Two segments from cached features: the write terms are GMemory.write's on each segment, the read terms the
    head-averaged read mass (on the state written so far) on each labelled loss position's block; the loss is the
    loss without them plus address_weight times their sum, and without labels (as at evaluation) they are left
    out."""
    cfg, frozen = tiny_backbone("llama")
    mcfg = _supervised(write_layer=1)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    b = random_batch(cfg, B=2, N=2, T=6, seed=4, loss_frac=0.6)
    b["entity"] = np.random.default_rng(0).integers(-1, 3, b["tokens"].shape).astype(np.int32)
    feats = [frozen_features(frozen, jnp.asarray(b["tokens"][:, n]), jnp.asarray(b["token_mask"][:, n]), cfg, 1)
             for n in range(2)]
    jb = dict(jax.tree.map(jnp.asarray, b), **{k: jnp.stack([f[k] for f in feats], 1)
                                               for k in ("features", "write_features")})
    out = forward_segments(mem, frozen, jb, cfg, mcfg)
    call = module_call(cfg, mcfg, mem)
    state = initial_state(mem, cfg, mcfg, 2)
    w_nll = w_n = r_nll = r_n = 0.0
    for n in range(2):
        _, alpha = call(state, feats[n]["features"], method=GMemory.read)  # [B, T, S]
        ent, valid = b["entity"][:, n], (b["loss_mask"][:, n] > 0) & (b["entity"][:, n] >= 0)
        for i, t in zip(*np.nonzero(valid)):
            r_nll -= np.log(np.asarray(alpha)[i, t][BLOCK == 1 + ent[i, t] % 3].sum() + 1e-6)
            r_n += 1
        state, _, (nll, count) = call(state, feats[n]["write_features"], jb["token_mask"][:, n], None, False,
                                      feats[n]["features"], False, jb["entity"][:, n], True, method=GMemory.write)
        w_nll, w_n = w_nll + float(nll.sum()), w_n + float(count.sum())
    assert r_n > 0
    np.testing.assert_allclose(float(out.metrics["address_write"]), w_nll / w_n, rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics["address_read"]), r_nll / r_n, rtol=1e-5)
    plain = forward_segments(mem, frozen, jb, cfg, mcfg.replace(address_weight=0.0))
    np.testing.assert_allclose(float(out.loss), float(plain.loss) + 0.5 * (w_nll / w_n + r_nll / r_n), rtol=1e-5)
    np.testing.assert_allclose(float(out.metrics["ce"]), float(plain.metrics["ce"]), rtol=1e-6)
    unlabelled = forward_segments(mem, frozen, {k: v for k, v in jb.items() if k != "entity"}, cfg, mcfg)
    assert "address_write" not in unlabelled.metrics
    np.testing.assert_allclose(float(unlabelled.loss), float(plain.loss), rtol=1e-6)
    nomem = forward_segments(mem, frozen, jb, cfg, mcfg, use_memory=False)  # nothing written: nothing to address
    assert "address_read" not in nomem.metrics


def test_the_loss_teaches_addresses_that_need_no_labels():
    """Tokens whose entity is written in their features: a few hundred Adam steps on the address terms alone put
    >90% of each unlabelled write's address (and each read's) in the right block, from ~25% at the start."""
    cfg, _ = tiny_backbone("llama")
    mcfg = _supervised(write_key_window=0)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    rng = np.random.default_rng(0)
    means = 2.0 * rng.normal(size=(4, cfg.hidden_size))  # entity -1 (filler) and 0..2: one mean direction each

    def sample(seed):
        r = np.random.default_rng(seed)
        entity = r.integers(-1, 3, (8, 12)).astype(np.int32)
        h = means[entity + 1] + r.normal(size=(8, 12, cfg.hidden_size))
        return jnp.asarray(h, jnp.float32), jnp.asarray(entity)

    def terms(params, h, entity):
        """(the write's mean address nll, each token's read mass on its block [B, T], which tokens have an entity)"""
        call = module_call(cfg, mcfg, params)
        state = initial_state(params, cfg, mcfg, h.shape[0])
        _, _, (nll, count) = call(state, h, jnp.ones(h.shape[:2], bool), None, False, None, False, entity, True,
                                  method=GMemory.write)
        _, alpha = call(state, h, method=GMemory.read)  # no labels in the read
        own = BLOCK[None, None] == jnp.where(entity >= 0, 1 + entity % 3, -1)[..., None]
        return nll.sum() / count.sum(), jnp.sum(jnp.where(own, alpha, 0.0), -1), entity >= 0

    def loss_fn(params, h, entity):
        write, read, labelled = terms(params, h, entity)
        return write + jnp.sum(jnp.where(labelled, -jnp.log(read + 1e-6), 0.0)) / jnp.sum(labelled)

    def block_mass(params, h, entity):  # (geometric mean of the write's block mass, mean read mass)
        write, read, labelled = terms(params, h, entity)
        return float(jnp.exp(-write)), float(np.asarray(read)[np.asarray(labelled)].mean())

    opt = optax.adam(3e-2)
    grad = jax.jit(jax.value_and_grad(loss_fn))

    @jax.jit
    def step(params, opt_state, h, entity):
        _, g = grad(params, h, entity)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    test_h, test_entity = sample(999)
    before = block_mass(mem, test_h, test_entity)
    assert max(before) < 0.5
    opt_state = opt.init(mem)
    for i in range(300):
        mem, opt_state = step(mem, opt_state, *sample(i))
    write, read = block_mass(mem, test_h, test_entity)
    assert write > 0.9 and read > 0.9, (before, write, read)


def test_config_batch_and_task_wiring():
    from gmem_jax.memory.config import MemoryConfig
    from gmem_jax.training.trainer import _device_batch
    from gmem_jax.training.sharding import make_mesh

    with pytest.raises(GmemError, match="address_weight=1.0 needs write_attention='keyed'"):
        small_memory("final", write_attention="slots", address_weight=1.0)
    with pytest.raises(GmemError, match="address_weight=-1.0"):
        _supervised(address_weight=-1.0)
    assert _supervised().reads_entity and not MemoryConfig().reads_entity
    n = jax.device_count()
    batch = {"tokens": np.zeros((n, 2, 4), np.int32), "entity": np.full((n, 2, 4), 2, np.int32)}
    assert "entity" in _device_batch(batch, make_mesh({"data": -1}), _supervised())
    assert "entity" not in _device_batch(batch, make_mesh({"data": -1}), _supervised(address_weight=0.0))
