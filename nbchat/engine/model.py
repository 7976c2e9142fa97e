"""The Llama-family decoder as pure JAX functions over the parameter pytree.

RMSNorm, rotary embeddings (half-split / Hugging Face order, optional Llama 3 frequency scaling),
grouped-query attention over a KV cache, SwiGLU MLP, optional q/k/v biases (Qwen2), tied or separate
output head.

The hot path is a plain function of (params, cache, token ids, positions) that callers wrap in
``jax.jit`` with the config static: no module objects, no per-call graph splitting. Layers are an
unrolled loop over per-layer buffers, not a ``lax.scan`` over stacked ones: XLA:CPU copies a
layer's slice of a stacked weight before every matmul (see ``unstack_layers``), which made decode
~45% slower. Weights may be stored in bfloat16; every matmul and reduction computes in float32.
On XLA:CPU (jax 0.10) bfloat16 halves the memory but is not faster: its convert-and-multiply runs
slower than a float32 matmul reads twice the bytes.

Shape letters: B batch, T new tokens, C cache capacity, D hidden, F MLP width, V vocabulary,
L layers, Hq query heads, Hkv key/value heads, G = Hq // Hkv query heads per kv head, hd head dim.

The parameter pytree (every linear weight ``[out, in]``, layers stacked on a leading L axis) is the
contract with ``weights.py``; see ``init_random_params`` for its exact keys and shapes. It may also
hold ``params["packed"]``: the same weights as the GGUF's 4-/8-bit block codes (``packed.py``), with
keys ``"layers"`` (a subset of the linear-weight keys) and ``"head"``. A one-token step (decode) reads
those instead of the float weights: it reads every weight once, so fewer bytes make it faster, while
a multi-token step (prefill) is a matrix product that the float weights serve faster.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from nbchat.engine import cache as kv_cache
from nbchat.engine import packed
from nbchat.engine.config import ModelConfig

COMPUTE_DTYPE = jnp.float32


def compiler_options() -> dict[str, bool]:
    """XLA options for jitting ``forward`` with a donated cache.

    On CPU, XLA's default copy insertion copies every donated cache buffer twice per step when a
    buffer is both read (attention) and updated in place (the new k/v); region analysis proves the
    read happens first and drops the copies (measured: 37 ms of copies per token at 1024 slots).
    """
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if jax.default_backend() == "cpu" else {}


def init_random_params(config: ModelConfig, seed: int = 0, dtype: str | jnp.dtype = "float32") -> dict:
    """Random parameters with the pytree layout ``weights.py`` produces, for tests and benchmarks.

    Linear weights are scaled by 1/sqrt(fan_in) so activations keep unit scale through the layers
    and the logits are spread out (not near-uniform), which makes argmax comparisons meaningful.
    """
    c = config
    L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    rng = np.random.default_rng(seed)

    def linear(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[-1]))

    def norm(*shape: int) -> np.ndarray:
        return 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)

    layers = {
        "attn_norm": norm(L, D),
        "q": linear(L, q_out, D),
        "k": linear(L, kv_out, D),
        "v": linear(L, kv_out, D),
        "o": linear(L, D, q_out),
        "mlp_norm": norm(L, D),
        "gate": linear(L, F, D),
        "up": linear(L, F, D),
        "down": linear(L, D, F),
    }
    if c.attention_bias:
        layers["q_bias"] = 0.1 * rng.standard_normal((L, q_out), dtype=np.float32)
        layers["k_bias"] = 0.1 * rng.standard_normal((L, kv_out), dtype=np.float32)
        layers["v_bias"] = 0.1 * rng.standard_normal((L, kv_out), dtype=np.float32)
    params = {
        "embed": 0.5 * rng.standard_normal((V, D), dtype=np.float32),
        "layers": layers,
        "final_norm": norm(D),
    }
    if not c.tie_word_embeddings:
        params["lm_head"] = linear(V, D)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype=dtype), params)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """[hd // 2] float32 rotation frequencies, computed the way Hugging Face does (float32 powers),
    with Llama 3 scaling applied when the config asks for it."""
    hd = config.head_dim
    exponents = np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)
    inv_freq = (np.float32(1.0) / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, scaled).astype(np.float32)


def unstack_layers(params: dict) -> dict:
    """The same parameters with ``layers`` (and ``packed["layers"]``) as tuples of per-layer dicts
    instead of stacked arrays.

    ``forward`` accepts both forms; the per-layer form is the fast one. Inside a jitted function, a
    layer slice of a stacked array feeds XLA:CPU's dot only after a copy (a dynamic-slice fusion under
    ``lax.scan``, a slice fusion when unrolled): every decode step would copy all the weights once
    more (SmolLM2-135M: the layer matmuls took 35 ms per token instead of 24 ms with separate
    buffers). On CPU the per-layer arrays are zero-copy views of the stacked buffers: no memory cost.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    num_layers = next(iter(layers.values())).shape[0]

    def layer_views(stacked: jax.Array) -> list[jax.Array]:
        if all(device.platform == "cpu" for device in stacked.devices()):
            host = np.asarray(stacked)  # a view of the device buffer on CPU
            return [jax.device_put(host[i], stacked.sharding) for i in range(num_layers)]
        return [stacked[i] for i in range(num_layers)]

    def per_layer(stacked_layers: dict) -> tuple[dict, ...]:
        views = {}
        for name, value in stacked_layers.items():  # an array, or a PackedWeight of arrays
            leaves, treedef = jax.tree.flatten(value)
            leaf_views = [layer_views(leaf) for leaf in leaves]
            views[name] = [jax.tree.unflatten(treedef, [v[i] for v in leaf_views]) for i in range(num_layers)]
        return tuple({name: views[name][i] for name in stacked_layers} for i in range(num_layers))

    unstacked = {**params, "layers": per_layer(layers)}
    if "packed" in params:
        unstacked["packed"] = {**params["packed"], "layers": per_layer(params["packed"]["layers"])}
    return unstacked


def _layer_slices(layers: dict | list, num_layers: int) -> list:
    """Per-layer dicts from a dict of stacked [L, ...] arrays (or PackedWeights); a list as is."""
    if not isinstance(layers, dict):
        return layers
    return [jax.tree.map(lambda stacked, i=i: stacked[i], layers) for i in range(num_layers)]


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x: [..., D] float32; weight: [D]."""
    variance = jnp.mean(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(variance + eps) * weight.astype(COMPUTE_DTYPE)


def linear(x: jax.Array, weight: jax.Array) -> jax.Array:
    """x: [..., in] float32; weight: [out, in] in its storage dtype, or packed block codes ->
    [..., out] float32."""
    if isinstance(weight, packed.PackedWeight):
        return packed.linear(x, weight)
    if weight.dtype != COMPUTE_DTYPE and math.prod(x.shape[:-1]) == 1:
        # One token with bfloat16 weights: XLA:CPU's dot converts a bfloat16 operand ~10x slower
        # than it reads float32, while a multiply-reduce loop fusion converts in registers and runs
        # at memory speed: the point of narrow storage.
        rows = (weight.astype(COMPUTE_DTYPE) * x.reshape(-1)).sum(axis=-1)  # [out]
        return rows.reshape(*x.shape[:-1], weight.shape[0])
    return jnp.einsum("...i,oi->...o", x, weight.astype(COMPUTE_DTYPE))


def materialized(x: jax.Array, always_true: jax.Array) -> jax.Array:
    """``x``, computed once into its own buffer before the next op reads it.

    XLA:CPU compiles a packed linear (unpacking and a matrix-vector product) into one loop and fuses
    the ops that produce its input into that loop too, recomputing them for every output row: after
    the attention that made a SmolLM2 decode step 8 ms slower; with every packed linear's input
    materialized the step took 17.7 ms instead of 22. A conditional is a boundary no fusion crosses;
    ``always_true`` is true but XLA cannot know it, so the other branch never runs.
    (``jax.lax.optimization_barrier`` would say this directly, but XLA:CPU drops barriers before
    fusion.)
    """
    return jax.lax.cond(always_true, lambda a: a, jnp.zeros_like, x)


def rotary_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """positions: [B, T] int -> (cos, sin) each [B, T, hd // 2]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate the two halves of the head dim (Hugging Face ``rotate_half`` order).

    x: [B, T, H..., hd]; cos, sin: [B, T, hd // 2], broadcast over the head axes.
    """
    extra_axes = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra_axes + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra_axes + sin.shape[2:])
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    positions: jax.Array,
    cached_k: jax.Array | None = None,
    cached_v: jax.Array | None = None,
    cache_len: jax.Array | None = None,
) -> jax.Array:
    """Causal grouped-query attention of T new tokens over the cached slots and themselves.

    q: [B, T, Hkv, G, hd]; k, v: [B, Hkv, T, hd] (the new tokens); positions: [B, T];
    cached_k: [B, Hkv, hd, C] (transposed, see ``KVCache``), cached_v: [B, Hkv, C, hd], or both None;
    cache_len: [B] int, row b's slots [0, cache_len[b]) are valid.
    Returns [B, T, Hkv, G, hd].

    The G query heads sharing a kv head are stacked as R = G * T rows (row g * T + t), so every
    score and weighted sum is a plain batched matmul over (B, Hkv) whose output needs no transpose:
    transposing the [B, Hkv, G, T, C] scores of a long prefill cost more than the matmuls.
    The cached and the new keys are scored separately and share one softmax (a common max and
    denominator), so the cache buffers are only read here: the caller writes the new k/v into them
    after every layer is done. Reading a buffer after an in-place update made XLA:CPU copy the
    whole buffer twice per layer.
    """
    B, T, Hkv, G, hd = q.shape
    scale = 1.0 / math.sqrt(hd)
    rows = q.transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, hd) * scale  # [B, Hkv, R, hd]
    row_positions = jnp.tile(positions, (1, G))[:, None, :, None]  # [B, 1, R, 1]
    new_scores = jnp.einsum("bkrd,bksd->bkrs", rows, k)  # [B, Hkv, R, T]
    new_scores = jnp.where(positions[:, None, None, :] <= row_positions, new_scores, -jnp.inf)
    if cached_k is None:
        attended = jnp.einsum("bkrs,bksd->bkrd", jax.nn.softmax(new_scores, axis=-1), v)
    else:
        C = cached_k.shape[3]
        cached_scores = jnp.einsum("bkrd,bkds->bkrs", rows, cached_k.astype(COMPUTE_DTYPE))  # [B, Hkv, R, C]
        valid = jnp.arange(C) < cache_len[:, None, None, None]  # [B, 1, 1, C]
        cached_scores = jnp.where(valid, cached_scores, -jnp.inf)
        # Every query sees at least itself, so the max is finite and the denominator positive.
        top = jnp.maximum(cached_scores.max(axis=-1), new_scores.max(axis=-1))[..., None]  # [B, Hkv, R, 1]
        cached_weights, new_weights = jnp.exp(cached_scores - top), jnp.exp(new_scores - top)
        total = cached_weights.sum(axis=-1, keepdims=True) + new_weights.sum(axis=-1, keepdims=True)
        attended = jnp.einsum("bkrs,bksd->bkrd", cached_weights, cached_v.astype(COMPUTE_DTYPE))
        attended = (attended + jnp.einsum("bkrs,bksd->bkrd", new_weights, v)) / total  # [B, Hkv, R, hd]
    return attended.reshape(B, Hkv, G, T, hd).transpose(0, 3, 1, 2, 4)


def forward(
    params: dict,
    config: ModelConfig,
    token_ids: jax.Array,
    positions: jax.Array,
    cache: kv_cache.KVCache | None = None,
    cache_len: jax.Array | None = None,
    logits_at: jax.Array | None = None,
) -> tuple[jax.Array, kv_cache.KVCache | None]:
    """Run the decoder on T new tokens per sequence.

    token_ids, positions: [B, T] int. With a cache, row b's new tokens attend to its slots
    [0, cache_len[b]) and (causally) to each other, and their k/v are written at its slots
    [cache_len[b], cache_len[b] + T): the caller keeps positions[b] == cache_len[b] + arange(T) and
    cache_len[b] + T <= capacity (cache_len is a traced [B] int, one length per row, so rows of a
    batch may sit at different positions). Without a cache this is the plain full-sequence forward.

    logits_at: [B] int, the index along T whose logits are wanted (the last real token of a padded
    prompt): the vocabulary projection is the largest matmul, so only needed rows go through it.
    None computes logits for all positions. Returns (logits [B, V] or [B, T, V] float32, the
    updated cache or None).

    Layers run as an unrolled Python loop over per-layer buffers (see ``unstack_layers``); stacked
    ``params["layers"]`` are accepted too and sliced here, which is slower but fine for tests.
    """
    c = config
    B, T = token_ids.shape
    G = c.num_heads // c.num_kv_heads
    layers = params["layers"]
    # One token per step: read the packed block codes where the checkpoint has them (see the module
    # docstring); the float weights serve everything else.
    packed_params = params.get("packed", {}) if B * T == 1 else {}
    packed_layers = packed_params.get("layers", [{}] * c.num_layers)
    layers = _layer_slices(layers, c.num_layers)
    packed_layers = _layer_slices(packed_layers, c.num_layers)
    cos, sin = rotary_tables(positions, rope_inverse_frequencies(c))  # [B, T, hd/2]
    x = params["embed"][token_ids].astype(COMPUTE_DTYPE)  # [B, T, D]
    new_k, new_v = [], []
    # Inputs of packed linears are computed once into their own buffers (see ``materialized``).
    always_true = positions[0, 0] >= 0

    def packed_input(a: jax.Array) -> jax.Array:
        return materialized(a, always_true) if packed_params else a

    for i, (dense, compact) in enumerate(zip(layers, packed_layers, strict=True)):
        p = {**dense, **compact}
        h = packed_input(rms_norm(x, p["attn_norm"], c.rms_norm_eps))
        q, k, v = linear(h, p["q"]), linear(h, p["k"]), linear(h, p["v"])  # [B, T, H*hd]
        if c.attention_bias:
            q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
        q = apply_rope(q.reshape(B, T, c.num_kv_heads, G, c.head_dim), cos, sin)
        k = apply_rope(k.reshape(B, T, c.num_kv_heads, c.head_dim), cos, sin).transpose(0, 2, 1, 3)
        v = v.reshape(B, T, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)  # [B, Hkv, T, hd]
        if cache is None:
            attended = attention(q, k, v, positions)  # [B, T, Hkv, G, hd]
        else:
            attended = attention(q, k, v, positions, cache.k[i], cache.v[i], cache_len)
            new_k.append(k)
            new_v.append(v)
        x = x + linear(packed_input(attended.reshape(B, T, c.num_heads * c.head_dim)), p["o"])
        h = packed_input(rms_norm(x, p["mlp_norm"], c.rms_norm_eps))
        x = x + linear(packed_input(jax.nn.silu(linear(h, p["gate"])) * linear(h, p["up"])), p["down"])

    if logits_at is not None:
        x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, D]
    x = rms_norm(x, params["final_norm"], c.rms_norm_eps)
    head = params["embed"] if c.tie_word_embeddings else params["lm_head"]  # [V, D]
    head = packed_params.get("head", head)
    new_cache = None
    if cache is not None:  # written last: see ``attention``
        new_cache = kv_cache.KVCache(
            tuple(
                kv_cache.write_keys(buffer, k, cache_len) for buffer, k in zip(cache.k, new_k, strict=True)
            ),
            tuple(
                kv_cache.write_values(buffer, v, cache_len) for buffer, v in zip(cache.v, new_v, strict=True)
            ),
        )
    return linear(packed_input(x), head), new_cache
