"""Backend policy: how the decoder's matrix products are formulated on each JAX backend.

XLA:CPU (jaxlib 0.10) needs tricks that accelerators do not; each lives here with the measurement
that justifies it (2-core AMD EPYC, SmolLM2-135M: 30 layers, d 576, ffn 1536, vocab 49152; see
``ENGINE-NOTES.md``), so ``model.py`` reads like the math. GPU and TPU get the plain formulation:
bfloat16 weights, matmuls accumulating in float32, no packing, no fusion barriers.

Holds no model structure and no weights; decisions are made at trace time (``jax.default_backend()``
is static), so the compiled program contains only the chosen formulation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nbchat.engine import packed

COMPUTE_DTYPE = jnp.float32  # activations, reductions and accumulations, whatever the weights' dtype


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def keeps_block_codes() -> bool:
    """Whether loaders keep a GGUF's Q4_0/Q4_1/Q8_0 block codes packed (``packed.py``) instead of
    dequantizing them.

    CPU: yes. A decode step reads every weight once, so its speed is the bytes read: with the codes
    the SmolLM2 step took 17 ms instead of 32 ms with float32 weights (commit ce21028, 0c6e497), and
    the model is held in 5-6 bits per weight. Accelerators: no; their bfloat16 matmuls are the fast
    path and the unpacking would only add work.
    """
    return on_cpu()


def default_dtype() -> str:
    """The float weights' storage dtype when the caller names none: float32 on CPU, where a bfloat16
    dot converts ~10x slower than it reads float32 (1-2 GB/s) so narrow storage buys memory only,
    bfloat16 elsewhere."""
    return "float32" if on_cpu() else "bfloat16"


def compiler_options() -> dict[str, bool]:
    """XLA options for jitting a step that donates its KV cache.

    On CPU, XLA's default copy insertion copies every donated cache buffer twice per step when a
    buffer is both read (attention) and updated in place (the new k/v); region analysis proves the
    read happens first and drops the copies (measured: 37 ms of copies per token at 1024 slots).
    """
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if on_cpu() else {}


def _always_true(x: jax.Array) -> jax.Array:
    """A predicate that is always true (no float exceeds +inf, NaN included) but that XLA cannot
    know, and that depends on ``x``: whatever a conditional on it computes waits for ``x``."""
    return jnp.logical_not(x.reshape(-1)[0] > jnp.inf)


def fusion_barrier(x: jax.Array) -> jax.Array:
    """``x``, computed once into its own buffer before the next op reads it (CPU; elsewhere ``x``).

    XLA:CPU compiles a packed linear (unpacking and a matrix-vector product) into one loop and fuses
    the ops that produce its input into that loop too, recomputing them for every output row: after
    the attention that made a SmolLM2 decode step 8 ms slower; with every packed linear's input
    materialized the step took 17.7 ms instead of 22 (commit 0c6e497). A conditional is a boundary
    no fusion crosses, and its other branch never runs. (``jax.lax.optimization_barrier`` would say
    this directly, but XLA:CPU drops barriers before fusion.)
    """
    if not on_cpu():
        return x
    return jax.lax.cond(_always_true(x), _identity, jnp.zeros_like, x)


def unpacked_when_needed(
    x: jax.Array, weight: packed.PackedWeight, rows: tuple[int, int] | None = None
) -> jax.Array:
    """The weight (its rows [start, stop) with ``rows``) unpacked to float32 [..., out, in] into a
    buffer of its own, computed only once ``x`` (the product's input) exists.

    Unpacking depends on the parameters alone, so XLA:CPU otherwise schedules every layer's
    unpacking at the start of the step: all of them (540 MB for SmolLM2) were live at once, each
    written to and read back from memory, and a 4-row decode step took 356 ms instead of 57 (same
    run; the unpacking fusions 10x slower than alone, where the buffer stays in cache). Computed in
    a conditional on a predicate of ``x``, each weight is unpacked just before its product and its
    buffer is freed after it: one weight's float copy lives at a time.
    """
    if rows is None:
        return jax.lax.cond(_always_true(x), packed.dequantize, _zeros_unpacked, weight)
    # Sliced inside the branch, where the slice fuses into the unpacking: a slice taken outside is
    # copied into the conditional's operand (25 ms per step for the head's chunks).
    unpack = functools.partial(_unpack_rows, rows=rows)
    zeros = functools.partial(_zeros_rows, rows=rows)
    return jax.lax.cond(_always_true(x), unpack, zeros, weight)


# The conditionals' branches are module-level functions, not lambdas made per call: JAX caches a
# branch's traced jaxpr by the function and its input types, so the 30 layers' ~210 conditionals
# of a step trace each distinct branch once.
def _identity(x: jax.Array) -> jax.Array:
    return x


def _zeros_unpacked(weight: packed.PackedWeight) -> jax.Array:
    return jnp.zeros(weight.shape, jnp.float32)


def _unpack_rows(weight: packed.PackedWeight, rows: tuple[int, int]) -> jax.Array:
    return packed.dequantize(weight.rows(*rows))


def _zeros_rows(weight: packed.PackedWeight, rows: tuple[int, int]) -> jax.Array:
    return jnp.zeros((*weight.shape[:-2], rows[1] - rows[0], weight.shape[-1]), jnp.float32)


# Products with at most this many rows of x read the packed codes once per row (see packed_linear).
FUSED_ROWS_MAX = 4
# Rows of a packed weight unpacked at a time for a product with several rows of x (see packed_linear).
UNPACKED_CHUNK_ROWS = 4096


def _rows(x: jax.Array) -> int:
    n = 1
    for size in x.shape[:-1]:
        n *= size
    return n


def float_linear(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x [..., in] float32 @ weight [out, in].T -> [..., out] float32."""
    if not on_cpu():
        # The plain formulation: the weights' dtype in, float32 accumulation out.
        return jnp.einsum(
            "...i,oi->...o", x.astype(weight.dtype), weight, preferred_element_type=COMPUTE_DTYPE
        ).astype(COMPUTE_DTYPE)
    if weight.dtype != COMPUTE_DTYPE and _rows(x) == 1:
        # One token with bfloat16 weights: XLA:CPU's dot converts a bfloat16 operand ~10x slower
        # than it reads float32, while a multiply-reduce loop fusion converts in registers and runs
        # at memory speed: the point of narrow storage.
        rows = (weight.astype(COMPUTE_DTYPE) * x.reshape(-1)).sum(axis=-1)  # [out]
        return rows.reshape(*x.shape[:-1], weight.shape[0])
    return jnp.einsum("...i,oi->...o", x, weight.astype(COMPUTE_DTYPE))


def packed_linear(x: jax.Array, weight: packed.PackedWeight) -> jax.Array:
    """x [..., in] float32 @ the packed weight [out, in].T -> [..., out] float32.

    One row (a one-sequence decode step): the unpacking fused into the matrix-vector product,
    reading only the codes (its input materialized first: see ``fusion_barrier``); up to
    ``FUSED_ROWS_MAX`` rows (a small batch): that product once per row. More rows (a larger batch,
    a prefill): one fused product of all rows ran the unpacking once per row of x or worse (a
    4-row step 300+ ms, the 49152-row head alone 50-70 ms), so the weight is unpacked once into a
    temporary float32 buffer, just in time (``unpacked_when_needed``; a large weight in chunks),
    and multiplied by XLA's matmul; the buffer lives for one product, so no float copy of the
    weights stays in memory.
    """
    rows = _rows(x)
    if rows == 1:
        return packed.linear(fusion_barrier(x), weight)
    if rows <= FUSED_ROWS_MAX:
        # A few rows: each row's own fused product, reading the codes once per row, costs less
        # than unpacking every weight once (same run, whole decode step: 2 rows 30 -> 18 ms, 4 rows
        # 35 -> 32; 8 rows 43 -> 56, so not beyond 4).
        flat = x.reshape(rows, x.shape[-1])
        products = [packed.linear(fusion_barrier(flat[row : row + 1]), weight) for row in range(rows)]
        return jnp.concatenate(products, axis=0).reshape(*x.shape[:-1], -1)
    out_features = weight.shape[-2]
    if out_features <= 2 * UNPACKED_CHUNK_ROWS:
        return x @ unpacked_when_needed(x, weight).T
    # A large weight (SmolLM2's 49152-row head: 113 MB as float32) in chunks, each unpacked after
    # the previous chunk's product: one chunk's float copy (9 MB) stays in cache between its
    # unpacking and its product instead of the whole copy going through memory twice. Same run,
    # whole decode step: 8 rows 73 -> 55 ms, 16 rows 103 -> 79 (64 with the slices of
    # ``unpacked_when_needed`` taken inside its conditional).
    parts, after = [], x
    for start in range(0, out_features, UNPACKED_CHUNK_ROWS):
        span = (start, min(start + UNPACKED_CHUNK_ROWS, out_features))
        after = x @ unpacked_when_needed(after, weight, span).T
        parts.append(after)
    return jnp.concatenate(parts, axis=-1)
