"""The generation loop: prompt ids in, a stream of token events out.

``Generator`` owns the jitted programs and the KV cache of one loaded model and runs one generation
at a time: it prefills the prompt in length-bucketed chunks (a chat compiles a handful of programs,
not one per prompt length), then runs one jitted decode step per token with the cache donated, and
yields each token as soon as its id (and log-probs) reach the host, so a consumer can stream it and
stop at once.

Across calls it keeps the KV cache of the last sequence: a multi-turn chat resends its whole
history, and only the part after the longest common prefix with the cached tokens is prefilled.

Knows nothing of chat templates, text or OpenAI's wire format.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nbchat.engine import cache as kv_cache
from nbchat.engine import backend, jax_setup, model, sampling
from nbchat.engine.config import ModelConfig
from nbchat.engine.sampling import SamplingParams
from nbchat.errors import ContextLengthError, InvalidRequestError

__all__ = ["Generator", "SamplingParams", "TokenConstraint", "TokenEvent", "prefill_buckets"]

# Prompt chunks are padded to one of these lengths; steps of 1.5x-2x keep padding waste (prefill
# compute) under half while a chat compiles only a few prefill programs. Longer prompts are
# prefilled in chunks of the largest bucket. A one-token suffix (the same prompt again) runs the
# decode program.
PREFILL_BUCKETS = (1, 16, 32, 64, 96, 128, 192, 256, 384, 512)
# Decode room reserved in the cache at prefill: a reply of up to this many tokens never has to grow
# the cache mid-generation, while a large max_new_tokens does not inflate the attention read of
# every token (the cache grows on demand beyond it).
DECODE_RESERVE = 128


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float  # log-prob of the chosen token (log_softmax of the processed logits before
    #                 temperature); never -inf: clamped to sampling.LOGPROB_FLOOR
    top_logprobs: tuple[tuple[int, float], ...]  # SamplingParams.top_logprobs best (id, logprob)


class TokenConstraint(Protocol):
    """Restricts which tokens may come next (implemented by nbchat/engine/constraints.py)."""

    def allowed_bitmask(self) -> np.ndarray | None:
        """Packed int32 bitmask [ceil(config.vocab_size / 32)] of tokens allowed next (bit i of word
        j allows token 32*j+i); None = everything allowed."""

    def advance(self, token_id: int) -> None:
        """Consume the token that was sampled."""


def prefill_buckets(context_length: int) -> tuple[int, ...]:
    """The padded chunk lengths a prompt is prefilled in, none longer than the context."""
    return tuple(b for b in PREFILL_BUCKETS if b < context_length) + (
        min(context_length, PREFILL_BUCKETS[-1]),
    )


def plan_prefill(start: int, end: int, context_length: int) -> list[tuple[int, int, int]]:
    """Chunks (cache_len, padded length, real tokens) prefilling prompt tokens [start, end).

    Each chunk's padded end stays within the context (the last cache capacity): a final chunk that
    would overrun it starts earlier and recomputes a few cached tokens instead.
    """
    buckets = prefill_buckets(context_length)
    chunks = []
    position = start
    while position < end:
        remaining = end - position
        padded = next((b for b in buckets if b >= remaining), buckets[-1])
        real = min(remaining, padded)
        chunk_start = min(position, context_length - padded)
        chunks.append((chunk_start, padded, real + (position - chunk_start)))
        position += real
    return chunks


@functools.lru_cache(maxsize=8)
def step_program(config: ModelConfig, graphdef: nnx.GraphDef) -> Callable:
    """The one jitted program behind prefill and decode, shared by every Generator of a config and
    decoder structure (the ``nnx.split`` graphdef: modules and weight formats, closed over as static).

    ``(state, cache, token_ids [B, T] int32, cache_len [] int32, n_real [] int32, sampler state,
    settings, allowed_bits [B, ceil(V / 32)] int32) -> (cache, sampler state, Sample)``: run T tokens
    through the model at slots [cache_len, cache_len + T), then sample from the logits of token
    ``n_real - 1``. Compiled once per (T, cache capacity); the cache is donated so XLA updates it in
    place.
    """

    def run(state, cache, token_ids, cache_len, n_real, sampler_state, settings, allowed_bits):
        B, T = token_ids.shape
        positions = cache_len + jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        logits_at = jnp.full((B,), n_real - 1, jnp.int32)
        logits, cache = model.forward(graphdef, state, token_ids, positions, cache, cache_len, logits_at)
        result, sampler_state = sampling.sample(logits, sampler_state, settings, allowed_bits)
        return cache, sampler_state, result

    return jax.jit(run, donate_argnums=1, compiler_options=backend.compiler_options())


class Generator:
    """Owns the jitted programs and the KV cache of one loaded model; one generation at a time."""

    def __init__(self, config: ModelConfig, decoder: model.Decoder):
        jax_setup.enable_persistent_compilation_cache()
        self._config = config
        graphdef, self._state = nnx.split(decoder)  # once: the hot path is a plain jit over the state
        self._program = step_program(config, graphdef)
        self._mask_words = -(-config.vocab_size // 32)
        self._all_allowed = jnp.full((1, self._mask_words), -1, jnp.int32)
        self._no_bias = jnp.zeros((1, config.vocab_size), jnp.float32)
        # The cache and the token ids whose k/v it holds in slots [0, len). Invariant, kept through
        # interrupts: either both are set and agree, or the ids are empty (nothing reusable).
        self._cache: kv_cache.KVCache | None = None
        self._cached_ids: list[int] = []
        self._generation = 0  # bumped by each generate(); an older iterator may not resume
        self.last_reused_tokens = 0  # prompt tokens the last generation took from the cache

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def context_length(self) -> int:
        return self._config.context_length

    @property
    def cached_token_count(self) -> int:
        """How many tokens of the last sequence the cache holds for reuse."""
        return len(self._cached_ids)

    def drop_cache(self) -> None:
        """Forget the cached sequence and free its buffers: the next prompt is prefilled whole."""
        self._generation += 1  # an open iterator must not resume on a cache it no longer owns
        self._take_cache()

    def generate(
        self,
        prompt_ids: Sequence[int],
        sampling_params: SamplingParams,
        *,
        max_new_tokens: int,
        stop_ids: Collection[int] = (),
        constraint: TokenConstraint | None = None,
    ) -> Iterator[TokenEvent]:
        """Yield one TokenEvent per sampled token. A token in stop_ids is yielded and ends the
        iteration; otherwise it ends after max_new_tokens. Closing the iterator (close(), break,
        GeneratorExit, KeyboardInterrupt) stops at once and leaves the engine usable. Raises
        ContextLengthError before compute if len(prompt_ids) + max_new_tokens > context_length, and
        InvalidRequestError for an empty prompt or a bad setting (naming the field)."""
        prompt = self._validated_prompt(prompt_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise InvalidRequestError(
                f"max_tokens must be an integer, got {max_new_tokens!r}.",
                param="max_tokens",
                code="invalid_type",
            )
        if max_new_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {max_new_tokens}.",
                param="max_tokens",
                code="invalid_value",
            )
        if len(prompt) + max_new_tokens > self.context_length:
            raise ContextLengthError(len(prompt), int(max_new_tokens), self.context_length)
        sampling.validate(sampling_params, self._config.vocab_size)
        self._generation += 1
        return self._run(
            self._generation,
            prompt,
            sampling_params,
            int(max_new_tokens),
            frozenset(int(t) for t in stop_ids),
            constraint,
        )

    def _validated_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InvalidRequestError(
                "The prompt is empty: there must be at least one token.",
                param="messages",
                code="invalid_value",
            )
        vocab = self._config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise InvalidRequestError(
                f"Prompt token id {bad} is outside the vocabulary [0, {vocab}).",
                param="messages",
                code="invalid_value",
            )
        return prompt

    # -- the cache, kept consistent through interrupts ------------------------------------------------

    def _take_cache(self) -> kv_cache.KVCache | None:
        """Hand the cache to a jitted call that donates it. Until ``_keep_cache`` the engine holds no
        cache and no reusable ids: if the call never returns (an interrupt), the donated buffers are
        gone and the next generation starts fresh."""
        cache, self._cache, self._cached_ids = self._cache, None, []
        return cache

    def _keep_cache(self, cache: kv_cache.KVCache, cached_ids: list[int]) -> None:
        self._cache = cache
        self._cached_ids = cached_ids

    def _cache_with_capacity(self, capacity: int, reused: int) -> kv_cache.KVCache:
        """Take the cache resized to ``capacity`` (its first ``reused`` slots kept), or a fresh one."""
        cache = self._take_cache()
        if cache is not None and (reused > 0 or cache.capacity == capacity):
            return kv_cache.resized(cache, capacity)  # slots past the reused ones are masked anyway
        del cache  # free the old buffers before allocating new ones
        return kv_cache.empty_cache(self._config, 1, capacity)

    # -- the loop ------------------------------------------------------------------------------------

    def _run(
        self,
        generation: int,
        prompt: list[int],
        sampling_params: SamplingParams,
        max_new_tokens: int,
        stop_ids: frozenset[int],
        constraint: TokenConstraint | None,
    ) -> Iterator[TokenEvent]:
        self._check_current(generation)
        context = self.context_length
        vocab = self._config.vocab_size
        seed = secrets.randbits(64) if sampling_params.seed is None else sampling_params.seed
        settings = self._device_settings(sampling_params)
        initial_state = jax.device_put(sampling.initial_state([prompt], vocab, seed))
        n_top = sampling_params.top_logprobs

        # Reuse the cached prefix, but prefill at least one token: its logits give the first sample.
        reused = min(kv_cache.common_prefix_length(self._cached_ids, prompt), len(prompt) - 1)
        self.last_reused_tokens = reused
        chunks = plan_prefill(reused, len(prompt), context)
        # A one-chunk prompt (a chat turn) is prefilled at the capacity decoding starts with. The
        # chunks of a long prompt run at the smallest capacity holding each (attention reads every
        # slot of the capacity), and the cache grows for decoding afterwards.
        decode_capacity = kv_cache.capacity_for(
            min(
                max(chunks[-1][0] + chunks[-1][1], len(prompt) + min(max_new_tokens, DECODE_RESERVE)), context
            ),
            context,
        )
        if len(chunks) == 1:
            capacities = [decode_capacity]
        else:
            capacities = [kv_cache.capacity_for(start + padded, context) for start, padded, _ in chunks]
        cache = self._cache_with_capacity(capacities[0], reused)
        # The ids of the tokens in the cache. The engine holds this very list between calls: it is only
        # changed while the cache is taken (when the engine holds an empty list instead).
        in_cache = prompt[:reused]
        self._keep_cache(cache, in_cache)

        result = None
        for i, ((start, padded, real), capacity) in enumerate(zip(chunks, capacities, strict=True)):
            last = i == len(chunks) - 1
            tokens = np.zeros((1, padded), np.int32)
            tokens[0, :real] = prompt[start : start + real]
            bits = self._allowed_bits(constraint) if last else self._all_allowed
            cache = kv_cache.resized(self._take_cache(), capacity)
            cache, state, result = self._program(
                self._state, cache, tokens, np.int32(start), np.int32(real), initial_state, settings, bits
            )
            in_cache = prompt[: start + real]
            self._keep_cache(cache, in_cache)
        if decode_capacity > self._cache_capacity():
            self._keep_cache(kv_cache.resized(self._take_cache(), decode_capacity), in_cache)

        # Without a constraint the next step needs nothing from the host (its input token stays on
        # device), so it is started before this token is read: the device computes while the host
        # delivers the token (detokenizing, rendering), instead of idling between steps (measured
        # on SmolLM2-135M: 23.3 -> 21.5 ms per token). After a stop token that step was for nothing.
        for produced in range(1, max_new_tokens + 1):
            more = produced < max_new_tokens
            ahead = more and constraint is None
            if ahead:
                next_result, state = self._decode_step(result, in_cache, state, settings, self._all_allowed)
            event = self._event(result, n_top)
            if ahead:
                self._record(in_cache, event.token_id)  # its k/v are being written by that step
            if constraint is not None:
                constraint.advance(event.token_id)
            yield event
            self._check_current(generation)
            if event.token_id in stop_ids or not more:
                return
            if not ahead:
                bits = self._allowed_bits(constraint)
                next_result, state = self._decode_step(result, in_cache, state, settings, bits)
                self._record(in_cache, event.token_id)
            result = next_result

    def _decode_step(
        self,
        result: sampling.Sample,
        in_cache: list[int],
        state: sampling.SamplerState,
        settings: sampling.SamplingArrays,
        bits: jax.Array | np.ndarray,
    ) -> tuple[sampling.Sample, sampling.SamplerState]:
        """Start the step that feeds ``result``'s token (still on device) at slot ``len(in_cache)``;
        the caller records the token's id with ``_record`` once it knows it."""
        position = len(in_cache)
        if position + 1 > self._cache_capacity():
            capacity = kv_cache.capacity_for(
                min(position + DECODE_RESERVE, self.context_length), self.context_length
            )
            self._keep_cache(kv_cache.resized(self._take_cache(), capacity), in_cache)
        cache = self._take_cache()
        cache, state, next_result = self._program(
            self._state,
            cache,
            result.token_ids[:, None],
            np.int32(position),
            np.int32(1),
            state,
            settings,
            bits,
        )
        self._keep_cache(cache, in_cache)  # slot `position` is written but not yet counted as cached
        return next_result, state

    def _record(self, in_cache: list[int], token_id: int) -> None:
        """Count the token fed by the last ``_decode_step`` as cached (the list may only change while
        the cache is taken: see ``_keep_cache``)."""
        cache = self._take_cache()
        in_cache.append(token_id)
        self._keep_cache(cache, in_cache)

    def _check_current(self, generation: int) -> None:
        if self._generation != generation:
            raise RuntimeError(
                "This generation was superseded by a newer generate() call on the same "
                "Generator, which runs one generation at a time."
            )

    def _cache_capacity(self) -> int:
        if self._cache is None:
            raise RuntimeError("The KV cache was lost during this generation.")
        return self._cache.capacity

    def _device_settings(self, sampling_params: SamplingParams) -> sampling.SamplingArrays:
        settings = sampling.sampling_arrays([sampling_params], self._config.vocab_size)
        if not sampling_params.logit_bias:  # the common case: skip sending V zeros
            settings = settings._replace(logit_bias=self._no_bias)
        return jax.device_put(settings)

    def _allowed_bits(self, constraint: TokenConstraint | None) -> jax.Array | np.ndarray:
        mask = None if constraint is None else constraint.allowed_bitmask()
        if mask is None:
            return self._all_allowed
        mask = np.asarray(mask, dtype=np.int32).reshape(1, -1)
        if mask.shape[1] != self._mask_words:
            raise ValueError(
                f"The constraint's bitmask has {mask.shape[1]} words; this model needs {self._mask_words} "
                f"(ceil(vocab_size / 32) for vocab_size {self._config.vocab_size})."
            )
        return mask

    @staticmethod
    def _event(result: sampling.Sample, n_top: int) -> TokenEvent:
        if n_top:
            token_id, logprob, top_ids, top_logprobs = jax.device_get(
                (result.token_ids, result.logprobs, result.top_ids, result.top_logprobs)
            )
            top = tuple(
                (int(t), float(lp)) for t, lp in zip(top_ids[0, :n_top], top_logprobs[0, :n_top], strict=True)
            )
        else:
            token_id, logprob = jax.device_get((result.token_ids, result.logprobs))
            top = ()
        return TokenEvent(int(token_id[0]), float(logprob[0]), top)
