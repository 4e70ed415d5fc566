"""The segment loop: extract -> retrieve -> inject -> (task loss) -> consolidate, scanned over segments.

A document arrives as `n_seg` segments of `seg_len` tokens ([B, N, T]). For segment k the frozen backbone runs
on segment k alone; the memory read inside it sees `state_{k-1}`, which holds segments < k only, so no token
ever sees its own or a later segment through memory (causality). After the segment's loss, its hidden states
are written into the memory. Every example has its own memory ([B, S, M]), started from the learned slot bank
and reset wherever `reset[b, k]` is set, so nothing leaks between examples or documents.

Activation memory: each segment is rematerialised in the backward pass, keeping only the hidden states the
memory extracted (named "memory_extract") so the frozen layers below the memory never run twice, and the loss's
gradient w.r.t. the hidden states at the loss positions (`losses.frozen_head_cross_entropy`) so the frozen LM
head does not run twice either.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from gmem_jax import losses
from gmem_jax.errors import GmemError
from gmem_jax.backbones import model as backbone
from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.modules import GMemory, in_entity_block, masked_mean
from gmem_jax.training.distributed import host_numpy

EXTRACT_NAME = "memory_extract"


class SegmentOutputs(NamedTuple):
    loss: jax.Array  # scalar: the composite objective
    metrics: dict  # scalars: loss, ce, sparsity, entropy, sp_bce, accuracy, tokens, gate_open, read_gate
    state: jax.Array  # [B, S, M] memory after the last segment ([B, S + 1, M] with memory.scope_gate)
    per_example: dict  # nll_sum, tokens, correct: [B] each (teacher-forced, over loss positions)
    segment_nll: jax.Array  # [B, N] summed NLL of each segment's loss positions
    predictions: jax.Array  # [B, N, K] argmax token at each loss position (K = T or loss_positions)
    positions: jax.Array  # [B, N, K] which position of each segment the predictions belong to
    read_spread: jax.Array  # [B, N, K] exp(entropy) of the head-averaged read weights there: slots a read spans
    read_mass: jax.Array  # [B, N, K] their sum: 1, or 1 - the null slot's weight (memory.read_written_only)
    sp_logits: Optional[jax.Array]  # [B, N, max_sents] supporting-fact logits (sp_head only)
    slot_usage: jax.Array  # [S] mean read weight per slot
    gate_mean: jax.Array  # [S] mean update-gate openness per slot
    scope_gate: Optional[jax.Array] = None  # [B, N] the scope gate g of each segment (memory.scope_gate only)


def memory_module(cfg: BackboneConfig, mcfg: MemoryConfig) -> GMemory:
    return GMemory(mcfg, cfg.hidden_size)


def init_memory(rng: jax.Array, cfg: BackboneConfig, mcfg: MemoryConfig) -> dict:
    """Fresh memory params (the only trainable tree)."""
    mcfg.check_backbone(cfg.num_layers)
    return _init_memory(rng, cfg, mcfg)


# Compiled as one program (eagerly, flax init compiles every initialiser op on its own: ~10 s on 2 CPU cores) and
# cached per (cfg, mcfg); the values are bitwise the same either way.
@partial(jax.jit, static_argnums=(1, 2))
def _init_memory(rng: jax.Array, cfg: BackboneConfig, mcfg: MemoryConfig) -> dict:
    h = jnp.zeros((1, 2, cfg.hidden_size), jnp.float32)
    return memory_module(cfg, mcfg).init(rng, h, jnp.ones((1, 2), bool))["params"]


def _call(mem_params, cfg, mcfg, method, *args, **kw):
    return memory_module(cfg, mcfg).apply({"params": mem_params}, *args, method=method, **kw)


def initial_state(mem_params: dict, cfg: BackboneConfig, mcfg: MemoryConfig, batch: int) -> jax.Array:
    """An empty memory for `batch` documents: [B, S, M] copies of the learned slot bank."""
    return _call(mem_params, cfg, mcfg, GMemory.initial_state, batch)


def memory_hooks(mem_params: dict, state: jax.Array, cfg: BackboneConfig, mcfg: MemoryConfig,
                 frozen: Optional[dict] = None, detach: Optional[jax.Array] = None,
                 later: Optional[jax.Array] = None, content_state: Optional[jax.Array] = None,
                 scope_mask: Optional[jax.Array] = None, scope_query: Optional[jax.Array] = None,
                 entity: Optional[jax.Array] = None, tag_input: bool = True,
                 encoded: Optional[jax.Array] = None) -> dict:
    """Keyword arguments for `backbone.forward` that make every token read `state` [B, S, M] and inject the
    result. The hook's aux is (extracted hidden states [B, T, H], read weights [B, T, S], token gate [B, T] or
    None). Pass `frozen` where the pass also writes: with mcfg.write_layer >= 0 a second hook then captures the
    write's source (see `write_source`); reading alone (decoding) does not need it, except with
    memory.residual_read_norm, whose read sees the stream through the frozen final norm (only frozen['final_norm']
    is used there: a decoder may pass just that entry). `detach` [B, T] and `later` (broadcastable to
    [B, T]): see `GMemory._inject`; `content_state`, `scope_mask` [B, T] / `scope_query` [B, H] (memory.scope_gate:
    the prompt, or its mean final hidden state, `prompt_query`), `entity` [B, T] (memory.address_oracle): see
    `GMemory.read_and_inject`. tag_input: name the hook's input EXTRACT_NAME so that a remat policy saves it
    rather than re-running the backbone; False where it is already an input of the rematerialised step (frozen
    features computed ahead), which the step keeps anyway: a tag would save a second copy per segment. encoded
    [B, T, M]: the read's E(h), computed by a caller that also hands it to the write (final injection)."""

    if mcfg.residual_read_norm and frozen is None:
        raise GmemError("memory.residual_read_norm reads through the frozen final norm: pass memory_hooks(..., "
                        "frozen) (a dict with the backbone's 'final_norm' entry is enough)")

    def hook(h):
        tag = (lambda x: checkpoint_name(x, EXTRACT_NAME)) if tag_input else (lambda x: x)  # noqa: E731
        h = tag(h)
        # what the read sees; the update still goes into the raw stream h
        source = tag(backbone.final_norm(frozen, h, cfg)) if mcfg.residual_read_norm else h
        h_out, alpha, gate = _call(mem_params, cfg, mcfg, GMemory.read_and_inject, state, h, detach, later,
                                   content_state, scope_mask, scope_query, entity, encoded, source)
        return h_out, (source, alpha, gate)

    capture = None
    if frozen is not None and mcfg.write_layer >= 0:
        capture = lambda h: (h, checkpoint_name(backbone.final_norm(frozen, h, cfg), EXTRACT_NAME))  # noqa: E731
    if mcfg.injection != "final":  # the write's layer is at or below the read's (MemoryConfig checks it)
        if capture is None:
            return {"layer_hook": hook, "hook_layer": mcfg.read_layer}
        return {"layer_hook": (capture, hook), "hook_layer": (mcfg.write_layer, mcfg.read_layer)}
    hooks = {"final_hook": hook}
    if capture is not None:
        hooks.update(layer_hook=capture, hook_layer=mcfg.write_layer)
    return hooks


def write_source(out: backbone.BackboneOutput, mcfg: MemoryConfig
                 ) -> tuple[jax.Array, jax.Array, jax.Array, Optional[jax.Array]]:
    """From a forward with `memory_hooks(..., frozen)`: (the hidden states the write consumes [B, T, H], those the
    read saw [B, T, H] (the final ones, or the residual stream entering read_layer): what the scope gate's summary
    pools and write_key_source="final" encodes, the read weights [B, T, S], the token gate [B, T] or None)."""
    if mcfg.injection == "final":
        h_read, alpha, gate = out.final_aux
        h_write = out.layer_aux if mcfg.write_layer >= 0 else h_read
    elif mcfg.write_layer >= 0:
        h_write, (h_read, alpha, gate) = out.layer_aux
    else:
        h_read, alpha, gate = out.layer_aux
        h_write = h_read
    return h_write, h_read, alpha, gate


def slot_spread(alpha: jax.Array) -> jax.Array:
    """exp(entropy) over the last axis of weights [..., S] >= 0 normalised to sum 1 (read weights, a write's
    per-slot change) -> how many slots they span [...] (1 to S; k equal weights span exactly k; 0 if all are 0,
    as when a memory.read_written_only read puts all its weight on the null slot)."""
    total = alpha.sum(-1, keepdims=True)
    p = alpha / jnp.maximum(total, 1e-30)
    spread = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))
    return jnp.where(total[..., 0] > 0, spread, 0.0)


def _write_reuses_read_encoding(mcfg: MemoryConfig) -> bool:
    """Whether the write encodes the final hidden states as the read does (its values: `shares_encoding`; its keys:
    write_key_source="final"). The segment step then encodes them once and hands E(h) to both, so autodiff sums the
    uses' cotangents and runs the encoder's backward once (XLA merged the repeated forwards, not the backwards)."""
    return mcfg.shares_encoding or mcfg.write_key_source == "final"


def _loss_positions(loss_mask: jax.Array, k: int) -> jax.Array:
    """Indices [B, K] of the positions with loss first (stable), so logits are computed only where needed."""
    order = jnp.argsort(-loss_mask, axis=-1, stable=True)
    return order[:, :k] if k else order


def _later_targets(loss_mask: jax.Array, n: int) -> Optional[jax.Array]:
    """[B, T] True at the loss targets that must not train the memory (memory.read_grad_targets = n): those after a
    segment's first n if n > 0, its last -n if n < 0 (e.g. -1: the EOS); None if n = 0 (nothing is detached).
    With memory.later_read_map these are also the positions that add W_l sg(r) (`later_in_generation` is the same
    rule for decoding)."""
    if not n:
        return None
    has_loss = loss_mask > 0
    before = jnp.cumsum(has_loss, axis=-1)  # targets up to and including each position
    if n > 0:
        return has_loss & (before > n)
    return has_loss & (before > has_loss.sum(-1, keepdims=True) + n)


def later_in_generation(mcfg: MemoryConfig, decode_step: jax.Array) -> Optional[jax.Array]:
    """`later` for a block fed during generation (memory.later_read_map): decode step 0 feeds the prompt, whose last
    token predicts answer target 1; step k >= 1 feeds the k-th generated token, which predicts target k + 1, a
    later target when k >= read_grad_targets. [] bool, or None without the option."""
    return decode_step >= mcfg.read_grad_targets if mcfg.later_read_map else None


def _prompt_mask(token_mask: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """[B, T] True on a segment's prompt: its real tokens up to the first one with a loss (which predicts the first
    answer target), all of them in a segment without loss; what generation's prefill sees of a question."""
    return token_mask & ((jnp.cumsum(loss_mask, -1) - loss_mask) == 0)


def _question_vector(h: jax.Array, token_mask: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean hidden state over the prompt of a (last) segment: h [B, T, H] -> [B, H]."""
    return masked_mean(h, _prompt_mask(token_mask, loss_mask))


def prompt_query(frozen: dict, tokens: jax.Array, token_mask: jax.Array, cfg: BackboneConfig,
                 mcfg: MemoryConfig) -> jax.Array:
    """memory.scope_gate's question for generation: the mean over the prompt's real tokens of what the read sees
    (the frozen backbone's final hidden states, or with a residual injection the residual stream entering
    read_layer, which the memory does not change either), tokens/token_mask [B, P] -> [B, H]
    (`memory_hooks(scope_query=)`), which is what training pools at the same positions."""
    return masked_mean(input_features(frozen, tokens, token_mask, cfg, mcfg)["read"], token_mask)


def forward_segments(
    mem_params: dict,
    frozen: dict,
    batch: dict,
    cfg: BackboneConfig,
    mcfg: MemoryConfig,
    *,
    use_memory: bool = True,
    gate_override: Optional[float] = None,
    state: Optional[jax.Array] = None,
) -> SegmentOutputs:
    """Run a batch of segmented documents through the frozen backbone with memory.

    batch: tokens, labels [B, N, T] int; token_mask [B, N, T] bool; loss_mask [B, N, T] float; optional
    reset [B, N] bool (start a fresh memory before segment k), scope [B] float (memory.scope_weight: 1 / 0 / -1
    the question concerns what was written / does not / unknown), features [B, N, T, H] and, with write_layer >= 0,
    write_features [B, N, T, H] (the frozen backbone's hidden states of each segment, `frozen_features`; with
    final injection they do not depend on the memory, so a trainer may compute them once, not at every step),
    sent_pos/sent_mask/sent_label [B, N, Ms] (with sp_head), entity [B, N, T] int (memory.address_oracle,
    address_weight). use_memory=False is the ablation "same trainable modules, memory disabled": every segment
    reads the initial slot bank and nothing is written, so each segment sees only itself.
    """
    features = batch.get("features")
    if features is not None and mcfg.injection != "final":
        raise GmemError("precomputed frozen features only exist for memory.injection='final' (a residual injection "
                        "changes the backbone's later layers); set train.feature_cache=False")
    if features is not None and (mcfg.write_layer >= 0) != ("write_features" in batch):
        raise GmemError("the batch's frozen features were computed for another memory.write_layer; rebuild them "
                        "with frozen_features(..., write_layer=memory.write_layer)")
    seg_features = None  # {'read', 'write': [N, B, T, H]}: the frozen backbone's outputs, segment-major
    if features is not None:
        seg_features = {"read": jnp.swapaxes(features, 0, 1),
                        "write": jnp.swapaxes(batch.get("write_features", features), 0, 1)}
    elif mcfg.injection == "final":
        # The frozen backbone's outputs do not depend on the memory here, so run it over every segment first, outside
        # the differentiated, rematerialised segment step. Inside it, JAX's remat partial evaluation hoisted the
        # per-layer weight slices out of the layer scan as a stacked copy of all the layer weights, made at every
        # step: +2.06 GiB per device for Llama-3.1-8B on 8 chips (docs/benchmarks.md section 8.7). Same values;
        # one segment at a time (lax.map), so activations stay those of one segment.
        seg_features = jax.lax.map(
            lambda x: encoder_inputs(frozen_features(frozen, x[0], x[1], cfg, mcfg.write_layer)),
            (jnp.swapaxes(batch["tokens"], 0, 1), jnp.swapaxes(batch["token_mask"].astype(bool), 0, 1)))
    tokens = batch["tokens"]
    B, N, T = tokens.shape
    init = initial_state(mem_params, cfg, mcfg, B)
    state0 = init if state is None else state
    reset = batch.get("reset", jnp.zeros((B, N), bool))
    K = min(mcfg.loss_positions, T) if mcfg.loss_positions else T
    sp = mcfg.sp_head and "sent_pos" in batch
    head_fn = partial(backbone.lm_logits, cfg=cfg)

    # memory.later_train_content: a second copy of the state (the same values) carries the later targets' gradient
    content = use_memory and mcfg.later_train_content
    # memory.pointer_weight: the carry also holds the tokens and provenance (GMemory.write) of the last W written
    # segments, newest first (W = memory.pointer_segments, 0: all N)
    pointer = use_memory and mcfg.pointer_weight > 0
    W = (mcfg.pointer_segments or N) if pointer else 0
    if pointer and mcfg.pointer_support and "support_mask" not in batch:
        raise GmemError("memory.pointer_support needs the batch's support_mask (tasks.base.collate makes it from the "
                        "supporting-fact labels); build batches with collate or set pointer_support=False")
    # the written tokens the pointer loss may point at: all real ones, or (pointer_support) the supporting facts'
    target = batch["support_mask"].astype(bool) if pointer and mcfg.pointer_support else batch["token_mask"]
    # memory.address_oracle's / address_weight's labels; [B, N, 0] stands for none (GMemory refuses an oracle
    # without them; the address loss is then left out, as at evaluation)
    entity = batch.get("entity") if mcfg.reads_entity else None
    address = use_memory and mcfg.address_weight > 0 and entity is not None
    entity = jnp.zeros((B, N, 0), jnp.int32) if entity is None else entity

    def seg_step(carry, xs):
        k, tok, msk, lab, lmask, rst, spos, tgt, ent, feat = xs
        ent = ent if ent.shape[-1] else None  # [B, T] the entity labels the memory reads, else None
        state, content_state = (jnp.where(rst[:, None, None], init, s) if s is not None else None for s in carry[:2])
        ptr = carry[2]
        detach = _later_targets(lmask, mcfg.read_grad_targets)
        enc = (_call(mem_params, cfg, mcfg, GMemory.encode, feat["read"])
               if feat is not None and use_memory and _write_reuses_read_encoding(mcfg) else None)
        hooks = memory_hooks(mem_params, state, cfg, mcfg, frozen, detach, detach if mcfg.later_read_map else None,
                             content_state, _prompt_mask(msk, lmask) if mcfg.scope_gate else None, entity=ent,
                             tag_input=feat is None, encoded=enc)
        if feat is None:  # residual injection: the memory changes the backbone's later layers
            out = backbone.forward(frozen, tok, cfg, kv_mask=msk, compute_logits=False, **hooks)
            hidden = out.hidden
            h_ext, h_final, alpha, read_gate = write_source(out, mcfg)
        else:  # final injection: the frozen backbone's output, computed before the scan or cached ahead of training
            hidden, (h_ext, alpha, read_gate) = hooks["final_hook"](feat["read"])
            h_ext = feat["write"] if mcfg.write_layer >= 0 else h_ext
            h_final = feat["read"]
        pos = _loss_positions(lmask, K)  # [B, K]
        take = lambda x: jnp.take_along_axis(x, pos, axis=1)  # noqa: E731  [B, T] -> [B, K]
        take_rows = lambda x: jnp.take_along_axis(x, pos[..., None], axis=1)  # noqa: E731  [B, T, D] -> [B, K, D]
        h_sel = take_rows(hidden)
        # Context segments usually have no loss at all: skip the LM head ([B, K, V] logits, the largest matmul
        # after the backbone) for them instead of computing logits nobody reads.
        nll, pred = jax.lax.cond(
            jnp.any(lmask > 0),
            lambda h, y: losses.frozen_head_cross_entropy(head_fn, frozen, h, y),
            lambda h, y: (jnp.zeros(y.shape, jnp.float32), jnp.zeros(y.shape, jnp.int32)),
            h_sel, take(lab))
        w = take(lmask).astype(jnp.float32)
        correct = (pred == take(lab)).astype(jnp.float32) * w
        if pointer:
            # a question the written segment does not concern (scope label 0) has nothing to point at there
            in_scope = w if "scope" not in batch else w * (batch["scope"] != 0)[:, None]
            ptr, ptr_ys = _pointer_terms(ptr, rst, take_rows(alpha), take(lab), in_scope)
        if address:  # the read at labelled loss positions, toward the entity's block
            ys_address = _address_read_terms(take_rows(alpha), take(ent), w, mcfg)
        if use_memory:
            new_state, z, *extra = _call(mem_params, cfg, mcfg, GMemory.write, state, h_ext, msk, gate_override,
                                         False, h_final, pointer, ent, address, read_encoded=enc)
            if pointer:  # a segment with no real tokens writes nothing: the last written ones stay
                ptr = _push_provenance(ptr, extra[0], tok, msk, z, tgt)
            if address:
                ys_address["addr_write_nll"], ys_address["addr_write_n"] = extra[-1]
            if content:
                content_state, _ = _call(mem_params, cfg, mcfg, GMemory.write, content_state, h_ext, msk,
                                         gate_override, True, h_final, False, ent, read_encoded=enc)
            if mcfg.bptt_depth:
                cut = (k + 1) % mcfg.bptt_depth == 0  # truncated BPTT: no gradient into older segments
                new_state, content_state = (None if x is None else jnp.where(cut, jax.lax.stop_gradient(x), x)
                                            for x in (new_state, content_state))
                if pointer:
                    ptr = (jnp.where(cut, jax.lax.stop_gradient(ptr[0]), ptr[0]),) + ptr[1:]
        else:
            new_state, z = state, jnp.zeros_like(state)
        s = _call(mem_params, cfg, mcfg, GMemory.importance, new_state)
        ys = dict(nll=(nll * w).sum(-1), tokens=w.sum(-1), correct=correct.sum(-1), pred=pred, pos=pos,
                  sparsity=losses.importance_sparsity(s), entropy=losses.importance_entropy(s),
                  usage=alpha.mean((0, 1)), gate=z.mean((0, 2)), spread=slot_spread(take_rows(alpha)),
                  mass=take_rows(alpha).sum(-1))
        if pointer:
            ys.update(ptr_ys)
        if address:
            ys.update(ys_address)
        if mcfg.scope_weight:  # which read positions the scope loss counts
            ys["has_loss"] = w > 0
        if read_gate is not None:  # memory.token_gate / scope_gate: how much the answer positions let through
            ys["read_gate"] = (take(read_gate) * w).sum(-1)
        if mcfg.scope_gate:  # with its gradient, for the scope loss; one g per segment
            ys["scope_p"], ys["scope_g"] = take(read_gate), read_gate[:, 0]
        if sp:
            ys["sent_h"] = jnp.take_along_axis(hidden, spos[..., None], axis=1)  # [B, Ms, H]
            ys["question"] = _question_vector(hidden, msk, lmask)
        return (new_state, content_state, ptr), ys

    if mcfg.remat:
        seg_step = jax.checkpoint(seg_step, prevent_cse=False,
                                  policy=jax.checkpoint_policies.save_only_these_names(
                                      EXTRACT_NAME, losses.HEAD_GRAD_NAME))
    seg_major = lambda x: jnp.swapaxes(x, 0, 1)  # [B, N, ...] -> [N, B, ...] for the scan
    spos = batch["sent_pos"] if sp else jnp.zeros((B, N, 1), jnp.int32)
    xs = (jnp.arange(N), *map(seg_major, (tokens, batch["token_mask"].astype(bool), batch["labels"],
                                          batch["loss_mask"].astype(jnp.float32), reset, spos,
                                          target.astype(bool), entity)),
          seg_features)
    ptr0 = None
    if pointer:  # nothing written yet: zero provenance over a segment of no real tokens
        ptr0 = (jnp.zeros((B, mcfg.num_slots, W, T), jnp.float32), jnp.zeros((B, W, T), tokens.dtype),
                jnp.zeros((B, W, T), bool))
    (final_state, _, _), ys = jax.lax.scan(seg_step, (state0, state0 if content else None, ptr0), xs)

    nll, ntok, correct = ys["nll"].sum(0), ys["tokens"].sum(0), ys["correct"].sum(0)  # [B]
    total_tokens = jnp.maximum(ntok.sum(), 1.0)
    ce = nll.sum() / total_tokens
    sparsity, entropy = ys["sparsity"].mean(), ys["entropy"].mean()
    loss = ce + mcfg.sparsity_weight * sparsity - mcfg.entropy_weight * entropy
    metrics = dict(ce=ce, sparsity=sparsity, entropy=entropy, accuracy=correct.sum() / total_tokens,
                   tokens=ntok.sum(), gate_open=ys["gate"].mean())
    if "read_gate" in ys:  # a bAbI run whose token gate closed used no memory at all (docs/results.md)
        metrics["read_gate"] = ys["read_gate"].sum() / total_tokens
    sp_logits = None
    if sp:
        Ms = spos.shape[-1]
        sent_h = jnp.swapaxes(ys["sent_h"], 0, 1).reshape(B, N * Ms, -1)
        sp_logits = _call(mem_params, cfg, mcfg, GMemory.sentence_scores, sent_h, ys["question"][-1]).reshape(B, N, Ms)
        bce_sum, bce_n = losses.binary_cross_entropy(sp_logits, batch["sent_label"].astype(jnp.float32),
                                                     batch["sent_mask"])
        metrics["sp_bce"] = bce_sum / jnp.maximum(bce_n, 1.0)
        loss = loss + mcfg.sp_weight * metrics["sp_bce"]
    if mcfg.scope_weight and "scope" in batch:  # the scope gate, or the read's weight on slots, against the label
        scope = batch["scope"].astype(jnp.float32)  # [B]
        valid = ys["has_loss"] & (scope >= 0)[None, :, None]  # [N, B, K]
        m = jnp.clip(ys["scope_p"] if mcfg.scope_gate else ys["mass"], 1e-6, 1.0 - 1e-6)
        y = jnp.broadcast_to(scope[None, :, None], m.shape)
        bce = -(y * jnp.log(m) + (1.0 - y) * jnp.log1p(-m))
        metrics["scope_bce"] = jnp.where(valid, bce, 0.0).sum() / jnp.maximum(valid.sum(), 1)
        loss = loss + mcfg.scope_weight * metrics["scope_bce"]
    if pointer:
        n_ptr = jnp.maximum(ys["ptr_n"].sum(), 1.0)
        metrics["pointer"] = ys["ptr_nll"].sum() / n_ptr
        metrics["pointer_mass"] = ys["ptr_mass"].sum() / n_ptr
        loss = loss + mcfg.pointer_weight * metrics["pointer"]
    if address:
        n_read = jnp.maximum(ys["addr_read_n"].sum(), 1.0)
        metrics["address_write"] = ys["addr_write_nll"].sum() / jnp.maximum(ys["addr_write_n"].sum(), 1.0)
        metrics["address_read"] = ys["addr_read_nll"].sum() / n_read
        metrics["address_read_mass"] = ys["addr_read_mass"].sum() / n_read
        loss = loss + mcfg.address_weight * (metrics["address_write"] + metrics["address_read"])
    metrics["loss"] = loss
    return SegmentOutputs(
        loss=loss, metrics=metrics, state=final_state,
        per_example=dict(nll_sum=nll, tokens=ntok, correct=correct),
        segment_nll=jnp.swapaxes(ys["nll"], 0, 1), predictions=jnp.swapaxes(ys["pred"], 0, 1),
        positions=jnp.swapaxes(ys["pos"], 0, 1), read_spread=jnp.swapaxes(ys["spread"], 0, 1),
        read_mass=jnp.swapaxes(ys["mass"], 0, 1),
        sp_logits=sp_logits, slot_usage=ys["usage"].mean(0), gate_mean=ys["gate"].mean(0),
        scope_gate=jnp.swapaxes(ys["scope_g"], 0, 1) if mcfg.scope_gate else None,
    )


def _push_provenance(ptr: tuple, prov: jax.Array, tok: jax.Array, msk: jax.Array, z: jax.Array,
                     target: jax.Array) -> tuple:
    """The pointer carry after a write: ptr = (P [B, S, W, T], tokens [B, W, T], target mask [B, W, T]) of the last
    W written segments, newest first; prov [B, S, T], tok/msk [B, T] the new segment's, target [B, T] which of its
    tokens the loss may point at; z [B, S, M] its gate. The new segment goes first, the oldest drops out, and the
    kept ones fade by the channel mean of (1 - z): slot s keeps a share 1 - z_s of what it held. A segment with no
    real tokens (front padding) changes nothing."""
    old_p, old_t, old_m = ptr
    keep = (1.0 - z.mean(-1))[:, :, None, None]
    new = (jnp.concatenate([prov[:, :, None], old_p[:, :, :-1] * keep], 2),
           jnp.concatenate([tok[:, None], old_t[:, :-1]], 1),
           jnp.concatenate([(msk & target)[:, None], old_m[:, :-1]], 1))
    wrote = jnp.any(msk, -1)
    return tuple(jnp.where(wrote.reshape((-1,) + (1,) * (n.ndim - 1)), n, o) for n, o in zip(new, ptr))


def _pointer_terms(ptr: tuple, reset: jax.Array, alpha: jax.Array, labels: jax.Array,
                   weight: jax.Array) -> tuple[tuple, dict]:
    """memory.pointer_weight's loss terms at a segment's K loss positions. ptr = (provenance P [B, S, W, T], tokens
    [B, W, T], target mask [B, W, T]) of the W segments written last (`_push_provenance`); reset [B]; alpha [B, K, S]
    the head-averaged read weights there, labels/weight [B, K]. The share of what a position retrieves that is a
    written token equal to its target is the sum over those tokens of beta_wt = sum_s alpha_s P_swt; positions
    whose target was not written (or that have no loss) do not count. Returns (ptr with reset documents cleared,
    {ptr_nll, ptr_n, ptr_mass: [B]})."""
    prov, ptok, pmask = ptr
    B, K = labels.shape
    prov = jnp.where(reset[:, None, None, None], 0.0, prov)
    pmask = pmask & ~reset[:, None, None]
    beta = jnp.einsum("bks,bswt->bkwt", alpha, prov).reshape(B, K, -1)
    hit = (ptok.reshape(B, 1, -1) == labels[:, :, None]) & pmask.reshape(B, 1, -1)  # [B, K, W * T]
    mass = jnp.sum(jnp.where(hit, beta, 0.0), -1)
    valid = (weight > 0) & jnp.any(hit, -1)
    terms = dict(ptr_nll=jnp.where(valid, -jnp.log(mass + 1e-6), 0.0).sum(-1), ptr_n=valid.sum(-1).astype(jnp.float32),
                 ptr_mass=jnp.where(valid, mass, 0.0).sum(-1))
    return (prov, ptok, pmask), terms


def _address_read_terms(alpha: jax.Array, entity: jax.Array, weight: jax.Array, mcfg: MemoryConfig) -> dict:
    """memory.address_weight's read terms at a segment's K loss positions: alpha [B, K, S] the head-averaged read
    weights, entity/weight [B, K]. A position with a loss and an entity label counts -log of its read mass on that
    entity's slot block. Returns {addr_read_nll, addr_read_n, addr_read_mass: [B]}."""
    mass = jnp.sum(jnp.where(in_entity_block(entity, mcfg, write=False), alpha, 0.0), -1)  # [B, K]
    valid = (weight > 0) & (entity >= 0)
    return dict(addr_read_nll=jnp.where(valid, -jnp.log(mass + 1e-6), 0.0).sum(-1),
                addr_read_n=valid.sum(-1).astype(jnp.float32), addr_read_mass=jnp.where(valid, mass, 0.0).sum(-1))


def frozen_features(frozen: dict, tokens: jax.Array, token_mask: jax.Array, cfg: BackboneConfig,
                    write_layer: int = -1) -> dict:
    """What the final-injection memory reads and writes, from the frozen backbone on segments run alone:
    tokens/token_mask [B, T] -> {'features': final-norm hidden states [B, T, H]} (+ 'write_features' [B, T, H],
    block `write_layer`'s input through the final norm, when write_layer >= 0). Batch keys of forward_segments."""
    if write_layer < 0:
        return {"features": backbone.forward(frozen, tokens, cfg, kv_mask=token_mask, compute_logits=False).hidden}
    out = backbone.forward(frozen, tokens, cfg, kv_mask=token_mask, compute_logits=False, hook_layer=write_layer,
                           layer_hook=lambda h: (h, backbone.final_norm(frozen, h, cfg)))
    return {"features": out.hidden, "write_features": out.layer_aux}


def input_features(frozen: dict, tokens: jax.Array, token_mask: jax.Array, cfg: BackboneConfig,
                   mcfg: MemoryConfig) -> dict:
    """What the memory's encoder receives from the frozen model on segments [B, T]: {'read': [B, T, H] (the hook's
    input), 'write': [B, T, H] (the write's source)}, before any memory is injected."""
    if mcfg.injection == "final":
        return encoder_inputs(frozen_features(frozen, tokens, token_mask, cfg, mcfg.write_layer))
    # the read layer's input (memory.residual_read_norm: through the final norm), and with a write_layer
    # (<= read_layer) that block's input through the final norm
    normed = lambda h: (h, backbone.final_norm(frozen, h, cfg))  # noqa: E731
    hooks = (normed,) if mcfg.write_layer >= 0 else ()
    layers = (mcfg.write_layer,) if hooks else ()
    out = backbone.forward(frozen, tokens, cfg, kv_mask=token_mask, compute_logits=False,
                           hook_layer=layers + (mcfg.read_layer,),
                           layer_hook=hooks + ((normed if mcfg.residual_read_norm else (lambda h: (h, h))),))
    return {"read": out.layer_aux[-1], "write": out.layer_aux[0]}


def encoder_inputs(features: dict) -> dict:
    """`frozen_features` output -> what the memory's encoder receives with the final injection: {'read': the
    final hidden states, 'write': the write_layer's (or the final ones without a write_layer)}, each [B, T, H]."""
    return {"read": features["features"], "write": features.get("write_features", features["features"])}


def with_input_statistics(mem_params: dict, frozen: dict, tokens, token_mask, cfg: BackboneConfig,
                          mcfg: MemoryConfig, batch_size: int = 16,
                          features_fn: Optional[Callable[[np.ndarray, np.ndarray], dict]] = None) -> dict:
    """Memory params whose input standardisation (standardize_inputs) uses the per-channel mean and 1/std of the
    real tokens of `tokens`/`token_mask` [num_segments, T] (training segments), accumulated in float64. With
    several processes every one must call it with the same segments (the backbone forward is collective).

    features_fn(tokens [b, T], token_mask [b, T]) -> `input_features`' dict: where the encoder inputs come from
    (default: a jitted `input_features` call). The trainer passes its frozen-feature cache, so the segments the
    statistics need run through the backbone once and training reuses them."""
    if not mcfg.standardize_inputs:
        return mem_params
    tokens, token_mask = np.asarray(tokens), np.asarray(token_mask).astype(bool)
    if features_fn is None:
        run = jax.jit(input_features, static_argnums=(3, 4))
        features_fn = lambda tok, msk: run(frozen, tok, msk, cfg, mcfg)  # noqa: E731
    sums = {}
    for start in range(0, len(tokens), batch_size):
        tok, msk = tokens[start:start + batch_size], token_mask[start:start + batch_size]
        for side, h in features_fn(tok, msk).items():
            h = host_numpy(h).astype(np.float64)[msk]  # [real tokens, H]; gathered if sharded over hosts
            acc = sums.setdefault(side, [0.0, 0.0, 0])
            acc[0], acc[1], acc[2] = acc[0] + h.sum(0), acc[1] + (h * h).sum(0), acc[2] + len(h)
    out = dict(mem_params)
    for side, (s1, s2, n) in sums.items():
        if n == 0:
            raise GmemError("no real tokens to estimate the memory's input statistics from; check the training data")
        mean = s1 / n
        std = np.sqrt(np.maximum(s2 / n - mean * mean, 0.0) + 1e-6)
        out[f"{side}_mean"] = jnp.asarray(mean, mem_params[f"{side}_mean"].dtype)
        out[f"{side}_inv_std"] = jnp.asarray(1.0 / std, mem_params[f"{side}_inv_std"].dtype)
    return out


def write_context(mem_params: dict, frozen: dict, tokens: jax.Array, token_mask: jax.Array, cfg: BackboneConfig,
                  mcfg: MemoryConfig, state: Optional[jax.Array] = None, entity: Optional[jax.Array] = None
                  ) -> jax.Array:
    """Write context segments into memory without computing any loss: tokens/token_mask [B, N, T] -> [B, S, M];
    entity [B, N, T]: memory.address_oracle's labels."""
    B, N, T = tokens.shape
    state = initial_state(mem_params, cfg, mcfg, B) if state is None else state
    entity = jnp.zeros((B, N, 0), jnp.int32) if entity is None else entity

    def seg_step(state, xs):
        tok, msk, ent = xs
        ent = ent if ent.shape[-1] else None
        out = backbone.forward(frozen, tok, cfg, kv_mask=msk, compute_logits=False,
                               **memory_hooks(mem_params, state, cfg, mcfg, frozen, scope_mask=msk, entity=ent))
        h_ext, h_final, _, _ = write_source(out, mcfg)
        return _call(mem_params, cfg, mcfg, GMemory.write, state, h_ext, msk, None, False, h_final, False, ent)[0], None

    state, _ = jax.lax.scan(seg_step, state, tuple(jnp.swapaxes(x, 0, 1) for x in (tokens, token_mask, entity)))
    return state


def count_memory_params(mem_params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(mem_params)))
