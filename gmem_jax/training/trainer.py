"""The training loop: build everything from a config, resume from the workdir, train, checkpoint, evaluate,
write summary.json. `python -m gmem_jax.train` is a thin CLI over `train(config, workdir)`.

Workdir layout: config.json (resolved config), metrics.jsonl, tb/ (TensorBoard), checkpoints/ (orbax: memory
params + optimizer state + step, data-iterator state, run identity), memory_export/ (safetensors + JSON),
eval_<split>.json, summary.json, *.png plots.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gmem_jax.backbones.model import count_params
from gmem_jax.memory.model import count_memory_params, encoder_inputs, init_memory, with_input_statistics
from gmem_jax.tasks.base import collate
from gmem_jax.tasks.metrics import answer_token_scores
from gmem_jax.training import builders, checkpoint, distributed, sharding
from gmem_jax.errors import GmemError
from gmem_jax.training.data import BatchIterator
from gmem_jax.training.feature_cache import FeatureCache, cached_collate
from gmem_jax.training.evaluation import (check_scorable, compare_systems, eval_memory_config, predict,
                                          predict_options)
from gmem_jax.training.loop import run_steps
from gmem_jax.training.monitor import Monitor
from gmem_jax.training.step import (init_train_state, make_eval_step, make_optimizer, make_schedule,
                                   make_train_step, parse_name_factors)

_ARRAY_KEYS = ("tokens", "token_mask", "labels", "loss_mask", "support_mask", "sent_pos", "sent_mask", "sent_label",
               "scope", "features", "write_features", "entity")


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def _device_batch(batch: dict, mesh, mcfg) -> dict:
    # the entity labels travel only when the memory reads them: no unused host-to-device copy per step
    arrays = {k: batch[k] for k in _ARRAY_KEYS if k in batch and (k != "entity" or mcfg.reads_entity)}
    return distributed.host_local_batch_to_global(arrays, mesh, sharding.batch_sharding(mesh))


def evaluate_run(config, *, task, tokenizer, frozen, cfg, mcfg, mem_params, use_memory, examples, show_progress
                 ) -> dict:
    """Task metrics of the trained system on `examples` (plus teacher-forced answer-token accuracies, see
    metrics.answer_token_scores)."""
    preds = predict(examples, tokenizer, frozen, cfg, mem_params=mem_params, mcfg=mcfg, use_memory=use_memory,
                    desc="eval", **predict_options(config, show_progress))
    scores = task.score(preds, examples)
    scores.update(answer_token_scores(preds))
    return {"metrics": scores, "predictions": preds}


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train (or resume) the memory described by `config` in `workdir`; returns the summary dict."""
    t_start = time.time()
    distributed.maybe_initialize()
    main = distributed.is_main_process()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tc = config.train

    mesh = builders.build_mesh(config)
    task = builders.build_task(config)
    tokenizer = builders.build_tokenizer(config, task)
    cfg, frozen, backbone_id = builders.build_backbone(config, mesh, tokenizer)
    mcfg = builders.build_memory_config(config, cfg)
    train_examples = builders.build_train_examples(config, tokenizer, frozen, cfg, workdir)
    eval_examples = builders.build_examples(config, task, tokenizer, config.task.eval_split, config.task.eval_limit,
                                            config.task.seed)
    builders.check_loss_positions(train_examples, mcfg, "training data")
    if config.eval.enabled:  # before training, not after it
        check_scorable(mcfg)
        emcfg = eval_memory_config(config, mcfg)  # an eval setting this memory cannot take fails here too
    if main:
        _atomic_write_json(workdir / "config.json", builders.config_to_dict(config))

    # the cache first: with standardize_inputs the initial params' statistics read their segments from it
    iterator, cache = _train_iterator(config, train_examples, frozen, cfg, mcfg)
    params = _initial_params(config, cfg, mcfg, frozen, train_examples, cache)
    optimizer = make_optimizer(learning_rate=tc.learning_rate, total_steps=tc.steps, warmup_steps=tc.warmup_steps,
                               weight_decay=tc.weight_decay, clip_norm=tc.clip_norm,
                               lr_multipliers=_lr_multipliers(tc.lr_multipliers, params))
    schedule = make_schedule(learning_rate=tc.learning_rate, total_steps=tc.steps, warmup_steps=tc.warmup_steps)
    state = init_train_state(params, optimizer)
    state_rules = sharding.memory_rules(config.mesh_shard_slots)
    state = jax.device_put(state, sharding.tree_shardings(state, mesh, state_rules))
    identity = checkpoint.run_identity(backbone_id, cfg.fingerprint(), params)
    store = checkpoint.CheckpointStore(workdir / "checkpoints", keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)

    restored = store.restore_latest(state, expected=identity)
    start_step = 0
    if restored is not None:
        state, extra = restored
        iterator.restore(extra["data"])
        start_step = int(state["step"])
    tokens_per_step = int(tc.batch_size * config.task.n_seg * config.task.seg_len)
    monitor = Monitor(workdir, tc.steps, main, tokens_per_step=tokens_per_step,
                      resume_step=start_step if restored is not None else None)
    train_step = make_train_step(cfg, mcfg, optimizer, use_memory=tc.use_memory)

    with jax.set_mesh(mesh):  # traced under the mesh: activations stay batch-sharded (sharding.constrain_batch)
        state, step, train_seconds = run_steps(
            state, frozen, train_step, lambda: _device_batch(next(iterator), mesh, mcfg), start_step=start_step,
            total_steps=tc.steps, log_every=tc.log_every, checkpoint_every=tc.checkpoint_every, schedule=schedule,
            monitor=monitor, store=store, lr_option="train.learning_rate",
            extra=lambda: {"data": iterator.state(), "config": builders.config_to_dict(config), **identity})

    if cache is not None and main:
        print(f"frozen feature cache: {cache.num_segments} distinct segments computed for {cache.served} served, "
              f"{cache.nbytes / 2**20:.0f} MiB", flush=True)
    # Collective on every process (a jitted step over global arrays; gathering params): process 0 writes.
    usage, gate = _memory_stats(state["params"], frozen, cfg, mcfg, iterator, mesh, tc.use_memory)
    checkpoint.export_params(state["params"], {"memory": mcfg.to_dict(), "backbone_id": backbone_id,
                                               "backbone_fingerprint": cfg.fingerprint(),
                                               "use_memory": bool(tc.use_memory)}, workdir / "memory_export")
    result: dict[str, Any] = {}
    comparison = None
    if config.eval.enabled:
        name = "memory" if tc.use_memory else "no_memory"
        systems = {name: (state["params"], emcfg, tc.use_memory)}
        if config.eval.baselines:  # the frozen model on the same examples: question only, and context in prompt
            report = compare_systems(config, task_for_layout=lambda lay: builders.build_task(config, lay),
                                     tokenizer=tokenizer, frozen=frozen, cfg=cfg, trained=systems,
                                     show_progress=main)
            comparison = report["results"]
            result = comparison[name]
            preds = report["predictions"][name]
        else:
            ev = evaluate_run(config, task=task, tokenizer=tokenizer, frozen=frozen, cfg=cfg, mcfg=emcfg,
                              mem_params=state["params"], use_memory=tc.use_memory, examples=eval_examples,
                              show_progress=main)
            result, preds = ev["metrics"], ev["predictions"]
        if main:
            _atomic_write_json(workdir / f"eval_{config.task.eval_split}.json",
                               {"metrics": result, "baselines": comparison, "predictions": preds})
    final = {}
    if main:
        log = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
        final = {k: v for k, v in log[-1].items() if k not in ("time",)} if log else {}
        monitor.plot(slot_usage=usage, gate_values=gate)
    monitor.close()
    store.close()
    summary = {
        "backbone_id": backbone_id, "backbone_fingerprint": cfg.fingerprint(),
        "backbone_params": count_params(frozen), "memory_params": count_memory_params(state["params"]),
        "memory_overhead": count_memory_params(state["params"]) / count_params(frozen),
        "task": config.task.name, "use_memory": bool(tc.use_memory), "steps": int(step),
        "resumed_from_step": start_step if restored is not None else None,
        "final_train": final, "eval": result, "eval_baselines": comparison, "eval_examples": len(eval_examples),
        "train_examples": len(train_examples),
        "train_tokens_per_second": (step - start_step) * tokens_per_step / max(train_seconds, 1e-9),
        "train_seconds": train_seconds, "wall_seconds": time.time() - t_start,
        "devices": jax.device_count(), "processes": jax.process_count(), "platform": jax.devices()[0].platform,
        "feature_cache": None if cache is None else {"distinct_segments": cache.num_segments,
                                                     "segments_served": cache.served, "bytes": cache.nbytes},
    }
    if main:
        _atomic_write_json(workdir / "summary.json", summary)
    return summary


def _lr_multipliers(spec: str, params: dict) -> dict[str, float]:
    """train.lr_multipliers parsed and checked against the memory's top-level parameter names."""
    out = parse_name_factors(spec)
    unknown = sorted(set(out) - set(params))
    if unknown:
        raise GmemError(f"train.lr_multipliers names {unknown}, which this memory does not have; its parameters "
                        f"are {sorted(params)}")
    return out


def _warm_start(fresh: dict, source: str, cfg, mcfg, partial: bool = False) -> dict:
    """train.init_memory_from: the memory exported by an earlier run (e.g. a curriculum's previous stage, or a
    memory trained on another task), in place of `fresh`. Its input statistics (standardize_inputs) come with it,
    not re-estimated: the weights were trained against them. Refused unless every parameter of `fresh` is in the
    source with the same shape and the source has no others; with `partial` (train.init_memory_partial) parameters
    the source lacks (e.g. a supporting-fact head when the source was trained on ZsRE) keep their fresh values and
    parameters only the source has are left out; the shared ones must still match."""
    loaded, loaded_mcfg = checkpoint.load_exported_memory(source, cfg)
    want = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(fresh)[0]}
    got = {sharding.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    kept_fresh = sorted(want.keys() - got.keys()) if partial else []
    shared = want.keys() - set(kept_fresh)
    fits = (shared and shared <= got.keys() and all(want[k].shape == got[k].shape for k in shared)
            and (partial or want.keys() == got.keys()))
    if not fits:
        diff = {k: (v, getattr(mcfg, k)) for k, v in loaded_mcfg.to_dict().items() if v != getattr(mcfg, k)}
        raise GmemError(f"train.init_memory_from={source}: that memory's parameters do not fit this config's "
                        f"memory (config fields that differ, theirs vs yours: {diff}); use the same memory.* "
                        "settings" + ("" if partial else ", or train.init_memory_partial=True to start parameters "
                                      "the source lacks fresh and leave out its extra ones"))
    unused = ", ".join(sorted(got.keys() - want.keys())) or "none"
    if partial:
        print(f"init_memory_from {source}: {len(shared)} of {len(want)} parameters loaded; fresh (the source lacks "
              f"them): {', '.join(kept_fresh) or 'none'}; unused from the source: {unused}", flush=True)
    flat = [jnp.asarray(got[k], x.dtype) if k in shared else x for k, x in want.items()]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(fresh), flat)


def _initial_params(config, cfg, mcfg, frozen, examples, cache: Optional[FeatureCache] = None) -> dict:
    """Fresh memory params, or an earlier run's (train.init_memory_from, `_warm_start`); with
    memory.standardize_inputs, fresh ones get input statistics from the first 256 training examples' segments
    (deterministic, so a resumed run builds the same tree before restoring it; every process holds all training
    examples, so all of them estimate from the same segments). With a feature cache those segments' frozen
    features come from (and stay in) the cache: an epoch visits them anyway, so they run through the backbone once
    instead of twice (a run shorter than an epoch keeps a few it never trains on)."""
    params = init_memory(jax.random.PRNGKey(config.train.seed), cfg, mcfg)
    if config.train.init_memory_from:
        return _warm_start(params, config.train.init_memory_from, cfg, mcfg, config.train.init_memory_partial)
    if not mcfg.standardize_inputs:
        return params
    sample = collate(list(examples[:256]))
    T = sample["tokens"].shape[-1]
    features_fn = None if cache is None else lambda tok, msk: encoder_inputs(cache.segments(tok, msk))
    return with_input_statistics(params, frozen, sample["tokens"].reshape(-1, T), sample["token_mask"].reshape(-1, T),
                                 cfg, mcfg, batch_size=config.eval.batch_size, features_fn=features_fn)


def _train_iterator(config, examples, frozen, cfg, mcfg) -> tuple[BatchIterator, Optional[FeatureCache]]:
    """The training batches; with train.feature_cache each batch also carries the cached frozen features (and the
    cache is returned too, for its end-of-run summary)."""
    tc = config.train
    if not tc.feature_cache:
        return BatchIterator(examples, tc.batch_size, seed=tc.seed, collate_fn=collate), None
    if mcfg.injection != "final":
        raise GmemError("train.feature_cache=True needs memory.injection='final' (a residual injection changes the "
                        "backbone's later layers, so they cannot be cached); set train.feature_cache=False")
    cache = FeatureCache(frozen, cfg, write_layer=mcfg.write_layer, chunk=config.eval.batch_size)
    return BatchIterator(examples, tc.batch_size, seed=tc.seed, collate_fn=cached_collate(cache)), cache


def _memory_stats(params, frozen, cfg, mcfg, iterator, mesh, use_memory):
    """Slot usage [S] and per-slot gate openness [S] on one training batch, for the end-of-run plots."""
    probe = BatchIterator(iterator.examples, iterator.global_batch_size, seed=iterator.seed + 1,
                          collate_fn=iterator.collate_fn)
    out = make_eval_step(cfg, mcfg, use_memory=use_memory)(params, frozen, _device_batch(next(probe), mesh, mcfg))
    return np.asarray(out.slot_usage), np.asarray(out.gate_mean)
