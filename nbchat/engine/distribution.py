"""The next-token distribution of a prompt, raw and as the sampler sees it: for teaching views.

``next_token_logprobs`` runs the decoder over a whole prompt (no KV cache: views are occasional, and
the chat's cache stays untouched) and applies the engine's own sampling code to the logits: the
processors (penalties, bias) give the raw log-probabilities, ``sampling.sampling_logprobs`` the
distribution after temperature / top_k / top_p / min_p, and ``sampling.choose`` the token the
sampler would draw with a given seed. Must not: hold sampling rules of its own, stream, or know text.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nbchat.engine import model, sampling
from nbchat.engine.config import ModelConfig
from nbchat.engine.sampling import SamplingParams

# Prompts are padded to a power of two from this length, so a class's views compile a few programs.
_MIN_BUCKET = 32


class NextTokenLogprobs(NamedTuple):
    raw: np.ndarray  # [V] float32: log_softmax of the processed logits (temperature 1, no filtering)
    sampled: np.ndarray  # [R, V] float32: per settings row, the distribution the sampler draws from
    chosen: np.ndarray  # [R] int32: the token the sampler draws for each row with its seed


@functools.lru_cache(maxsize=8)
def _logits_program(config: ModelConfig):
    def run(params, token_ids, n_real):
        T = token_ids.shape[1]
        positions = jnp.arange(T, dtype=jnp.int32)[None, :]
        logits, _ = model.forward(params, config, token_ids, positions, logits_at=jnp.full((1,), n_real - 1))
        return logits[0]  # [V]

    return jax.jit(run)


@jax.jit
def _process(logits, counts, seen, settings):
    """Raw log-probs [V] (settings row 0's processors) and each row's sampling distribution [R, V]."""
    rows = settings.temperature.shape[0]
    logits = jnp.broadcast_to(logits, (rows, logits.shape[-1]))
    state = sampling.SamplerState(
        sampling.key_data(0), jnp.broadcast_to(counts, logits.shape), jnp.broadcast_to(seen, logits.shape)
    )
    processed = sampling.process_logits(logits, state, settings, _all_allowed(rows, logits.shape[-1]))
    return jax.nn.log_softmax(processed[0]), sampling.sampling_logprobs(processed, settings)


@jax.jit
def _choose(logits, counts, seen, settings, key_data):
    """The token the sampler draws first with this key, as ``sampling.sample`` does."""
    state = sampling.SamplerState(key_data, counts, seen)
    processed = sampling.process_logits(logits[None], state, settings, _all_allowed(1, logits.shape[-1]))
    _, step_key = jax.random.split(jax.random.wrap_key_data(key_data, impl="threefry2x32"))
    token_ids, _, _ = sampling.choose(processed, step_key[None], settings)  # one row, its own key
    return token_ids[0]


def _all_allowed(rows: int, vocab: int) -> jax.Array:
    return jnp.full((rows, -(-vocab // 32)), -1, jnp.int32)


def next_token_logprobs(
    params: dict,
    config: ModelConfig,
    prompt_ids: Sequence[int],
    rows: Sequence[SamplingParams],
    *,
    generated: int = 0,
) -> NextTokenLogprobs:
    """The distribution of the token after ``prompt_ids``, under each of ``rows``' settings (each
    row's ``seed`` draws its ``chosen`` token). The last ``generated`` ids of the prompt count as
    generated (frequency / presence penalties), as in a reply in progress."""
    prompt = [int(token) for token in prompt_ids]
    length = max(_MIN_BUCKET, 1 << (len(prompt) - 1).bit_length())
    length = min(length, max(config.context_length, len(prompt)))
    tokens = np.zeros((1, length), np.int32)
    tokens[0, : len(prompt)] = prompt
    logits = _logits_program(config)(params, tokens, np.int32(len(prompt)))
    vocab = config.vocab_size
    seen = np.zeros((1, vocab), bool)
    seen[0, np.asarray(prompt, dtype=np.int64)] = True
    counts = np.zeros((1, vocab), np.int32)
    for token in prompt[len(prompt) - generated :] if generated else ():
        counts[0, token] += 1
    raw, after = _process(logits, counts, seen, sampling.sampling_arrays(list(rows), vocab))
    chosen = [
        int(
            _choose(
                logits, counts, seen, sampling.sampling_arrays([row], vocab), sampling.key_data(row.seed or 0)
            )
        )
        for row in rows
    ]
    return NextTokenLogprobs(np.asarray(raw), np.asarray(after), np.array(chosen, np.int32))
