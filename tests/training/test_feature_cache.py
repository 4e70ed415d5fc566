"""train.feature_cache: training on the frozen backbone's cached hidden states is the same computation as
running the backbone at every step (final injection), and identical segments are computed once."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.memory.model import forward_segments, frozen_features
from gmem_jax.training.feature_cache import FeatureCache

from trainer_testlib import STANDARD, exported, metrics, run_train

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "memory"))
from memory_testlib import perturbed_memory, random_batch, small_memory, tiny_backbone  # noqa: E402


@pytest.mark.parametrize("write_layer", [-1, 1])
def test_cache_computes_each_distinct_segment_once_and_serves_its_features(write_layer):
    cfg, frozen = tiny_backbone("llama")
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, cfg.vocab_size, 6).astype(np.int32) for _ in range(3))
    tokens = np.stack([np.stack([a, b]), np.stack([a, c]), np.stack([b, a])])  # [E=3, N=2, T=6]
    mask = np.ones_like(tokens, bool)
    mask[2, 1, 5] = False  # same tokens as [0, 0] but another mask: another segment
    cache = FeatureCache(frozen, cfg, write_layer=write_layer, chunk=3)  # the first call: a full chunk of 3
    got = cache.features(tokens[:2], mask[:2])  # a, b, c
    assert cache.num_segments == 3
    rest = cache.features(tokens[2:], mask[2:])  # b, a with another mask
    got = {k: np.concatenate([v, rest[k]]) for k, v in got.items()}
    assert cache.num_segments == 4 and cache.served == 6  # b was seen already; a with the other mask was not
    cache.features(tokens, mask)
    assert cache.num_segments == 4  # everything seen: nothing computed again (the second call ran a padded chunk)
    want = frozen_features(frozen, tokens.reshape(6, 6), mask.reshape(6, 6), cfg, write_layer)
    assert set(got) == set(want) == ({"features", "write_features"} if write_layer >= 0 else {"features"})
    for k in want:
        np.testing.assert_allclose(got[k].reshape(6, 6, -1), want[k], rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("write_layer", [-1, 1])
def test_cached_features_give_the_same_loss_and_gradients(write_layer):
    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("final", write_layer=write_layer)
    mem = perturbed_memory(cfg, mcfg)
    b = jax.tree.map(jnp.asarray, random_batch(cfg))
    B, N, T = b["tokens"].shape
    feats = jax.vmap(lambda t, m: frozen_features(frozen, t, m, cfg, write_layer), in_axes=1, out_axes=1)(
        b["tokens"], b["token_mask"])
    assert sorted(feats) == (["features"] if write_layer < 0 else ["features", "write_features"])
    assert all(f.shape == (B, N, T, cfg.hidden_size) for f in feats.values())
    loss = jax.jit(jax.value_and_grad(lambda m, fz, bb: forward_segments(m, fz, bb, cfg, mcfg).loss))
    (l0, g0), (l1, g1) = loss(mem, frozen, b), loss(mem, frozen, dict(b, **feats))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6), g0, g1)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0)) > 1e-3  # the memory does get gradient
    # Features made for another write layer, or for a residual injection (which changes the later layers), are
    # refused rather than silently used.
    with pytest.raises(GmemError, match="write_layer"):
        forward_segments(mem, frozen, dict(b, features=feats["features"]), cfg,
                         small_memory("final", write_layer=1 - write_layer if write_layer >= 0 else 1))
    with pytest.raises(GmemError, match="injection"):
        forward_segments(mem, frozen, dict(b, features=feats["features"]), cfg, small_memory("residual"))


def test_write_layer_writes_from_the_final_normed_residual_stream_of_that_block():
    """The write of write_layer=k equals a write fed by hand with final_norm(residual entering block k)."""
    from gmem_jax.backbones.model import final_norm, run_layers, embed
    from gmem_jax.memory.model import memory_module, write_context
    from gmem_jax.memory.modules import GMemory

    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("final", write_layer=1)
    mem = perturbed_memory(cfg, mcfg)
    b = random_batch(cfg, N=1)
    tok, msk = jnp.asarray(b["tokens"][:, 0]), jnp.asarray(b["token_mask"][:, 0])
    pos = jnp.broadcast_to(jnp.arange(tok.shape[1]), tok.shape)
    h, _ = run_layers(frozen, embed(frozen, tok, pos, cfg), cfg=cfg, positions=pos, kv_mask=msk, start=0, end=1)
    module = memory_module(cfg, mcfg)
    state0 = module.apply({"params": mem}, tok.shape[0], method=GMemory.initial_state)
    by_hand, _ = module.apply({"params": mem}, state0, final_norm(frozen, h, cfg), msk, method=GMemory.write)
    got = write_context(mem, frozen, tok[:, None], msk[:, None], cfg, mcfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(by_hand), rtol=1e-5, atol=1e-6)
    other = write_context(mem, frozen, tok[:, None], msk[:, None], cfg, small_memory("final"))
    assert float(jnp.abs(other - got).max()) > 1e-3  # the final-layer write is a different one


def test_trainer_with_feature_cache_matches_the_uncached_run(tmp_path, standard_run):
    plain, cached = standard_run, tmp_path / "cached"
    # STANDARD has standardize_inputs on: its statistics are estimated in the trainer before step 1.
    proc = run_train(cached, "--config.train.feature_cache=True", *STANDARD)
    assert "distinct segments" in proc.stdout + proc.stderr
    fc = json.loads((cached / "summary.json").read_text())["feature_cache"]
    assert json.loads((plain / "summary.json").read_text())["feature_cache"] is None
    # Every segment served to training (and the end-of-run probe batch) was computed once; a tiny run repeats some.
    assert 0 < fc["distinct_segments"] <= fc["segments_served"] and fc["bytes"] > 0
    m0, m1 = metrics(plain), metrics(cached)
    assert [m["step"] for m in m0] == [m["step"] for m in m1]
    for a, b in zip(m0, m1):
        for key in ("loss", "ce", "grad_norm", "accuracy"):
            assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    a, b = exported(plain), exported(cached)
    assert {"read_mean", "read_inv_std", "write_mean", "write_inv_std"} <= set(a)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("write_layer", [-1, 1])
def test_input_statistics_standardize_the_real_tokens(write_layer):
    """After with_input_statistics, what the encoder sees on the same segments has mean 0 and std 1 per channel
    over real tokens (padding excluded), on both the read and the write side."""
    from gmem_jax.memory.model import init_memory, input_features, with_input_statistics

    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("final", write_layer=write_layer, standardize_inputs=True)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    np.testing.assert_array_equal(np.asarray(mem["read_inv_std"]), 1.0)  # identity before statistics
    b = random_batch(cfg, B=6, N=2)
    tok, msk = b["tokens"].reshape(12, -1), b["token_mask"].reshape(12, -1)
    mem = with_input_statistics(mem, frozen, tok, msk, cfg, mcfg, batch_size=5)  # a ragged last batch
    feats = input_features(frozen, jnp.asarray(tok), jnp.asarray(msk), cfg, mcfg)
    for side in ("read", "write"):
        x = (np.asarray(feats[side], np.float64)[msk] - np.asarray(mem[f"{side}_mean"])) * np.asarray(
            mem[f"{side}_inv_std"])
        np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(x.std(0), 1.0, rtol=1e-3)
    differs = float(np.abs(np.asarray(mem["read_mean"]) - np.asarray(mem["write_mean"])).max())
    assert (differs > 1e-3) == (write_layer >= 0)


@pytest.mark.parametrize("write_layer", [-1, 1])
def test_input_statistics_read_through_the_cache_equal_direct_ones_and_stay_cached(write_layer):
    """The trainer estimates the input statistics from its feature cache: the same numbers as running the backbone
    directly, each distinct segment computed once, and a later training batch of those segments computes nothing."""
    from gmem_jax.memory.model import encoder_inputs, init_memory, with_input_statistics

    cfg, frozen = tiny_backbone("llama")
    mcfg = small_memory("final", write_layer=write_layer, standardize_inputs=True)
    mem = init_memory(jax.random.PRNGKey(1), cfg, mcfg)
    b = random_batch(cfg, B=3, N=2)
    tokens, mask = np.asarray(b["tokens"]), np.asarray(b["token_mask"])
    tokens[2, 1], mask[2, 1] = tokens[0, 0], mask[0, 0]  # a repeated segment: computed once
    tok, msk = tokens.reshape(6, -1), mask.reshape(6, -1)
    direct = with_input_statistics(mem, frozen, tok, msk, cfg, mcfg, batch_size=4)
    cache = FeatureCache(frozen, cfg, write_layer=write_layer, chunk=4)
    cached = with_input_statistics(mem, frozen, tok, msk, cfg, mcfg, batch_size=4,
                                   features_fn=lambda t, m: encoder_inputs(cache.segments(t, m)))
    assert cache.num_segments == 5
    for k in ("read_mean", "read_inv_std", "write_mean", "write_inv_std"):
        np.testing.assert_allclose(np.asarray(cached[k]), np.asarray(direct[k]), rtol=1e-5, atol=1e-6, err_msg=k)
        assert float(np.abs(np.asarray(cached[k]) - np.asarray(mem[k])).max()) > 1e-3  # statistics were set
    cache.features(tokens, mask)
    assert cache.num_segments == 5
