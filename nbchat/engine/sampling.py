"""Sampling settings, logits processors and the sampler: batched and jit-able.

Every setting reaches the jitted code as an array (one value per batch row), so changing the
temperature, top_p, penalties, bias or seed never compiles a new program. Sampler state (the RNG key,
generated-token counts, the set of tokens seen) lives on device between steps, one row per sequence:
each row has its own key, so a row's draws depend only on its own seed and logits, never on which
other sequences share the batch.

What a step does to the logits of row b, in order:
  1. repetition_penalty (Hugging Face / CTRL): for every token in the prompt or generated so far,
     a positive logit is divided by the penalty and a negative one multiplied by it.
  2. frequency_penalty, presence_penalty (OpenAI): subtract count * frequency_penalty +
     (count > 0) * presence_penalty, with counts over the generated tokens only.
  3. logit_bias: add the bias (a dense [V] vector).
  4. allowed-token bitmask (grammar constraints): disallowed tokens get -inf.
  The result is the "processed logits"; the reported log-probs are their log_softmax (before
  temperature), clamped to LOGPROB_FLOOR instead of -inf.
  5. temperature == 0: the argmax of the processed logits (the first index on ties).
     Otherwise the logits are divided by the temperature and:
     - top_k == 0, top_p == 1 and min_p == 0: sample from the full distribution (every token).
     - else sample among the MAX_CANDIDATES highest logits, keeping the top_k first (top_k > 0),
       then the smallest prefix whose probability reaches top_p (probabilities renormalized over
       the top_k when top_k > 0, over the whole vocabulary otherwise, as Hugging Face does), then
       the tokens whose probability is at least min_p times the most likely one's. top_k larger
       than MAX_CANDIDATES acts as MAX_CANDIDATES, and a nucleus wider than MAX_CANDIDATES tokens is
       cut there: the price of not sorting the vocabulary each token (sorting 49152 logits cost
       ~11 ms per token on CPU, top_k(64) ~0.13 ms).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nbchat.engine.limits import LOGPROB_FLOOR, MAX_TOP_LOGPROBS

MAX_CANDIDATES = 64  # tokens that top_k / top_p / min_p choose among


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0.0 means greedy (argmax)
    top_p: float = 1.0  # nucleus; 1.0 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0.0 = off
    frequency_penalty: float = 0.0  # OpenAI semantics, counts over generated tokens
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL semantics over prompt+generated tokens; 1.0 = off
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> additive bias
    seed: int | None = None  # None = fresh randomness
    top_logprobs: int = 0  # how many alternatives each TokenEvent carries (0..MAX_TOP_LOGPROBS)


def validate(sampling: SamplingParams, vocab_size: int) -> None:
    """Raise ValueError when ``sampling`` breaks what the sampler needs to run: finite numbers,
    a non-negative temperature, probabilities in [0, 1], a positive repetition penalty, bias ids
    inside the vocabulary, at most MAX_TOP_LOGPROBS alternatives. The bounds a request may ask for
    (temperature up to 2, penalties, bias size) are the chat API's rules, checked before this."""
    numbers = {name: getattr(sampling, name) for name in (
        "temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")}
    numbers.update({f"logit_bias[{token}]": bias for token, bias in dict(sampling.logit_bias).items()})
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not math.isfinite(value):
            raise ValueError(f"SamplingParams.{name} must be a finite number, got {value!r}")
    integers = {"top_k": sampling.top_k, "top_logprobs": sampling.top_logprobs,
                **({} if sampling.seed is None else {"seed": sampling.seed})}
    bias_ids = [("logit_bias token", token) for token in dict(sampling.logit_bias)]
    for name, value in [*integers.items(), *bias_ids]:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"SamplingParams.{name} must be an integer, got {value!r}")
    checks = [
        (sampling.temperature >= 0, "temperature >= 0"),
        (0 <= sampling.top_p <= 1, "0 <= top_p <= 1"),
        (sampling.top_k >= 0, "top_k >= 0"),
        (0 <= sampling.min_p <= 1, "0 <= min_p <= 1"),
        (sampling.repetition_penalty > 0, "repetition_penalty > 0"),
        (all(0 <= int(token) < vocab_size for token in sampling.logit_bias),
         f"logit_bias token ids in [0, {vocab_size})"),
        (0 <= sampling.top_logprobs <= MAX_TOP_LOGPROBS, f"0 <= top_logprobs <= {MAX_TOP_LOGPROBS}"),
    ]
    for holds, rule in checks:
        if not holds:
            raise ValueError(f"SamplingParams needs {rule}: {sampling}")


class SamplingArrays(NamedTuple):
    """The settings of B rows as arrays, the traced arguments of ``sample``."""

    temperature: jax.Array  # [B] float32
    top_p: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    min_p: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32
    presence_penalty: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32
    logit_bias: jax.Array  # [B, V] float32


def sampling_arrays(rows: Sequence[SamplingParams], vocab_size: int) -> SamplingArrays:
    """Host (numpy) arrays for ``rows``, validated settings assumed."""

    def column(name: str, dtype: type) -> np.ndarray:
        return np.array([getattr(row, name) for row in rows], dtype=dtype)

    bias = np.zeros((len(rows), vocab_size), np.float32)
    for b, row in enumerate(rows):
        for token_id, value in row.logit_bias.items():
            bias[b, int(token_id)] = value
    return SamplingArrays(
        temperature=column("temperature", np.float32),
        top_p=column("top_p", np.float32),
        top_k=column("top_k", np.int32),
        min_p=column("min_p", np.float32),
        frequency_penalty=column("frequency_penalty", np.float32),
        presence_penalty=column("presence_penalty", np.float32),
        repetition_penalty=column("repetition_penalty", np.float32),
        logit_bias=bias,
    )


class SamplerState(NamedTuple):
    """What the sampler carries from one token to the next, on device."""

    key: jax.Array  # [B, 2] uint32, raw threefry key data per row ([2]: one key shared by every row)
    counts: jax.Array  # [B, V] int32, how often each token was generated
    seen: jax.Array  # [B, V] bool, tokens in the prompt or generated (repetition penalty)


def key_data(seed: int) -> np.ndarray:
    """[2] uint32 threefry key data for any Python int seed (taken modulo 2**64)."""
    seed %= 2**64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], dtype=np.uint32)


def initial_state(
    prompts: Sequence[Sequence[int]], vocab_size: int, seed: int | Sequence[int]
) -> SamplerState:
    """Host arrays for a fresh generation of ``len(prompts)`` rows, seeded with ``seed`` (one seed
    for every row, or one per row)."""
    seen = np.zeros((len(prompts), vocab_size), bool)
    for b, prompt in enumerate(prompts):
        seen[b, np.asarray(prompt, dtype=np.int64)] = True
    seeds = [seed] * len(prompts) if isinstance(seed, (int, np.integer)) else list(seed)
    keys = np.stack([key_data(int(row_seed)) for row_seed in seeds]).reshape(len(prompts), 2)
    return SamplerState(keys, np.zeros((len(prompts), vocab_size), np.int32), seen)


class Sample(NamedTuple):
    """One sampled token per row, with its log-prob and the best alternatives."""

    token_ids: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] float32
    top_ids: jax.Array  # [B, MAX_TOP_LOGPROBS] int32, most likely first
    top_logprobs: jax.Array  # [B, MAX_TOP_LOGPROBS] float32


def unpack_bitmask(bits: jax.Array, vocab_size: int) -> jax.Array:
    """bits: [B, ceil(V / 32)] int32, bit i of word j allows token 32 * j + i -> [B, V] bool."""
    token = jnp.arange(vocab_size)
    words = bits[:, token // 32]  # [B, V]
    return ((words >> (token % 32).astype(bits.dtype)) & 1).astype(bool)


def process_logits(
    logits: jax.Array, state: SamplerState, settings: SamplingArrays, allowed_bits: jax.Array
) -> jax.Array:
    """Steps 1-4 of the module docstring: logits [B, V] -> processed logits [B, V] float32."""
    logits = logits.astype(jnp.float32)
    penalty = settings.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    logits = jnp.where(state.seen, penalized, logits)
    counts = state.counts.astype(jnp.float32)
    logits = logits - counts * settings.frequency_penalty[:, None]
    logits = logits - (counts > 0) * settings.presence_penalty[:, None]
    logits = logits + settings.logit_bias
    return jnp.where(unpack_bitmask(allowed_bits, logits.shape[-1]), logits, -jnp.inf)


def sample_whole_vocabulary(key: jax.Array, logits: jax.Array, block: int = 256) -> jax.Array:
    """One token per row drawn from softmax(logits) [B, V] by inverting the CDF at one uniform draw.

    Two levels (blocks of ``block`` tokens, then tokens within the chosen block) keep the cumulative
    sums short. Exact up to float rounding, and a token of probability 0 is never returned. Costs a
    fraction of ``jax.random.categorical``, which draws V Gumbel variates (~1.2 ms for V = 49152).
    """
    B, V = logits.shape
    n_blocks = -(-V // block)
    weights = jnp.exp(logits - logits.max(axis=-1, keepdims=True))  # [B, V], 0 where banned
    weights = jnp.pad(weights, ((0, 0), (0, n_blocks * block - V))).reshape(B, n_blocks, block)

    def first_above(cumulative: jax.Array, mass: jax.Array, target: jax.Array) -> jax.Array:
        """Index of the first entry whose cumulative mass exceeds target, never past the last
        entry with mass (rounding can put target at the very end)."""
        n = mass.shape[-1]
        last_with_mass = n - 1 - jnp.argmax(mass[:, ::-1] > 0, axis=-1)
        return jnp.minimum(jnp.sum(cumulative <= target[:, None], axis=-1), last_with_mass)

    block_mass = weights.sum(axis=-1)  # [B, n_blocks]
    block_cumulative = jnp.cumsum(block_mass, axis=-1)
    target = jax.random.uniform(key, (B,)) * block_cumulative[:, -1]
    chosen_block = first_above(block_cumulative, block_mass, target)  # [B]
    rows = jnp.arange(B)
    target = target - (block_cumulative[rows, chosen_block] - block_mass[rows, chosen_block])
    in_block = weights[rows, chosen_block]  # [B, block]
    offset = first_above(jnp.cumsum(in_block, axis=-1), in_block, target)
    return (chosen_block * block + offset).astype(jnp.int32)


def choose(
    processed: jax.Array, keys: jax.Array, settings: SamplingArrays
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Step 5 of the module docstring. processed: [B, V]; keys: [B] typed PRNG keys, one per row.

    Returns (token ids [B], candidate ids [B, MAX_CANDIDATES] and their processed logits, most
    likely first), the candidates being reusable for the top log-probs.
    """
    B, V = processed.shape
    n_candidates = min(MAX_CANDIDATES, V)
    # [B, K], descending. The barrier keeps XLA from folding the later slices of the result into the
    # top_k, which turns it into a full sort of the vocabulary (11 ms instead of 0.1 ms on CPU). The
    # extra operand keeps the barrier's operand from being the top_k's own tuple: compiled for
    # several devices (sharding.py), XLA:CPU aborts on that (TopkDecomposer, jaxlib 0.10); same speed.
    candidate_logits, candidate_ids, _ = jax.lax.optimization_barrier(
        (*jax.lax.top_k(processed, n_candidates), jnp.zeros((), jnp.int32))
    )
    greedy = candidate_ids[:, 0]

    scaled, candidates, keep = _scaled_candidates(processed, candidate_logits, settings)

    split = jax.vmap(jax.random.split)(keys)  # [B, 2]
    truncated_keys, full_keys = split[:, 0], split[:, 1]
    picked = jax.vmap(jax.random.categorical)(truncated_keys, jnp.where(keep, candidates, -jnp.inf))
    truncated = jnp.take_along_axis(candidate_ids, picked[:, None], axis=-1)[:, 0]
    filtered = (settings.top_k > 0) | (settings.top_p < 1.0) | (settings.min_p > 0.0)
    full = jax.lax.cond(  # on CPU a cond runs one branch: skipped for greedy and filtered rows
        jnp.any((settings.temperature > 0.0) & ~filtered),
        lambda: jax.vmap(lambda key, row: sample_whole_vocabulary(key, row[None])[0])(full_keys, scaled),
        lambda: jnp.zeros((B,), jnp.int32),
    )
    sampled = jnp.where(filtered, truncated, full)
    token_ids = jnp.where(settings.temperature == 0.0, greedy, sampled).astype(jnp.int32)
    return token_ids, candidate_ids, candidate_logits


def _scaled_candidates(
    processed: jax.Array, candidate_logits: jax.Array, settings: SamplingArrays
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The logits divided by the temperature ([B, V]), the candidates' too ([B, K], descending) and
    which candidates top_k, top_p and min_p keep ([B, K] bool): step 5's filtering."""
    n_candidates = candidate_logits.shape[-1]
    temperature = jnp.maximum(settings.temperature, 1e-6)[:, None]  # [B, 1]; 0 handled by `greedy`
    scaled = processed / temperature  # [B, V]
    candidates = candidate_logits / temperature  # [B, K], still descending
    rank = jnp.arange(n_candidates)
    top_k = jnp.where(settings.top_k > 0, jnp.minimum(settings.top_k, n_candidates), n_candidates)
    keep = rank < top_k[:, None]
    # top_p measures probability renormalized over the top_k when top_k is on, else over all tokens.
    log_total = jnp.where(
        (settings.top_k > 0)[:, None],
        jax.nn.logsumexp(jnp.where(keep, candidates, -jnp.inf), axis=-1, keepdims=True),
        jax.nn.logsumexp(scaled, axis=-1, keepdims=True),
    )
    probs = jnp.where(keep, jnp.exp(candidates - log_total), 0.0)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < settings.top_p[:, None]) | (rank == 0)
    keep &= candidates >= candidates[:, :1] + jnp.log(settings.min_p)[:, None]  # log(0) = -inf keeps all
    return scaled, candidates, keep


def sampling_logprobs(processed: jax.Array, settings: SamplingArrays) -> jax.Array:
    """The log-probabilities of the distribution ``choose`` draws from: processed logits [B, V] ->
    [B, V] float32, -inf for every token the temperature 0 / top_k / top_p / min_p filtering rules
    out (temperature 0: the argmax has log-probability 0). For teaching views; not on the hot path."""
    B, V = processed.shape
    candidate_logits, candidate_ids = jax.lax.top_k(processed, min(MAX_CANDIDATES, V))
    scaled, candidates, keep = _scaled_candidates(processed, candidate_logits, settings)
    filtered = (settings.top_k > 0) | (settings.top_p < 1.0) | (settings.min_p > 0.0)
    kept = jnp.where(keep, candidates, -jnp.inf)
    rows = jnp.arange(B)[:, None]
    truncated = jnp.full((B, V), -jnp.inf).at[rows, candidate_ids].set(jax.nn.log_softmax(kept, axis=-1))
    full = jax.nn.log_softmax(scaled, axis=-1)
    greedy = jnp.where(jnp.arange(V)[None, :] == candidate_ids[:, :1], 0.0, -jnp.inf)
    sampled = jnp.where(filtered[:, None], truncated, full)
    return jnp.where((settings.temperature == 0.0)[:, None], greedy, sampled)


def sample(
    logits: jax.Array, state: SamplerState, settings: SamplingArrays, allowed_bits: jax.Array
) -> tuple[Sample, SamplerState]:
    """Process ``logits`` [B, V], pick one token per row, and advance the sampler state."""
    state = SamplerState(*(jnp.asarray(part) for part in state))
    processed = process_logits(logits, state, settings, allowed_bits)
    B = logits.shape[0]
    keys = jax.random.wrap_key_data(jnp.broadcast_to(state.key, (B, 2)), impl="threefry2x32")  # [B]
    split = jax.vmap(jax.random.split)(keys)  # [B, 2]
    next_keys, step_keys = split[:, 0], split[:, 1]
    token_ids, candidate_ids, candidate_logits = choose(processed, step_keys, settings)

    log_total = jax.nn.logsumexp(processed, axis=-1, keepdims=True)  # [B, 1]
    chosen = jnp.take_along_axis(processed, token_ids[:, None], axis=-1)[:, 0] - log_total[:, 0]
    n_top = min(MAX_TOP_LOGPROBS, candidate_ids.shape[-1])
    top_logprobs = candidate_logits[:, :n_top] - log_total
    floor = jnp.float32(LOGPROB_FLOOR)
    result = Sample(
        token_ids=token_ids,
        logprobs=jnp.maximum(chosen, floor),
        top_ids=candidate_ids[:, :n_top].astype(jnp.int32),
        top_logprobs=jnp.maximum(top_logprobs, floor),
    )

    rows = jnp.arange(token_ids.shape[0])
    new_state = SamplerState(
        key=jax.random.key_data(next_keys),
        counts=state.counts.at[rows, token_ids].add(1),
        seen=state.seen.at[rows, token_ids].set(True),
    )
    return result, new_state
