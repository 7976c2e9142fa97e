"""The decoder and the KV cache on tiny random-weight models: cached prefill + decode reproduce the
full-sequence forward, whatever the cache capacity, the parameter layout or the storage dtype."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbchat.engine import cache as kv_cache
from nbchat.engine import model
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

forward = jax.jit(model.forward, static_argnums=1, compiler_options=model.compiler_options())
cached_forward = jax.jit(
    model.forward, static_argnums=1, donate_argnums=4, compiler_options=model.compiler_options()
)


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
        params, config, padded, positions(0, 32), cache, np.zeros(1, np.int32),
        np.array([n_prefill - 1], np.int32),
    )
    rows = [np.asarray(logits[0])]
    for t in range(n_prefill, T):
        if grow_to is not None and t == (n_prefill + T) // 2:
            cache = kv_cache.resized(cache, grow_to)
        logits, cache = cached_forward(
            params, config, tokens[:, t : t + 1], positions(t, 1), cache, np.array([t], np.int32),
            np.zeros(1, np.int32),
        )
        rows.append(np.asarray(logits[0]))
    return np.stack(rows)


@pytest.fixture(scope="module")
def params():
    return model.unstack_layers(model.init_random_params(TINY, seed=0))


@pytest.fixture(scope="module")
def tokens():
    return prompt_tokens(24)


@pytest.fixture(scope="module")
def full_logits(params, tokens):
    logits, cache = forward(params, TINY, tokens, positions(0, tokens.shape[1]))
    assert cache is None
    return np.asarray(logits[0])  # [T, V]


def test_prefill_then_decode_equals_the_full_forward(params, tokens, full_logits):
    stepped = prefill_then_decode(params, TINY, tokens, n_prefill=10, capacity=256)
    np.testing.assert_allclose(stepped, full_logits[9:], atol=1e-4, rtol=1e-4)
    assert (stepped.argmax(-1) == full_logits[9:].argmax(-1)).all()


def test_growing_the_cache_midway_changes_nothing(params, tokens, full_logits):
    stepped = prefill_then_decode(params, TINY, tokens, n_prefill=10, capacity=256, grow_to=384)
    np.testing.assert_allclose(stepped, full_logits[9:], atol=1e-4, rtol=1e-4)


def test_rows_of_a_batch_write_and_attend_at_their_own_cache_lengths(params):
    # Two sequences of different lengths share one cache: each row's prefill and next token match
    # that sequence's own full forward.
    first, second = prompt_tokens(11, seed=2)[0], prompt_tokens(18, seed=3)[0]
    padded = np.zeros((2, 32), np.int32)
    padded[0, :10], padded[1, :17] = first[:10], second[:17]
    cache = kv_cache.empty_cache(TINY, 2, 256)
    lengths = np.array([10, 17], np.int32)
    _, cache = cached_forward(params, TINY, padded, np.tile(positions(0, 32), (2, 1)), cache,
                              np.zeros(2, np.int32), lengths - 1)
    step = np.array([[first[10]], [second[17]]], np.int32)
    logits, _ = cached_forward(params, TINY, step, lengths[:, None], cache, lengths, np.zeros(2, np.int32))
    for row, sequence in enumerate((first, second)):
        expected, _ = forward(params, TINY, sequence[None], positions(0, len(sequence)))
        np.testing.assert_allclose(np.asarray(logits[row]), np.asarray(expected[0, -1]), atol=1e-4, rtol=1e-4)


def test_logits_at_picks_one_position_per_row(params, tokens, full_logits):
    logits, _ = forward(
        params, TINY, tokens, positions(0, tokens.shape[1]), None, None, np.array([5], np.int32)
    )
    np.testing.assert_allclose(np.asarray(logits[0]), full_logits[5], atol=1e-5)


def test_stacked_and_per_layer_params_give_the_same_logits(tokens, full_logits):
    stacked = model.init_random_params(TINY, seed=0)
    logits, _ = forward(stacked, TINY, tokens, positions(0, tokens.shape[1]))
    np.testing.assert_allclose(np.asarray(logits[0]), full_logits, atol=1e-5)


def test_biases_separate_head_and_llama3_rope_also_match_the_full_forward():
    params = model.unstack_layers(model.init_random_params(TINY_VARIANT, seed=3))
    assert "lm_head" in params and "q_bias" in params["layers"][0]
    tokens = prompt_tokens(20, seed=4)
    full, _ = forward(params, TINY_VARIANT, tokens, positions(0, 20))
    stepped = prefill_then_decode(params, TINY_VARIANT, tokens, n_prefill=12, capacity=256)
    np.testing.assert_allclose(stepped, np.asarray(full[0, 11:]), atol=1e-4, rtol=1e-4)


def test_bfloat16_storage_computes_in_float32(tokens):
    bf16 = model.unstack_layers(model.init_random_params(TINY, seed=0, dtype="bfloat16"))
    widened = jax.tree.map(lambda a: a.astype(jnp.float32), bf16)
    # Decode (one token: the multiply-reduce path) and prefill (the matmul path) against float32
    # weights holding the same values.
    for n in (1, tokens.shape[1]):
        expected, _ = forward(widened, TINY, tokens[:, :n], positions(0, n))
        got, _ = forward(bf16, TINY, tokens[:, :n], positions(0, n))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-4, rtol=1e-4)


def test_unstacked_layers_share_the_stacked_buffers_on_cpu():
    stacked = model.init_random_params(TINY, seed=0)
    per_layer = model.unstack_layers(stacked)
    q = stacked["layers"]["q"]
    assert len(per_layer["layers"]) == TINY.num_layers
    assert per_layer["layers"][1]["q"].unsafe_buffer_pointer() == q.unsafe_buffer_pointer() + q[0].nbytes
    np.testing.assert_array_equal(np.asarray(per_layer["layers"][1]["q"]), np.asarray(q[1]))
    assert model.unstack_layers(per_layer) is per_layer


def test_init_random_params_has_the_contract_shapes():
    from nbchat.engine.weights import expected_param_shapes

    for config in (TINY, TINY_VARIANT):
        params = model.init_random_params(config, seed=0)
        expected = expected_param_shapes(config)
        assert params.keys() == expected.keys()
        assert params["layers"].keys() == expected["layers"].keys()
        for name, shape in expected["layers"].items():
            assert params["layers"][name].shape == (config.num_layers, *shape)
        assert params["embed"].shape == expected["embed"]


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
