"""Device mesh and parameter/batch shardings.

Mesh axes (any subset may be present; a rule naming an absent axis simply does not shard along it):
  'data'   pure data parallelism (batch split, parameters replicated);
  'fsdp'   batch split AND the frozen backbone's weights split (gathered per layer inside the scan);
  'tensor' optional Megatron-style split of attention heads / MLP width / vocabulary.

Sharding rules are a table of (regex over the '/'-joined tree path, PartitionSpec), first match wins, no match
means replicated. A dimension that a rule would shard but whose size is not divisible by the mesh axes is
replicated instead, so tiny test models never fail to place.

Backbone layout choice: 'fsdp' always splits the hidden axis D, the one axis every backbone matrix has and that
is a multiple of 64 in every real model; splitting the vocabulary instead would leave GPT-2's embedding
(V = 50257, prime-ish) fully replicated. 'tensor' takes the other axis (heads, MLP width, vocabulary). The
leading [num_layers] axis of stacked layer leaves is never sharded: the scan slices it.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from gmem_jax.errors import GmemError

Rules = Sequence[tuple[str, P]]

BATCH_AXES = ("data", "fsdp")  # mesh axes the batch dimension is split over

# Frozen backbone (paths documented at the top of gmem_jax/backbones/model.py). Shapes: V vocab, D hidden,
# L layers, F MLP width, H*E / K*E query / key-value width, P positions.
BACKBONE_RULES: Rules = (
    (r"^embed/embedding$", P("tensor", "fsdp")),  # [V, D]
    (r"^pos_embed/embedding$", P(None, "fsdp")),  # [P, D]
    (r"^lm_head/kernel$", P("fsdp", "tensor")),  # [D, V]
    (r"^layers/attn/(q|k|v)/kernel$", P(None, "fsdp", "tensor")),  # [L, D, H*E | K*E]
    (r"^layers/attn/o/kernel$", P(None, "tensor", "fsdp")),  # [L, H*E, D]
    (r"^layers/mlp/(fc|gate|up)/kernel$", P(None, "fsdp", "tensor")),  # [L, D, F]
    (r"^layers/mlp/(proj|down)/kernel$", P(None, "tensor", "fsdp")),  # [L, F, D]
    # biases and norm scales: small, replicated (no rule).
)

# Memory leaves whose name matches are the slot bank [slots, mem_dim] (and the keyed write's slot addresses, the
# same shape): the only memory tensors worth sharding.
# re.search, so the same rule also places the optimizer's moments (opt_state/.../mu/.../slots) like the params.
SLOT_BANK_PATTERN = r"(^|/)(slots|slot_bank|memory_bank|slot_keys)$"


def memory_rules(shard_slots: bool = False) -> Rules:
    """Rules for the trainable memory tree (and its optimizer state): replicated, or the slot bank split over
    its slot axis on 'fsdp' when `shard_slots` (for very large banks)."""
    return ((SLOT_BANK_PATTERN, P("fsdp", None)),) if shard_slots else ()


def make_mesh(axes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the given named axis sizes, e.g. {"data": -1, "fsdp": 8, "tensor": 1}; one size may be -1
    (= all remaining devices). The product must equal the device count (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = dict(axes)
    unknown = [k for k, v in sizes.items() if v == -1]
    if len(unknown) > 1:
        raise GmemError(f"mesh axes {unknown} are all -1; give at most one axis size -1 (the rest of the devices)")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise GmemError(f"mesh axis sizes must be positive or -1, got {sizes}")
    known = math.prod(v for v in sizes.values() if v != -1)
    if unknown:
        if n % known:
            raise GmemError(f"mesh {sizes}: {n} devices are not divisible by the fixed axes' product {known}; "
                            "change the axis sizes")
        sizes[unknown[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise GmemError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n} are available; "
                        "make the product of the axis sizes equal the device count (or use -1 for one axis)")
    names = tuple(sizes)
    return jax.make_mesh(tuple(sizes.values()), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def path_str(path: tuple) -> str:
    """A jax key path -> 'a/b/0/c'."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """The PartitionSpec of one leaf: the first rule whose regex matches `path`, with every mesh axis that is
    absent from the mesh or does not divide its dimension dropped (that dimension is then replicated)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            break
    else:
        return P()
    if len(spec) > len(shape):
        raise GmemError(f"sharding rule {pattern!r} gives {len(spec)}-d spec {spec} but tensor {path!r} has shape "
                        f"{tuple(shape)}; fix the rule table")
    out = []
    for dim, entry in zip(shape, spec):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        names = tuple(a for a in names if a in mesh.shape and mesh.shape[a] > 1)
        if not names or dim % math.prod(mesh.shape[a] for a in names):
            out.append(None)
        else:
            out.append(names[0] if len(names) == 1 else names)
    while out and out[-1] is None:  # canonical form: P(None, 'fsdp') and P(None, 'fsdp', None) are the same
        out.pop()
    return P(*out)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of NamedSharding matching `tree` (arrays or jax.ShapeDtypeStruct leaves)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, spec_for(path_str(p), np.shape(x), mesh, rules)), tree)


def loader_sharding(mesh: Mesh, rules: Rules = BACKBONE_RULES) -> Callable[[str, Sequence[int]], NamedSharding]:
    """The adapter a weight loader calls per tensor: (param-tree path 'layers/attn/q/kernel', full shape
    including the stacked [num_layers] axis) -> where to place it."""
    return lambda path, shape: NamedSharding(mesh, spec_for(path, shape, mesh, rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ('data', 'fsdp') (those present in the mesh), other axes replicated."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
    return NamedSharding(mesh, P(axes if axes else None))


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pin an activation's leading (batch) axis to the mesh's batch axes; identity outside a mesh context.

    x [B, ...]. Inside `jax.set_mesh(mesh)` (the trainer and the AOT bench trace under one) this is a
    `with_sharding_constraint` to P(('data', 'fsdp')) on axis 0 (whichever of them the mesh has with size > 1).
    Why: the FSDP rules split every weight's D axis, and without a constraint on the activations XLA's partitioner
    is free to keep the residual stream, MLP activations and logits at the *global* batch and all-reduce partial
    matmuls over D instead of all-gathering each layer's weights (measured: bench.scale_aot --explain, f32[8, 512,
    128256] logits per device in the 8B compile). With the constraint each device keeps 1/n of the batch, which
    is what lets the per-device batch grow. A batch that does not divide the axes is left unconstrained."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or x.ndim == 0 or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
