"""Loading weights: GGUF files written here with gguf.GGUFWriter (every supported tensor type, llama.cpp's
Q/K row permutation) and Hugging Face safetensors directories, compared with the arrays they were
made from; and the loader's refusals (tensor type, shape, missing and unexpected tensors, dtype)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from safetensors.numpy import save_file

from nbchat.engine import packed, weights
from nbchat.engine.config import Llama3RopeScaling, ModelConfig, llama3_rope_factors
from nbchat.engine.weights import load_gguf, load_safetensors_dir, read_gguf_metadata
from nbchat.errors import InvalidRequestError, ModelNotFoundError, UnsupportedModelError

# Rows of 256 so that every block format, K-quants included, fits the tiny model.
TINY = ModelConfig(
    architecture="llama",
    vocab_size=320,
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    rms_norm_eps=2.0**-16,  # a float32 value: GGUF stores the epsilon as float32
    rope_theta=10000.0,
    context_length=1024,
)

# (pytree key, GGUF name, Hugging Face name), written out here rather than taken from the loader.
TOP_NAMES = [
    ("embed", "token_embd.weight", "model.embed_tokens.weight"),
    ("final_norm", "output_norm.weight", "model.norm.weight"),
    ("lm_head", "output.weight", "lm_head.weight"),
]
LAYER_NAMES = [
    ("attn_norm", "blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("q", "blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("k", "blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("v", "blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("o", "blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("q_bias", "blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("k_bias", "blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("v_bias", "blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("mlp_norm", "blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("gate", "blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("up", "blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("down", "blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
]


def make_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random parameters in the loader's pytree layout (float32, Hugging Face row order)."""
    rng = np.random.default_rng(seed)
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"attn_norm": (d,), "q": (q_rows, d), "k": (kv_rows, d), "v": (kv_rows, d), "o": (d, q_rows)}
    shapes |= {"mlp_norm": (d,), "gate": (f, d), "up": (f, d), "down": (d, f)}
    if config.attention_bias:
        shapes |= {"q_bias": (q_rows,), "k_bias": (kv_rows,), "v_bias": (kv_rows,)}

    def normal(*shape: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)

    params = {
        "embed": normal(v, d),
        "final_norm": 1 + normal(d),
        "layers": {key: normal(config.num_layers, *shape) for key, shape in shapes.items()},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = normal(v, d)
    return params


def named_tensors(config: ModelConfig, params: dict, convention: int) -> dict[str, np.ndarray]:
    """File tensor name -> array (convention 1: GGUF names, 2: Hugging Face names)."""
    tensors = {row[convention]: params[row[0]] for row in TOP_NAMES if row[0] in params}
    for row in LAYER_NAMES:
        if row[0] in params["layers"]:
            for i in range(config.num_layers):
                tensors[row[convention].format(i=i)] = params["layers"][row[0]][i]
    return tensors


def llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q/K rows of Llama models."""
    return (
        rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


# --- K-quant encoders (gguf-py decodes Q4_K/Q5_K/Q6_K but cannot encode them) ---------------------


def _pack_k_scales(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block -> the 12-byte layout of Q4_K/Q5_K."""
    packed = np.zeros((scales.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (scales[:, :4] & 63) | ((scales[:, 4:] >> 4) << 6)
    packed[:, 4:8] = (mins[:, :4] & 63) | ((mins[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (scales[:, 4:] & 15) | ((mins[:, 4:] & 15) << 4)
    return packed


def _encode_q45_k(rows: np.ndarray, levels: int) -> np.ndarray:
    """Q4_K (levels 15) or Q5_K (levels 31): super-blocks of 256 in 8 sub-blocks of 32, value =
    d*scale*q - dmin*min with 6-bit scale/min per sub-block and float16 d, dmin per super-block."""
    x = rows.reshape(-1, 8, 32).astype(np.float32)
    low = np.minimum(x.min(-1), 0)
    ideal_scale, ideal_min = (x.max(-1) - low) / levels, -low
    d = (ideal_scale.max(-1) / 63).astype(np.float16)
    dmin = (ideal_min.max(-1) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = (
            np.nan_to_num(np.rint(ideal_scale / d.astype(np.float32)[:, None])).clip(0, 63).astype(np.uint8)
        )
        mins = (
            np.nan_to_num(np.rint(ideal_min / dmin.astype(np.float32)[:, None])).clip(0, 63).astype(np.uint8)
        )
        step = (d.astype(np.float32)[:, None] * scales)[..., None]
        offset = (dmin.astype(np.float32)[:, None] * mins)[..., None]
        q = np.nan_to_num(np.rint((x + offset) / step)).clip(0, levels).astype(np.uint8)
    nibbles = (q & 15).reshape(-1, 4, 2, 32)
    qs = (nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(-1, 128)
    head = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), _pack_k_scales(scales, mins)]
    if levels == 31:
        high_bits = ((q >> 4) & 1).astype(np.uint8)  # [blocks, sub-block, 32]
        qh = np.bitwise_or.reduce(high_bits << np.arange(8, dtype=np.uint8)[None, :, None], axis=1)
        head.append(qh)
    return np.concatenate([*head, qs], axis=-1).reshape(rows.shape[0], -1)


def _encode_q6_k(rows: np.ndarray) -> np.ndarray:
    """Q6_K: super-blocks of 256 in 16 sub-blocks of 16, value = d*scale*q with q in [-32, 31], int8
    scale per sub-block, float16 d per super-block."""
    x = rows.reshape(-1, 16, 16).astype(np.float32)
    extreme = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    ideal_scale = extreme / -32  # the largest magnitude maps to q = -32 exactly
    d = (np.abs(ideal_scale).max(-1) / 127).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = (
            np.nan_to_num(np.rint(ideal_scale / d.astype(np.float32)[:, None]))
            .clip(-127, 127)
            .astype(np.int8)
        )
        step = (d.astype(np.float32)[:, None] * scales)[..., None]
        q = np.nan_to_num(np.rint(x / step)).clip(-32, 31).astype(np.int8)
    unsigned = (q.astype(np.int16) + 32).astype(np.uint8).reshape(-1, 256)
    low = (unsigned & 15).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (unsigned >> 4).reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, scales.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=-1)
    return blocks.reshape(rows.shape[0], -1)


def encode(rows: np.ndarray, qtype: GGML) -> np.ndarray:
    if qtype == GGML.Q4_K:
        return _encode_q45_k(rows, 15)
    if qtype == GGML.Q5_K:
        return _encode_q45_k(rows, 31)
    if qtype == GGML.Q6_K:
        return _encode_q6_k(rows)
    return gguf.quants.quantize(rows, qtype)


def error_bound(rows: np.ndarray, qtype: GGML) -> np.ndarray:
    """Per-element bound on |dequantized - source| for the block formats, from each block's values:
    half a step where rounding is symmetric, a full step where one end of the range clips (Q4_0/Q5_0
    reach -8d / -16d but only +7d / +15d; Q6_K likewise) and for the K-quants, whose 6-bit sub-block
    scales move the step by up to half a unit of d; plus float16 rounding of the block scales."""
    block = {GGML.Q8_0: 32, GGML.Q4_0: 32, GGML.Q4_1: 32, GGML.Q5_0: 32, GGML.Q5_1: 32}.get(qtype, 256)
    x = rows.reshape(-1, block)
    amax, spread = np.abs(x).max(-1), x.max(-1) - np.minimum(x.min(-1), 0 if block == 256 else x.min(-1))
    bound = {
        GGML.Q8_0: amax / 127 / 2,
        GGML.Q4_0: amax / 8,
        GGML.Q4_1: spread / 15 / 2,
        GGML.Q5_0: amax / 16,
        GGML.Q5_1: spread / 31 / 2,
        GGML.Q4_K: 1.25 * spread / 15,
        GGML.Q5_K: 1.25 * spread / 31,
        GGML.Q6_K: 1.25 * amax / 32,
    }[qtype] + amax * 2.0**-9
    return np.repeat(bound, block).reshape(rows.shape)


def write_gguf(
    path: Path,
    config: ModelConfig,
    tensors: dict[str, np.ndarray],
    qtype: GGML = GGML.F32,
    *,
    types: dict[str, GGML] | None = None,
    metadata: dict | None = None,
) -> dict[str, np.ndarray]:
    """Write a GGUF as llama.cpp's converter would (Q/K rows permuted for llama); matrices in ``qtype``,
    vectors in F32. Returns the bytes written per tensor."""
    writer = gguf.GGUFWriter(path, config.architecture)
    arch = config.architecture
    fields = {
        "block_count": config.num_layers,
        "context_length": config.context_length,
        "embedding_length": config.hidden_size,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_heads,
        "attention.head_count_kv": config.num_kv_heads,
        "rope.dimension_count": config.head_dim,
    }
    for name, value in fields.items():
        writer.add_uint32(f"{arch}.{name}", value)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_theta)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    for name, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(name, value)
        else:
            writer.add_uint32(name, value)
    written = {}
    for name, values in tensors.items():
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            values = llama_cpp_permute(
                values, config.num_heads if ".attn_q." in name else config.num_kv_heads
            )
        tensor_type = (types or {}).get(name, qtype if values.ndim == 2 else GGML.F32)
        if tensor_type in (GGML.F32, GGML.F16):
            data = values.astype(np.float32 if tensor_type == GGML.F32 else np.float16)
            writer.add_tensor(name, data)
        else:
            data = encode(values, tensor_type)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=tensor_type)
        written[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return written


# Decoder module path inside a layer -> the key this file's parameter dicts use.
_LAYER_MODULES = {
    "attn_norm": ("attn_norm",),
    "q": ("attn", "q"),
    "k": ("attn", "k"),
    "v": ("attn", "v"),
    "o": ("attn", "o"),
    "mlp_norm": ("mlp_norm",),
    "gate": ("mlp", "gate"),
    "up": ("mlp", "up"),
    "down": ("mlp", "down"),
}


def matrix_values(matrix) -> np.ndarray:
    """A model.Matrix's weight as an array: the float weight, or the packed codes dequantized."""
    if matrix.packed_format is None:
        return np.asarray(matrix.weight[...])
    return np.asarray(packed.dequantize(matrix.packed_weight()))


def float_params(config: ModelConfig, decoder) -> tuple[ModelConfig, dict]:
    """(config, the loaded decoder's parameters in this file's layout): layers stacked per key."""
    layers: dict[str, list] = {}
    for block in decoder.layers:
        for key, path in _LAYER_MODULES.items():
            module = block
            for part in path:
                module = getattr(module, part)
            if hasattr(module, "packed_format"):
                layers.setdefault(key, []).append(matrix_values(module))
                if module.bias is not None:
                    layers.setdefault(f"{key}_bias", []).append(np.asarray(module.bias[...]))
            else:
                layers.setdefault(key, []).append(np.asarray(module.weight[...]))
    params = {
        "embed": matrix_values(decoder.embed),
        "final_norm": np.asarray(decoder.final_norm.weight[...]),
        "layers": {key: np.stack(values) for key, values in layers.items()},
    }
    if decoder.lm_head is not None:
        params["lm_head"] = matrix_values(decoder.lm_head)
    return config, params


def assert_params_equal(loaded: dict, expected: dict) -> None:
    assert set(loaded) == set(expected)
    assert set(loaded["layers"]) == set(expected["layers"])
    for key in ("embed", "final_norm", "lm_head"):
        if key in expected:
            np.testing.assert_array_equal(np.asarray(loaded[key]), expected[key], err_msg=key)
    for key, value in expected["layers"].items():
        np.testing.assert_array_equal(np.asarray(loaded["layers"][key]), value, err_msg=f"layers.{key}")


@pytest.fixture(scope="module")
def tiny_params() -> dict:
    return make_params(TINY)


# --- GGUF -----------------------------------------------------------------------------------------


def test_llama_cpp_permutation_is_undone_exactly(tmp_path, tiny_params):
    path = tmp_path / "tiny-f32.gguf"
    written = write_gguf(path, TINY, named_tensors(TINY, tiny_params, 1))
    # The file really holds permuted rows: a loader that skipped the un-permutation would differ.
    assert not np.array_equal(written["blk.0.attn_q.weight"], tiny_params["layers"]["q"][0])
    assert not np.array_equal(written["blk.1.attn_k.weight"], tiny_params["layers"]["k"][1])

    config, params = float_params(*load_gguf(path, progress=False))

    assert config == TINY
    assert_params_equal(params, tiny_params)


def test_qwen2_gguf_keeps_row_order_and_loads_biases(tmp_path):
    config = ModelConfig(
        **{**TINY.__dict__, "architecture": "qwen2", "attention_bias": True, "tie_word_embeddings": True}
    )
    source = make_params(config, seed=1)
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, config, named_tensors(config, source, 1))

    loaded_config, params = float_params(*load_gguf(path, progress=False))

    assert loaded_config == config
    assert "lm_head" not in params
    assert_params_equal(params, source)


@pytest.mark.parametrize("qtype", [GGML.F16, GGML.BF16], ids=lambda t: t.name)
def test_float_tensor_types_load_exactly(tmp_path, qtype):
    config = ModelConfig(**{**TINY.__dict__, "tie_word_embeddings": True})
    source = make_params(config, seed=2)
    # Round the source to the file's precision first: loading must then give it back bit for bit.
    float_type = np.float16 if qtype == GGML.F16 else ml_dtypes.bfloat16
    rounded = {
        "embed": source["embed"].astype(float_type).astype(np.float32),
        "final_norm": source["final_norm"],
        "layers": {
            key: value if value.ndim == 2 else value.astype(float_type).astype(np.float32)
            for key, value in source["layers"].items()
        },
    }
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, config, named_tensors(config, rounded, 1), qtype)

    _, params = float_params(*load_gguf(path, progress=False))

    assert_params_equal(params, rounded)


QUANTIZED_TYPES = [GGML.Q8_0, GGML.Q4_0, GGML.Q4_1, GGML.Q5_0, GGML.Q5_1, GGML.Q4_K, GGML.Q5_K, GGML.Q6_K]


@pytest.mark.parametrize("qtype", QUANTIZED_TYPES, ids=lambda t: t.name)
def test_quantized_tensor_types_dequantize_within_block_error(tmp_path, tiny_params, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    source = named_tensors(TINY, tiny_params, 1)
    written = write_gguf(path, TINY, source, qtype)

    _, params = float_params(*load_gguf(path, progress=False))

    loaded = {name: np.asarray(value) for name, value in named_tensors(TINY, params, 1).items()}
    for name, values in source.items():
        if values.ndim == 1:
            np.testing.assert_array_equal(loaded[name], values, err_msg=name)
            continue
        # Exactly what the file's blocks decode to, rows permuted back as llama.cpp stored them ...
        stored = loaded[name]
        if ".attn_q." in name or ".attn_k." in name:
            stored = llama_cpp_permute(stored, TINY.num_heads if ".attn_q." in name else TINY.num_kv_heads)
        np.testing.assert_array_equal(stored, gguf.quants.dequantize(written[name], qtype), err_msg=name)
        # ... and within the format's quantization error of the source values.
        error = np.abs(loaded[name] - values)
        assert (error <= error_bound(values, qtype)).all(), f"{name}: max error {error.max():.4g}"
        assert error.max() > 0  # it really went through the block format


def test_bfloat16_dtype_rounds_dequantized_values(tmp_path, tiny_params):
    path = tmp_path / "tiny-q8.gguf"
    write_gguf(path, TINY, named_tensors(TINY, tiny_params, 1), GGML.Q8_0)
    _, float32_params = float_params(*load_gguf(path, "float32", progress=False, pack=False))

    _, params = float_params(*load_gguf(path, "bfloat16", progress=False, pack=False))

    assert params["layers"]["q"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["q"]),
        np.asarray(float32_params["layers"]["q"]).astype(ml_dtypes.bfloat16),
    )


def test_unsupported_tensor_type_is_named(tmp_path, tiny_params):
    path = tmp_path / "q2k.gguf"
    tensors = named_tensors(TINY, tiny_params, 1)
    writer_types = {"blk.1.ffn_down.weight": GGML.Q2_K}
    # gguf-py cannot encode Q2_K; any bytes of the right size make a well-formed file.
    block_bytes = gguf.GGML_QUANT_SIZES[GGML.Q2_K][1]
    writer = gguf.GGUFWriter(path, "llama")
    for name, values in tensors.items():
        if name in writer_types:
            raw = np.zeros((values.shape[0], values.shape[1] // 256 * block_bytes), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=GGML.Q2_K)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(UnsupportedModelError, match=r"'blk\.1\.ffn_down\.weight'.*Q2_K"):
        load_gguf(path, progress=False)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, tiny_params):
    tensors = named_tensors(TINY, tiny_params, 1)
    tensors["blk.0.ffn_up.weight"] = tensors["blk.0.ffn_up.weight"][:256]
    path = tmp_path / "bad-shape.gguf"
    write_gguf(path, TINY, tensors)

    with pytest.raises(
        UnsupportedModelError, match=r"'blk\.0\.ffn_up\.weight' has shape \[256, 256\], expected \[512, 256\]"
    ):
        load_gguf(path, progress=False)


def test_missing_and_unexpected_tensors_are_named(tmp_path, tiny_params):
    tensors = named_tensors(TINY, tiny_params, 1)
    del tensors["blk.1.attn_v.weight"]
    tensors["blk.0.attn_output.bias"] = np.zeros(TINY.hidden_size, np.float32)
    path = tmp_path / "bad-names.gguf"
    write_gguf(path, TINY, tensors)

    with pytest.raises(UnsupportedModelError) as caught:
        load_gguf(path, progress=False)
    assert "'blk.1.attn_v.weight' is missing" in str(caught.value)
    assert "'blk.0.attn_output.bias'" in str(caught.value)


def test_llama3_rope_freqs_tensor_becomes_rope_scaling(tmp_path, tiny_params):
    config = ModelConfig(**{**TINY.__dict__, "rope_theta": 500000.0, "context_length": 131072})
    scaling = Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    tensors = named_tensors(TINY, tiny_params, 1)
    tensors["rope_freqs.weight"] = np.array(
        llama3_rope_factors(scaling, config.head_dim, config.rope_theta), np.float32
    )
    path = tmp_path / "llama31.gguf"
    write_gguf(path, config, tensors)

    loaded_config, params = float_params(*load_gguf(path, progress=False))

    assert loaded_config.rope_scaling == scaling
    assert_params_equal(params, tiny_params)


def test_vocab_size_comes_from_metadata_when_present(tmp_path, tiny_params):
    path = tmp_path / "vocab.gguf"
    write_gguf(path, TINY, named_tensors(TINY, tiny_params, 1), metadata={"llama.vocab_size": 999})

    with pytest.raises(
        UnsupportedModelError, match=r"'token_embd\.weight' has shape \[320, 256\], expected \[999, 256\]"
    ):
        load_gguf(path, progress=False)


def test_read_gguf_metadata_returns_python_values(tmp_path, tiny_params):
    path = tmp_path / "meta.gguf"
    write_gguf(
        path, TINY, named_tensors(TINY, tiny_params, 1), metadata={"tokenizer.chat_template": "{{ x }}"}
    )

    metadata = read_gguf_metadata(path)

    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 2
    assert metadata["llama.attention.layer_norm_rms_epsilon"] == 2.0**-16
    assert metadata["tokenizer.chat_template"] == "{{ x }}"


def test_bad_dtype_is_an_invalid_request(tmp_path):
    with pytest.raises(InvalidRequestError) as caught:
        load_gguf(tmp_path / "never-read.gguf", dtype="float16")
    assert caught.value.param == "dtype"
    assert "'float32', 'bfloat16'" in caught.value.message


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "absent.gguf")
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello, not a model")
    with pytest.raises(UnsupportedModelError, match="not a readable GGUF file"):
        load_gguf(not_gguf)


def test_progress_bar_only_when_asked(tmp_path, tiny_params, capsys):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, TINY, named_tensors(TINY, tiny_params, 1))

    load_gguf(path, progress=False)
    assert capsys.readouterr().err == ""
    load_gguf(path, progress=True)
    assert "Loading tiny.gguf" in capsys.readouterr().err


# --- safetensors ----------------------------------------------------------------------------------


def hf_config_json(config: ModelConfig) -> dict:
    return {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.architecture]],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.context_length,
        "tie_word_embeddings": config.tie_word_embeddings,
    }


def write_hf_dir(
    directory: Path, config: ModelConfig, tensors: dict[str, np.ndarray], shards: int = 1
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_json(config)))
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        save_file(part, str(directory / file))
        weight_map |= dict.fromkeys(part, file)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return directory


def test_safetensors_dir_loads_exact_params(tmp_path, tiny_params):
    directory = write_hf_dir(tmp_path / "tiny", TINY, named_tensors(TINY, tiny_params, 2))

    config, params = float_params(*load_safetensors_dir(directory, progress=False))

    assert config == TINY
    assert_params_equal(params, tiny_params)


def test_sharded_safetensors_with_index(tmp_path, tiny_params):
    directory = write_hf_dir(tmp_path / "sharded", TINY, named_tensors(TINY, tiny_params, 2), shards=3)
    assert len(list(directory.glob("*.safetensors"))) == 3

    _, params = float_params(*load_safetensors_dir(directory, progress=False))

    assert_params_equal(params, tiny_params)


def test_bfloat16_safetensors_to_float32_and_bfloat16(tmp_path):
    config = ModelConfig(
        **{**TINY.__dict__, "architecture": "qwen2", "attention_bias": True, "tie_word_embeddings": True}
    )
    source = make_params(config, seed=3)
    tensors = {
        name: value.astype(ml_dtypes.bfloat16) for name, value in named_tensors(config, source, 2).items()
    }
    # Tied checkpoints sometimes save the head anyway; it is the embedding and is ignored.
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    directory = write_hf_dir(tmp_path / "qwen2-bf16", config, tensors)

    loaded_config, float32_params = float_params(*load_safetensors_dir(directory, "float32", progress=False))
    _, bfloat16_params = float_params(*load_safetensors_dir(directory, "bfloat16", progress=False))

    assert loaded_config == config
    expected = {
        "embed": source["embed"].astype(ml_dtypes.bfloat16).astype(np.float32),
        "final_norm": source["final_norm"].astype(ml_dtypes.bfloat16).astype(np.float32),
        "layers": {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in source["layers"].items()},
    }
    assert_params_equal(float32_params, expected)
    assert bfloat16_params["layers"]["q_bias"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(bfloat16_params["embed"]), tensors["model.embed_tokens.weight"])


def test_safetensors_shape_mismatch_names_tensor(tmp_path, tiny_params):
    tensors = named_tensors(TINY, tiny_params, 2)
    tensors["model.layers.1.self_attn.o_proj.weight"] = tensors[
        "model.layers.1.self_attn.o_proj.weight"
    ].T.copy()[:128]
    directory = write_hf_dir(tmp_path / "bad", TINY, tensors)

    with pytest.raises(
        UnsupportedModelError, match=r"'model\.layers\.1\.self_attn\.o_proj\.weight' has shape \[128, 256\]"
    ):
        load_safetensors_dir(directory, progress=False)


def test_safetensors_dir_without_weights_or_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_safetensors_dir(tmp_path, progress=False)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_json(TINY)))
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        load_safetensors_dir(tmp_path, progress=False)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="pickle"):
        load_safetensors_dir(tmp_path, progress=False)


# --- the real default model -----------------------------------------------------------------------


@pytest.mark.integration
def test_smollm2_gguf_config_and_shapes():
    from nbchat.models import resolve

    path = resolve("smollm2-135m-instruct").path
    config, decoder = load_gguf(path, progress=False)

    assert config == ModelConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=100000.0,
        context_length=8192,
        tie_word_embeddings=True,
    )
    assert config.rms_norm_eps == pytest.approx(1e-5)
    assert len(decoder.layers) == 30
    q, k = decoder.layers[29].attn.q, decoder.layers[29].attn.k
    assert (q.out_features, q.in_features, q.packed_format) == (576, 576, "Q4_1")
    assert (k.out_features, k.in_features, k.packed_format) == (192, 576, "Q4_1")
    assert decoder.embed.packed_format == "Q8_0"  # the tied head's codes, looked up for embeddings too
    assert decoder.lm_head is None


def test_weights_reader_skips_long_string_arrays_and_keeps_everything_else(tmp_path):
    # The loader's reader steps over vocabularies and reads number arrays in one view: the metadata
    # it gives (tokenizer arrays aside) and every tensor must be exactly gguf.GGUFReader's.
    path = tmp_path / "fields.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_token_list([f"tok{i}" for i in range(3000)])  # a long string array: skipped
    writer.add_token_types(list(range(3000)))  # a long number array: one view
    writer.add_array("general.languages", ["en", "fr"])  # a short string array: read as usual
    writer.add_array("general.numbers", [1.5, 2.5])
    writer.add_string("general.name", "fields")
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    fast, full = weights._open_gguf(path, string_arrays=False), gguf.GGUFReader(path)
    assert weights._gguf_metadata(fast, with_tokenizer=False) == weights._gguf_metadata(
        full, with_tokenizer=False
    )
    assert fast.fields["general.languages"].contents() == ["en", "fr"]
    assert fast.fields["tokenizer.ggml.token_type"].contents() == list(range(3000))
    assert fast.fields["tokenizer.ggml.tokens"].contents() == []
    assert [(t.name, t.data_offset) for t in fast.tensors] == [(t.name, t.data_offset) for t in full.tensors]
    np.testing.assert_array_equal(fast.tensors[0].data, full.tensors[0].data)


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's memory mappings")
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "float"])
def test_loaded_decoder_does_not_keep_the_file_mapped(tmp_path, tiny_params, pack):
    # The file is memory-mapped while it is read; its F32 norms are views of that memory, and a
    # parameter aliasing one would keep every page touched while loading resident.
    path = tmp_path / "mapped.gguf"
    write_gguf(path, TINY, named_tensors(TINY, tiny_params, 1), GGML.Q4_0)

    config, decoder = load_gguf(path, progress=False, pack=pack)
    gc.collect()

    assert str(path) not in Path("/proc/self/maps").read_text()
    _, params = float_params(config, decoder)
    np.testing.assert_array_equal(params["final_norm"], tiny_params["final_norm"])  # copied, not lost
