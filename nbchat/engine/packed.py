"""Linear weights kept in a GGUF's own 4- or 8-bit block codes, dequantized inside the jitted step.

A one-token decode step reads every weight once, so its speed is the bytes it reads. XLA:CPU (jaxlib
0.10) runs dots at full speed only in float32: a bfloat16, float16 or int8 dot, and any ``convert``
of a narrow array, ran ~10x slower here than a float32 dot reading twice the bytes (1-2 GB/s). So the
codes are packed in uint32 words and unpacked with shifts, masks and a bit trick instead of
``convert``: ``bitcast(code | 0x4B000000) == 2**23 + code`` exactly, so subtracting ``2**23 + offset``
gives the signed code as a float32 with no conversion op. XLA fuses that unpacking, the per-block
scales and the matrix-vector product into one loop, so no float32 copy of the weight is written and
memory delivers 5-6 bits per weight instead of 32 (SmolLM2-135M, Q4_1 layers and Q8_0 head: a decode
step with a 256-slot cache 17 ms instead of 32; see ``backend.fusion_barrier`` for the fusion it needs).

The values equal ``gguf.quants.dequantize`` of the same blocks (the same float32 products and sums),
so the model computes the function the reference computes from the file.

Layout of one [out, in] weight with ``bits`` b (4 or 8), n = 32 // b codes per word: ``codes`` uint32
[out / n, in], where code slot j (bits [b*j, b*j + b)) of word [r, c] holds row r * n + j, column c;
``scale`` and ``minimum`` float32 [out, in / 32], one per GGUF block of 32 along ``in``: value =
(code - offset) * scale (+ minimum). Rows are independent, so a row permutation (llama.cpp's Q/K
order) applies to the codes before packing and to the scales alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np

# The float32 whose bits are 0x4B000000 is 2**23; OR-ing an integer below 2**23 into its mantissa
# gives 2**23 + that integer exactly.
_MAGIC_BITS = 0x4B000000
_MAGIC_VALUE = float(2**23)


@dataclasses.dataclass(frozen=True)
class PackedFormat:
    """How one GGML block type maps onto packed codes."""

    bits: int  # code width
    offset: int  # value = (code - offset) * scale (+ minimum)
    has_minimum: bool


# GGML types whose blocks are kept packed (names of gguf.GGMLQuantizationType members). Others (the
# K-quants, whose 256-value super-blocks nest 6-bit scales, and float types) are dequantized at load.
PACKED_FORMATS = {
    "Q4_0": PackedFormat(bits=4, offset=8, has_minimum=False),  # d, 16 bytes of nibbles
    "Q4_1": PackedFormat(bits=4, offset=0, has_minimum=True),  # d, m, 16 bytes of nibbles
    "Q8_0": PackedFormat(bits=8, offset=128, has_minimum=False),  # d, 32 int8
}


def block_shape(type_name: str) -> tuple[int, int]:
    """(values, bytes) per block of a GGML type, from gguf's own table."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


BLOCK = block_shape("Q4_0")[0]  # values per block: 32 for every packable type


def packable(type_name: str, shape: tuple[int, ...]) -> bool:
    """Whether a GGUF tensor of this type and numpy shape [out, in] can be kept packed."""
    fmt = PACKED_FORMATS.get(type_name)
    return fmt is not None and len(shape) == 2 and shape[1] % BLOCK == 0 and shape[0] % (32 // fmt.bits) == 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A linear weight [out, in] as packed codes and per-block scales (see the module docstring).

    A pytree: the arrays are leaves (stackable on a leading layer axis), the format is static.
    """

    codes: Any  # uint32 [..., out / n, in]
    scale: Any  # float32 [..., out, in / 32]
    minimum: Any  # float32 [..., out, in / 32], or None
    bits: int = dataclasses.field(metadata={"static": True})
    offset: int = dataclasses.field(metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical [..., out, in] shape."""
        return (*self.scale.shape[:-1], self.codes.shape[-1])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.codes, self.scale, self.minimum) if a is not None)

    def rows(self, start: int, stop: int) -> PackedWeight:
        """Rows [start, stop) of the weight (``start`` and ``stop`` multiples of the codes per word,
        as every row count of a packed weight is)."""
        per_word = 32 // self.bits
        if start % per_word or stop % per_word:
            raise ValueError(f"rows [{start}, {stop}) do not start and end on a word of {per_word} codes")
        minimum = None if self.minimum is None else self.minimum[..., start:stop, :]
        codes = self.codes[..., start // per_word : stop // per_word, :]
        return PackedWeight(codes, self.scale[..., start:stop, :], minimum, self.bits, self.offset)


def split_blocks(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """GGUF block bytes of a [out, in] tensor -> (codes uint8 [out, in], scale float32 [out, in/32],
    minimum float32 [out, in/32] or None), with codes in value order (Q4 blocks store values 0-15 in
    the low nibbles and 16-31 in the high ones; Q8_0 codes are int8 + 128)."""
    fmt = PACKED_FORMATS[type_name]
    out, inner = shape
    block_values, block_bytes = block_shape(type_name)
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(out, inner // block_values, block_bytes)
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    minimum = None
    start = 2
    if fmt.has_minimum:
        minimum = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        start = 4
    payload = blocks[..., start:]
    if fmt.bits == 4:
        codes = np.concatenate([payload & 0x0F, payload >> 4], axis=-1)
    else:
        codes = (payload.view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return codes.reshape(out, inner), scale, minimum


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [out, in] -> uint32 words [out / n, in]: row r * n + j in code slot j of word row r."""
    per_word = 32 // bits
    grouped = codes.reshape(codes.shape[0] // per_word, per_word, codes.shape[1]).astype(np.uint32)
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))[None, :, None]
    return np.bitwise_or.reduce(grouped << shifts, axis=1)


def packed_from_gguf(
    raw: np.ndarray, type_name: str, shape: tuple[int, int], row_order: np.ndarray | None = None
) -> PackedWeight:
    """A PackedWeight (numpy leaves) from one GGUF tensor's raw blocks; ``row_order`` reorders rows
    (``values[row_order]``), e.g. to undo llama.cpp's Q/K permutation."""
    fmt = PACKED_FORMATS[type_name]
    codes, scale, minimum = split_blocks(raw, type_name, shape)
    if row_order is not None:
        codes, scale = codes[row_order], scale[row_order]
        minimum = None if minimum is None else minimum[row_order]
    return PackedWeight(pack_codes(codes, fmt.bits), scale, minimum, fmt.bits, fmt.offset)


def _per_value(per_block: Any) -> Any:
    """[..., in / 32] -> [..., in], each block's number repeated over its 32 values.

    Broadcast and merge the scales rather than splitting the values into [..., in / 32, 32]: with the
    values reshaped, XLA:CPU picked a layout for the unpacked buffer that made the dot 3x slower.
    """
    shape = (*per_block.shape, BLOCK)
    return jnp.broadcast_to(per_block[..., None], shape).reshape(*per_block.shape[:-1], -1)


def _signed_codes(codes: Any, bits: int, offset: int, shifts: Any) -> Any:
    """(code >> shift) & mask - offset as float32, without a convert op (see the module docstring)."""
    unpacked = (codes >> shifts) & jnp.uint32((1 << bits) - 1)
    return jax.lax.bitcast_convert_type(unpacked | jnp.uint32(_MAGIC_BITS), jnp.float32) - jnp.float32(
        _MAGIC_VALUE + offset
    )


def dequantize(weight: PackedWeight) -> Any:
    """The whole weight as float32 [..., out, in], as one elementwise expression (no concatenation)."""
    per_word = 32 // weight.bits
    shifts = (jnp.arange(per_word, dtype=jnp.uint32) * jnp.uint32(weight.bits))[:, None]  # [n, 1]
    signed = _signed_codes(weight.codes[..., :, None, :], weight.bits, weight.offset, shifts)
    signed = signed.reshape(*weight.codes.shape[:-2], -1, weight.codes.shape[-1])  # [..., out, in]
    values = signed * _per_value(weight.scale)
    if weight.minimum is not None:
        values = values + _per_value(weight.minimum)
    return values


def take_rows(weight: PackedWeight, ids: Any) -> Any:
    """Rows ``ids`` [...] of the weight as float32 [..., in] (an embedding lookup), unpacking only
    the words that hold them."""
    per_word = 32 // weight.bits
    words = weight.codes[ids // per_word]  # [..., in]
    shifts = ((ids % per_word).astype(jnp.uint32) * jnp.uint32(weight.bits))[..., None]  # [..., 1]
    values = _signed_codes(words, weight.bits, weight.offset, shifts) * _per_value(weight.scale[ids])
    if weight.minimum is not None:
        values = values + _per_value(weight.minimum[ids])
    return values


def linear(x: Any, weight: PackedWeight) -> Any:
    """x [..., in] float32 @ weight.T -> [..., out] float32, for one token (a matrix-vector product).

    Written as ``x @ w.T`` over the whole unpacked weight: XLA:CPU fuses it into one loop that
    unpacks and multiplies. Measured alternatives were slower: ``einsum("...i,oi->...o")`` (a
    layout that made the 49152-row head 33 ms instead of 2), a dot per code slot (~1700 small ops
    per token), codes grouped so that unpacking needs a concatenation (4x slower), and this same
    product with several rows of x (prefill: 2x slower than float32 weights, so prefill uses those).
    """
    return x @ dequantize(weight).T
