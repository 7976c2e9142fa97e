"""The decoder and the KV cache on tiny random-weight models: cached prefill + decode reproduce the
full-sequence forward, whatever the cache capacity, the rows' cache lengths or the storage dtype."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nbchat.engine import backend, model
from nbchat.engine import cache as kv_cache
from nbchat.engine.config import Llama3RopeScaling, ModelConfig
from tests.tiny_model import TINY_ENGINE_CONFIG as TINY

# Qwen2-style biases, a separate head and Llama 3 RoPE scaling, all in one config.
TINY_VARIANT = ModelConfig(
    architecture="qwen2",
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=1,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_theta=500000.0,
    context_length=1024,
    rope_scaling=Llama3RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    ),
    attention_bias=True,
    tie_word_embeddings=False,
)

forward = jax.jit(model.forward, static_argnums=0, compiler_options=backend.compiler_options())
cached_forward = jax.jit(
    model.forward, static_argnums=0, donate_argnums=4, compiler_options=backend.compiler_options()
)


def random_decoder(config: ModelConfig, seed: int, dtype: str = "float32") -> tuple:
    """(graphdef, state) of a random decoder, split once as the engine does."""
    return nnx.split(model.Decoder(config, dtype=dtype, rngs=nnx.Rngs(seed)))


def prompt_tokens(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, n)).astype(np.int32)


def positions(start: int, n: int) -> np.ndarray:
    return (start + np.arange(n, dtype=np.int32))[None]


def prefill_then_decode(params, config, tokens, n_prefill, capacity, grow_to=None):
    """Logits [T - n_prefill + 1, V] for positions n_prefill-1 .. T-1, the prompt prefilled padded
    to 32 tokens and the rest decoded one token at a time (the cache resized midway if asked)."""
    T = tokens.shape[1]
    padded = np.zeros((1, 32), np.int32)
    padded[0, :n_prefill] = tokens[0, :n_prefill]
    cache = kv_cache.empty_cache(config, 1, capacity)
    logits, cache = cached_forward(
        *params, padded, positions(0, 32), cache, np.int32(0), np.array([n_prefill - 1], np.int32)
    )
    rows = [np.asarray(logits[0])]
    for t in range(n_prefill, T):
        if grow_to is not None and t == (n_prefill + T) // 2:
            cache = kv_cache.resized(cache, grow_to)
        logits, cache = cached_forward(
            *params, tokens[:, t : t + 1], positions(t, 1), cache, np.int32(t), np.zeros(1, np.int32)
        )
        rows.append(np.asarray(logits[0]))
    return np.stack(rows)


@pytest.fixture(scope="module")
def params():
    return random_decoder(TINY, seed=0)


@pytest.fixture(scope="module")
def tokens():
    return prompt_tokens(24)


@pytest.fixture(scope="module")
def full_logits(params, tokens):
    logits, cache = forward(*params, tokens, positions(0, tokens.shape[1]))
    assert cache is None
    return np.asarray(logits[0])  # [T, V]


def test_prefill_then_decode_equals_the_full_forward(params, tokens, full_logits):
    stepped = prefill_then_decode(params, TINY, tokens, n_prefill=10, capacity=256)
    np.testing.assert_allclose(stepped, full_logits[9:], atol=1e-4, rtol=1e-4)
    assert (stepped.argmax(-1) == full_logits[9:].argmax(-1)).all()


def test_growing_the_cache_midway_changes_nothing(params, tokens, full_logits):
    stepped = prefill_then_decode(params, TINY, tokens, n_prefill=10, capacity=256, grow_to=384)
    np.testing.assert_allclose(stepped, full_logits[9:], atol=1e-4, rtol=1e-4)


def test_logits_at_picks_one_position_per_row(params, tokens, full_logits):
    logits, _ = forward(*params, tokens, positions(0, tokens.shape[1]), None, None, np.array([5], np.int32))
    np.testing.assert_allclose(np.asarray(logits[0]), full_logits[5], atol=1e-5)


def test_rows_with_their_own_cache_lengths_match_each_row_decoded_alone(params):
    # Two sequences in one batch, at different lengths: each row writes its new k/v at its own
    # cache_len and attends to its own slots only, so its logits are those of the row run alone.
    lengths = (10, 17)
    rows = [prompt_tokens(24, seed=seed) for seed in (5, 6)]
    alone = [
        prefill_then_decode(params, TINY, row[:, : n + 3], n_prefill=n, capacity=256)
        for row, n in zip(rows, lengths, strict=True)
    ]
    cache = kv_cache.empty_cache(TINY, 2, 256)
    padded = np.zeros((2, 32), np.int32)
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        padded[b, :n] = row[0, :n]
    logits_at = np.array([n - 1 for n in lengths], np.int32)
    logits, cache = cached_forward(
        *params, padded, np.broadcast_to(positions(0, 32), (2, 32)), cache, np.zeros(2, np.int32), logits_at
    )
    together = [[np.asarray(logits[b])] for b in range(2)]
    for step in range(3):
        cache_len = np.array(lengths, np.int32) + step
        next_tokens = np.array([[row[0, n + step]] for row, n in zip(rows, lengths, strict=True)], np.int32)
        logits, cache = cached_forward(
            *params, next_tokens, cache_len[:, None], cache, cache_len, np.zeros(2, np.int32)
        )
        for b in range(2):
            together[b].append(np.asarray(logits[b]))
    for b in range(2):
        np.testing.assert_allclose(np.stack(together[b]), alone[b], atol=1e-4, rtol=1e-4)


def test_biases_separate_head_and_llama3_rope_also_match_the_full_forward():
    params = random_decoder(TINY_VARIANT, seed=3)
    decoder = nnx.merge(*params)
    assert decoder.lm_head is not None and decoder.layers[0].attn.q.bias is not None
    tokens = prompt_tokens(20, seed=4)
    full, _ = forward(*params, tokens, positions(0, 20))
    stepped = prefill_then_decode(params, TINY_VARIANT, tokens, n_prefill=12, capacity=256)
    np.testing.assert_allclose(stepped, np.asarray(full[0, 11:]), atol=1e-4, rtol=1e-4)


def test_bfloat16_storage_computes_in_float32(tokens):
    graphdef, bf16 = random_decoder(TINY, seed=0, dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    widened = jax.tree.map(lambda a: a.astype(jnp.float32), bf16)
    # Decode (one token: the multiply-reduce path) and prefill (the matmul path) against float32
    # weights holding the same values.
    for n in (1, tokens.shape[1]):
        expected, _ = forward(graphdef, widened, tokens[:, :n], positions(0, n))
        got, _ = forward(graphdef, bf16, tokens[:, :n], positions(0, n))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-4, rtol=1e-4)


def test_every_layer_holds_its_own_parameter_buffers():
    for config in (TINY, TINY_VARIANT):
        _, state = random_decoder(config, seed=0)
        shapes = {".".join(map(str, path)): v.shape for path, v in nnx.to_flat_state(state)}
        D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
        q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        per_layer = {
            "attn_norm.weight": (D,),
            "attn.q.weight": (q_out, D),
            "attn.k.weight": (kv_out, D),
            "attn.v.weight": (kv_out, D),
            "attn.o.weight": (D, q_out),
            "mlp_norm.weight": (D,),
            "mlp.gate.weight": (F, D),
            "mlp.up.weight": (F, D),
            "mlp.down.weight": (D, F),
        }
        if config.attention_bias:
            per_layer |= {"attn.q.bias": (q_out,), "attn.k.bias": (kv_out,), "attn.v.bias": (kv_out,)}
        expected = {"embed.weight": (V, D), "final_norm.weight": (D,)}
        for i in range(config.num_layers):
            expected |= {f"layers.{i}.{name}": shape for name, shape in per_layer.items()}
        if not config.tie_word_embeddings:
            expected["lm_head.weight"] = (V, D)
        assert shapes == expected


def test_rope_frequencies_without_scaling_are_the_standard_ones():
    inv_freq = model.rope_inverse_frequencies(TINY)
    expected = 1.0 / TINY.rope_theta ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)


def test_llama3_scaling_keeps_high_slows_low_and_blends_the_middle_frequencies():
    scaling = TINY_VARIANT.rope_scaling
    base = 1.0 / TINY_VARIANT.rope_theta ** (np.arange(0, 16, 2, dtype=np.float64) / 16)
    scaled = model.rope_inverse_frequencies(TINY_VARIANT)
    wavelength = 2 * math.pi / base
    high = wavelength < scaling.original_max_position_embeddings / scaling.high_freq_factor
    low = wavelength > scaling.original_max_position_embeddings / scaling.low_freq_factor
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-5)
    np.testing.assert_allclose(scaled[low], base[low] / scaling.factor, rtol=1e-5)
    middle = ~high & ~low
    assert ((scaled[middle] < base[middle]) & (scaled[middle] > base[middle] / scaling.factor)).all()


def test_rope_scores_depend_only_on_the_relative_position():
    inv_freq = model.rope_inverse_frequencies(TINY)
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, 1, 1, 1, 16)).astype(np.float32)

    def rotated(x, position):
        cos, sin = model.rotary_tables(np.array([[position]]), inv_freq)
        return np.asarray(model.apply_rope(x, cos, sin))

    score = float((rotated(q, 7) * rotated(k, 3)).sum())
    assert float((rotated(q, 104) * rotated(k, 100)).sum()) == pytest.approx(score, rel=1e-4)
    assert np.linalg.norm(rotated(q, 50)) == pytest.approx(np.linalg.norm(q), rel=1e-5)


def test_capacity_buckets_grow_by_half_or_a_third_and_end_at_the_context():
    assert kv_cache.capacity_buckets(8192) == (256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
    assert kv_cache.capacity_buckets(1000) == (256, 384, 512, 768, 1000)
    assert kv_cache.capacity_buckets(100) == (100,)
    assert kv_cache.capacity_for(257, 8192) == 384
    assert kv_cache.capacity_for(256, 8192) == 256
    with pytest.raises(ValueError, match="exceed the context"):
        kv_cache.capacity_for(1001, 1000)


def test_resizing_keeps_the_leading_slots():
    cache = kv_cache.empty_cache(TINY, 1, 256)
    assert cache.k[0].shape == (1, TINY.num_kv_heads, TINY.head_dim, 256)  # keys: slots last
    assert cache.v[0].shape == (1, TINY.num_kv_heads, 256, TINY.head_dim)

    def numbered(buffers):
        return tuple(jnp.arange(b.size, dtype=jnp.float32).reshape(b.shape) for b in buffers)

    filled = kv_cache.KVCache(numbered(cache.k), numbered(cache.v))
    grown = kv_cache.resized(filled, 384)
    assert grown.capacity == 384 and len(grown.k) == TINY.num_layers
    np.testing.assert_array_equal(np.asarray(grown.k[0])[..., :256], np.asarray(filled.k[0]))
    np.testing.assert_array_equal(np.asarray(grown.v[0])[:, :, :256], np.asarray(filled.v[0]))
    assert not np.asarray(grown.k[0])[..., 256:].any() and not np.asarray(grown.v[0])[:, :, 256:].any()
    shrunk = kv_cache.resized(grown, 256)
    np.testing.assert_array_equal(np.asarray(shrunk.k[0]), np.asarray(filled.k[0]))
    np.testing.assert_array_equal(np.asarray(shrunk.v[0]), np.asarray(filled.v[0]))


def test_common_prefix_length():
    assert kv_cache.common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert kv_cache.common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert kv_cache.common_prefix_length([], [1]) == 0
    assert kv_cache.common_prefix_length([1, 2, 3], [1, 2]) == 2
