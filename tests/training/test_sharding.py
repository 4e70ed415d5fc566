"""Sharding rules on the 8 simulated CPU devices: hand-written expected specs, and sharded == unsharded forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.model import forward, init_params
from gmem_jax.errors import GmemError
from gmem_jax.training.sharding import (BACKBONE_RULES, batch_sharding, constrain_batch, loader_sharding, make_mesh,
                                        memory_rules, path_str, spec_for, tree_shardings)

GPT2 = BackboneConfig(arch="gpt2", vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4,
                      head_dim=16, intermediate_size=256, max_position_embeddings=32, norm_eps=1e-5,
                      tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
LLAMA = BackboneConfig(arch="llama", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, intermediate_size=96, max_position_embeddings=64, norm_eps=1e-6,
                       tie_word_embeddings=False)


def _specs(tree, mesh, rules):
    shard = tree_shardings(tree, mesh, rules)
    return {path_str(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(shard)[0]}


def test_make_mesh_fills_the_rest_and_validates():
    mesh = make_mesh({"data": -1, "fsdp": 4, "tensor": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    with pytest.raises(GmemError, match="needs 12 devices but 8"):
        make_mesh({"data": 3, "fsdp": 4})
    with pytest.raises(GmemError, match="not divisible"):
        make_mesh({"data": -1, "fsdp": 3})
    with pytest.raises(GmemError, match="at most one"):
        make_mesh({"data": -1, "fsdp": -1})


def test_backbone_rules_gpt2():
    mesh = make_mesh({"data": -1, "fsdp": 4, "tensor": 2})
    params = jax.eval_shape(lambda: init_params(GPT2, jax.random.key(0)))
    specs = _specs(params, mesh, BACKBONE_RULES)
    expected = {
        "embed/embedding": P(None, "fsdp"),  # [101, 64]: vocab 101 does not split 2 ways -> replicated dim
        "pos_embed/embedding": P(None, "fsdp"),
        "final_norm/scale": P(), "final_norm/bias": P(),
        "layers/attn_norm/scale": P(), "layers/attn_norm/bias": P(),
        "layers/mlp_norm/scale": P(), "layers/mlp_norm/bias": P(),
        "layers/attn/q/bias": P(), "layers/attn/k/bias": P(), "layers/attn/v/bias": P(), "layers/attn/o/bias": P(),
        "layers/attn/q/kernel": P(None, "fsdp", "tensor"), "layers/attn/k/kernel": P(None, "fsdp", "tensor"),
        "layers/attn/v/kernel": P(None, "fsdp", "tensor"), "layers/attn/o/kernel": P(None, "tensor", "fsdp"),
        "layers/mlp/fc/kernel": P(None, "fsdp", "tensor"), "layers/mlp/fc/bias": P(),
        "layers/mlp/proj/kernel": P(None, "tensor", "fsdp"), "layers/mlp/proj/bias": P(),
    }
    assert specs == expected


def test_backbone_rules_llama_and_size_one_axes_dropped():
    mesh = make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    params = jax.eval_shape(lambda: init_params(LLAMA, jax.random.key(0)))
    specs = _specs(params, mesh, BACKBONE_RULES)
    expected = {
        "embed/embedding": P(None, "fsdp"), "lm_head/kernel": P("fsdp"),
        "final_norm/scale": P(), "layers/attn_norm/scale": P(), "layers/mlp_norm/scale": P(),
        "layers/attn/q/kernel": P(None, "fsdp"), "layers/attn/k/kernel": P(None, "fsdp"),
        "layers/attn/v/kernel": P(None, "fsdp"), "layers/attn/o/kernel": P(None, None, "fsdp"),
        "layers/mlp/gate/kernel": P(None, "fsdp"), "layers/mlp/up/kernel": P(None, "fsdp"),
        "layers/mlp/down/kernel": P(None, None, "fsdp"),
    }
    assert specs == expected


def test_tiny_model_falls_back_to_replication():
    tiny = LLAMA.replace(hidden_size=12, num_heads=2, num_kv_heads=1, head_dim=6, intermediate_size=20, vocab_size=30)
    mesh = make_mesh({"fsdp": 8})
    params = jax.eval_shape(lambda: init_params(tiny, jax.random.key(0)))
    assert set(_specs(params, mesh, BACKBONE_RULES).values()) == {P()}


def test_rule_longer_than_tensor_is_a_clear_error():
    mesh = make_mesh({"fsdp": 8})
    with pytest.raises(GmemError, match=r"'w'.*shape \(8,\)"):
        spec_for("w", (8,), mesh, ((r"^w$", P(None, "fsdp")),))


def test_memory_rules_replicated_by_default_slot_bank_optional():
    mesh = make_mesh({"data": 2, "fsdp": 4})
    state = {"step": jnp.zeros((), jnp.int32),
             "params": {"memory": {"slots": jnp.zeros((16, 8)), "gate": {"kernel": jnp.zeros((8, 8))}}},
             "opt_state": ({"mu": {"memory": {"slots": jnp.zeros((16, 8))}}},)}
    assert set(_specs(state, mesh, memory_rules()).values()) == {P()}
    sharded = _specs(state, mesh, memory_rules(shard_slots=True))
    assert sharded == {"step": P(), "params/memory/slots": P("fsdp"), "params/memory/gate/kernel": P(),
                       "opt_state/0/mu/memory/slots": P("fsdp")}


def test_batch_and_loader_shardings():
    mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert batch_sharding(make_mesh({"fsdp": 8})).spec == P(("fsdp",))
    place = loader_sharding(mesh)
    s = place("layers/mlp/down/kernel", (2, 96, 64))
    assert isinstance(s, NamedSharding) and s.spec == P(None, None, "fsdp")
    assert s.shard_shape((2, 96, 64)) == (2, 96, 16)


@pytest.mark.parametrize("cfg", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_sharded_forward_matches_unsharded(cfg, highest_precision):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = init_params(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, cfg.vocab_size)
    fn = lambda p, t: forward(p, t, cfg).logits  # noqa: E731
    reference = np.asarray(jax.jit(fn)(params, tokens))

    p_shard = tree_shardings(params, mesh, BACKBONE_RULES)
    sharded_params = jax.device_put(params, p_shard)
    q = sharded_params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor") and q.addressable_shards[0].data.shape == (2, 32, 32)
    out = jax.jit(fn, in_shardings=(p_shard, batch_sharding(mesh)))(sharded_params, tokens)
    np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-5, atol=1e-5)


def test_activations_stay_batch_sharded_under_the_mesh(highest_precision):
    """FSDP: under `jax.set_mesh` the forward keeps activations split over the batch and all-gathers weights
    (no all-reduce of partial matmuls over D, batch-sharded logits); outside it, nothing is constrained and XLA
    picks the all-reduce layout with replicated logits. Same numbers either way."""
    mesh = make_mesh({"fsdp": 8})
    params = init_params(LLAMA, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (8, 16), 0, LLAMA.vocab_size)
    p_shard = tree_shardings(params, mesh, BACKBONE_RULES)
    sharded_params = jax.device_put(params, p_shard)
    assert constrain_batch(tokens) is tokens  # no mesh context: the identity

    def run():
        fn = jax.jit(lambda p, t: forward(p, t, LLAMA).logits, in_shardings=(p_shard, batch_sharding(mesh)))
        return fn(sharded_params, tokens), fn.lower(sharded_params, tokens).compile().as_text()

    free, free_hlo = run()
    with jax.set_mesh(mesh):
        pinned, pinned_hlo = run()
    assert pinned.sharding.spec == P("fsdp") and pinned.addressable_shards[0].data.shape == (1, 16, 128)
    assert "all-reduce" not in pinned_hlo and "all-gather" in pinned_hlo
    assert free.sharding.spec == P() and "all-reduce" in free_hlo  # what the constraint changes
    np.testing.assert_allclose(np.asarray(pinned), np.asarray(free), rtol=1e-5, atol=1e-5)
    with jax.set_mesh(mesh):  # a batch the mesh cannot split is left alone rather than failing
        odd = jax.jit(lambda p, t: forward(p, t, LLAMA).logits)(sharded_params, tokens[:3])
    np.testing.assert_allclose(np.asarray(odd), np.asarray(free)[:3], rtol=1e-5, atol=1e-5)
