"""What the memory costs: parameter counts (exact, by formula) and activation memory over segments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.backbones import BackboneConfig, init_params
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import init_memory
from gmem_jax.training.step import init_train_state, make_optimizer, make_train_step

GPT2_124M = BackboneConfig(arch="gpt2", vocab_size=50257, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12,
                           head_dim=64, intermediate_size=3072, max_position_embeddings=1024, norm_eps=1e-5,
                           tie_word_embeddings=True, attention_bias=True, mlp_bias=True)


def _count(tree_fn):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(jax.eval_shape(tree_fn)))


def test_gpt2_124m_layout_has_the_published_parameter_count():
    assert _count(lambda: init_params(GPT2_124M, jax.random.PRNGKey(0))) == 124_439_808


@pytest.mark.parametrize("gate, injection, write_attention, standardize", [("update", "final", "tokens", False),
                                                                           ("gru", "residual", "slots", True),
                                                                           ("update", "final", "keyed", False)])
def test_memory_parameter_count_matches_the_formula(gate, injection, write_attention, standardize):
    H, M, S = 768, 512, 1024
    mcfg = MemoryConfig(num_slots=S, mem_dim=M, num_heads=8, gate=gate, injection=injection, read_layer=6,
                        write_attention=write_attention, standardize_inputs=standardize)
    dense = lambda i, o: i * o + o  # noqa: E731
    expected = (S * M  # slot bank
                + dense(H, 2 * M) + 2 * (2 * M) + dense(2 * M, M)  # encoder: Linear, LayerNorm, Linear
                + dense(M, H) + 2 * H + dense(H, H)  # decoder
                + 4 * dense(M, M)  # write attention q, k, v, out (keyed: the read's q, write k, v, out)
                + ((S * M + dense(M, 1)) if write_attention == "keyed" else 0)  # slot addresses, token strength
                + dense(2 * M, (2 if gate == "gru" else 1) * M) + (dense(2 * M, M) if gate == "gru" else 0)
                + dense(M, M // 4) + dense(M // 4, 1)  # importance MLP
                + (dense(2 * H, H) if injection == "final" else H)  # injection
                + (4 * H if standardize else 0))  # mean and 1/std, read and write side
    assert _count(lambda: init_memory(jax.random.PRNGKey(0), GPT2_124M, mcfg)) == expected


def test_activation_memory_does_not_grow_with_segments():
    """Compiled peak temp memory of the train step at 16 segments is far from 4x that at 4 segments."""
    cfg = BackboneConfig(arch="gpt2", vocab_size=2048, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4,
                         head_dim=32, intermediate_size=512, max_position_embeddings=256, norm_eps=1e-5,
                         tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    mcfg = MemoryConfig(num_slots=64, mem_dim=64, num_heads=4, loss_positions=0)
    frozen = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    opt = make_optimizer(learning_rate=1e-3, total_steps=10)
    state = jax.eval_shape(lambda: init_train_state(init_memory(jax.random.PRNGKey(1), cfg, mcfg), opt))
    step = make_train_step(cfg, mcfg, opt)

    def temp_bytes(n_seg):
        B, T = 2, 128
        batch = {"tokens": jax.ShapeDtypeStruct((B, n_seg, T), jnp.int32),
                 "labels": jax.ShapeDtypeStruct((B, n_seg, T), jnp.int32),
                 "token_mask": jax.ShapeDtypeStruct((B, n_seg, T), jnp.bool_),
                 "loss_mask": jax.ShapeDtypeStruct((B, n_seg, T), jnp.float32)}
        return step.lower(state, frozen, batch).compile().memory_analysis().temp_size_in_bytes

    four, sixteen = temp_bytes(4), temp_bytes(16)
    assert sixteen < 1.6 * four, (four, sixteen)
