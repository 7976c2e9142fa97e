"""Several devices: which ``jax.sharding.Mesh`` the engine runs on, and the PartitionSpec of every
parameter and KV cache buffer on it.

The mesh has up to two axes, ``data`` (outer) and ``model``. ``model`` is tensor parallelism in the
Megatron arrangement, so each layer needs no more than one all-reduce after attention and one after
the MLP:

- column-parallel q, k, v, gate, up: their output rows are split (each device computes some heads,
  some of the MLP's hidden units), and so are their biases;
- row-parallel o, down: their input columns are split (each device multiplies its own heads' or
  hidden units' activations; GSPMD sums the partial outputs);
- the KV cache over its kv-head axis, the axis the q/k/v rows of one device's heads produce.

The token embedding and the output head stay replicated: split over the vocabulary rows, the
tied embedding's row gather and head made SmolLM2's decode 5x slower than with the MLP split alone
(2 forced CPU devices: 3.8 vs 19 tok/s), as GSPMD moved the table between devices every step.

Attention is split only when the mesh's model size divides the number of *kv* heads: query head
``kv * G + g`` belongs to kv head ``kv``, so contiguous blocks of query rows then line up with the
blocks of kv heads and of the cache. Any dimension the model size does not divide stays replicated
(SmolLM2-135M has 9 query and 3 kv heads: on 2 devices its attention is replicated, its MLP's 1536
hidden units are split). ``data`` splits the cache's batch rows (slots) where it divides them and
replicates every parameter.

Packed GGUF weights (``packed.PackedWeight``: ``codes`` uint32 [out / n, in], ``scale`` and
``minimum`` [out, in / 32]) are split as one matrix, all leaves alike or none:
- rows: ``codes`` [out / n, in] along its first axis needs out / n divisible by the model size
  (word row r holds logical rows r * n .. r * n + n - 1, so device k's word rows hold exactly its
  logical rows), ``scale`` / ``minimum`` along ``out``;
- columns: ``codes`` along ``in`` and ``scale`` / ``minimum`` along their in / 32 blocks, which needs
  in / 32 divisible by the model size (a device's columns are then whole blocks with their scales).

Placement is all the engine does: parameters and cache are ``jax.device_put`` with NamedShardings and
jit's GSPMD propagation shards every program from its inputs. No model code changes.

One device, or ``NBCHAT_MESH=none``: no mesh at all, so the single-device path is exactly the same.
Holds no model math and no scheduling.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nbchat.engine.cache import KVCache
from nbchat.engine.config import ModelConfig
from nbchat.errors import InvalidRequestError

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)  # mesh axes in device-grid order
ENV_VAR = "NBCHAT_MESH"
_OFF = ("none", "off", "1")

# Module names (the last module of a parameter's path in ``model.Decoder``) by how they split.
_COLUMN_PARALLEL = frozenset({"q", "k", "v", "gate", "up"})
_ROW_PARALLEL = frozenset({"o", "down"})
_ATTENTION = frozenset({"q", "k", "v", "o"})


def _invalid(source: str, message: str) -> InvalidRequestError:
    param = "mesh" if source == "mesh" else ENV_VAR
    return InvalidRequestError(f"{source}: {message}", param=param, code="invalid_value")


def parse_mesh_spec(spec: str, source: str = "mesh") -> dict[str, int]:
    """``"model=2"``, ``"data=2,model=2"``, ``"none"``/``"off"``/``"1"`` (no mesh: {}) -> axis sizes.

    ``source`` names where the text came from (``mesh`` or ``NBCHAT_MESH``) in the error."""
    text = spec.strip().lower()
    if text in _OFF:
        return {}
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, equals, size = (piece.strip() for piece in part.partition("="))
        if not equals or name not in AXES or not size.isdigit() or int(size) < 1 or name in sizes:
            raise _invalid(
                source,
                f"cannot read {spec!r}: write axis=size pairs over the axes {' and '.join(AXES)}, e.g. "
                f"'model=2' or 'data=2,model=2', or 'none' for a single device.",
            )
        sizes[name] = int(size)
    return {name: sizes[name] for name in AXES if name in sizes}


def make_mesh(sizes: Mapping[str, int], source: str = "mesh",
              devices: Sequence[jax.Device] | None = None) -> Mesh | None:
    """A Mesh over the first prod(sizes) devices with ``sizes``' axes (None when that is one device)."""
    devices = list(jax.devices() if devices is None else devices)
    wanted = math.prod(sizes.values())
    if wanted > len(devices):
        raise _invalid(
            source,
            f"{dict(sizes)} needs {wanted} devices but {len(devices)} are present: ask for at most "
            f"{len(devices)} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX "
            "starts makes N host devices).",
        )
    if wanted == 1:
        return None
    grid = np.array(devices[:wanted], dtype=object).reshape(tuple(sizes.values()))
    return Mesh(grid, tuple(sizes))


def choose_mesh(requested: Mesh | str | None = None) -> Mesh | None:
    """The mesh the engine runs on: ``requested`` (a Mesh or a spec string), else ``$NBCHAT_MESH``,
    else every device on the model axis when there are several, and None for one device."""
    if isinstance(requested, Mesh):
        unknown = [name for name in requested.axis_names if name not in AXES]
        if unknown:
            raise _invalid("mesh", f"axis {unknown[0]!r} is not one the engine shards over: name the "
                                   f"Mesh's axes from {AXES}.")
        return requested if requested.size > 1 else None
    if requested is not None and not isinstance(requested, str):
        raise _invalid("mesh", f"expected a jax.sharding.Mesh or a spec string such as 'model=2', got "
                               f"{type(requested).__name__}.")
    source, spec = ("mesh", requested) if requested is not None else (ENV_VAR, os.environ.get(ENV_VAR))
    if spec is None or not spec.strip() or spec.strip().lower() == "auto":
        count = len(jax.devices())
        return make_mesh({MODEL: count}, source) if count > 1 else None
    return make_mesh(parse_mesh_spec(spec, source), source)


def describe(mesh: Mesh | None) -> str:
    """``"data=2,model=2"``, or ``"none"``."""
    if mesh is None:
        return "none"
    return ",".join(f"{name}={size}" for name, size in mesh.shape.items())


def _axis_size(mesh: Mesh, name: str) -> int:
    return mesh.shape.get(name, 1)


def _divides(size: int, *dims: int) -> bool:
    return size > 1 and all(dim % size == 0 for dim in dims)


def _matrix_specs(module: str, leaves: Mapping[str, tuple[int, ...]], config: ModelConfig,
                  model_size: int) -> dict[str, PartitionSpec]:
    """The specs of one matrix's leaves (``weight`` or ``codes``/``scale``/``minimum``, ``bias``),
    keyed by leaf name; see the module docstring."""
    replicated = {name: PartitionSpec() for name in leaves}
    if module in _ATTENTION and not _divides(model_size, config.num_kv_heads):
        return replicated
    matrices = {name: shape for name, shape in leaves.items() if name != "bias"}
    if module in _COLUMN_PARALLEL:
        if not _divides(model_size, *(shape[0] for shape in leaves.values())):
            return replicated
        return {name: PartitionSpec(MODEL, *([None] * (len(shape) - 1))) for name, shape in leaves.items()}
    if module in _ROW_PARALLEL:
        if not _divides(model_size, *(shape[-1] for shape in matrices.values())):
            return replicated
        specs = {name: PartitionSpec(None, MODEL) for name in matrices}
        return specs | {name: PartitionSpec() for name in leaves if name == "bias"}
    return replicated


def _names(path: tuple) -> tuple[str, ...]:
    """A state leaf's path as names: ('layers', '0', 'attn', 'q', 'codes')."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            names.append(key.name)
    return tuple(names)


def parameter_specs(state: Any, config: ModelConfig, mesh: Mesh) -> Any:
    """The PartitionSpec of every leaf of the decoder's state (``nnx.split``), in its structure.

    Norm weights and anything not named in the module docstring stay replicated."""
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = [_names(path) for path, _ in with_paths]
    matrices: dict[tuple[str, ...], dict[str, tuple[int, ...]]] = {}
    for leaf_names, (_, leaf) in zip(names, with_paths, strict=True):
        matrices.setdefault(leaf_names[:-1], {})[leaf_names[-1]] = tuple(leaf.shape)
    model_size = _axis_size(mesh, MODEL)
    specs = {
        prefix: _matrix_specs(prefix[-1] if prefix else "", leaves, config, model_size)
        for prefix, leaves in matrices.items()
    }
    return jax.tree_util.tree_unflatten(treedef, [specs[n[:-1]][n[-1]] for n in names])


def cache_specs(config: ModelConfig, mesh: Mesh, batch_size: int) -> KVCache:
    """The PartitionSpecs of a cache of ``batch_size`` rows: rows over ``data``, kv heads over
    ``model``, where the axis size divides them."""
    rows = DATA if _divides(_axis_size(mesh, DATA), batch_size) else None
    heads = MODEL if _divides(_axis_size(mesh, MODEL), config.num_kv_heads) else None
    spec = PartitionSpec(rows, heads, None, None)
    per_layer = tuple(spec for _ in range(config.num_layers))
    return KVCache(per_layer, per_layer)


def _shardings(specs: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs,
                        is_leaf=lambda node: isinstance(node, PartitionSpec))


def place_parameters(state: Any, config: ModelConfig, mesh: Mesh) -> Any:
    """The decoder's state on ``mesh``, each leaf split as ``parameter_specs`` says."""
    return jax.device_put(state, _shardings(parameter_specs(state, config, mesh), mesh))


def place_cache(cache: KVCache, config: ModelConfig, mesh: Mesh) -> KVCache:
    """``cache`` on ``mesh`` as ``cache_specs`` says (a no-op for buffers already placed so)."""
    return jax.device_put(cache, _shardings(cache_specs(config, mesh, cache.batch_size), mesh))
