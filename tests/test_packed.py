"""Packed block codes (nbchat/engine/packed.py): the values equal gguf's own dequantization, the
loader keeps exactly the packable weights packed (and no float copy of them), and a model prefilling
and decoding from them computes the same tokens as one reading float weights."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from gguf import GGMLQuantizationType as GGML

from nbchat.engine import backend, generate, model, packed
from nbchat.engine.weights import load_gguf
from tests.test_weights import TINY, float_params, make_params, named_tensors, write_gguf

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


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_rows_of_a_packed_weight_are_its_rows(qtype):
    raw, expected = quantized(48, 64, qtype, seed=5)
    weight = packed.packed_from_gguf(raw, qtype.name, (48, 64))

    np.testing.assert_array_equal(np.asarray(packed.dequantize(weight.rows(16, 48))), expected[16:48])
    with pytest.raises(ValueError, match="word of"):
        weight.rows(2, 16)


@pytest.mark.parametrize("qtype", [GGML.Q4_1, GGML.Q8_0], ids=lambda t: t.name)
def test_a_large_weight_times_several_rows_is_multiplied_in_chunks(qtype):
    # Over 2 * UNPACKED_CHUNK_ROWS rows (a vocabulary head), several rows of x take the chunked
    # path; its last chunk is a partial one.
    out = 2 * backend.UNPACKED_CHUNK_ROWS + 8 * 13
    raw, expected = quantized(out, 64, qtype, seed=6)
    weight = jax.tree.map(jnp.asarray, packed.packed_from_gguf(raw, qtype.name, (out, 64)))
    x = np.random.default_rng(7).standard_normal((3, 64)).astype(np.float32)

    result = np.asarray(jax.jit(backend.packed_linear)(x, weight))

    assert result.shape == (3, out)
    np.testing.assert_allclose(result, x @ expected.T, rtol=1e-4, atol=1e-4)


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


def packed_formats(decoder) -> dict[str, str]:
    """Module path -> GGML type of every matrix the decoder holds as block codes."""
    return {
        ".".join(map(str, path)): node.packed_format
        for path, node in nnx.iter_graph(decoder)
        if isinstance(node, model.Matrix) and node.packed_format is not None
    }


LAYER_MATRICES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def all_matrices(config, qtype: GGML) -> dict[str, str]:
    names = {f"layers.{i}.{name}": qtype.name for i in range(config.num_layers) for name in LAYER_MATRICES}
    return names | {"embed": qtype.name, "lm_head": qtype.name}


@pytest.mark.parametrize("qtype", PACKED_TYPES, ids=lambda t: t.name)
def test_loader_packs_the_packable_layer_weights_and_head(tmp_path, qtype):
    path = write_tiny(tmp_path, qtype)
    _, decoder = load_gguf(path, progress=False)
    _, unpacked = float_params(*load_gguf(path, progress=False, pack=False))

    assert packed_formats(decoder) == all_matrices(TINY, qtype)
    # The same values as the float weights, Q/K rows un-permuted alike.
    _, from_codes = float_params(TINY, decoder)
    for key, values in unpacked["layers"].items():
        np.testing.assert_array_equal(from_codes["layers"][key], values, err_msg=key)
    np.testing.assert_array_equal(from_codes["lm_head"], unpacked["lm_head"])
    np.testing.assert_array_equal(from_codes["embed"], unpacked["embed"])


def test_loader_packs_nothing_it_cannot_and_nothing_when_asked_not_to(tmp_path):
    _, float_decoder = load_gguf(write_tiny(tmp_path, GGML.F32), progress=False)
    _, k_quant_decoder = load_gguf(write_tiny(tmp_path, GGML.Q4_K), progress=False)
    _, unpacked = load_gguf(write_tiny(tmp_path, GGML.Q8_0), progress=False, pack=False)

    assert packed_formats(float_decoder) == {}
    assert packed_formats(k_quant_decoder) == {}
    assert packed_formats(unpacked) == {}


def test_each_layer_keeps_its_own_block_type(tmp_path):
    # K-quant mixes store some layers' tensors in another type: every layer has its own buffers, so
    # each keeps the type it was stored in.
    path = write_tiny(tmp_path, GGML.Q4_0, types={"blk.1.ffn_down.weight": GGML.Q8_0})

    _, decoder = load_gguf(path, progress=False)

    assert packed_formats(decoder) == all_matrices(TINY, GGML.Q4_0) | {"layers.1.mlp.down": "Q8_0"}
    assert decoder.layers[1].mlp.down.bits == 8 and decoder.layers[0].mlp.down.bits == 4


@pytest.mark.parametrize("qtype", [GGML.Q4_1, GGML.Q8_0], ids=lambda t: t.name)
def test_decoding_from_packed_weights_gives_the_float_weights_tokens(tmp_path, qtype):
    path = write_tiny(tmp_path, qtype, seed=5)
    config, packed_decoder = load_gguf(path, progress=False)
    _, float_decoder = load_gguf(path, progress=False, pack=False)
    prompt = [5, 17, 200, 31, 64, 9, 150]
    greedy = generate.SamplingParams(temperature=0.0)

    def run(decoder) -> list[generate.TokenEvent]:
        return list(generate.Generator(config, decoder).generate(prompt, greedy, max_new_tokens=24))

    packed_events, float_events = run(packed_decoder), run(float_decoder)

    assert [e.token_id for e in packed_events] == [e.token_id for e in float_events]
    np.testing.assert_allclose(
        [e.logprob for e in packed_events], [e.logprob for e in float_events], rtol=1e-4, atol=1e-4
    )


def test_prefill_and_decode_both_read_the_packed_codes(tmp_path):
    config, decoder = load_gguf(write_tiny(tmp_path, GGML.Q8_0, seed=6), progress=False)
    graphdef, state = nnx.split(decoder)
    # No float copy of a packed matrix is held: its only leaves are the codes and the scales.
    leaves = {".".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}
    assert {leaf for leaf in leaves if leaf.startswith("layers.0.attn.q.")} == {
        "layers.0.attn.q.codes",
        "layers.0.attn.q.scale",
    }
    assert "embed.weight" not in leaves and "lm_head.weight" not in leaves
    # Zeroed codes change what every step computes, one token (decode) or several (prefill).
    zeroed = jax.tree.map(
        lambda leaf: jnp.zeros_like(leaf) if leaf.dtype == jnp.uint32 else leaf, state
    )
    token, position = jnp.array([[7]]), jnp.array([[0]])
    tokens, positions = jnp.array([[7, 8]]), jnp.array([[0, 1]])

    for ids, where in ((token, position), (tokens, positions)):
        intact = model.forward(graphdef, state, ids, where)[0]
        tampered = model.forward(graphdef, zeroed, ids, where)[0]
        assert not np.allclose(tampered, intact)


def test_embedding_rows_from_codes_equal_the_dequantized_rows():
    raw, expected = quantized(64, 96, GGML.Q4_1, seed=7)
    weight = jax.tree.map(jnp.asarray, packed.packed_from_gguf(raw, "Q4_1", (64, 96)))
    ids = jnp.array([[0, 9, 63], [8, 7, 1]])

    rows = jax.jit(packed.take_rows)(weight, ids)

    np.testing.assert_array_equal(np.asarray(rows), expected[np.asarray(ids)])


def test_block_size_is_gguf_s():
    for type_name in packed.PACKED_FORMATS:
        assert packed.block_shape(type_name)[0] == packed.BLOCK
