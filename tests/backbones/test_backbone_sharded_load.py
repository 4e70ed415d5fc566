"""Loading straight onto an 8-device FSDP mesh: each device reads only its slice, logits unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from gmem_jax.backbones import loading
from gmem_jax.backbones.loading import load_backbone
from gmem_jax.backbones.model import forward
from gmem_jax.errors import GmemError

logits_fn = jax.jit(lambda params, tokens, cfg: forward(params, tokens, cfg).logits, static_argnums=2)


def fsdp_rule(n):
    """Shard the largest axis divisible by n (never the stacked layer axis); replicate when none is."""

    def spec_for(path, shape):
        first = 1 if path.startswith("layers/") else 0
        axes = [(d, i) for i, d in enumerate(shape) if i >= first and d % n == 0]
        if not axes:
            return P()
        axis = max(axes)[1]
        return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])

    return spec_for


@pytest.fixture
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets XLA_FLAGS for 8 simulated CPU devices)")
    # Auto axes (as gmem_jax.training.sharding.make_mesh builds them): forward() lets XLA place activations
    return jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fsdp_load_reads_slices_and_matches_single_device(arch, mesh, gpt2_dir, llama_dir, monkeypatch,
                                                          highest_precision):
    path = (gpt2_dir if arch == "gpt2" else llama_dir)[0]
    reads = []
    original = loading.SafetensorsTensors.read

    def recording_read(self, name, index):
        x = original(self, name, index)
        reads.append((name, x.size, int(np.prod(self.shape(name)))))
        return x

    monkeypatch.setattr(loading.SafetensorsTensors, "read", recording_read)
    rule = fsdp_rule(8)
    cfg, sharded = load_backbone(path, mesh=mesh, shardings=rule)
    flat = jax.tree_util.tree_flatten_with_path(sharded)[0]
    n_sharded = 0
    for key_path, leaf in flat:
        p = "/".join(k.key for k in key_path)
        assert leaf.sharding == NamedSharding(mesh, rule(p, leaf.shape)), p
        if "fsdp" in rule(p, leaf.shape):
            n_sharded += 1
            shard = leaf.addressable_shards[0].data
            assert len(leaf.addressable_shards) == 8 and shard.size * 8 == leaf.size, p
    assert n_sharded >= len(flat) - 1  # everything here has a dimension divisible by 8
    # the embedding [V=256, D=64] is split on V: every read is one device's 32 x 64 rows, never the whole table
    embed = [r for r in reads if r[0].endswith(("wte.weight", "embed_tokens.weight"))]
    assert len(embed) == 8 and all(size * 8 == full for _, size, full in embed)
    monkeypatch.undo()

    assert_same_model(cfg, sharded, load_backbone(path)[1])


def assert_same_model(cfg, sharded, single):
    """Bit-identical weights; logits equal up to the summation order of sharded matmuls."""
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24)), jnp.int32)
    np.testing.assert_allclose(np.asarray(logits_fn(sharded, tokens, cfg)),
                               np.asarray(logits_fn(single, tokens, cfg)), atol=1e-4, rtol=0)


def test_spec_that_does_not_divide_is_a_clear_error(mesh, llama_dir):
    def layer_axis_rule(path, shape):  # the stacked layer axis (2 layers) cannot be split 8 ways
        return P("fsdp") if path == "layers/attn_norm/scale" else P()

    with pytest.raises(GmemError, match="does not fit parameter layers/attn_norm/scale of shape \\[2, 64\\]"):
        load_backbone(llama_dir[0], mesh=mesh, shardings=layer_axis_rule)


def test_project_backbone_rules_via_loader_sharding(mesh, llama_dir, highest_precision):
    """The training code's rule table, passed as a callable returning NamedSharding."""
    sharding = pytest.importorskip("gmem_jax.training.sharding")
    cfg, params = load_backbone(llama_dir[0], mesh=mesh, shardings=sharding.loader_sharding(mesh))
    q = params["layers"]["attn"]["q"]["kernel"]  # [L, D, H*E]: D split over fsdp
    assert q.sharding.spec == P(None, "fsdp") and q.addressable_shards[0].data.shape == (2, 8, 64)
    assert_same_model(cfg, params, load_backbone(llama_dir[0])[1])
