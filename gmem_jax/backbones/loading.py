"""Load pretrained backbone weights into our parameter tree (see model.py), never through pickle or remote code.

Sources: a local Hugging Face folder (`config.json` + `model.safetensors`, or a sharded
`model.safetensors.index.json`), a Hugging Face hub id (downloaded with `snapshot_download`, then read as a
folder), or a llama.cpp `.gguf` file (gguf_loader.py).

Every leaf of our tree is described by one `TensorRule` (which checkpoint tensor, whether to transpose, which
piece of a fused tensor) taken from a per-architecture name table, and is built with
`jax.make_array_from_callback`: each device's callback reads only its slice of the checkpoint tensor (for the
stacked layer axis, the slice of each layer's tensor), so a sharded load never materialises a whole model on one
host. Without a mesh the same path places whole leaves on the default device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from gmem_jax.backbones.config import BackboneConfig, config_from_hf
from gmem_jax.backbones.gguf_loader import GGUF_LLAMA_NAMES, open_gguf
from gmem_jax.backbones.model import init_params
from gmem_jax.errors import GmemError

# (leaf path like 'layers/attn/q/kernel', full leaf shape) -> PartitionSpec (needs mesh=) or a jax Sharding
ShardingFn = Callable[[str, tuple], Union[jax.sharding.PartitionSpec, jax.sharding.Sharding]]

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Our module path -> Hugging Face module name ('{i}' = layer index); leaf suffix '.weight' / '.bias'.
# A (name, j, n) entry is the j-th of n equal pieces of the tensor's output axis (GPT-2's fused c_attn).
GPT2_NAMES = {
    "embed": "wte",
    "pos_embed": "wpe",
    "final_norm": "ln_f",
    "layers/attn_norm": "h.{i}.ln_1",
    "layers/attn/q": ("h.{i}.attn.c_attn", 0, 3),
    "layers/attn/k": ("h.{i}.attn.c_attn", 1, 3),
    "layers/attn/v": ("h.{i}.attn.c_attn", 2, 3),
    "layers/attn/o": "h.{i}.attn.c_proj",
    "layers/mlp_norm": "h.{i}.ln_2",
    "layers/mlp/fc": "h.{i}.mlp.c_fc",
    "layers/mlp/proj": "h.{i}.mlp.c_proj",
}
LLAMA_NAMES = {
    "embed": "model.embed_tokens",
    "final_norm": "model.norm",
    "lm_head": "lm_head",
    "layers/attn_norm": "model.layers.{i}.input_layernorm",
    "layers/attn/q": "model.layers.{i}.self_attn.q_proj",
    "layers/attn/k": "model.layers.{i}.self_attn.k_proj",
    "layers/attn/v": "model.layers.{i}.self_attn.v_proj",
    "layers/attn/o": "model.layers.{i}.self_attn.o_proj",
    "layers/mlp_norm": "model.layers.{i}.post_attention_layernorm",
    "layers/mlp/gate": "model.layers.{i}.mlp.gate_proj",
    "layers/mlp/up": "model.layers.{i}.mlp.up_proj",
    "layers/mlp/down": "model.layers.{i}.mlp.down_proj",
}
_LEAF_SUFFIX = {"embedding": "weight", "scale": "weight", "kernel": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class NameTable:
    """How one checkpoint format names our modules.

    kernels_out_in: projection weights are stored [out, in] (nn.Linear, GGUF) and must be transposed to our
    [in, out]; GPT-2's Conv1D already stores [in, out]. prefixes: optional name prefixes tried in order
    (GPT-2 checkpoints exist with and without 'transformer.')."""

    modules: dict
    kernels_out_in: bool
    prefixes: tuple = ("",)


TABLES = {
    "gpt2": NameTable(GPT2_NAMES, kernels_out_in=False, prefixes=("", "transformer.")),
    "llama": NameTable(LLAMA_NAMES, kernels_out_in=True),
    "gguf": NameTable(GGUF_LLAMA_NAMES, kernels_out_in=True),
}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Where one leaf of our tree comes from. name: checkpoint tensor ('{i}' for stacked layer leaves);
    transpose: checkpoint is [out, in]; part (j, n): our leaf is piece j of n along the output axis."""

    name: str
    transpose: bool = False
    part: tuple = (0, 1)

    def source_shape(self, leaf_shape: tuple) -> tuple:
        """The checkpoint shape implied by one (per-layer) leaf shape."""
        shape = leaf_shape[:-1] + (leaf_shape[-1] * self.part[1],)
        return shape[::-1] if self.transpose else shape

    def source_index(self, leaf_index: tuple, leaf_shape: tuple) -> tuple:
        """Map a tuple of slices into our (per-layer) leaf to the slices of the checkpoint tensor."""
        idx = [slice(*s.indices(n)[:2]) for s, n in zip(leaf_index, leaf_shape, strict=True)]
        j, n = self.part
        if n > 1:  # shift the output-axis slice into piece j
            off = j * leaf_shape[-1]
            idx[-1] = slice(idx[-1].start + off, idx[-1].stop + off)
        return tuple(idx[::-1]) if self.transpose else tuple(idx)


def rule_for(path: str, table: NameTable, prefix: str) -> TensorRule:
    """The TensorRule for our leaf `path` (e.g. 'layers/attn/q/kernel')."""
    module, leaf = path.rsplit("/", 1)
    entry = table.modules.get(module)
    if entry is None:
        raise GmemError(f"no checkpoint name for parameter {path!r} in this format; the config asks for a "
                        "module the checkpoint format does not have")
    name, j, n = entry if isinstance(entry, tuple) else (entry, 0, 1)
    transpose = leaf == "kernel" and table.kernels_out_in
    return TensorRule(f"{prefix}{name}.{_LEAF_SUFFIX[leaf]}", transpose, (j, n))


class SafetensorsTensors:
    """Tensors of a Hugging Face folder (single or sharded safetensors), opened lazily and read by slice."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.folder, self._stack, self._open = folder, stack, safe_open
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                self._file_of = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError) as e:
                raise GmemError(f"{index} is not a valid safetensors index ({e}); re-download the checkpoint") from None
        elif (folder / "model.safetensors").is_file():
            with safe_open(str(folder / "model.safetensors"), framework="np") as f:
                self._file_of = {k: "model.safetensors" for k in f.keys()}
        else:
            found = sorted(p.name for p in folder.iterdir())[:8]
            raise GmemError(f"{folder} has neither model.safetensors nor model.safetensors.index.json (found "
                            f"{found}); only safetensors weights are loaded (convert .bin pickles to safetensors)")
        for fname in sorted(set(self._file_of.values())):
            if not (folder / fname).is_file():
                raise GmemError(f"{folder} lists shard {fname!r} in its index but the file is missing; "
                                "download the complete checkpoint")
        self._handles: dict = {}

    def where(self) -> str:
        return str(self.folder)

    def names(self) -> set[str]:
        return set(self._file_of)

    def _slice(self, name: str):
        fname = self._file_of[name]
        if fname not in self._handles:
            self._handles[fname] = self._stack.enter_context(self._open(str(self.folder / fname), framework="np"))
        return self._handles[fname].get_slice(name)

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        return tuple(self._slice(name).get_shape()) if name in self._file_of else None

    def read(self, name: str, index: tuple) -> np.ndarray:
        return self._slice(name)[index]


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    kind: str  # "folder" | "gguf"
    path: Path


def resolve_source(source: Union[str, Path]) -> ResolvedSource:
    """A local folder, a local .gguf file, or a hub id (downloaded: json, safetensors and tokenizer files)."""
    p = Path(source).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise GmemError(f"{p} is a file but not a .gguf file; pass a Hugging Face model folder, a hub id "
                            "or a llama.cpp .gguf file")
        return ResolvedSource("gguf", p)
    if p.is_dir():
        return ResolvedSource("folder", p)
    s = str(source)
    if s.endswith(".gguf") or not _HUB_ID.match(s):
        raise GmemError(f"model {s!r} not found: no such file or folder (and it is not an 'org/name' hub id)")
    try:
        from huggingface_hub import snapshot_download

        return ResolvedSource("folder", Path(snapshot_download(s, allow_patterns=HUB_PATTERNS)))
    except Exception as e:  # offline, unknown repo, gated repo...: all the same to the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise GmemError(f"could not get {s!r} from the Hugging Face hub ({type(e).__name__}: {msg}); check the id "
                        "and the network (HF_HUB_OFFLINE), or pass a local folder") from None


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise GmemError(f"{folder} has no config.json; pass a Hugging Face model folder (config.json + "
                        "*.safetensors), a hub id or a .gguf file")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise GmemError(f"{path} is not valid JSON ({e})") from None


def _choose_prefix(table: NameTable, tensors) -> str:
    names = tensors.names()
    embed = table.modules["embed"] + ".weight"
    for prefix in table.prefixes:
        if prefix + embed in names:
            return prefix
    return table.prefixes[0]  # the missing-tensor check below names what was expected


def _leaf_reader(tensors, rule: TensorRule, leaf_shape: tuple, stacked: bool, dtype) -> Callable:
    """index (tuple of slices into the full leaf) -> np.ndarray of that slice, in `dtype`."""

    def read_one(name, index, shape):
        x = tensors.read(name, rule.source_index(index, shape))
        return (x.T if rule.transpose else x).astype(dtype)

    def read(index):
        if not stacked:
            return read_one(rule.name, index, leaf_shape)
        layers = range(*index[0].indices(leaf_shape[0]))
        return np.stack([read_one(rule.name.format(i=i), index[1:], leaf_shape[1:]) for i in layers])

    return read


def _check_tensor(tensors, rule: TensorRule, path: str, leaf_shape: tuple, stacked: bool):
    per_layer = leaf_shape[1:] if stacked else leaf_shape
    expected = rule.source_shape(per_layer)
    for i in range(leaf_shape[0] if stacked else 1):
        name = rule.name.format(i=i)
        got = tensors.shape(name)
        if got is None:
            raise GmemError(f"checkpoint {tensors.where()} has no tensor {name!r} (needed for {path}); the weights "
                            "do not match the config (wrong model_type, tie_word_embeddings or num layers?)")
        if tuple(got) != expected:
            raise GmemError(f"tensor {name!r} in {tensors.where()} has shape {list(got)} but the config implies "
                            f"{list(expected)} (for {path}); the weights and the config do not match")


def _sharding_for(path: str, shape: tuple, mesh, shardings: Optional[ShardingFn]) -> jax.sharding.Sharding:
    if shardings is None:
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = shardings(path, shape)
    try:
        if isinstance(spec, jax.sharding.Sharding):
            sharding = spec
        elif mesh is None:
            raise GmemError(f"the sharding rule returned PartitionSpec {spec} for {path} but no mesh was given; "
                            "pass mesh= or make the rule return NamedSharding")
        else:
            sharding = jax.sharding.NamedSharding(mesh, spec)
        sharding.shard_shape(shape)  # raises when a mesh axis does not divide its dimension
    except ValueError as e:
        raise GmemError(f"sharding {spec} does not fit parameter {path} of shape {list(shape)} "
                        f"({str(e).splitlines()[0]}); fix the sharding rule") from None
    return sharding


def load_params(cfg: BackboneConfig, tensors, table: NameTable, *, mesh=None, shardings: Optional[ShardingFn] = None
                ) -> dict:
    """Build our parameter tree for `cfg` from a tensor source, leaf by leaf (see module docstring)."""
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    prefix = _choose_prefix(table, tensors)
    dtype = jnp.dtype(cfg.param_dtype)
    plan = []  # validate every tensor and sharding before reading anything
    for key_path, leaf in leaves:
        path = "/".join(k.key for k in key_path)
        rule = rule_for(path, table, prefix)
        stacked = path.startswith("layers/")
        _check_tensor(tensors, rule, path, leaf.shape, stacked)
        plan.append((leaf.shape, _sharding_for(path, leaf.shape, mesh, shardings),
                     _leaf_reader(tensors, rule, leaf.shape, stacked, dtype)))
    arrays = [jax.make_array_from_callback(shape, sharding, read) for shape, sharding, read in plan]
    return jax.tree_util.tree_unflatten(treedef, arrays)


def load_backbone(
    source: Union[str, Path],
    *,
    dtype: str = "float32",
    param_dtype: Optional[str] = None,
    mesh: Optional[jax.sharding.Mesh] = None,
    shardings: Optional[ShardingFn] = None,
) -> tuple[BackboneConfig, dict]:
    """Load (cfg, params) from a Hugging Face folder, a hub id or a llama.cpp .gguf file.

    dtype: compute dtype; param_dtype: storage dtype the weights are cast to while loading (default: dtype).
    shardings: `shardings(path, shape)` -> a PartitionSpec on `mesh`, or a jax Sharding (e.g.
    gmem_jax.training.sharding.loader_sharding(mesh)); paths look like 'layers/attn/q/kernel' and shapes include
    the leading [num_layers] axis of stacked leaves. Each device reads only its slice of each tensor. With a
    mesh and no rule every leaf is replicated; with neither, leaves go to the default device.
    """
    overrides = dict(dtype=dtype, param_dtype=param_dtype or dtype)
    for name in set(overrides.values()):
        try:
            jnp.dtype(name)
        except TypeError:
            raise GmemError(f"unknown dtype {name!r}; use float32 or bfloat16") from None
    resolved = resolve_source(source)
    if resolved.kind == "gguf":
        cfg, tensors = open_gguf(resolved.path, **overrides)
        return cfg, load_params(cfg, tensors, TABLES["gguf"], mesh=mesh, shardings=shardings)
    cfg = config_from_hf(read_hf_config(resolved.path), **overrides)
    with contextlib.ExitStack() as stack:
        tensors = SafetensorsTensors(resolved.path, stack)
        return cfg, load_params(cfg, tensors, TABLES[cfg.arch], mesh=mesh, shardings=shardings)
