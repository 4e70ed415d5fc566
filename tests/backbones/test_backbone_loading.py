"""Loading HF safetensors checkpoints: logit parity with transformers' PyTorch models, dtypes, errors."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from gmem_jax.backbones.loading import load_backbone
from gmem_jax.backbones.model import forward
from gmem_jax.errors import GmemError
from hf_oracle import LLAMA3_ROPE, hf_logits, save_llama

logits_fn = jax.jit(lambda params, tokens, cfg: forward(params, tokens, cfg).logits, static_argnums=2)


def random_tokens(vocab, batch=2, seq=40, seed=0):
    # seq 40 > original_max_position_embeddings 16, so llama3 rope scaling matters
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)


def assert_logit_parity(path, model, tol=1e-4):
    cfg, params = load_backbone(path)
    tokens = random_tokens(cfg.vocab_size)
    ours = np.asarray(logits_fn(params, jnp.asarray(tokens), cfg))
    ref = hf_logits(model, tokens)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= tol, np.abs(ours - ref).max()
    return cfg, params


def test_gpt2_logit_parity(gpt2_dir, highest_precision):
    path, model = gpt2_dir
    cfg, params = assert_logit_parity(path, model)
    assert cfg.arch == "gpt2" and cfg.num_layers == 2 and params["layers"]["attn"]["q"]["kernel"].shape == (2, 64, 64)


def test_gpt2_without_transformer_prefix(gpt2_dir, tmp_path, highest_precision):
    """The original OpenAI GPT-2 checkpoints name tensors 'h.0...' instead of 'transformer.h.0...'."""
    path, model = gpt2_dir
    tensors = load_file(str(path / "model.safetensors"))
    assert any(k.startswith("transformer.") for k in tensors)
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    assert_logit_parity(tmp_path, model)


@pytest.mark.parametrize("kv_heads,tie,rope_scaling", [
    (1, False, None),
    (2, True, LLAMA3_ROPE),
    (4, False, LLAMA3_ROPE),
])
def test_llama_logit_parity(tmp_path, highest_precision, kv_heads, tie, rope_scaling):
    model = save_llama(tmp_path, kv_heads=kv_heads, tie=tie, rope_scaling=rope_scaling, seed=kv_heads)
    cfg, params = assert_logit_parity(tmp_path, model)
    assert (cfg.num_kv_heads, cfg.tie_word_embeddings) == (kv_heads, tie)
    assert ("lm_head" in params) == (not tie)
    assert (cfg.rope_scaling is not None) == (rope_scaling is not None)


def test_llama_sharded_index(tmp_path, highest_precision):
    model = save_llama(tmp_path, kv_heads=2, layers=3, max_shard_size="40KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    assert_logit_parity(tmp_path, model)


def test_bf16_load_is_the_exact_cast_of_fp32(llama_dir):
    """Casting while loading gives exactly the fp32 weights rounded to bf16 (agreement of bf16 *predictions*
    with fp32 is checked on the real SmolLM2 model in test_backbone_gguf.py: on random tiny models even
    transformers' own bf16 model flips ~10% of the argmaxes)."""
    path, _ = llama_dir
    cfg32, p32 = load_backbone(path)
    cfg16, p16 = load_backbone(path, dtype="bfloat16")
    assert cfg16 == cfg32.replace(dtype="bfloat16", param_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(p32), jax.tree.leaves(p16), strict=True):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


def test_param_dtype_separate_from_compute_dtype(gpt2_dir):
    cfg, params = load_backbone(gpt2_dir[0], dtype="float32", param_dtype="bfloat16")
    assert (cfg.dtype, cfg.param_dtype) == ("float32", "bfloat16")
    assert params["embed"]["embedding"].dtype == jnp.bfloat16


# ---- errors: one line, naming the problem ----

def raises_one_line(fn, *fragments):
    with pytest.raises(GmemError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


def copy_checkpoint(src, dst):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)


def test_missing_folder(tmp_path):
    raises_one_line(lambda: load_backbone(tmp_path / "nope"), "not found", "nope")


def test_folder_without_config_or_weights(tmp_path, gpt2_dir):
    raises_one_line(lambda: load_backbone(tmp_path), "config.json")
    shutil.copy(gpt2_dir[0] / "config.json", tmp_path / "config.json")
    raises_one_line(lambda: load_backbone(tmp_path), "model.safetensors")


def test_unsupported_model_type(tmp_path, gpt2_dir):
    copy_checkpoint(gpt2_dir[0], tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    raises_one_line(lambda: load_backbone(tmp_path), "unsupported model_type", "bert")


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, gpt2_dir):
    copy_checkpoint(gpt2_dir[0], tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    name = "transformer.h.1.mlp.c_fc.weight"
    assert tensors[name].shape == (64, 256)
    tensors[name] = np.zeros((64, 100), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    raises_one_line(lambda: load_backbone(tmp_path), repr(name), "[64, 100]", "[64, 256]")


def test_missing_tensor_is_named(tmp_path, llama_dir):
    copy_checkpoint(llama_dir[0], tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    raises_one_line(lambda: load_backbone(tmp_path), "'model.layers.1.self_attn.k_proj.weight'", "layers/attn/k")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raises_one_line(lambda: load_backbone("no-such-org/no-such-model"), "no-such-org/no-such-model", "hub")


def test_unknown_dtype(gpt2_dir):
    raises_one_line(lambda: load_backbone(gpt2_dir[0], dtype="float12"), "float12")
