"""LoRA finetuning of a frozen backbone on MemLLM write/read examples (teacher forcing).

    python -m gmem_jax.memllm.train --model smollm2 --workdir runs/memllm --steps 200 [--targets q,v ...]

The data are `gmem_jax.memllm.data` examples built from the ZsRE *train* split (`ZsRETask.records("train")`;
dev records are never seen), encoded right-padded to `max_len` tokens. The loss is the mean next-token
cross-entropy over the target tokens (`loss_mask`): the calls and answers, never the prompt nor the spliced
read results.

As in `gmem_jax.training.step`, only the LoRA tree is trained: the frozen backbone is an argument of the
jitted step (never a closure constant), gradients and AdamW state (`make_optimizer`) exist for the LoRA leaves
only, and the train state is donated. The LoRA tree is kept *nested* ({'layers': {'attn': {'q': {'kernel':
{'a', 'b'}}}}}) in the train state, checkpoints and the export, because those name leaves by '/'-joined paths;
`merge_lora` takes the flat form ({'layers/attn/q/kernel': {'a', 'b'}}), see `flatten_lora` / `nest_lora`.

Workdir: checkpoints/ (orbax: LoRA params + optimizer state + step, data-iterator state, settings, run
identity; resumed automatically), metrics.jsonl + tb/ + loss plot, lora/ (`export_params`: memory.safetensors
with 'layers/attn/q/kernel/a'-style names + memory_config.json holding the LoRA settings and the backbone
fingerprint; read back with `load_lora`), summary.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gmem_jax import losses
from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.backbones.model import count_params, forward
from gmem_jax.errors import GmemError
from gmem_jax.memllm.data import KINDS, build_examples, encode_examples
from gmem_jax.memllm.lora import init_lora, merge_lora
from gmem_jax.training import checkpoint
from gmem_jax.training.data import BatchIterator
from gmem_jax.training.loop import run_steps
from gmem_jax.training.monitor import METRICS_FILE, Monitor, read_metrics
from gmem_jax.training.step import init_train_state, make_optimizer, make_schedule

LORA_EXPORT = "lora"  # subfolder of the workdir written by export_params
SUMMARY = "summary.json"
_SHARED_DATA = Path(os.environ.get("GMEM_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
DEFAULT_ZSRE = _SHARED_DATA / "zsre" / "zsre_mend_edit_837.json"
RESUMABLE_CHANGES = ("steps", "log_every", "checkpoint_every")  # settings a resumed run may change


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig:
    """Everything that defines a LoRA run. Resuming requires the same values except RESUMABLE_CHANGES
    (raising `steps` continues training; the LR schedule is then that of the new total)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")
    steps: int = 200
    batch_size: int = 8
    max_len: int = 64  # examples longer than this (in tokens, incl. EOS) are dropped with a logged count
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    kinds: tuple[str, ...] = KINDS  # which memllm.data example kinds to train on
    train_limit: Optional[int] = None  # first N train records (None: all)
    log_every: int = 10
    checkpoint_every: int = 50

    def __post_init__(self):
        for name in ("rank", "steps", "batch_size", "max_len", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise GmemError(f"LoRA training {name}={getattr(self, name)}; it must be >= 1")
        if not self.learning_rate > 0 or not self.alpha > 0:
            raise GmemError(f"learning_rate={self.learning_rate} and alpha={self.alpha} must be > 0")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------------------------------------ LoRA trees

def nest_lora(flat: dict) -> dict:
    """{'layers/attn/q/kernel': {'a', 'b'}} -> {'layers': {'attn': {'q': {'kernel': {'a', 'b'}}}}}."""
    out: dict = {}
    for path, ab in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = dict(ab)
    return out


def flatten_lora(nested: dict) -> dict:
    """The inverse of `nest_lora`: every {'a', 'b'} pair keyed by the '/'-joined path to it."""
    flat = {}

    def walk(node, path):
        if not isinstance(node, dict):
            raise GmemError(f"LoRA tree node {'/'.join(path)!r} is a {type(node).__name__}; expected nested dicts "
                            "ending in {'a', 'b'} pairs (a tree made by nest_lora / load_lora)")
        if set(node) == {"a", "b"}:
            flat["/".join(path)] = node
            return
        for k, v in node.items():
            walk(v, path + [k])

    walk(nested, [])
    return flat


# ------------------------------------------------------------------------------------------------ the model

def lm_loss(lora: dict, frozen: dict, batch: dict, cfg: BackboneConfig, alpha: float) -> tuple[jax.Array, dict]:
    """Mean next-token cross-entropy over target tokens of the LoRA-adapted backbone.

    lora: nested LoRA tree; frozen: backbone params; batch: tokens [B, T] int32, mask [B, T] bool (real tokens,
    right-padded), loss_mask [B, T] bool (True where tokens[:, t] is a target, predicted at t - 1).
    Returns (loss [], {'loss', 'token_acc', 'targets'})."""
    params = merge_lora(frozen, flatten_lora(lora), alpha)
    logits = forward(params, batch["tokens"], cfg, kv_mask=batch["mask"]).logits[:, :-1]  # [B, T-1, V]
    targets = batch["tokens"][:, 1:]
    weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [B, T-1]
    n = jnp.maximum(weight.sum(), 1.0)
    loss = (nll * weight).sum() / n
    acc = ((losses.argmax_last(logits) == targets) * weight).sum() / n
    return loss, {"loss": loss, "token_acc": acc, "targets": weight.sum()}


@functools.lru_cache(maxsize=8)
def make_lora_train_step(cfg: BackboneConfig, settings: LoraTrainConfig):
    """Jitted `train_step(state, frozen, batch) -> (state, metrics)` with `lora_optimizer(settings)`; state =
    init_train_state(nested lora, optimizer) is donated, `frozen` is only read (gradients are taken w.r.t.
    state['params'] alone). Cached per (cfg, settings), so runs with the same settings share one compile."""
    optimizer = lora_optimizer(settings)

    def train_step(state, frozen, batch):
        grads, metrics = jax.grad(lm_loss, has_aux=True)(state["params"], frozen, batch, cfg, settings.alpha)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return jax.jit(train_step, donate_argnums=(0,))


def init_lora_state(cfg: BackboneConfig, settings: LoraTrainConfig) -> dict:
    """The initial train state {'step', 'params': nested LoRA (init_lora, seeded by settings.seed),
    'opt_state'}."""
    return _init_state_program(cfg, settings)(jax.random.PRNGKey(settings.seed))


@functools.lru_cache(maxsize=8)
def _init_state_program(cfg: BackboneConfig, settings: LoraTrainConfig):
    # One jitted program: run eagerly, every random/zeros op of the adapters and optimizer state compiles alone.
    return jax.jit(lambda key: init_train_state(nest_lora(init_lora(cfg, settings.rank, settings.targets, key)),
                                                lora_optimizer(settings)))


def lora_optimizer(settings: LoraTrainConfig) -> optax.GradientTransformation:
    """The project's AdamW (`make_optimizer`) with the run's schedule and regularisation."""
    return make_optimizer(learning_rate=settings.learning_rate, total_steps=settings.steps,
                          warmup_steps=settings.warmup_steps, weight_decay=settings.weight_decay,
                          clip_norm=settings.clip_norm)


def encode_train_data(records: Sequence, tokenizer, settings: LoraTrainConfig, *, pad_id: int, eos_id: int
                      ) -> list[dict]:
    """Rows {'tokens', 'mask', 'loss_mask'} ([max_len] each) of the training examples, for BatchIterator."""
    examples = build_examples(records, settings.kinds, source="zsre train records")
    enc = encode_examples(examples, tokenizer, max_len=settings.max_len, pad_id=pad_id, eos_id=eos_id)
    rows = [{k: v[i] for k, v in enc.items()} for i in range(len(enc["tokens"]))]
    if len(rows) < settings.batch_size:
        raise GmemError(f"only {len(rows)} training examples fit max_len={settings.max_len}, fewer than one batch "
                        f"of {settings.batch_size}; raise max_len, lower batch_size or use more records")
    return rows


def _check_settings(saved: dict, settings: LoraTrainConfig, directory: Path) -> None:
    now = settings.to_dict()
    for key in sorted(set(saved) | set(now)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != now.get(key):
            raise GmemError(f"checkpoint in {directory} was trained with {key}={saved.get(key)} but this run has "
                            f"{key}={now.get(key)}: use the same setting or a new --workdir")


def train_lora(cfg: BackboneConfig, frozen: dict, tokenizer, records: Sequence, workdir: str | Path,
               settings: LoraTrainConfig = LoraTrainConfig(), *, backbone_id: str) -> tuple[dict, dict]:
    """Train (or resume) LoRA adapters on MemLLM examples from ZsRE `records` (use train-split records only).
    Returns (summary, nested LoRA tree) and writes the summary to workdir/summary.json. `backbone_id` names the
    backbone in checkpoints and the export."""
    t_start = time.time()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    records = list(records)[:settings.train_limit]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise GmemError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; MemLLM examples end with EOS")
    rows = encode_train_data(records, tokenizer, settings, pad_id=eos_id if pad_id is None else pad_id,
                             eos_id=int(eos_id))

    schedule = make_schedule(learning_rate=settings.learning_rate, total_steps=settings.steps,
                             warmup_steps=settings.warmup_steps)
    state = init_lora_state(cfg, settings)
    lora = state["params"]
    identity = checkpoint.run_identity(backbone_id, cfg.fingerprint(), lora)
    store = checkpoint.CheckpointStore(workdir / "checkpoints", keep=2)
    iterator = BatchIterator(rows, settings.batch_size, seed=settings.seed)
    start_step = 0
    restored = store.restore_latest(state, expected=identity)
    if restored is not None:
        state, extra = restored
        _check_settings(extra["settings"], settings, workdir / "checkpoints")
        iterator.restore(extra["data"])
        start_step = int(state["step"])
    train_step = make_lora_train_step(cfg, settings)
    monitor = Monitor(workdir, settings.steps, tokens_per_step=settings.batch_size * settings.max_len,
                      resume_step=start_step if restored is not None else None)
    state, step, train_seconds = run_steps(
        state, frozen, train_step, lambda: next(iterator), start_step=start_step, total_steps=settings.steps,
        log_every=settings.log_every, checkpoint_every=settings.checkpoint_every, schedule=schedule,
        monitor=monitor, store=store, lr_option="--lr",
        extra=lambda: {"data": iterator.state(), "settings": settings.to_dict(), **identity})

    export_config = {"lora": settings.to_dict(), "backbone_id": backbone_id,
                     "backbone_fingerprint": cfg.fingerprint()}
    checkpoint.export_params(state["params"], export_config, workdir / LORA_EXPORT)
    monitor.plot()
    monitor.close()
    store.close()
    logged = read_metrics(workdir / METRICS_FILE)
    lora_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    summary = {
        "backbone_id": backbone_id, "backbone_fingerprint": cfg.fingerprint(), "settings": settings.to_dict(),
        "train_records": len(records), "train_examples": len(rows), "steps": step,
        "resumed_from_step": start_step if restored is not None else None,
        "first_logged": logged[0] if logged else None, "final_logged": logged[-1] if logged else None,
        "lora_params": lora_params, "backbone_params": count_params(frozen),
        "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(step - start_step, 1),
        "wall_seconds": time.time() - t_start, "platform": jax.devices()[0].platform,
        "lora_export": str(workdir / LORA_EXPORT),
    }
    (workdir / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary, state["params"]


def load_lora(path_dir: str | Path, cfg: Optional[BackboneConfig] = None) -> tuple[dict, dict]:
    """(flat LoRA tree of jnp arrays for `merge_lora`, export config) from what `train_lora` exported
    (workdir/lora). With `cfg`, the backbone fingerprint must match the one trained on."""
    params, config = checkpoint.import_params(path_dir)
    if "lora" not in config:
        raise GmemError(f"{path_dir} holds exported params without LoRA settings; point at the lora/ folder of a "
                        "`python -m gmem_jax.memllm.train` workdir")
    if cfg is not None and config.get("backbone_fingerprint") != cfg.fingerprint():
        raise GmemError(f"LoRA in {path_dir} was trained on backbone {config.get('backbone_id')} (fingerprint "
                        f"{config.get('backbone_fingerprint')}), not on this one ({cfg.fingerprint()}): pass the "
                        "same --model")
    return jax.tree.map(jnp.asarray, flatten_lora(params)), config


# ------------------------------------------------------------------------------------------------ CLI

def load_model(model: str, dtype: str = "float32") -> tuple[BackboneConfig, dict, Any]:
    """(cfg, frozen params, tokenizer) for a --model: 'smollm2', a .gguf file, a HF folder or hub id."""
    from gmem_jax.backbones.loading import load_backbone
    from gmem_jax.tasks.tokenizers import load_tokenizer
    from gmem_jax.training.builders import resolve_model_source

    source = resolve_model_source(model)
    cfg, params = load_backbone(source, dtype=dtype)
    return cfg, params, load_tokenizer(source)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="'smollm2', a .gguf file, a HF model folder or hub id")
    parser.add_argument("--workdir", required=True, help="run folder (checkpoints, metrics, lora/, summary)")
    parser.add_argument("--data", default=str(DEFAULT_ZSRE), help="ZsRE JSON (MEND/EasyEdit layout)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gmem_jax.memllm.train", description=__doc__.split("\n")[0])
    add_common_args(p)
    d = LoraTrainConfig()
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--targets", default=",".join(d.targets), help="comma-separated, e.g. q,v,o,up,down")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-len", type=int, default=d.max_len)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--kinds", default=",".join(d.kinds), help=f"example kinds among {','.join(KINDS)}")
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N train records")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    args = p.parse_args(argv)
    try:
        from gmem_jax.tasks.zsre import ZsRETask

        settings = LoraTrainConfig(
            rank=args.rank, alpha=args.alpha, targets=tuple(t for t in args.targets.split(",") if t),
            steps=args.steps, batch_size=args.batch_size, max_len=args.max_len, learning_rate=args.lr,
            warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, seed=args.seed,
            kinds=tuple(k for k in args.kinds.split(",") if k), train_limit=args.train_limit,
            log_every=args.log_every, checkpoint_every=args.checkpoint_every)
        records = ZsRETask(args.data).records("train")
        cfg, frozen, tokenizer = load_model(args.model, args.dtype)
        summary, _ = train_lora(cfg, frozen, tokenizer, records, args.workdir, settings, backbone_id=args.model)
    except GmemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
