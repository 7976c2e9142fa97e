"""The sampler: each logits processor and filter does what the sampling module documents.

Statistical tests draw many samples at once (vmapped over keys) from fixed logits with fixed seeds,
so they are deterministic; every row of a batch carries its own settings, one compiled program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbchat.engine import sampling
from nbchat.engine.sampling import (
    LOGPROB_FLOOR,
    MAX_CANDIDATES,
    SamplerState,
    SamplingArrays,
    SamplingParams,
)
from nbchat.errors import InvalidRequestError

V = 256
WORDS = V // 32
ALL_ALLOWED = np.full((1, WORDS), -1, np.int32)


def settings_for(*rows: SamplingParams) -> SamplingArrays:
    return sampling.sampling_arrays(rows, V)


def fresh_state(rows: int, seed: int = 0, prompt: tuple[int, ...] = ()) -> SamplerState:
    return sampling.initial_state([prompt] * rows, V, seed)


@jax.jit
def draw(logits, settings, allowed_bits, seeds):
    """Tokens [n, B] sampled with n independent keys (the other state fresh)."""

    def one(seed_key):
        state = SamplerState(seed_key, jnp.zeros(logits.shape, jnp.int32), jnp.zeros(logits.shape, bool))
        return sampling.sample(logits, state, settings, allowed_bits)[0].token_ids

    return jax.vmap(one)(seeds)


sample = jax.jit(sampling.sample)
process_logits = jax.jit(sampling.process_logits)


def many_keys(n: int, seed: int = 0) -> np.ndarray:
    return np.stack([sampling.key_data(seed * 100_000 + i) for i in range(n)])


def frequencies(tokens: np.ndarray) -> np.ndarray:
    """tokens [n] -> empirical distribution over V."""
    return np.bincount(tokens, minlength=V) / len(tokens)


def probs_of(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    return e / e.sum()


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    """One row of logits: a few clear favourites above a long, graded tail."""
    rng = np.random.default_rng(0)
    row = rng.normal(0.0, 1.0, V).astype(np.float32)
    row[[10, 20, 30, 40]] = [6.0, 5.5, 4.8, 3.0]
    return row


def test_greedy_is_argmax_whatever_the_other_settings(logits):
    rows = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, top_k=5, top_p=0.5, min_p=0.2),
    ]
    tokens = np.asarray(
        draw(np.stack([logits] * 2), settings_for(*rows), np.repeat(ALL_ALLOWED, 2, 0), many_keys(4000))
    )
    assert (tokens == int(np.argmax(logits))).all()


def test_full_distribution_matches_softmax_including_tokens_beyond_the_candidates():
    flat = np.linspace(1.0, 0.0, V, dtype=np.float32)  # nearly uniform: most mass past rank 64
    tokens = np.asarray(draw(flat[None], settings_for(SamplingParams()), ALL_ALLOWED, many_keys(20_000)))[
        :, 0
    ]
    expected = probs_of(flat)
    assert (tokens >= MAX_CANDIDATES).mean() == pytest.approx(expected[MAX_CANDIDATES:].sum(), abs=0.02)
    assert np.abs(frequencies(tokens) - expected).max() < 0.005


def test_top_k_yields_only_the_k_best(logits):
    best = np.argsort(-logits)
    tokens = np.asarray(
        draw(
            logits[None], settings_for(SamplingParams(top_k=3, temperature=5.0)), ALL_ALLOWED, many_keys(4000)
        )
    )[:, 0]
    assert set(tokens.tolist()) == set(best[:3].tolist())


def test_top_k_above_the_candidate_count_acts_as_the_candidate_count():
    flat = np.zeros(V, np.float32)
    flat[:MAX_CANDIDATES] = 1.0  # the 64 best are a clear set; ties elsewhere
    tokens = np.asarray(
        draw(flat[None], settings_for(SamplingParams(top_k=200)), ALL_ALLOWED, many_keys(4000))
    )
    assert tokens.max() < MAX_CANDIDATES


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    row = np.full(V, -1e4, np.float32)
    row[:4] = np.log([0.5, 0.3, 0.15, 0.05])
    # mass before each rank: 0, 0.5, 0.8, 0.95 -> top_p 0.75 keeps ranks 0 and 1, renormalized
    tokens = np.asarray(
        draw(row[None], settings_for(SamplingParams(top_p=0.75)), ALL_ALLOWED, many_keys(4000))
    )[:, 0]
    assert set(tokens.tolist()) == {0, 1}
    assert (tokens == 0).mean() == pytest.approx(0.5 / 0.8, abs=0.02)


def test_top_p_after_top_k_measures_mass_within_the_top_k():
    row = np.full(V, -1e4, np.float32)
    row[:4] = np.log([0.4, 0.3, 0.2, 0.1])
    # top_k=2 renormalizes to 4/7, 3/7: top_p 0.5 then keeps only rank 0 (HF order); over the full
    # vocabulary it would keep ranks 0 and 1 (mass before rank 1 = 0.4 < 0.5).
    both = settings_for(SamplingParams(top_k=2, top_p=0.5), SamplingParams(top_p=0.5))
    tokens = np.asarray(draw(np.stack([row, row]), both, np.repeat(ALL_ALLOWED, 2, 0), many_keys(4000)))
    assert set(tokens[:, 0].tolist()) == {0}
    assert set(tokens[:, 1].tolist()) == {0, 1}


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    row = np.full(V, -1e4, np.float32)
    row[:4] = np.log([0.5, 0.3, 0.15, 0.05])
    # min_p 0.2 keeps probabilities >= 0.1: ranks 0, 1, 2
    tokens = np.asarray(
        draw(row[None], settings_for(SamplingParams(min_p=0.2)), ALL_ALLOWED, many_keys(4000))
    )[:, 0]
    assert set(tokens.tolist()) == {0, 1, 2}
    assert (tokens == 2).mean() == pytest.approx(0.15 / 0.95, abs=0.02)


def test_lower_temperature_sharpens_towards_the_best_token(logits):
    temperatures = [2.0, 1.0, 0.3]
    rows = settings_for(*(SamplingParams(temperature=t) for t in temperatures))
    tokens = np.asarray(draw(np.stack([logits] * 3), rows, np.repeat(ALL_ALLOWED, 3, 0), many_keys(4000)))
    best = int(np.argmax(logits))
    share = [(tokens[:, b] == best).mean() for b in range(3)]
    assert share[0] < share[1] < share[2]
    assert share[1] == pytest.approx(probs_of(logits)[best], abs=0.03)
    assert share[2] == pytest.approx(probs_of(logits / 0.3)[best], abs=0.03)


def test_logit_bias_minus_100_bans_and_plus_100_forces(logits):
    best = int(np.argmax(logits))
    rows = settings_for(
        SamplingParams(logit_bias={best: -100.0}, temperature=0.0),
        SamplingParams(logit_bias={best: -100.0}),
        SamplingParams(logit_bias={7: 100.0}),
    )
    tokens = np.asarray(draw(np.stack([logits] * 3), rows, np.repeat(ALL_ALLOWED, 3, 0), many_keys(4000)))
    assert (tokens[:, 0] == int(np.argsort(-logits)[1])).all()
    assert best not in tokens[:, 1]
    assert (tokens[:, 2] == 7).all()


def test_unpack_bitmask_reads_bit_i_of_word_j_as_token_32j_plus_i():
    allowed = [0, 5, 31, 32, 63, 200, 255]  # 31 and 63 are sign bits of their words
    words = np.zeros((1, WORDS), np.uint32)
    for t in allowed:
        words[0, t // 32] |= np.uint32(1) << np.uint32(t % 32)
    unpacked = np.asarray(sampling.unpack_bitmask(jnp.asarray(words.view(np.int32)), V))[0]
    assert np.flatnonzero(unpacked).tolist() == allowed


def test_bitmask_restricts_sampling_and_greedy(logits):
    allowed = [3, 100, 201]
    words = np.zeros((1, WORDS), np.uint32)
    for t in allowed:
        words[0, t // 32] |= np.uint32(1) << np.uint32(t % 32)
    bits = np.repeat(words.view(np.int32), 2, 0)
    rows = settings_for(SamplingParams(temperature=0.0), SamplingParams(temperature=3.0))
    tokens = np.asarray(draw(np.stack([logits] * 2), rows, bits, many_keys(4000)))
    assert (tokens[:, 0] == allowed[int(np.argmax(logits[allowed]))]).all()
    assert set(tokens[:, 1].tolist()) == set(allowed)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    row = np.zeros(V, np.float32)
    row[:4] = [2.0, -2.0, 2.0, -2.0]
    state = fresh_state(1, prompt=(0, 1))  # tokens 0 and 1 seen, 2 and 3 not
    settings = settings_for(SamplingParams(repetition_penalty=2.0))
    processed = np.asarray(process_logits(row[None], state, settings, ALL_ALLOWED))[0]
    assert processed[:4].tolist() == [1.0, -4.0, 2.0, -2.0]


def test_frequency_and_presence_penalties_follow_openai():
    row = np.zeros(V, np.float32)
    state = fresh_state(1, prompt=(5,))._replace(counts=np.zeros((1, V), np.int32))
    state.counts[0, [1, 2]] = [3, 1]
    settings = settings_for(SamplingParams(frequency_penalty=0.5, presence_penalty=1.5))
    processed = np.asarray(process_logits(row[None], state, settings, ALL_ALLOWED))[0]
    # prompt tokens (5) are not penalized: counts cover generated tokens only
    assert processed[[1, 2, 5, 9]].tolist() == [-(3 * 0.5 + 1.5), -(1 * 0.5 + 1.5), 0.0, 0.0]


def test_sample_updates_counts_seen_and_key():
    row = np.zeros((1, V), np.float32)
    row[0, 42] = 50.0
    state = fresh_state(1, seed=1)
    result, new_state = sample(row, state, settings_for(SamplingParams()), ALL_ALLOWED)
    assert int(result.token_ids[0]) == 42
    assert int(new_state.counts[0, 42]) == 1 and bool(new_state.seen[0, 42])
    assert not np.array_equal(np.asarray(new_state.key), state.key)


def test_logprobs_are_log_softmax_of_processed_logits_before_temperature(logits):
    banned = int(np.argsort(-logits)[1])
    settings = settings_for(SamplingParams(temperature=0.0, logit_bias={banned: -100.0, 3: 2.0}))
    words = np.full((1, WORDS), -1, np.int32)
    words[0, 0] &= ~np.int32(1 << 5)  # token 5 disallowed by the mask
    result, _ = sample(logits[None], fresh_state(1), settings, words)
    processed = logits.copy()
    processed[banned] -= 100.0
    processed[3] += 2.0
    processed[5] = -np.inf
    expected = processed - np.log(np.exp(processed[np.isfinite(processed)]).sum())
    order = np.argsort(-expected)[: sampling.MAX_TOP_LOGPROBS]
    assert int(result.token_ids[0]) == order[0]
    assert float(result.logprobs[0]) == pytest.approx(expected[order[0]], abs=1e-4)
    assert np.asarray(result.top_ids[0]).tolist() == order.tolist()
    np.testing.assert_allclose(np.asarray(result.top_logprobs[0]), expected[order], atol=1e-4)


def test_a_banned_token_reports_the_floor_not_minus_infinity():
    row = np.zeros((1, V), np.float32)
    words = np.zeros((1, WORDS), np.int32)
    words[0, 0] = 1  # only token 0 allowed
    result, _ = sample(row, fresh_state(1), settings_for(SamplingParams(temperature=0.0)), words)
    assert int(result.token_ids[0]) == 0 and float(result.logprobs[0]) == pytest.approx(0.0)
    assert np.asarray(result.top_logprobs[0, 1:]).tolist() == [LOGPROB_FLOOR] * (
        sampling.MAX_TOP_LOGPROBS - 1
    )


def test_same_seed_same_tokens_other_seed_other_tokens(logits):
    settings = settings_for(SamplingParams(temperature=1.5))
    first = np.asarray(draw(logits[None], settings, ALL_ALLOWED, many_keys(4000, seed=1)))
    again = np.asarray(draw(logits[None], settings, ALL_ALLOWED, many_keys(4000, seed=1)))
    other = np.asarray(draw(logits[None], settings, ALL_ALLOWED, many_keys(4000, seed=2)))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_key_data_takes_any_int_seed():
    assert sampling.key_data(-1).tolist() == [0xFFFFFFFF, 0xFFFFFFFF]
    assert sampling.key_data(2**64 + 5).tolist() == [0, 5]
    assert sampling.key_data(3).tolist() == jax.random.key_data(jax.random.PRNGKey(3)).tolist()


def test_changing_settings_never_recompiles(logits):
    step = jax.jit(sampling.sample)
    state = fresh_state(1)
    variants = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05),
        SamplingParams(frequency_penalty=1.0, presence_penalty=-0.5, repetition_penalty=1.3),
        SamplingParams(logit_bias={1: 5.0}, seed=9),
    ]
    for params in variants:
        step(logits[None], state, settings_for(params), ALL_ALLOWED)
    assert step._cache_size() == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "hot"),
        ("top_p", 1.5),
        ("top_k", -1),
        ("top_k", 2.5),
        ("min_p", 1.1),
        ("frequency_penalty", float("inf")),
        ("repetition_penalty", 0.0),
        ("logit_bias", {V: 1.0}),
        ("logit_bias", {1: float("nan")}),
        ("logit_bias", {"one": 1.0}),
        ("seed", 1.5),
        ("top_logprobs", 21),
        ("top_logprobs", True),
    ],
)
def test_settings_the_sampler_cannot_run_are_plain_errors_naming_the_setting(field, value):
    # The bounds a request may ask for (temperature up to 2, penalties, bias size) are the chat API's
    # rules (test_protocol); the sampler refuses only what it cannot run.
    with pytest.raises(ValueError, match=field) as raised:
        sampling.validate(SamplingParams(**{field: value}), V)
    assert not isinstance(raised.value, InvalidRequestError)


def test_good_settings_pass_validation():
    sampling.validate(
        SamplingParams(
            temperature=0.0,
            top_p=0.0,
            top_k=1000,
            min_p=1.0,
            frequency_penalty=-2.0,
            presence_penalty=2.0,
            repetition_penalty=1.2,
            logit_bias={0: -100, V - 1: 100},
            seed=-(2**63),
            top_logprobs=20,
        ),
        V,
    )


def test_whole_vocabulary_sampling_never_returns_a_zero_probability_token():
    vocab = 1000  # not a multiple of the 256-token block
    keys = jax.random.split(jax.random.key(0), 500)
    draw_whole = jax.jit(jax.vmap(sampling.sample_whole_vocabulary, in_axes=(0, None)))
    for allowed in ([0], [vocab - 1], [255, 256], [3, 511, 999]):
        logits = np.full((1, vocab), -np.inf, np.float32)
        logits[0, allowed] = 0.0
        tokens = np.asarray(draw_whole(keys, logits))[:, 0]
        assert set(tokens.tolist()) == set(allowed)
