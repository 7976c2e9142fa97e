"""Checkpoint files -> the parameter pytree of the decoder (see ``expected_param_shapes``).

Reads GGUF files (llama.cpp; dequantized with ``gguf.quants``, llama.cpp's Q/K row permutation undone)
and Hugging Face safetensors directories (single or sharded). Every tensor is shape-checked against
the ModelConfig before any data is read; layers are stacked on a leading axis for ``lax.scan``; every
linear weight stays in ``[out, in]`` layout. Holds no model code and no tokenizer code.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from nbchat.engine.config import ModelConfig, config_from_gguf, config_from_hf
from nbchat.errors import InvalidRequestError, ModelNotFoundError, UnsupportedModelError

DTYPES = ("float32", "bfloat16")

# GGML tensor types the loader dequantizes (names of gguf.GGMLQuantizationType members). The K-quant
# mixes (Q4_K_M, Q5_K_M) fall back to Q5_0/Q5_1/Q8_0 for rows that are not a multiple of 256.
GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# Per-layer tensors: pytree key under "layers" -> (GGUF name, Hugging Face name).
LAYER_TENSOR_NAMES = {
    "attn_norm": ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    "q": ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    "k": ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    "v": ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    "o": ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    "q_bias": ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    "k_bias": ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    "v_bias": ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    "mlp_norm": ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    "gate": ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    "up": ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "down": ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
}
# Whole-model tensors: pytree key -> (GGUF name, Hugging Face name).
TOP_TENSOR_NAMES = {
    "embed": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm": ("output_norm.weight", "model.norm.weight"),
    "lm_head": ("output.weight", "lm_head.weight"),
}
_GGUF, _HF = 0, 1

# llama.cpp's converter permutes Q/K rows of these architectures for its interleaved RoPE.
_GGUF_PERMUTED_ARCHITECTURES = ("llama",)
# llama.cpp writes Llama 3 RoPE scaling as this tensor; it becomes part of the config, not a param.
_GGUF_ROPE_FREQS = "rope_freqs.weight"


def expected_param_shapes(config: ModelConfig) -> dict[str, Any]:
    """The parameter pytree's structure with a shape tuple at each leaf (layer tensors without the
    leading L axis)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layers: dict[str, tuple[int, ...]] = {
        "attn_norm": (d,),
        "q": (q_rows, d),
        "k": (kv_rows, d),
        "v": (kv_rows, d),
        "o": (d, q_rows),
        "mlp_norm": (d,),
        "gate": (f, d),
        "up": (f, d),
        "down": (d, f),
    }
    if config.attention_bias:
        layers |= {"q_bias": (q_rows,), "k_bias": (kv_rows,), "v_bias": (kv_rows,)}
    shapes: dict[str, Any] = {"embed": (v, d), "layers": layers, "final_norm": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (v, d)
    return shapes


def _numpy_dtype(dtype: str) -> np.dtype:
    if dtype == "float32":
        return np.dtype(np.float32)
    if dtype == "bfloat16":
        import ml_dtypes  # jax's own dependency; numpy has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    raise InvalidRequestError(
        f"dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}.",
        param="dtype",
        code="invalid_value",
    )


def _tensor_plan(
    config: ModelConfig, convention: int
) -> Iterator[tuple[str, int | None, str, tuple[int, ...]]]:
    """(pytree key, layer index or None, file tensor name, expected shape) for every parameter."""
    shapes = expected_param_shapes(config)
    for key, shape in shapes.items():
        if key != "layers":
            yield key, None, TOP_TENSOR_NAMES[key][convention], shape
    for key, shape in shapes["layers"].items():
        for i in range(config.num_layers):
            yield key, i, LAYER_TENSOR_NAMES[key][convention].format(i=i), shape


def _check_tensors(
    config: ModelConfig,
    convention: int,
    file_shapes: Mapping[str, tuple[int, ...]],
    ignorable: Callable[[str], bool],
    source: str,
) -> None:
    """Every expected tensor present with its shape and nothing unexplained left over; all problems in
    one message, before any tensor data is read."""
    problems = []
    expected_names = set()
    for _, _, name, shape in _tensor_plan(config, convention):
        expected_names.add(name)
        if name not in file_shapes:
            problems.append(f"tensor {name!r} is missing")
        elif tuple(file_shapes[name]) != shape:
            problems.append(f"tensor {name!r} has shape {list(file_shapes[name])}, expected {list(shape)}")
    unexpected = sorted(name for name in file_shapes if name not in expected_names and not ignorable(name))
    if unexpected:
        shown = ", ".join(map(repr, unexpected[:8])) + (" ..." if len(unexpected) > 8 else "")
        problems.append(
            f"{len(unexpected)} tensor(s) the {config.architecture} decoder has no place for: {shown}"
        )
    if problems:
        summary = (
            f"{config.architecture}, {config.num_layers} layers, hidden {config.hidden_size}, ffn "
            f"{config.intermediate_size}, {config.num_heads} heads / {config.num_kv_heads} kv heads of "
            f"{config.head_dim}, vocab {config.vocab_size}, tied embeddings {config.tie_word_embeddings}"
        )
        shown_problems = "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
        raise UnsupportedModelError(f"{source} does not match its config ({summary}): {shown_problems}.")


def _assemble(
    config: ModelConfig,
    convention: int,
    read: Callable[[str, str], np.ndarray],
    dtype: str,
    progress: bool,
    description: str,
) -> dict[str, Any]:
    """Read every tensor into the pytree, one stacked [L, ...] group at a time.

    Each group is filled in a host buffer of the target dtype and moved to the device before the
    next group starts, so the peak is the model once plus one group (never three copies).
    ``read(name, key)`` returns one tensor as a float array in [out, in] layout.
    """
    import jax
    from tqdm.auto import tqdm

    target = _numpy_dtype(dtype)
    shapes = expected_param_shapes(config)
    count = sum(1 for _ in _tensor_plan(config, convention))
    params: dict[str, Any] = {"layers": {}}
    with tqdm(total=count, desc=description, unit="tensor", disable=not progress, leave=False) as bar:
        for key in shapes:
            if key == "layers":
                continue
            name = TOP_TENSOR_NAMES[key][convention]
            params[key] = jax.device_put(np.asarray(read(name, key)).astype(target, copy=False))
            bar.update()
        for key, shape in shapes["layers"].items():
            stacked = np.empty((config.num_layers, *shape), dtype=target)
            for i in range(config.num_layers):
                stacked[i] = read(LAYER_TENSOR_NAMES[key][convention].format(i=i), key)
                bar.update()
            params["layers"][key] = jax.device_put(stacked)
            del stacked
    return params


# ---------------------------------------------------------------------------------------------------------
# GGUF


def _gguf_metadata(reader: Any, *, with_tokenizer: bool) -> dict[str, Any]:
    # Skipping the tokenizer arrays (tens of thousands of strings) when the caller does not need them.
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.") and (with_tokenizer or not name.startswith("tokenizer.ggml."))
    }


def _open_gguf(path: str | Path) -> Any:
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        raise UnsupportedModelError(f"{str(path)!r} is not a readable GGUF file: {error}") from error


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Every metadata field of a GGUF file as a Python value (str, int, float, bool or list),
    tokenizer fields (``tokenizer.ggml.tokens``, ``tokenizer.chat_template`` ...) included."""
    return _gguf_metadata(_open_gguf(path), with_tokenizer=True)


def _unpermute_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation (interleaved RoPE pairs -> Hugging Face's half split).

    llama.cpp stores head h's rows as (pair j, member t) where Hugging Face has (half t, index j):
    reshape to [heads, hd/2, 2, ...] and swap the two inner axes back.
    """
    pairs = rows.shape[0] // num_heads // 2
    return rows.reshape(num_heads, pairs, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def load_gguf(
    path: str | Path, dtype: str = "float32", progress: bool = True, pack: bool = True
) -> tuple[ModelConfig, dict[str, Any]]:
    """Load a llama.cpp GGUF file (architectures llama and qwen2) as (ModelConfig, params).

    Quantized tensors are dequantized to ``dtype`` ("float32" or "bfloat16"); tensor types other than
    ``GGUF_TENSOR_TYPES`` raise ``UnsupportedModelError`` naming the tensor and its type. With
    ``pack``, linear weights stored as Q4_0, Q4_1 or Q8_0 are also kept as their block codes in
    ``params["packed"]`` (see ``model.py`` and ``packed.py``), which one-token steps read instead:
    the same values, about half the time per decoded token on SmolLM2-135M.
    """
    from gguf.quants import dequantize

    _numpy_dtype(dtype)  # a bad dtype fails before the file is read
    path = Path(path)
    reader = _open_gguf(path)
    metadata = _gguf_metadata(reader, with_tokenizer=False)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    # GGUF lists dimensions innermost first; numpy order is the reverse.
    file_shapes = {
        name: tuple(int(n) for n in reversed(tensor.shape.tolist())) for name, tensor in tensors.items()
    }

    for name, tensor in tensors.items():
        if tensor.tensor_type.name not in GGUF_TENSOR_TYPES:
            raise UnsupportedModelError(
                f"GGUF tensor {name!r} in {path.name} has type {tensor.tensor_type.name}; nbchat reads "
                f"{', '.join(GGUF_TENSOR_TYPES)}. Use a GGUF quantized to one of those (e.g. Q4_K_M, Q8_0)."
            )

    embedding = file_shapes.get(TOP_TENSOR_NAMES["embed"][_GGUF])
    rope_freqs = None
    if _GGUF_ROPE_FREQS in tensors:
        rope_freqs = dequantize(tensors[_GGUF_ROPE_FREQS].data, tensors[_GGUF_ROPE_FREQS].tensor_type)
    config = config_from_gguf(
        metadata,
        tie_word_embeddings=TOP_TENSOR_NAMES["lm_head"][_GGUF] not in tensors,
        vocab_size=embedding[0] if embedding else None,
        rope_freqs=rope_freqs.reshape(-1).tolist() if rope_freqs is not None else None,
    )
    _check_tensors(
        config, _GGUF, file_shapes, lambda name: name == _GGUF_ROPE_FREQS, f"GGUF file {path.name}"
    )

    permuted_heads = {}
    if config.architecture in _GGUF_PERMUTED_ARCHITECTURES:
        permuted_heads = {"q": config.num_heads, "k": config.num_kv_heads}

    def read(name: str, key: str) -> np.ndarray:
        tensor = tensors[name]
        values = dequantize(tensor.data, tensor.tensor_type).reshape(file_shapes[name])
        if key in permuted_heads:
            values = _unpermute_rows(values, permuted_heads[key])
        return values

    params = _assemble(config, _GGUF, read, dtype, progress, f"Loading {path.name}")
    if pack:
        packed_params = _packed_gguf_params(config, tensors, file_shapes, permuted_heads, progress)
        if packed_params["layers"] or "head" in packed_params:
            params["packed"] = packed_params
    return config, params


def _packed_gguf_params(
    config: ModelConfig,
    tensors: Mapping[str, Any],
    file_shapes: Mapping[str, tuple[int, ...]],
    permuted_heads: Mapping[str, int],
    progress: bool,
) -> dict[str, Any]:
    """``params["packed"]``: each linear layer weight whose tensors (in every layer) share one
    packable GGML type, as a PackedWeight stacked on a leading layer axis, and the output head if
    packable."""
    import jax
    from tqdm.auto import tqdm

    from nbchat.engine import packed

    def packed_tensor(name: str, key: str) -> packed.PackedWeight:
        tensor, shape = tensors[name], file_shapes[name]
        order = None
        if key in permuted_heads:  # the rows' new order, as _unpermute_rows reorders values
            order = _unpermute_rows(np.arange(shape[0]), permuted_heads[key])
        return packed.packed_from_gguf(tensor.data, tensor.tensor_type.name, shape, order)

    def packable(names: list[str]) -> bool:
        types = {tensors[name].tensor_type.name for name in names}
        return len(types) == 1 and packed.packable(types.pop(), file_shapes[names[0]])

    linear_keys = [key for key, shape in expected_param_shapes(config)["layers"].items() if len(shape) == 2]
    result: dict[str, Any] = {"layers": {}}
    with tqdm(linear_keys, desc="Packing weights", unit="tensor", disable=not progress, leave=False) as bar:
        for key in bar:
            names = [LAYER_TENSOR_NAMES[key][_GGUF].format(i=i) for i in range(config.num_layers)]
            if packable(names):
                per_layer = [packed_tensor(name, key) for name in names]
                stacked = jax.tree.map(lambda *layers: np.stack(layers), *per_layer)
                result["layers"][key] = jax.device_put(stacked)
    head_key = "embed" if config.tie_word_embeddings else "lm_head"
    head_name = TOP_TENSOR_NAMES[head_key][_GGUF]
    if packable([head_name]):
        result["head"] = jax.device_put(packed_tensor(head_name, head_key))
    return result


# ---------------------------------------------------------------------------------------------------------
# Hugging Face safetensors


def _safetensors_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file holding it (one file, or shards listed by the index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UnsupportedModelError(f"{index} has no 'weight_map' object.")
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        return {"": single}
    if any(directory.glob("*.bin")) or any(directory.glob("*.pth")):
        raise UnsupportedModelError(
            f"{directory} holds PyTorch pickle weights only; nbchat reads model.safetensors (or a GGUF file)."
        )
    raise ModelNotFoundError(f"{directory} has no model.safetensors or model.safetensors.index.json.")


def load_safetensors_dir(
    path: str | Path, dtype: str = "float32", progress: bool = True
) -> tuple[ModelConfig, dict[str, Any]]:
    """Load a Hugging Face model directory (config.json + model.safetensors, or shards with
    model.safetensors.index.json) as (ModelConfig, params) in ``dtype`` ("float32" or "bfloat16")."""
    from safetensors import safe_open

    _numpy_dtype(dtype)
    directory = Path(path)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelNotFoundError(f"{directory} has no config.json; expected a Hugging Face model directory.")
    config = config_from_hf(json.loads(config_path.read_text()))
    files_by_name = _safetensors_files(directory)

    with ExitStack() as stack:
        handles = {}
        for file in sorted(set(files_by_name.values())):
            if not file.is_file():
                raise ModelNotFoundError(
                    f"Shard {file.name} listed in the index is missing from {directory}."
                )
            handles[file] = stack.enter_context(safe_open(str(file), framework="numpy"))
        handle_by_name, file_shapes = {}, {}
        for handle in handles.values():
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not mappings)
                handle_by_name[name] = handle
                file_shapes[name] = tuple(handle.get_slice(name).get_shape())

        def ignorable(name: str) -> bool:
            # Old checkpoints save RoPE's inverse frequencies; tied ones may save the head anyway.
            return name.endswith("rotary_emb.inv_freq") or (
                config.tie_word_embeddings and name == TOP_TENSOR_NAMES["lm_head"][_HF]
            )

        _check_tensors(config, _HF, file_shapes, ignorable, f"Safetensors in {directory}")

        def read(name: str, key: str) -> np.ndarray:
            return handle_by_name[name].get_tensor(name)

        return config, _assemble(config, _HF, read, dtype, progress, f"Loading {directory.name}")
