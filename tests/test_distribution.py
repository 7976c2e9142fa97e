"""The next-token distribution the teaching views show is the sampler's own: ``sampling_logprobs``
matches what ``sample`` draws under each setting, and ``next_token_logprobs`` gives the log-probs the
generator reports for the same prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nbchat.engine import sampling
from nbchat.engine.distribution import next_token_logprobs
from nbchat.engine.generate import Generator
from nbchat.engine.sampling import SamplerState, SamplingParams

V = 256
DRAWS = 20_000


@jax.jit
def draw(logits, settings, seeds):
    """Tokens [n] sampled by ``sampling.sample`` with n independent keys."""

    def one(key):
        state = SamplerState(key, jnp.zeros(logits.shape, jnp.int32), jnp.zeros(logits.shape, bool))
        allowed = jnp.full((1, V // 32), -1, jnp.int32)
        return sampling.sample(logits, state, settings, allowed)[0].token_ids[0]

    return jax.vmap(one)(seeds)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.6),
        SamplingParams(temperature=0.9, min_p=0.2),
        SamplingParams(temperature=0.0),
    ],
    ids=["temperature", "top_k", "top_p", "min_p", "greedy"],
)
def test_sampling_logprobs_is_the_distribution_sample_draws_from(params):
    logits = jnp.asarray(np.random.default_rng(1).standard_normal((1, V)).astype(np.float32) * 2.5)
    settings = sampling.sampling_arrays([params], V)
    shown = np.exp(np.asarray(sampling.sampling_logprobs(logits, settings))[0])
    assert shown.sum() == pytest.approx(1.0, abs=1e-5)
    seeds = np.stack([sampling.key_data(i) for i in range(DRAWS)])
    drawn = np.bincount(np.asarray(draw(logits, settings, seeds)), minlength=V) / DRAWS
    assert set(np.flatnonzero(drawn)) <= set(np.flatnonzero(shown))  # nothing ruled out is drawn
    assert np.abs(drawn - shown).max() < 0.015
    if params.temperature == 0:
        assert shown[int(jnp.argmax(logits))] == 1.0


def test_next_token_logprobs_match_the_generators_and_its_draw(tiny_model):
    prompt = tiny_model.tokenizer("Hello! How are you today?")["input_ids"]
    generator = Generator(tiny_model.config, tiny_model.params)
    greedy = next(
        generator.generate(prompt, SamplingParams(temperature=0.0, top_logprobs=20), max_new_tokens=1)
    )
    seeded = next(generator.generate(prompt, SamplingParams(temperature=1.0, seed=7), max_new_tokens=1))
    rows = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=7)]
    result = next_token_logprobs(tiny_model.params, tiny_model.config, prompt, rows)
    top = np.argsort(result.raw)[::-1][:20]
    assert [int(token) for token in top] == [token for token, _ in greedy.top_logprobs]
    assert result.raw[top] == pytest.approx([logprob for _, logprob in greedy.top_logprobs], abs=1e-4)
    # The token the view says each row draws is the one a reply with that seed starts with.
    assert [int(token) for token in result.chosen] == [greedy.token_id, seeded.token_id]
