"""Checkpoint files -> the decoder's state: a ``model.Decoder`` whose parameters come from the file.

Reads GGUF files (llama.cpp; llama.cpp's Q/K row permutation undone) and Hugging Face safetensors
directories (single or sharded). The decoder's own module tree is the one source of shapes: every
file tensor is shape-checked against the abstract ``Decoder(config)`` (``nnx.eval_shape``) before any
data is read, then the state is filled by path. A GGUF's Q4_0/Q4_1/Q8_0 matrices are kept as their
block codes where the backend wants them (``backend.keeps_block_codes``), read from the memory-mapped
file straight into the packed layout; other quantized types are dequantized with ``gguf.quants``.
Every matrix stays in ``[out, in]`` layout. Holds no model code and no tokenizer code; imports no JAX
until a load.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from nbchat.engine.config import DTYPES, ModelConfig, config_from_gguf, config_from_hf
from nbchat.errors import InvalidRequestError, ModelNotFoundError, UnsupportedModelError

# GGML tensor types the loader reads (names of gguf.GGMLQuantizationType members). The K-quant
# mixes (Q4_K_M, Q5_K_M) fall back to Q5_0/Q5_1/Q8_0 for rows that are not a multiple of 256.
GGUF_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")

# The float decoder's parameter paths ("{i}" the layer index) -> (GGUF name, Hugging Face name). A
# packed matrix's codes, scale and minimum come from the tensor of its float path's ``.weight``.
TENSOR_NAMES = {
    "embed.weight": ("token_embd.weight", "model.embed_tokens.weight"),
    "final_norm.weight": ("output_norm.weight", "model.norm.weight"),
    "lm_head.weight": ("output.weight", "lm_head.weight"),
    "layers.{i}.attn_norm.weight": ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    "layers.{i}.attn.q.weight": ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    "layers.{i}.attn.k.weight": ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    "layers.{i}.attn.v.weight": ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    "layers.{i}.attn.o.weight": ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    "layers.{i}.attn.q.bias": ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    "layers.{i}.attn.k.bias": ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    "layers.{i}.attn.v.bias": ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    "layers.{i}.mlp_norm.weight": (
        "blk.{i}.ffn_norm.weight",
        "model.layers.{i}.post_attention_layernorm.weight",
    ),
    "layers.{i}.mlp.gate.weight": ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    "layers.{i}.mlp.up.weight": ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    "layers.{i}.mlp.down.weight": ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
}
_GGUF, _HF = 0, 1
_LAYER_INDEX = re.compile(r"^layers\.(\d+)\.")
_PACKED_LEAVES = ("codes", "scale", "minimum")  # see model.Matrix

# llama.cpp's converter permutes Q/K rows of these architectures for its interleaved RoPE.
_GGUF_PERMUTED_ARCHITECTURES = ("llama",)
# llama.cpp writes Llama 3 RoPE scaling as this tensor; it becomes part of the config, not a param.
_GGUF_ROPE_FREQS = "rope_freqs.weight"


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


def _resolved_dtype(dtype: str | None) -> str:
    """``dtype``, or the backend's default; a bad one fails before any file is read."""
    if dtype is None:
        from nbchat.engine import backend

        dtype = backend.default_dtype()
    _numpy_dtype(dtype)
    return dtype


def _abstract_decoder(config: ModelConfig, formats: Mapping[str, str], dtype: str) -> Any:
    """The Decoder with shapes and dtypes only (nothing allocated)."""
    from flax import nnx

    from nbchat.engine.model import Decoder

    return nnx.eval_shape(lambda: Decoder(config, formats=formats, dtype=dtype, rngs=nnx.Rngs(0)))


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _file_name(path: str, convention: int) -> str:
    """The file's tensor name for a float parameter path ("layers.3.attn.q.weight")."""
    match = _LAYER_INDEX.match(path)
    if match is None:
        return TENSOR_NAMES[path][convention]
    pattern = "layers.{i}." + path[match.end() :]
    return TENSOR_NAMES[pattern][convention].format(i=match.group(1))


def _tensor_plan(decoder: Any, convention: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(float parameter path, file tensor name, expected shape) for every parameter of an abstract
    decoder; a packed matrix is one entry, its float weight's path and logical [out, in] shape."""
    from flax import nnx

    plan = {}
    for path, variable in nnx.to_flat_state(nnx.state(decoder)):
        *module_path, leaf = path
        if leaf in _PACKED_LEAVES:
            matrix = decoder
            for part in module_path:
                matrix = matrix[part] if isinstance(part, int) else getattr(matrix, part)
            dotted, shape = _dotted((*module_path, "weight")), (matrix.out_features, matrix.in_features)
        else:
            dotted, shape = _dotted(path), tuple(variable.shape)
        plan[dotted] = (dotted, _file_name(dotted, convention), shape)
    return list(plan.values())


def _layer_paths(config: ModelConfig) -> Iterator[str]:
    """Every float parameter path the name table knows, layers expanded (biases included)."""
    for pattern in TENSOR_NAMES:
        if pattern.startswith("layers.{i}."):
            yield from (pattern.format(i=i) for i in range(config.num_layers))
        else:
            yield pattern


def _check_tensors(
    plan: list[tuple[str, str, tuple[int, ...]]],
    config: ModelConfig,
    file_shapes: Mapping[str, tuple[int, ...]],
    ignorable: Callable[[str], bool],
    source: str,
) -> None:
    """Every expected tensor present with its shape and nothing unexplained left over; all problems in
    one message, before any tensor data is read."""
    problems = []
    expected_names = set()
    for _, name, shape in plan:
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
    decoder: Any,
    dtype: str,
    read_float: Callable[[str], np.ndarray],
    read_packed: Callable[[str], Any] | None,
    progress: bool,
    description: str,
) -> Any:
    """The abstract ``decoder`` with every parameter read from the file, one tensor at a time.

    ``read_float(path)`` returns a float parameter as an array in [out, in] layout; ``read_packed(path)``
    a packed matrix's ``packed.PackedWeight`` (numpy leaves) for the float path of its weight. Each
    tensor goes to the device before the next is read, so the peak is the model once plus one tensor;
    no parameter refers to the file's memory, so a memory-mapped file is unmapped once read.
    """
    import jax
    from flax import nnx
    from tqdm.auto import tqdm

    target = _numpy_dtype(dtype)
    graphdef, abstract = nnx.split(decoder)
    flat = list(nnx.to_flat_state(abstract))
    filled = []
    packed_weight: tuple[str, Any] = ("", None)  # the matrix whose leaves are being filled
    with tqdm(total=len(flat), desc=description, unit="tensor", disable=not progress, leave=False) as bar:
        for path, variable in flat:
            *module, leaf = map(str, path)
            if leaf in _PACKED_LEAVES:
                weight_path = ".".join([*module, "weight"])
                if packed_weight[0] != weight_path:
                    packed_weight = (weight_path, read_packed(weight_path))
                value = getattr(packed_weight[1], leaf)
            else:
                value = np.asarray(read_float(_dotted(path))).astype(target, copy=False)
                if value.base is not None:
                    # A view of the file (an F32 tensor of a memory-mapped GGUF): on CPU, device_put
                    # aliases it, and one small norm kept the whole mapping resident (96 MB of
                    # SmolLM2's pages touched while loading).
                    value = value.copy()
            if value.shape != variable.shape or value.dtype != variable.dtype:
                read_as = f"{value.shape} {value.dtype}"
                raise AssertionError(f"{_dotted(path)}: read {read_as}, expected {variable}")
            filled.append((path, variable.replace(jax.device_put(value))))
            bar.update()
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# ---------------------------------------------------------------------------------------------------------
# GGUF


def _gguf_metadata(reader: Any, *, with_tokenizer: bool) -> dict[str, Any]:
    # Skipping the tokenizer arrays (tens of thousands of strings) when the caller does not need them.
    return {
        name: field.contents()
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.") and (with_tokenizer or not name.startswith("tokenizer.ggml."))
    }


_LONG_STRING_ARRAY = 1024  # items: a vocabulary or a merge list, not a list of tags


@functools.cache
def _reader_without_string_arrays() -> type:
    """A ``gguf.GGUFReader`` that reads metadata arrays of numbers as one view each and steps over
    long arrays of strings instead of parsing them.

    GGUFReader turns every array item into its own numpy views: for SmolLM2's 49152 tokens, their
    49152 types and 48900 merges that took 2.9 s of a 3.0 s open, on every model load, for fields
    the weights do not use (the tokenizer is converted once and cached: ``tokenizer.py``). Long
    string arrays are kept with no items; short ones (``general.languages``) are read as usual;
    ``field.contents()`` of a number array is the same list.
    """
    import gguf

    class ReaderWithoutStringArrays(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple:
            if raw_type != gguf.GGUFValueType.ARRAY or self.byte_order == "S":
                return super()._get_field_parts(orig_offs, raw_type)
            item_type = self._get(orig_offs, np.uint32)
            length = self._get(orig_offs + 4, np.uint64)
            types = [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(item_type[0])]
            number = self.gguf_scalar_to_np.get(types[1])
            if number is not None:  # one view of every item (the reader makes one per item)
                values = self._get(orig_offs + 12, number, length[0])
                return 12 + int(values.nbytes), [item_type, length, values], [2], types
            if types[1] != gguf.GGUFValueType.STRING or length[0] < _LONG_STRING_ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            offset = orig_offs + 12
            for _ in range(int(length[0])):  # each item: a uint64 byte length, then the bytes
                offset += 8 + struct.unpack_from("<Q", self.data, offset)[0]
            return offset - orig_offs, [item_type, length], [], types

    return ReaderWithoutStringArrays


def _open_gguf(path: str | Path, *, string_arrays: bool = True) -> Any:
    """A reader of the file; without ``string_arrays``, long metadata arrays of strings read as
    empty (see ``_reader_without_string_arrays``)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist.")
    try:
        return (gguf.GGUFReader if string_arrays else _reader_without_string_arrays())(path)
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
    path: str | Path, dtype: str | None = None, progress: bool = True, pack: bool | None = None
) -> tuple[ModelConfig, Any]:
    """Load a llama.cpp GGUF file (architectures llama and qwen2) as (ModelConfig, model.Decoder).

    With ``pack`` (default: ``backend.keeps_block_codes()``, true on CPU), matrices stored as Q4_0,
    Q4_1 or Q8_0 stay in their block codes (``packed.py``): the same values, read from the file
    without a float copy, about half the time per decoded token on SmolLM2-135M. Every other tensor
    is dequantized to ``dtype`` ("float32" or "bfloat16"; default: ``backend.default_dtype()``);
    tensor types other than ``GGUF_TENSOR_TYPES`` raise ``UnsupportedModelError`` naming the tensor
    and its type.
    """
    from gguf.quants import dequantize

    dtype = _resolved_dtype(dtype)  # a bad dtype fails before the file is read
    path = Path(path)
    reader = _open_gguf(path, string_arrays=False)
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

    embedding = file_shapes.get(TENSOR_NAMES["embed.weight"][_GGUF])
    rope_freqs = None
    if _GGUF_ROPE_FREQS in tensors:
        rope_freqs = dequantize(tensors[_GGUF_ROPE_FREQS].data, tensors[_GGUF_ROPE_FREQS].tensor_type)
    config = config_from_gguf(
        metadata,
        tie_word_embeddings=TENSOR_NAMES["lm_head.weight"][_GGUF] not in tensors,
        vocab_size=embedding[0] if embedding else None,
        rope_freqs=rope_freqs.reshape(-1).tolist() if rope_freqs is not None else None,
    )
    formats = {}
    if pack if pack is not None else _keeps_block_codes():
        from nbchat.engine import packed

        for param in _layer_paths(config):
            tensor = tensors.get(_file_name(param, _GGUF))
            if tensor is not None and packed.packable(tensor.tensor_type.name, file_shapes[tensor.name]):
                formats[param.removesuffix(".weight")] = tensor.tensor_type.name
    decoder = _abstract_decoder(config, formats, dtype)
    plan = _tensor_plan(decoder, _GGUF)
    _check_tensors(
        plan, config, file_shapes, lambda name: name == _GGUF_ROPE_FREQS, f"GGUF file {path.name}"
    )
    names = {param: name for param, name, _ in plan}

    def permuted_heads(param: str) -> int | None:
        """The head count whose rows llama.cpp permuted in this parameter, or None."""
        if config.architecture not in _GGUF_PERMUTED_ARCHITECTURES:
            return None
        if param.endswith(".attn.q.weight"):
            return config.num_heads
        return config.num_kv_heads if param.endswith(".attn.k.weight") else None

    def read_float(param: str) -> np.ndarray:
        tensor = tensors[names[param]]
        values = dequantize(tensor.data, tensor.tensor_type).reshape(file_shapes[tensor.name])
        heads = permuted_heads(param)
        return values if heads is None else _unpermute_rows(values, heads)

    def read_packed(param: str) -> Any:
        from nbchat.engine import packed

        tensor = tensors[names[param]]
        shape = file_shapes[tensor.name]
        heads = permuted_heads(param)
        order = None if heads is None else _unpermute_rows(np.arange(shape[0]), heads)  # rows' new order
        return packed.packed_from_gguf(tensor.data, tensor.tensor_type.name, shape, order)

    decoder = _assemble(decoder, dtype, read_float, read_packed, progress, f"Loading {path.name}")
    return config, decoder


def _keeps_block_codes() -> bool:
    from nbchat.engine import backend

    return backend.keeps_block_codes()


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
    path: str | Path, dtype: str | None = None, progress: bool = True
) -> tuple[ModelConfig, Any]:
    """Load a Hugging Face model directory (config.json + model.safetensors, or shards with
    model.safetensors.index.json) as (ModelConfig, model.Decoder) with parameters in ``dtype``
    ("float32" or "bfloat16"; default: ``backend.default_dtype()``)."""
    from safetensors import safe_open

    dtype = _resolved_dtype(dtype)
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
                config.tie_word_embeddings and name == TENSOR_NAMES["lm_head.weight"][_HF]
            )

        decoder = _abstract_decoder(config, {}, dtype)
        plan = _tensor_plan(decoder, _HF)
        _check_tensors(plan, config, file_shapes, ignorable, f"Safetensors in {directory}")
        names = {param: name for param, name, _ in plan}

        def read_float(param: str) -> np.ndarray:
            return handle_by_name[names[param]].get_tensor(names[param])

        return config, _assemble(decoder, dtype, read_float, None, progress, f"Loading {directory.name}")
