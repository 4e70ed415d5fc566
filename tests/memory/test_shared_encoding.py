"""The segment step encodes the final hidden states once for the read and the write where both use the same
encoding (`MemoryConfig.shares_encoding`: the write's values; write_key_source="final": its keys): the same loss
and gradients as encoding them per use, and the differentiated step runs the encoder's first layer fewer times."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from memory_testlib import count_dot_generals, perturbed_memory, random_batch, small_memory, tiny_backbone

from gmem_jax.memory import model as memory_model

H, M = 32, 24  # the encoder's first kernel [H, 2M] = [32, 48]: no other memory weight has that shape

# config -> (encodings per segment: once / per use, encoder-input matmuls per encoding without remat). Each
# encoding costs a forward and a kernel gradient, a third product with standardised inputs (the gradient reaches
# the input statistics through the standardised input), and with remat a recomputed forward.
CASES = {
    "tokens write (shares_encoding)": (dict(mem_dim=M), (1, 2), 2),
    "keyed, final-state keys, standardised (the ZsRE induction recipe's layout: values from layer 0)":
        (dict(mem_dim=M, write_attention="keyed", write_key_source="final", write_layer=0, standardize_inputs=True),
         (2, 3), 3),
}


def _encoder_in_matmuls(jaxpr) -> int:
    """dot_generals that take or produce a [H, 2M] array or its transpose (the encoder's input layer: its forward
    and its kernel gradient)."""
    kernel = {(H, 2 * M), (2 * M, H)}
    return count_dot_generals(jaxpr, lambda eqn: kernel & {v.aval.shape for v in (*eqn.invars, *eqn.outvars)
                                                           if hasattr(v, "aval")})


@pytest.mark.parametrize("case, remat", [(list(CASES)[0], True), (list(CASES)[1], False)])  # ~12 s each
def test_one_encoding_same_loss_and_gradients_fewer_encoder_matmuls(case, remat, monkeypatch):
    cfg, frozen = tiny_backbone("llama", hidden_size=H, num_heads=4, head_dim=8)
    options, (n_once, n_per_use), products = CASES[case]
    mcfg = small_memory("final", remat=remat, **options)
    mem = perturbed_memory(cfg, mcfg)
    batch = jax.tree.map(jnp.asarray, random_batch(cfg))
    loss = lambda p: memory_model.forward_segments(p, frozen, batch, cfg, mcfg).loss  # noqa: E731

    def run():
        value, grads = jax.jit(jax.value_and_grad(loss))(mem)
        return value, grads, _encoder_in_matmuls(jax.make_jaxpr(jax.grad(loss))(mem).jaxpr)

    got, got_grads, once = run()
    monkeypatch.setattr(memory_model, "_write_reuses_read_encoding", lambda mcfg: False)  # encode per use
    want, want_grads, per_use = run()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), got_grads, want_grads)
    products += remat
    assert (once, per_use) == (n_once * products, n_per_use * products)
