"""Causal query chunks (layers.ATTENTION_CHUNK): the same attention as one [T, T] product, against transformers.

The backbone's own tests use sequences shorter than the default chunk, so these shrink it to 16 and run 40 tokens:
chunks of 16, 16 and 8 queries, each over the keys up to its own end.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.backbones import layers
from gmem_jax.backbones.loading import load_backbone
from gmem_jax.backbones.model import forward
from hf_oracle import hf_logits, save_llama


def _logits(params, tokens, cfg, kv_mask=None):
    return np.asarray(jax.jit(lambda p, t, m: forward(p, t, cfg, kv_mask=m).logits)(params, tokens, kv_mask))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunked_attention_matches_transformers(arch, gpt2_dir, tmp_path, highest_precision, monkeypatch):
    path, model = gpt2_dir if arch == "gpt2" else (tmp_path, save_llama(tmp_path, kv_heads=2, seed=3))
    cfg, params = load_backbone(path)
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32)
    monkeypatch.setattr(layers, "ATTENTION_CHUNK", 16)
    ours = _logits(params, jnp.asarray(tokens), cfg)
    ref = hf_logits(model, tokens)
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


def test_chunks_equal_one_product_with_padding_and_in_the_gradient(llama_dir, highest_precision, monkeypatch):
    """Right-padded keys (kv_mask) and the backward (a residual-injection memory differentiates through the
    blocks): chunked and unchunked agree on every real position and in the gradient w.r.t. the embeddings."""
    path, _ = llama_dir
    cfg, params = load_backbone(path)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 40)).astype(np.int32))
    kv_mask = jnp.arange(40)[None, :] < jnp.array([[40], [29]])  # the second row: 11 padding tokens at the end

    def run(chunk):
        monkeypatch.setattr(layers, "ATTENTION_CHUNK", chunk)
        logits = _logits(params, tokens, cfg, kv_mask)
        loss = lambda p: (forward(p, tokens, cfg, kv_mask=kv_mask).logits * kv_mask[..., None]).sum()  # noqa: E731
        grad = jax.jit(jax.grad(loss))(params)["embed"]["embedding"]
        return logits, np.asarray(grad)

    (l16, g16), (lfull, gfull) = run(16), run(10_000)
    real = np.asarray(kv_mask)
    assert np.abs(l16 - lfull)[real].max() <= 1e-4
    # scale-relative: the embedding gradient sums many terms (entries near 0 carry fp32 cancellation noise; the
    # softmax runs in fp32 in both paths, so even float64 params agree only to ~1e-6 of the largest entry)
    scale = np.abs(gfull).max()
    assert scale > 0 and np.abs(g16 - gfull).max() <= 1e-5 * scale, np.abs(g16 - gfull).max() / scale
