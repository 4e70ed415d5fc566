"""The oracle for the backbone tests: tiny random transformers (PyTorch) models saved as safetensors folders."""
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# initializer_range=0.3: at the default 0.02 the attention is nearly uniform and a RoPE/layout bug can hide.
INIT = 0.3
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def save_gpt2(path: Path, *, seed=0, vocab=256, eos=1) -> "torch.nn.Module":
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  initializer_range=INIT, bos_token_id=eos, eos_token_id=eos)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


def save_llama(path: Path, *, seed=0, kv_heads=2, tie=False, rope_scaling=None, max_shard_size=None,
               layers=2) -> "torch.nn.Module":
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, initializer_range=INIT, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, rope_scaling=rope_scaling, bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return model


def hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask.astype(np.int64))}
        return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.float().numpy()


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of one unpadded prompt, never stopping at EOS."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()
