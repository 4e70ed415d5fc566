"""The PyTorch reference side of the comparisons, written here for the benchmarks (torch is a bench/test-only
dependency: only bench/ imports this module, never the package).

It follows the way the author's public G-MemLLM code works: a transformers `GPT2LMHeadModel` run frozen under
`torch.no_grad()` with `output_hidden_states=True` (so it also computes the frozen logits it returns "for
reference"); a memory module of encoder/decoder MLPs, an `nn.MultiheadAttention` write with the slots as
queries, a sigmoid update gate, dot-product read attention and a `Linear([h; r] -> h)` fusion before the LM head;
the augmented logits from `lm_head`; CE + importance regularisers; backward; AdamW. Generation re-runs the whole
sequence for every new token (no KV cache), as that code's forward does.

Differences from that code, chosen so both sides do the same work as gmem_jax: no dropout; the first segment
reads the learned slot bank (gmem_jax does) instead of skipping the read; the importance MLP has the same shape
as gmem_jax's (M -> M/4 -> 1); the backward runs once per document (through the memory across segments).
With a bf16 backbone (`gpt2_torch(..., dtype=torch.bfloat16)`) the memory stays fp32, as in gmem_jax: hidden
states are cast up before the memory and the fused states down before the frozen LM head.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.loading import load_backbone
from gmem_jax.memory.config import MemoryConfig


def gpt2_torch(cfg: BackboneConfig, seed: int = 0, dtype=torch.float32) -> transformers.GPT2LMHeadModel:
    """A random-weight transformers GPT-2 of cfg's shape in `dtype`, frozen, eval mode (no dropout)."""
    if cfg.arch != "gpt2":
        raise ValueError("the PyTorch reference is GPT-2 only")
    torch.manual_seed(seed)
    hf = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings,
                                 n_embd=cfg.hidden_size, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                                 n_inner=cfg.intermediate_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                 bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_ids[0])
    model = transformers.GPT2LMHeadModel(hf).eval().to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def same_weights_in_jax(model: transformers.GPT2LMHeadModel) -> tuple[BackboneConfig, dict]:
    """The torch model's exact weights as a gmem_jax (cfg, params), through the package's own safetensors
    loader, so both frameworks run the same function."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_backbone(Path(tmp), dtype=str(model.dtype).removeprefix("torch."))


class TorchMemory(nn.Module):
    """Encoder/decoder MLPs, MHA write with a sigmoid update gate, read attention, importance MLP, fusion."""

    def __init__(self, hidden: int, mcfg: MemoryConfig):
        super().__init__()
        M, S = mcfg.mem_dim, mcfg.num_slots
        self.mem_dim = M
        self.encoder = nn.Sequential(nn.Linear(hidden, 2 * M), nn.LayerNorm(2 * M), nn.GELU(), nn.Linear(2 * M, M))
        self.decoder = nn.Sequential(nn.Linear(M, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                     nn.Linear(hidden, hidden))
        self.slots = nn.Parameter(torch.randn(S, M) / math.sqrt(M))
        self.write_attn = nn.MultiheadAttention(M, mcfg.num_heads, batch_first=True)
        self.gate = nn.Linear(2 * M, M)
        self.importance = nn.Sequential(nn.Linear(M, max(M // 4, 1)), nn.GELU(), nn.Linear(max(M // 4, 1), 1),
                                        nn.Sigmoid())
        self.fuse = nn.Linear(2 * hidden, hidden)  # [h; r] -> h before the LM head

    def initial_state(self, batch: int) -> torch.Tensor:
        return self.slots.unsqueeze(0).expand(batch, -1, -1)

    def retrieve(self, state: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """state [B, S, M], h [B, T, H] -> r [B, T, H]."""
        q = self.encoder(h)
        alpha = torch.softmax(torch.bmm(q, state.transpose(1, 2)) / math.sqrt(self.mem_dim), dim=-1)
        return self.decoder(torch.bmm(alpha, state))

    def update(self, state: torch.Tensor, h: torch.Tensor, pad: torch.Tensor | None):
        """Write a segment: -> (new state [B, S, M], importance [B, S]). pad [B, T] True on padding."""
        x = self.encoder(h)
        a, _ = self.write_attn(state, x, x, key_padding_mask=pad, need_weights=False)
        g = torch.sigmoid(self.gate(torch.cat([state, a], -1)))
        new = g * a + (1 - g) * state
        return new, self.importance(new).squeeze(-1)


def segment_forward(model, mem: TorchMemory, state, tokens, mask, *, update: bool = True):
    """One segment the author's way: frozen pass with hidden states (and frozen logits), read + fuse, write,
    augmented logits for every position. Returns (augmented logits [B, T, V], frozen logits, new state, s)."""
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=mask, output_hidden_states=True)
        h = out.hidden_states[-1].float()  # the memory is fp32 whatever the backbone's dtype
    enhanced = mem.fuse(torch.cat([h, mem.retrieve(state, h)], -1))
    s = None
    if update:
        state, s = mem.update(state, h, None if mask is None else mask == 0)
    return model.lm_head(enhanced.to(model.dtype)).float(), out.logits, state, s


def make_train_step(model, mem: TorchMemory, mcfg: MemoryConfig, lr: float = 1e-4):
    """step(batch of numpy [B, N, T] arrays) -> loss: all segments, CE + regularisers, one backward, AdamW."""
    opt = torch.optim.AdamW(mem.parameters(), lr=lr, weight_decay=0.01)

    def step(batch: dict) -> float:
        tokens = torch.from_numpy(batch["tokens"]).long()
        labels = torch.from_numpy(batch["labels"]).long()
        mask = torch.from_numpy(batch["token_mask"].astype(np.int64))
        B, N, _ = tokens.shape
        state = mem.initial_state(B)
        ce = sparsity = entropy = 0.0
        for k in range(N):
            logits, _frozen_logits, state, s = segment_forward(model, mem, state, tokens[:, k], mask[:, k])
            ce = ce + F.cross_entropy(logits.flatten(0, 1), labels[:, k].flatten())
            p = s / s.sum(-1, keepdim=True)
            sparsity = sparsity + s.abs().mean()
            entropy = entropy - (p * torch.log(p + 1e-9)).sum(-1).mean()
        loss = (ce + mcfg.sparsity_weight * sparsity - mcfg.entropy_weight * entropy) / N
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mem.parameters(), 1.0)
        opt.step()
        return loss.item()

    return step


@torch.no_grad()
def generate_rerun(model, mem: TorchMemory, state, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy generation with memory that re-runs the whole sequence for every token (no KV cache), reading the
    memory at every position as the author's forward does. prompt [B, P] -> new tokens [B, max_new_tokens]."""
    seq = torch.from_numpy(prompt).long()
    for _ in range(max_new_tokens):
        logits, _, _, _ = segment_forward(model, mem, state, seq, None, update=False)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:].numpy()


@torch.no_grad()
def hf_generate(model, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """transformers' own cached greedy `generate` (no memory), never stopping early. -> [B, max_new_tokens]."""
    ids = torch.from_numpy(prompt).long()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         min_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
    return out[:, prompt.shape[1]:].numpy()
