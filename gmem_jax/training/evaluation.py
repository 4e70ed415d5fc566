"""Model evaluation on task examples: teacher-forced token accuracy, greedy answer generation (with the
memory written from the context first), supporting-fact predictions; then the task's own metrics.

Three systems share this code path so they are compared like for like:
  memory      trained memory params, context written into memory, every generated token reads it;
  no_memory   trained params with the memory disabled (reads the learned slot bank, nothing written);
  frozen      the backbone alone (mem_params=None) on the same last segment (layout "none" or "prompt").
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gmem_jax import generation, losses
from gmem_jax.backbones import forward
from gmem_jax.errors import GmemError
from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import (forward_segments, initial_state, later_in_generation, memory_hooks,
                                   prompt_query, slot_spread, write_context)
from gmem_jax.tasks.base import SegmentedExample, collate
from gmem_jax.tasks.hotpotqa import supporting_facts_from_scores
from gmem_jax.tasks.metrics import answer_token_scores, clean_generation


@functools.lru_cache(maxsize=None)
def generation_hooks(cfg: BackboneConfig, mcfg: MemoryConfig):
    """The static `hooks` callable for `generation.generate`: one object per (cfg, mcfg), so no recompiles.
    hook_state = (memory params, memory state [B, S, M]), then with memory.scope_gate the `prompt_query` of the
    prompt [B, H], then with memory.residual_read_norm the frozen tree or {'final_norm': its final norm's params}
    (`decode_hook_state` builds it)."""

    def hooks(hook_state, decode_step):
        mem_params, state, *rest = hook_state
        query = rest.pop(0) if mcfg.scope_gate else None
        frozen = rest.pop(0) if mcfg.residual_read_norm else None
        if rest:
            raise GmemError(f"generation hook_state has {len(rest)} entries too many for this memory config; build "
                            "it with decode_hook_state")
        return memory_hooks(mem_params, state, cfg, mcfg, frozen, later=later_in_generation(mcfg, decode_step),
                            scope_query=query)

    return hooks


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _memory_pass(mem_params, frozen, batch, cfg, mcfg, use_memory):
    """Teacher-forced outputs of the last segment and the memory state after the context segments (all but the
    last), which generation continues from."""
    B = batch["tokens"].shape[0]
    if use_memory:
        state = write_context(mem_params, frozen, batch["tokens"][:, :-1], batch["token_mask"][:, :-1], cfg, mcfg)
    else:
        state = initial_state(mem_params, cfg, mcfg, B)
    if mcfg.sp_head:  # supporting-fact scores need every segment's sentence states: one full pass
        out = forward_segments(mem_params, frozen, batch, cfg, mcfg, use_memory=use_memory)
    else:  # the context was just written: run only the question segment on top of it (half the work)
        last = {k: v[:, -1:] if v.ndim >= 2 else v for k, v in batch.items()}
        out = forward_segments(mem_params, frozen, last, cfg, mcfg, use_memory=use_memory, state=state)
    return out.predictions[:, -1], out.positions[:, -1], out.sp_logits, state


_prompt_query = jax.jit(prompt_query, static_argnums=(3, 4))


def decode_hook_state(mem_params: dict, state: jax.Array, frozen: dict, cfg: BackboneConfig, mcfg: MemoryConfig,
                      prompt=None, prompt_mask=None) -> tuple:
    """`generation_hooks`' hook_state for generating from `state` [B, S, M]: prompt / prompt_mask [B, P] (left-padded,
    as `generation.generate` takes them) are needed with memory.scope_gate, which pools the prompt up front because
    a decode step sees one token."""
    hook_state = (mem_params, state)
    if mcfg.scope_gate:
        if prompt is None:
            raise GmemError("memory.scope_gate pools the prompt before decoding: pass decode_hook_state(..., prompt, "
                            "prompt_mask)")
        hook_state += (_prompt_query(frozen, jnp.asarray(prompt), jnp.asarray(prompt_mask, bool), cfg, mcfg),)
    if mcfg.residual_read_norm:  # the read sees the stream through the frozen final norm
        hook_state += ({"final_norm": frozen["final_norm"]},)
    return hook_state


@functools.partial(jax.jit, static_argnums=(3,))
def frozen_argmax(frozen, tokens, mask, cfg):
    """Argmax next-token predictions of the frozen backbone alone: tokens/mask [B, T] -> [B, T]."""
    return losses.argmax_last(forward(frozen, tokens, cfg, kv_mask=mask).logits)


def _left_padded_prompts(batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """The prompt part of each last segment, right-aligned into [B, seg_len] (generation wants left padding)."""
    tokens, plen = batch["tokens"][:, -1], batch["prompt_len"]
    B, T = tokens.shape
    out, mask = np.zeros_like(tokens), np.zeros((B, T), bool)
    for i in range(B):
        n = int(plen[i])
        if n:
            out[i, T - n:], mask[i, T - n:] = tokens[i, :n], True
        else:  # a padding example: one dummy token so the row is valid; its output is discarded
            mask[i, -1] = True
    return out, mask


def check_scorable(mcfg: Optional[MemoryConfig]) -> None:
    """GmemError for a memory `predict` cannot score: memory.address_oracle reads by entity labels, which
    generation (one token a step, no labels) does not have."""
    if mcfg is not None and mcfg.address_oracle:
        raise GmemError("memory.address_oracle is a training diagnostic whose read needs entity labels generation "
                        "does not have: set eval.enabled=False and score it teacher-forced with "
                        "docs/analysis/babi_oracle_address.py")


def predict(examples: Sequence[SegmentedExample], tokenizer: Any, frozen: dict, cfg: BackboneConfig, *,
            mem_params: Optional[dict] = None, mcfg: Optional[MemoryConfig] = None, use_memory: bool = True,
            batch_size: int = 8, max_new_tokens: int = 16, sp_top_k: int = 0, desc: str = "eval",
            show_progress: bool = True) -> dict[str, dict]:
    """Predictions {id: {'answer': text, 'token_em': float, 'answer_preds': [int, ...], 'answer_hits': [0/1, ...],
    'sp': [[title, sent_id], ...]}} for each example. 'answer_preds' are the teacher-forced argmax tokens at the
    answer positions of the last segment, in order (what EasyEdit's locality compares between a system and the
    unedited model); 'answer_hits' says which of them equal the targets (the last target is EOS), given only when
    every target was scored. sp_top_k: how 'sp' is chosen, see `supporting_facts_from_scores`."""
    if mem_params is not None:
        check_scorable(mcfg)
    eos = getattr(tokenizer, "eos_token_id", None)
    predictions: dict[str, dict] = {}
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc=desc, disable=not show_progress, leave=False):
        chunk = list(examples[start:start + batch_size])
        batch = collate(chunk, pad_to=batch_size)  # a fixed batch shape: one compile for the whole run
        arrays = {k: v for k, v in batch.items() if k != "example_mask"}
        last_labels, last_loss = batch["labels"][:, -1], batch["loss_mask"][:, -1] > 0
        if mem_params is not None:
            preds, pos, sp_logits, state = _memory_pass(mem_params, frozen, arrays, cfg, mcfg, use_memory)
            preds, pos = np.asarray(preds), np.asarray(pos)
            hit = preds == np.take_along_axis(last_labels, pos, 1)
            weight = np.take_along_axis(last_loss, pos, 1)  # loss positions come first, in ascending order
        else:
            preds = np.asarray(frozen_argmax(frozen, batch["tokens"][:, -1], batch["token_mask"][:, -1], cfg))
            hit, weight, sp_logits = preds == last_labels, last_loss, None
        prompt, prompt_mask = _left_padded_prompts(batch)
        hooks = hook_state = None
        if mem_params is not None:
            hooks = generation_hooks(cfg, mcfg)
            hook_state = decode_hook_state(mem_params, state, frozen, cfg, mcfg, prompt, prompt_mask)
        result = generation.generate(frozen, cfg, prompt, prompt_mask, max_new_tokens=max_new_tokens,
                                     eos_ids=() if eos is None else (int(eos),), hooks=hooks, hook_state=hook_state)
        new_tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
        for i, ex in enumerate(chunk):
            ids = [int(t) for t in new_tokens[i, :lengths[i]] if t != eos]
            p = {"answer": clean_generation(tokenizer.decode(ids, skip_special_tokens=True)),
                 "token_em": float((hit[i] & weight[i]).sum() / max(weight[i].sum(), 1)),
                 "answer_preds": preds[i][weight[i]].tolist()}
            if weight[i].sum() == last_loss[i].sum():  # every target scored (memory.loss_positions may keep fewer)
                p["answer_hits"] = hit[i][weight[i]].astype(int).tolist()
            if sp_logits is not None:
                p["sp"] = supporting_facts_from_scores(ex, jax.nn.sigmoid(np.asarray(sp_logits[i])),
                                                       top_k=sp_top_k)
            predictions[ex.meta["id"]] = p
    return predictions


@functools.partial(jax.jit, static_argnums=(4, 5))
def _last_segment_predictions(mem_params, frozen, batch, state, cfg, mcfg):
    """Teacher-forced predictions, their positions, the slots each position's read spans and the read weight that
    landed on slots (not the null slot of memory.read_written_only), [B, K] each, of the last segment reading
    `state` [B, S, M]; and its scope gate [B] (memory.scope_gate; else None)."""
    last = {k: v[:, -1:] if v.ndim >= 2 else v for k, v in batch.items()}
    out = forward_segments(mem_params, frozen, last, cfg, mcfg, state=state)
    gate = None if out.scope_gate is None else out.scope_gate[:, -1]
    return out.predictions[:, -1], out.positions[:, -1], out.read_spread[:, -1], out.read_mass[:, -1], gate


def other_context(contexts: np.ndarray) -> np.ndarray:
    """contexts [B, ...] -> [B] int: for each example, the nearest earlier one (cyclically) whose context differs,
    -1 if every example holds the same context. ZsRE lists each record's questions next to each other, all written
    from the same edit, so the previous example is usually not another record's."""
    flat = contexts.reshape(len(contexts), -1)
    out = np.full(len(flat), -1)
    for i in range(len(flat)):
        for step in range(1, len(flat)):
            if not np.array_equal(flat[i], flat[(i - step) % len(flat)]):
                out[i] = (i - step) % len(flat)
                break
    return out


def memory_reliance(examples: Sequence[SegmentedExample], frozen: dict, cfg: BackboneConfig, mem_params: dict,
                    mcfg: MemoryConfig, *, batch_size: int = 8) -> dict[str, float]:
    """Does the trained model use what was written? Teacher-forced answer-token accuracy of the question segment
    reading (own) the memory written from its own context, (other) the memory written from the nearest earlier
    example in the batch with a different context (`other_context`; examples with none are left out of the "other"
    figures, `answer_tokens_other` counts what is in), (empty) the unwritten slot bank; and the fraction of
    answer-token predictions that change from own to other / empty. A memory that is read but not relied on gives
    own == other. (Before 2026-12-04, late, "other" was simply the previous example's memory: for a ZsRE
    record's generalization, locality and portability questions that was the same edit.)

    When examples carry meta['kind'] (ZsRE: reliability, generalization, locality, portability) the accuracies
    are also given per kind (`token_acc_own_locality`, ...), and for locality examples the agreement of each
    state's predictions with the frozen backbone's argmax on the same question segment
    (`locality_agreement_own`, ...; EasyEdit's locality, which `token_acc` on gold NQ answers is not, but pooled
    over answer tokens like every figure here, where EasyEdit averages per example first): whether
    what was written, or the trained injection itself, moves the answers to unrelated questions.
    `read_slots_own` (and per kind): how many slots an answer position's read spreads over, reading its own
    memory (SegmentOutputs.read_spread): a lookup of the question's subject reads a few, a diffuse read most of the bank.
    `read_mass_own` / `read_mass_other` (and per kind): the read weight that lands on slots rather than on the null
    slot (memory.read_written_only; 1 otherwise), reading its own / another example's memory: a question the
    written memory does not concern should read nothing.
    `write_slots_own`: how many slots an example's context changed, the same exp(entropy) over each slot's share of
    the total change |written - empty| (L2 per slot; 0 for a context that changed nothing): a write that stores the
    context in a few slots against one that smears it over the whole bank, where any read address finds it.
    `scope_gate_own` / `scope_gate_other` (and per kind; memory.scope_gate only): the mean scope gate g over the
    answer tokens, reading its own / another example's memory: how much of the injection a question lets in.
    With memory.scope_gate also the state "other_slots": another example's slots under this example's own summary row, so the
    gate is exactly the own one (g depends only on that row and the question) and what changes is the content
    read: `token_acc_other_slots` / `changed_vs_other_slots` tell a memory whose answers come from what it reads
    from one whose output only follows the gate (open for its own context, shut for another's)."""
    scoped = ("other_slots",) if mcfg.scope_gate else ()
    states_names = ("own", "other", "empty") + scoped
    hits = {k: [] for k in states_names}
    agree = {k: [] for k in states_names}
    kinds: list[np.ndarray] = []
    changed = {k: [] for k in ("other", "empty") + scoped}
    spread: list[np.ndarray] = []
    mass = {k: [] for k in ("own", "other")}
    gates = {k: [] for k in ("own", "other") + scoped} if mcfg.scope_gate else {}
    written: list[np.ndarray] = []
    has_other: list[np.ndarray] = []  # per answer position: its example has a partner with another context
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        if len(chunk) < 2:  # "another example's memory" needs two examples in the batch
            continue
        batch = {k: v for k, v in collate(chunk).items() if k != "example_mask"}
        state = write_context(mem_params, frozen, batch["tokens"][:, :-1], batch["token_mask"][:, :-1], cfg, mcfg)
        partner = other_context(np.asarray(batch["tokens"][:, :-1]))
        states = {"own": state, "other": state[np.where(partner >= 0, partner, np.arange(len(chunk)))],
                  "empty": initial_state(mem_params, cfg, mcfg, len(chunk))}
        if scoped:  # the other example's slots, this example's summary row [B, 1, M]: the own gate
            states["other_slots"] = jnp.concatenate([states["other"][:, :mcfg.num_slots], state[:, mcfg.num_slots:]], 1)
        change = jnp.linalg.norm(state - states["empty"], axis=-1)[:, :mcfg.num_slots]  # [B, S], no summary row
        written.append(np.asarray(slot_spread(change)))
        preds, spreads, masses, seg_gates = {}, {}, {}, {}
        for k, s in states.items():  # the positions depend only on the loss mask: the same for every state
            p, pos, sp, ms, g = _last_segment_predictions(mem_params, frozen, batch, s, cfg, mcfg)
            preds[k], pos, spreads[k], masses[k] = np.asarray(p), np.asarray(pos), np.asarray(sp), np.asarray(ms)
            seg_gates[k] = None if g is None else np.asarray(g)
        gold = np.take_along_axis(batch["labels"][:, -1], pos, 1)
        w = np.take_along_axis(batch["loss_mask"][:, -1] > 0, pos, 1)
        kind = np.array([str(ex.meta.get("kind", "")) for ex in chunk])[:, None].repeat(w.shape[1], 1)
        kinds.append(kind[w])
        has_other.append(np.broadcast_to((partner >= 0)[:, None], w.shape)[w])
        spread.append(spreads["own"][w])
        for k in mass:
            mass[k].append(masses[k][w])
        for k in gates:
            gates[k].append(np.broadcast_to(seg_gates[k][:, None], w.shape)[w])
        ref = None
        if (kind == "locality").any():  # the unedited model on the same question segment, same positions
            ref = np.take_along_axis(np.asarray(frozen_argmax(frozen, batch["tokens"][:, -1],
                                                              batch["token_mask"][:, -1], cfg)), pos, 1)
        for k, p in preds.items():
            hits[k].append((p == gold)[w])
            agree[k].append((p == ref)[w] if ref is not None else np.zeros(int(w.sum()), bool))
        for k in changed:
            changed[k].append((preds[k] != preds["own"])[w])
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    valid = cat(has_other).astype(bool)

    def mean(values, state, sel=True):  # "other" figures only where another context was available
        keep = sel & valid if state.startswith("other") else np.broadcast_to(sel, values.shape)
        return float(values[keep].mean()) if keep.any() else float("nan")

    out = {f"token_acc_{k}": mean(cat(v), k) for k, v in hits.items()}
    out.update({f"changed_vs_{k}": mean(cat(v), k) for k, v in changed.items()})
    out["answer_tokens"] = int(cat(hits["own"]).size)
    out["answer_tokens_other"] = int(valid.sum())
    out["read_slots_own"] = float(cat(spread).mean())
    out.update({f"read_mass_{k}": mean(cat(v), k) for k, v in mass.items()})
    out.update({f"scope_gate_{k}": mean(cat(v), k) for k, v in gates.items()})
    out["write_slots_own"] = float(cat(written).mean())
    kind = cat(kinds)
    for name in sorted(set(kind.tolist()) - {""}):
        sel = kind == name
        out.update({f"token_acc_{k}_{name}": mean(cat(v), k, sel) for k, v in hits.items()})
        out[f"answer_tokens_{name}"] = int(sel.sum())
        out[f"read_slots_own_{name}"] = float(cat(spread)[sel].mean())
        out.update({f"read_mass_{k}_{name}": mean(cat(v), k, sel) for k, v in mass.items()})
        out.update({f"scope_gate_{k}_{name}": mean(cat(v), k, sel) for k, v in gates.items()})
        if name == "locality":
            out.update({f"locality_agreement_{k}": mean(cat(v), k, sel) for k, v in agree.items()})
    return out


def predict_options(config, show_progress: bool) -> dict:
    """`predict`'s keyword arguments that come from config.eval (the same for every system scored)."""
    return dict(batch_size=config.eval.batch_size, max_new_tokens=config.eval.max_new_tokens,
                sp_top_k=config.eval.get("sp_top_k", 0), show_progress=show_progress)


def eval_memory_config(config, mcfg: MemoryConfig) -> MemoryConfig:
    """The memory config evaluation runs with: `mcfg` (as trained) with config.eval's inference-time settings
    (eval.scope_gate_threshold) in place; a setting the memory cannot take raises GmemError."""
    threshold = config.eval.get("scope_gate_threshold")
    return mcfg if threshold is None else dataclasses.replace(mcfg, scope_gate_threshold=float(threshold))


def compare_systems(config, *, task_for_layout, tokenizer, frozen, cfg, trained: dict, show_progress: bool = True
                    ) -> dict:
    """Score several systems on the same eval split, in one harness.

    task_for_layout(layout) -> Task; trained: {system name: (memory params, MemoryConfig, use_memory)} for the
    trained systems ("memory", "no_memory"); the frozen backbone is always scored on the question alone
    ("frozen": ZsRE's locality is judged against its answers) and, when config.eval.baselines, with as much
    context as fits in its prompt ("in_prompt"; an ablation sweep can skip it). Returns {"results": {system:
    metrics}, "seconds": {...}, "examples": n}.
    """
    import time

    from gmem_jax.training import builders

    split, limit, seed = config.task.eval_split, config.task.eval_limit, config.task.seed
    runs = {"frozen": ("none", {})}
    if config.eval.baselines:
        runs["in_prompt"] = ("prompt", {})
    examples = {lay: builders.build_examples(config, task_for_layout(lay), tokenizer, split, limit, seed)
                for lay in ("memory", *(layout for layout, _ in runs.values()))}
    ev = predict_options(config, show_progress)
    for name, (params, mcfg, use_memory) in trained.items():
        runs[name] = ("memory", dict(mem_params=params, mcfg=mcfg, use_memory=use_memory))
    preds, seconds = {}, {}
    for name, (layout, kw) in runs.items():
        t0 = time.time()
        preds[name] = predict(examples[layout], tokenizer, frozen, cfg, desc=name, **ev, **kw)
        seconds[name] = time.time() - t0
    task = task_for_layout("memory")
    results = {}
    for name, (layout, _) in runs.items():
        for ex in examples[layout]:
            p = preds[name].get(ex.meta["id"])
            if p is not None and ex.meta.get("kind") == "locality":
                ref = preds["frozen"].get(ex.meta["id"], {})
                p["reference"] = ref.get("answer", "")
                p["reference_preds"] = ref.get("answer_preds")
        results[name] = task.score(preds[name], examples[layout])
        results[name].update(answer_token_scores(preds[name]))
    return {"results": results, "seconds": seconds, "examples": len(examples["memory"]), "predictions": preds}


def markdown_table(report: dict) -> str:
    """A metrics x systems table (percentages) with a caption naming task, split, size and backbone."""
    systems = list(report["results"])
    metrics = sorted({m for s in systems for m in report["results"][s]})
    lines = [f"Task `{report.get('task')}`, split `{report.get('split')}`, {report['examples']} examples, backbone "
             f"`{report.get('backbone')}`. Values are percentages.", "",
             "| metric | " + " | ".join(systems) + " |", "|---|" + "---|" * len(systems)]
    for m in metrics:
        cells = [report["results"][s].get(m) for s in systems]
        lines.append(f"| {m} | " + " | ".join("" if c is None else f"{100 * c:.1f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"
