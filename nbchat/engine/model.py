"""The Llama-family decoder as Flax NNX modules.

RMSNorm, rotary embeddings (half-split / Hugging Face order, optional Llama 3 frequency scaling),
grouped-query attention over a KV cache, SwiGLU MLP, optional q/k/v biases (Qwen2), tied or separate
output head. The module tree is the one parameter layout: loaders fill its state by path
(``weights.py``), a random test model is ``Decoder(config, rngs=nnx.Rngs(seed))``.

The hot path is ``forward(graphdef, state, ...)``: callers ``nnx.split`` a Decoder once and wrap
``forward`` in a plain ``jax.jit`` with the graphdef static and the KV cache donated. (An ``nnx.jit``
per token cost ~28 ms of overhead for 30 layers; the split ~0.5 ms.) Layers are a list of Blocks,
each with its own buffers: a layer slice of a stacked weight cost XLA:CPU a copy before every matmul
(35 vs 24 ms per token). How a product is computed on each backend (packed block codes, fusion
barriers, bfloat16) is ``backend.py``'s business.

Shape letters: B batch, T new tokens, C cache capacity, D hidden, F MLP width, V vocabulary,
Hq query heads, Hkv key/value heads, G = Hq // Hkv query heads per kv head, hd head dim.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nbchat.engine import backend, packed
from nbchat.engine import cache as kv_cache
from nbchat.engine.backend import COMPUTE_DTYPE
from nbchat.engine.config import ModelConfig

# A model's packed matrices: module path ("embed", "lm_head", "layers.3.attn.q", ...) -> the name of
# their GGML block type in ``packed.PACKED_FORMATS``. Matrices not named hold float weights.
WeightFormats = Mapping[str, str]


def _scoped(formats: WeightFormats, prefix: str) -> dict[str, str]:
    """The formats of the matrices under ``prefix`` ("layers.0."), keyed relative to it."""
    return {path[len(prefix) :]: name for path, name in formats.items() if path.startswith(prefix)}


class Matrix(nnx.Module):
    """A weight [out, in]: float (``weight``) or GGUF block codes (``codes``, ``scale``, ``minimum``
    and the static ``bits``, ``offset``: see ``packed.py``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        packed_format: str | None,
        dtype: str,
        init_std: float,
        key: jax.Array,
    ):
        self.in_features, self.out_features = in_features, out_features
        self.packed_format = packed_format
        if packed_format is None:
            self.weight = nnx.Param(
                (init_std * jax.random.normal(key, (out_features, in_features))).astype(dtype)
            )
            return
        fmt = packed.PACKED_FORMATS[packed_format]
        self.bits, self.offset = fmt.bits, fmt.offset
        blocks = (out_features, in_features // packed.BLOCK)
        # Random codes centred on the offset, scaled so the values have about init_std spread.
        step = init_std * math.sqrt(12) / 2**fmt.bits
        self.codes = nnx.Param(
            jax.random.bits(key, (out_features // (32 // fmt.bits), in_features), jnp.uint32)
        )  # [out / n, in]
        self.scale = nnx.Param(jnp.full(blocks, step, jnp.float32))  # [out, in / 32]
        self.minimum = (
            nnx.Param(jnp.full(blocks, -step * 2 ** (fmt.bits - 1), jnp.float32)) if fmt.has_minimum else None
        )

    def packed_weight(self) -> packed.PackedWeight:
        minimum = None if self.minimum is None else self.minimum[...]
        return packed.PackedWeight(self.codes[...], self.scale[...], minimum, self.bits, self.offset)

    def matmul(self, x: jax.Array) -> jax.Array:
        """x [..., in] float32 -> x @ W.T [..., out] float32."""
        if self.packed_format is None:
            return backend.float_linear(x, self.weight[...])
        return backend.packed_linear(x, self.packed_weight())

    def take_rows(self, ids: jax.Array) -> jax.Array:
        """ids [...] int -> W[ids] [..., in] float32."""
        if self.packed_format is None:
            return self.weight[...][ids].astype(COMPUTE_DTYPE)
        return packed.take_rows(self.packed_weight(), ids)


class Linear(Matrix):
    """y = x @ W.T (+ b): W [out, in], b [out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = False,
        packed_format: str | None = None,
        dtype: str = "float32",
        key: jax.Array,
    ):
        weight_key, bias_key = jax.random.split(key)
        # Scaled by 1/sqrt(fan_in) so random models keep unit activations and spread-out logits.
        super().__init__(
            in_features,
            out_features,
            packed_format=packed_format,
            dtype=dtype,
            init_std=1 / math.sqrt(in_features),
            key=weight_key,
        )
        self.bias = (
            nnx.Param((0.1 * jax.random.normal(bias_key, (out_features,))).astype(dtype))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias[...].astype(COMPUTE_DTYPE)


class Embed(Matrix):
    """Token embeddings W [V, D]: ``embed(ids)`` looks rows up, ``embed.attend(x)`` is the tied
    output head x @ W.T."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        packed_format: str | None = None,
        dtype: str = "float32",
        key: jax.Array,
    ):
        super().__init__(dim, vocab_size, packed_format=packed_format, dtype=dtype, init_std=0.5, key=key)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.take_rows(ids)

    def attend(self, x: jax.Array) -> jax.Array:
        return self.matmul(x)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype: str = "float32", key: jax.Array):
        self.eps = eps
        self.weight = nnx.Param((1.0 + 0.1 * jax.random.normal(key, (dim,))).astype(dtype))  # [D]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] float32."""
        variance = jnp.mean(x * x, axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(variance + self.eps) * self.weight[...].astype(COMPUTE_DTYPE)


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
    cache_len: [B] int, row b's slots [0, cache_len[b]) are valid, or [] for every row alike.
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
        # Per row [B, 1, 1, C], or [C] for every row alike (a scalar cache_len: measured faster at
        # 1152 slots, 30 vs 39 ms per decode step).
        valid = jnp.arange(C) < (cache_len[:, None, None, None] if cache_len.ndim else cache_len)
        cached_scores = jnp.where(valid, cached_scores, -jnp.inf)
        # Every query sees at least itself, so the max is finite and the denominator positive.
        top = jnp.maximum(cached_scores.max(axis=-1), new_scores.max(axis=-1))[..., None]  # [B, Hkv, R, 1]
        cached_weights, new_weights = jnp.exp(cached_scores - top), jnp.exp(new_scores - top)
        total = cached_weights.sum(axis=-1, keepdims=True) + new_weights.sum(axis=-1, keepdims=True)
        attended = jnp.einsum("bkrs,bksd->bkrd", cached_weights, cached_v.astype(COMPUTE_DTYPE))
        attended = (attended + jnp.einsum("bkrs,bksd->bkrd", new_weights, v)) / total  # [B, Hkv, R, hd]
    return attended.reshape(B, Hkv, G, T, hd).transpose(0, 3, 1, 2, 4)


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary positions; returns its output and the new k/v."""

    def __init__(self, config: ModelConfig, *, formats: WeightFormats, dtype: str, key: jax.Array):
        c = self.config = config
        D, q_out, kv_out = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        keys = iter(jax.random.split(key, 4))

        def linear(name: str, in_features: int, out_features: int, use_bias: bool) -> Linear:
            return Linear(
                in_features,
                out_features,
                use_bias=use_bias,
                packed_format=formats.get(name),
                dtype=dtype,
                key=next(keys),
            )

        self.q = linear("q", D, q_out, c.attention_bias)
        self.k = linear("k", D, kv_out, c.attention_bias)
        self.v = linear("v", D, kv_out, c.attention_bias)
        self.o = linear("o", q_out, D, False)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        positions: jax.Array,
        cached: tuple[jax.Array, jax.Array] | None,
        cache_len: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, T, D]; cached: this layer's (keys, values) buffers or None.
        Returns (output [B, T, D], k [B, Hkv, T, hd], v [B, Hkv, T, hd])."""
        c = self.config
        B, T, _ = x.shape
        G = c.num_heads // c.num_kv_heads
        q = apply_rope(self.q(x).reshape(B, T, c.num_kv_heads, G, c.head_dim), cos, sin)
        k = apply_rope(self.k(x).reshape(B, T, c.num_kv_heads, c.head_dim), cos, sin).transpose(0, 2, 1, 3)
        v = self.v(x).reshape(B, T, c.num_kv_heads, c.head_dim).transpose(0, 2, 1, 3)
        attended = attention(q, k, v, positions, *(cached or (None, None)), cache_len)  # [B, T, Hkv, G, hd]
        return self.o(attended.reshape(B, T, c.num_heads * c.head_dim)), k, v


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, formats: WeightFormats, dtype: str, key: jax.Array):
        D, F = config.hidden_size, config.intermediate_size
        gate_key, up_key, down_key = jax.random.split(key, 3)
        self.gate = Linear(D, F, packed_format=formats.get("gate"), dtype=dtype, key=gate_key)
        self.up = Linear(D, F, packed_format=formats.get("up"), dtype=dtype, key=up_key)
        self.down = Linear(F, D, packed_format=formats.get("down"), dtype=dtype, key=down_key)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    """One pre-norm decoder layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, *, formats: WeightFormats, dtype: str, key: jax.Array):
        D, eps = config.hidden_size, config.rms_norm_eps
        keys = jax.random.split(key, 4)
        self.attn_norm = RMSNorm(D, eps, dtype=dtype, key=keys[0])
        self.attn = Attention(config, formats=_scoped(formats, "attn."), dtype=dtype, key=keys[1])
        self.mlp_norm = RMSNorm(D, eps, dtype=dtype, key=keys[2])
        self.mlp = MLP(config, formats=_scoped(formats, "mlp."), dtype=dtype, key=keys[3])

    def __call__(self, x, cos, sin, positions, cached, cache_len):
        """x: [B, T, D] -> (x [B, T, D], k, v [B, Hkv, T, hd]); see ``Attention``."""
        attended, k, v = self.attn(self.attn_norm(x), cos, sin, positions, cached, cache_len)
        x = x + attended
        return x + self.mlp(self.mlp_norm(x)), k, v


class Decoder(nnx.Module):
    """The whole decoder: token ids -> logits, reading and extending a KV cache.

    ``formats`` names the matrices held as packed block codes (see ``WeightFormats``); ``dtype`` is
    the storage dtype of the float parameters. Every product computes in float32.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        formats: WeightFormats | None = None,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        c = self.config = config
        formats = dict(formats or {})
        # One draw from the Rngs, split with plain jax.random: an RngStream call per parameter cost
        # ~10 ms each under nnx.eval_shape (2.5 s for SmolLM2's shapes), the loader's critical path.
        embed_key, norm_key, head_key, *layer_keys = jax.random.split(rngs.params(), 3 + c.num_layers)
        self.embed = Embed(
            c.vocab_size, c.hidden_size, packed_format=formats.get("embed"), dtype=dtype, key=embed_key
        )
        self.layers = nnx.List(
            [
                Block(c, formats=_scoped(formats, f"layers.{i}."), dtype=dtype, key=layer_keys[i])
                for i in range(c.num_layers)
            ]
        )
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=dtype, key=norm_key)
        self.lm_head = (
            None
            if c.tie_word_embeddings
            else Linear(
                c.hidden_size, c.vocab_size, packed_format=formats.get("lm_head"), dtype=dtype, key=head_key
            )
        )

    def __call__(
        self,
        token_ids: jax.Array,
        positions: jax.Array,
        cache: kv_cache.KVCache | None = None,
        cache_len: jax.Array | None = None,
        logits_at: jax.Array | None = None,
    ) -> tuple[jax.Array, kv_cache.KVCache | None]:
        """Run T new tokens per sequence; see ``forward``."""
        if cache is not None:
            cache_len = jnp.asarray(cache_len, jnp.int32)  # [B] or []
        cos, sin = rotary_tables(positions, rope_inverse_frequencies(self.config))  # [B, T, hd/2]
        x = self.embed(token_ids)  # [B, T, D]
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            cached = None if cache is None else (cache.k[i], cache.v[i])
            x, k, v = block(x, cos, sin, positions, cached, cache_len)
            new_k.append(k)
            new_v.append(v)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None].astype(jnp.int32), axis=1)[:, 0]  # [B, D]
        x = self.final_norm(x)
        logits = self.embed.attend(x) if self.lm_head is None else self.lm_head(x)  # [B, (T,) V]
        if cache is None:
            return logits, None
        # Written last, after every layer read its buffers: see ``attention``.
        return logits, kv_cache.KVCache(
            tuple(kv_cache.write_keys(b, k, cache_len) for b, k in zip(cache.k, new_k, strict=True)),
            tuple(kv_cache.write_values(b, v, cache_len) for b, v in zip(cache.v, new_v, strict=True)),
        )


def forward(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    token_ids: jax.Array,
    positions: jax.Array,
    cache: kv_cache.KVCache | None = None,
    cache_len: jax.Array | None = None,
    logits_at: jax.Array | None = None,
) -> tuple[jax.Array, kv_cache.KVCache | None]:
    """The decoder ``nnx.split`` into (graphdef, state), run on T new tokens per sequence: a pure
    function of pytrees, for ``jax.jit`` with the graphdef static and the cache donated.

    token_ids, positions: [B, T] int. With a cache, row b's new tokens attend to its slots
    [0, cache_len[b]) and (causally) to each other, and their k/v are written at slots
    [cache_len[b], cache_len[b] + T): the caller keeps positions[b] == cache_len[b] + arange(T) and
    cache_len[b] + T <= capacity. cache_len is a traced int32 [B], or [] for every row alike.
    Without a cache this is the plain full-sequence forward.

    logits_at: [B] int, the index along T whose logits are wanted (the last real token of a padded
    prompt): the vocabulary projection is the largest matmul, so only needed rows go through it.
    None computes logits for all positions. Returns (logits [B, V] or [B, T, V] float32, the
    updated cache or None).
    """
    return nnx.merge(graphdef, state)(token_ids, positions, cache, cache_len, logits_at)
