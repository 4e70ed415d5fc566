"""LoRA adapters on a frozen backbone: exact at init, numpy-oracle merge, training touches only LoRA leaves."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.model import count_params, forward, init_params
from gmem_jax.errors import GmemError
from gmem_jax.memllm.lora import init_lora, lora_targets, merge_lora

CFG = BackboneConfig(arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, intermediate_size=48, max_position_embeddings=64, norm_eps=1e-6,
                     tie_word_embeddings=False)


@pytest.fixture(scope="module")
def frozen():
    return jax.jit(init_params, static_argnums=0)(CFG, jax.random.PRNGKey(0))


def bits(x):
    return np.asarray(x).view(np.uint32)


def test_init_shapes_and_exact_identity(frozen):
    lora = init_lora(CFG, 4, tuple(lora_targets(CFG)), jax.random.PRNGKey(1))
    shapes = {k: (v["a"].shape, v["b"].shape) for k, v in lora.items()}
    assert shapes == {
        "layers/attn/q/kernel": ((2, 32, 4), (2, 4, 32)), "layers/attn/k/kernel": ((2, 32, 4), (2, 4, 16)),
        "layers/attn/v/kernel": ((2, 32, 4), (2, 4, 16)), "layers/attn/o/kernel": ((2, 32, 4), (2, 4, 32)),
        "layers/mlp/gate/kernel": ((2, 32, 4), (2, 4, 48)), "layers/mlp/up/kernel": ((2, 32, 4), (2, 4, 48)),
        "layers/mlp/down/kernel": ((2, 48, 4), (2, 4, 32))}
    assert all(not np.any(v["b"]) for v in lora.values())
    merged = jax.jit(merge_lora, static_argnums=2)(frozen, lora, 8.0)
    assert jax.tree.structure(merged) == jax.tree.structure(frozen)
    for m, f in zip(jax.tree.leaves(merged), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(bits(m), bits(f))


def test_merge_matches_numpy_oracle(frozen):
    lora = init_lora(CFG, 3, ("q", "down"), jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    lora = {k: {"a": v["a"], "b": jnp.asarray(rng.normal(size=v["b"].shape), jnp.float32)} for k, v in lora.items()}
    merged = merge_lora(frozen, lora, alpha=6.0)
    for path, leaf in [("attn", "q"), ("mlp", "down")]:
        ab = lora[f"layers/{path}/{leaf}/kernel"]
        want = np.asarray(frozen["layers"][path][leaf]["kernel"], np.float64) + \
            2.0 * np.einsum("lir,lro->lio", np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64))
        np.testing.assert_allclose(merged["layers"][path][leaf]["kernel"], want, rtol=1e-5, atol=1e-6)
    assert merged["layers"]["attn"]["k"]["kernel"] is frozen["layers"]["attn"]["k"]["kernel"]  # shared, no copy
    assert merged["embed"] is frozen["embed"]


def test_training_updates_only_lora(frozen):
    before = jax.tree.map(lambda x: np.array(x, copy=True), frozen)
    lora = init_lora(CFG, 4, ("q", "v"), jax.random.PRNGKey(1))
    opt = optax.adam(3e-2)
    opt_state = opt.init(lora)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (4, 16), 0, CFG.vocab_size)

    @jax.jit
    def step(lora, opt_state, frozen, tokens):
        def loss_fn(lora):
            logits = forward(merge_lora(frozen, lora, 8.0), tokens[:, :-1], CFG).logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(lora)
        updates, opt_state = opt.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    losses = []
    for _ in range(6):
        lora, opt_state, loss = step(lora, opt_state, frozen, tokens)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    assert all(np.any(v["b"]) for v in lora.values())
    for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(bits(b), bits(a))
    # Adam's moments mirror the LoRA tree and nothing else: no optimizer memory for the frozen backbone.
    adam = opt_state[0]
    assert jax.tree.structure(adam.mu) == jax.tree.structure(lora) == jax.tree.structure(adam.nu)
    assert count_params(opt_state) == 2 * count_params(lora) + 1  # + the step count
    assert count_params(lora) == 2 * (32 * 4 + 4 * 32) + 2 * (32 * 4 + 4 * 16)  # [L=2] x (q + v)


def test_bad_lora_input():
    with pytest.raises(GmemError, match="choose among"):
        init_lora(CFG, 4, ("fc",), jax.random.PRNGKey(0))  # a GPT-2 name on a Llama backbone
    with pytest.raises(GmemError, match="rank=0"):
        init_lora(CFG, 0, ("q",), jax.random.PRNGKey(0))
    other = CFG.replace(hidden_size=16, head_dim=4)
    lora = init_lora(other, 2, ("q",), jax.random.PRNGKey(0))
    frozen = {"layers": {"attn": {"q": {"kernel": jnp.zeros((2, 32, 32))}}}}
    with pytest.raises(GmemError, match=r"a \[2, 16, 2\] @ b \[2, 2, 16\] does not fit the kernel \[2, 32, 32\]"):
        merge_lora(frozen, lora, 1.0)
    with pytest.raises(GmemError, match="does not exist"):
        merge_lora({"layers": {}}, lora, 1.0)
