"""Packed block codes (nbchat/engine/packed.py): the values equal gguf's own dequantization, the
loader keeps exactly the packable weights packed, and a model decoding from them computes the same
tokens as one decoding from float weights."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML

from nbchat.engine import generate, model, packed
from nbchat.engine.weights import load_gguf
from tests.test_weights import TINY, make_params, named_tensors, write_gguf

PACKED_TYPES = [GGML.Q4_0, GGML.Q4_1, GGML.Q8_0]


def quantized(rows: int, cols: int, qtype: GGML, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF blocks, what gguf dequantizes them to) of a random [rows, cols] matrix."""
    values = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(rows, cols)


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_unpacked_values_equal_gguf_dequantize_exactly(qtype):
    raw, expected = quantized(48, 96, qtype)

    weight = packed.packed_from_gguf(raw, qtype.name, (48, 96))

    assert weight.shape == (48, 96)
    assert weight.codes.dtype == np.uint32 and weight.codes.shape == (48 // (32 // weight.bits), 96)
    assert weight.nbytes < expected.nbytes / 3  # 4-bit: 6 bits per value with scales; 8-bit: 9
    np.testing.assert_array_equal(np.asarray(packed.dequantize(weight)), expected)


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_row_order_moves_codes_and_scales_together(qtype):
    raw, expected = quantized(64, 64, qtype, seed=1)
    order = np.random.default_rng(2).permutation(64)

    weight = packed.packed_from_gguf(raw, qtype.name, (64, 64), order)

    np.testing.assert_array_equal(np.asarray(packed.dequantize(weight)), expected[order])


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_linear_equals_the_float_product(qtype):
    raw, expected = quantized(40, 128, qtype, seed=3)
    weight = jax.tree.map(jnp.asarray, packed.packed_from_gguf(raw, qtype.name, (40, 128)))
    x = np.random.default_rng(4).standard_normal((1, 1, 128)).astype(np.float32)

    result = jax.jit(packed.linear)(x, weight)

    assert result.shape == (1, 1, 40)
    np.testing.assert_allclose(np.asarray(result), x @ expected.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("type_name", "shape", "expected"),
    [
        ("Q4_1", (1536, 576), True),
        ("Q8_0", (49152, 576), True),
        ("Q4_0", (12, 64), False),  # 12 rows do not fill words of 8 four-bit codes
        ("Q8_0", (12, 64), True),  # ... but fill words of 4 eight-bit codes
        ("Q4_0", (16, 48), False),  # 48 columns are not whole blocks of 32
        ("Q4_K", (256, 256), False),  # super-blocks with nested scales: dequantized at load
        ("F32", (256, 256), False),
        ("Q8_0", (64,), False),
    ],
)
def test_packable(type_name, shape, expected):
    assert packed.packable(type_name, shape) is expected


def write_tiny(tmp_path, qtype: GGML, types: dict | None = None, seed: int = 0):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, TINY, named_tensors(TINY, make_params(TINY, seed), 1), qtype, types=types)
    return path


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_loader_packs_the_packable_layer_weights_and_head(tmp_path, qtype):
    _, params = load_gguf(write_tiny(tmp_path, qtype), progress=False)

    assert set(params["packed"]["layers"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    for key, weight in params["packed"]["layers"].items():
        # The same values as the float weights, Q/K rows un-permuted alike.
        np.testing.assert_array_equal(
            np.asarray(packed.dequantize(weight)), np.asarray(params["layers"][key]), err_msg=key
        )
    np.testing.assert_array_equal(
        np.asarray(packed.dequantize(params["packed"]["head"])), np.asarray(params["lm_head"])
    )


def test_loader_packs_nothing_it_cannot_and_nothing_when_asked_not_to(tmp_path):
    _, float_params = load_gguf(write_tiny(tmp_path, GGML.F32), progress=False)
    _, k_quant_params = load_gguf(write_tiny(tmp_path, GGML.Q4_K), progress=False)
    _, unpacked = load_gguf(write_tiny(tmp_path, GGML.Q8_0), progress=False, pack=False)

    assert "packed" not in float_params
    assert "packed" not in k_quant_params
    assert "packed" not in unpacked


def test_a_weight_whose_layers_differ_in_type_stays_float(tmp_path):
    # K-quant mixes store some layers' tensors in another type: a stack needs one format.
    path = write_tiny(tmp_path, GGML.Q4_0, types={"blk.1.ffn_down.weight": GGML.Q8_0})

    _, params = load_gguf(path, progress=False)

    assert set(params["packed"]["layers"]) == {"q", "k", "v", "o", "gate", "up"}


@pytest.mark.parametrize("qtype", [GGML.Q4_1, GGML.Q8_0], ids=lambda t: t.name)
def test_decoding_from_packed_weights_gives_the_float_weights_tokens(tmp_path, qtype):
    config, params = load_gguf(write_tiny(tmp_path, qtype, seed=5), progress=False)
    float_only = {key: value for key, value in params.items() if key != "packed"}
    prompt = [5, 17, 200, 31, 64, 9, 150]
    greedy = generate.SamplingParams(temperature=0.0)

    def run(p: dict) -> list[generate.TokenEvent]:
        return list(generate.Generator(config, p).generate(prompt, greedy, max_new_tokens=24))

    packed_events, float_events = run(params), run(float_only)

    assert [e.token_id for e in packed_events] == [e.token_id for e in float_events]
    np.testing.assert_allclose(
        [e.logprob for e in packed_events], [e.logprob for e in float_events], rtol=1e-4, atol=1e-4
    )


def test_one_token_forward_reads_the_packed_weights(tmp_path):
    config, params = load_gguf(write_tiny(tmp_path, GGML.Q8_0, seed=6), progress=False)
    # Codes that differ from the float weights show which ones a step used.
    zeroed = jax.tree.map(jnp.zeros_like, params["packed"])
    tampered = model.unstack_layers({**params, "packed": zeroed})
    intact = model.unstack_layers(params)
    token, position = jnp.array([[7]]), jnp.array([[0]])
    tokens, positions = jnp.array([[7, 8]]), jnp.array([[0, 1]])

    one_intact = model.forward(intact, config, token, position)[0]
    one_tampered = model.forward(tampered, config, token, position)[0]
    two_intact = model.forward(intact, config, tokens, positions)[0]
    two_tampered = model.forward(tampered, config, tokens, positions)[0]

    assert not np.allclose(one_tampered, one_intact)  # decode: packed codes
    np.testing.assert_array_equal(two_tampered, two_intact)  # prefill: float weights
