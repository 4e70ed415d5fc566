"""Optimizer, train state and the jitted train / eval steps of the memory.

Only the memory params are differentiated and optimised: the frozen backbone tree is an *argument* of the
jitted step (so it can be bf16 and FSDP-sharded, and is never baked into the graph as a constant), it never
enters the optimizer state, and the train state buffers are donated so the update happens in place.
"""
from __future__ import annotations

import functools
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from gmem_jax.backbones.config import BackboneConfig
from gmem_jax.errors import GmemError
from gmem_jax.memory.config import MemoryConfig
from gmem_jax.memory.model import forward_segments

TrainState = dict  # {'step': int32 [], 'params': memory params, 'opt_state': optax state over params}


def make_schedule(*, learning_rate: float, total_steps: int, warmup_steps: int = 0, end_lr_fraction: float = 0.1
                  ) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `end_lr_fraction` of it at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup_steps else learning_rate, peak_value=learning_rate,
        warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * end_lr_fraction)


def parse_name_factors(spec: str, option: str = "train.lr_multipliers", example: str = "inject_fuse=0.1"
                       ) -> dict[str, float]:
    """'inject_fuse=0.1,decoder=0.5' -> {'inject_fuse': 0.1, 'decoder': 0.5}: the "NAME=FACTOR,..." options
    (train.lr_multipliers, train.kind_loss_weights); `option` and `example` word the error."""
    out = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = -1.0
        if not sep or not name.strip() or not 0 <= factor < float("inf"):
            raise GmemError(f"{option}: {item!r} is not NAME=FACTOR (finite FACTOR >= 0), e.g. {example!r}")
        out[name.strip()] = factor
    return out


# Parameters that are states or addresses, not maps: decaying them towards 0 would erase what they hold.
_NO_DECAY = ("slots", "slot_keys")


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_steps: int = 0, weight_decay: float = 0.01,
                   clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999, end_lr_fraction: float = 0.1,
                   lr_multipliers: Optional[Mapping[str, float]] = None) -> optax.GradientTransformation:
    """AdamW with global-norm clipping and `make_schedule`. Weight decay applies to matrices only (not biases,
    norms, gates, the slot bank or the keyed write's slot addresses), as is usual for small adapters.
    `lr_multipliers` {top-level parameter name: factor} scales the learning rate (and with it the decoupled weight
    decay) of those parameters, e.g. a wide layer whose per-step output change, ~lr x sum|input|, is far larger
    than the rest's."""
    schedule = make_schedule(learning_rate=learning_rate, total_steps=total_steps, warmup_steps=warmup_steps,
                             end_lr_fraction=end_lr_fraction)
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and getattr(path[0], "key", None) not in _NO_DECAY, params)
    parts = [optax.clip_by_global_norm(clip_norm),
             optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)]
    if lr_multipliers:
        factor = lambda path: lr_multipliers.get(getattr(path[0], "key", None), 1.0)  # noqa: E731
        parts.append(optax.stateless(lambda updates, params=None: jax.tree_util.tree_map_with_path(
            lambda path, u: u * factor(path), updates)))
    return optax.chain(*parts)


def init_train_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def make_train_step(cfg: BackboneConfig, mcfg: MemoryConfig, optimizer: optax.GradientTransformation, *,
                    use_memory: bool = True) -> Callable:
    """Returns jitted `train_step(state, frozen, batch) -> (state, metrics)`; `state` is donated."""

    def loss_fn(params, frozen, batch):
        out = forward_segments(params, frozen, batch, cfg, mcfg, use_memory=use_memory)
        return out.loss, out.metrics

    def train_step(state: TrainState, frozen: dict, batch: dict):
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state["params"], frozen, batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(cfg: BackboneConfig, mcfg: MemoryConfig, *, use_memory: bool = True) -> Callable:
    """Returns jitted `eval_step(params, frozen, batch) -> SegmentOutputs` (teacher-forced)."""
    return jax.jit(functools.partial(forward_segments, cfg=cfg, mcfg=mcfg, use_memory=use_memory))
