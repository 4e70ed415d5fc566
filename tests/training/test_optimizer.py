"""make_optimizer: per-parameter learning-rate multipliers scale exactly those parameters' updates."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gmem_jax.errors import GmemError
from gmem_jax.training.step import make_optimizer, parse_name_factors


def _updates(lr_multipliers):
    params = {"inject_fuse": {"kernel": jnp.full((3, 2), 0.5)}, "decoder": {"bias": jnp.arange(2.0)}}
    grads = {"inject_fuse": {"kernel": jnp.arange(6.0).reshape(3, 2) - 2.0}, "decoder": {"bias": jnp.array([1.0, -3.0])}}
    opt = make_optimizer(learning_rate=0.1, total_steps=10, warmup_steps=0, lr_multipliers=lr_multipliers)
    state = opt.init(params)
    for _ in range(2):  # two steps: Adam's moments and the weight decay both come into play
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, updates


def test_lr_multipliers_scale_only_the_named_parameters():
    base_params, base = _updates(None)
    params, scaled = _updates({"inject_fuse": 0.25})
    assert not np.allclose(scaled["inject_fuse"]["kernel"], base["inject_fuse"]["kernel"])
    np.testing.assert_array_equal(scaled["decoder"]["bias"], base["decoder"]["bias"])
    # the first step's update of a scaled leaf is exactly factor x the unscaled one (same gradients, same state)
    p0 = {"k": jnp.full((2, 2), 0.5)}
    g = {"k": jnp.array([[1.0, -2.0], [0.5, 3.0]])}
    one = lambda m: make_optimizer(learning_rate=0.1, total_steps=10, lr_multipliers=m)  # noqa: E731
    u1, _ = one(None).update(g, one(None).init(p0), p0)
    u2, _ = one({"k": 0.25}).update(g, one({"k": 0.25}).init(p0), p0)
    np.testing.assert_allclose(np.asarray(u2["k"]), 0.25 * np.asarray(u1["k"]), rtol=1e-6)
    frozen, _ = _updates({"inject_fuse": 0.0})
    np.testing.assert_array_equal(frozen["inject_fuse"]["kernel"], jnp.full((3, 2), 0.5))
    assert not np.array_equal(base_params["inject_fuse"]["kernel"], jnp.full((3, 2), 0.5))


def test_parse_name_factors():
    assert parse_name_factors("") == {}
    assert parse_name_factors("inject_fuse=0.1, decoder=2") == {"inject_fuse": 0.1, "decoder": 2.0}
    for bad in ("inject_fuse", "inject_fuse=x", "=0.1", "a=-1", "a=nan", "a=inf"):
        with pytest.raises(GmemError, match="NAME=FACTOR"):
            parse_name_factors(bad)


def test_weight_decay_spares_the_slot_bank_and_slot_addresses():
    """AdamW's decoupled decay shrinks matrices, but not what the memory holds or where it files it."""
    params = {"slots": jnp.ones((4, 3)), "slot_keys": jnp.ones((4, 3)), "decoder": {"kernel": jnp.ones((3, 3)),
                                                                                  "bias": jnp.ones(3)}}
    opt = make_optimizer(learning_rate=0.1, total_steps=10, warmup_steps=0, weight_decay=0.5)
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zero, opt.init(params), params)
    new = optax.apply_updates(params, updates)
    for name in ("slots", "slot_keys"):
        np.testing.assert_array_equal(new[name], params[name])
    np.testing.assert_array_equal(new["decoder"]["bias"], params["decoder"]["bias"])
    np.testing.assert_allclose(new["decoder"]["kernel"], 1.0 - 0.1 * 0.5, rtol=1e-6)  # lr x decay, first step
