"""The generation loop: prompt ids in, one stream of token events out per sequence, many sequences
at once.

``Generator`` owns the jitted programs and the KV cache of one loaded model and serves several
sequences in one decode step (continuous batching). The cache has a fixed number of rows (slots) per
batch bucket (SLOT_BUCKETS: 1, 2, 4, 8, 16); each slot holds one sequence's k/v, and its position,
sampling settings, penalties state, RNG key and allowed-token mask are rows of device arrays, so
which sequences share a step never compiles anything new. A new request is prefilled into a free
slot in length-bucketed chunks (interleaved with the others' decode steps) and joins at the next
step; a finished or cancelled sequence frees its slot at once. A slot keeps the k/v of its last
sequence: a returning conversation (a chat resends its whole history) lands on the slot holding
its longest prefix, and only the rest is prefilled.

A scheduler thread runs the steps, started with the first request and ended when no sequence is
left. A thread rather than a loop driven by whichever consumer asks for a token: an interrupt
(KeyboardInterrupt in the consumer, a closed iterator) then never lands inside a step, which
would lose the donated cache of every sequence; the device keeps computing while consumers
detokenize and render; and no consumer's pace decides another's. Each token reaches its
consumer as soon as its step is read, and a consumer that falls behind pauses only its own row.

Knows nothing of chat templates, text or OpenAI's wire format.
"""

from __future__ import annotations

import functools
import secrets
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nbchat.engine import backend, jax_setup, model, sampling, sharding
from nbchat.engine import cache as kv_cache
from nbchat.engine.config import ModelConfig
from nbchat.engine.sampling import SamplingParams
from nbchat.errors import EngineBusyError

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
# Slots per batch: the cache has one of these numbers of rows. A step costs about the same for every
# row of its bucket, used or not, so the batch grows to the next bucket when a request finds no free
# slot and shrinks when half of it has stayed unused for SHRINK_AFTER_STEPS steps (not at once: a
# conversation returning soon, such as a tool loop's next request, finds its prefix still cached).
SLOT_BUCKETS = (1, 2, 4, 8, 16)
SHRINK_AFTER_STEPS = 64
# Tokens a sequence may have waiting for its consumer before its row pauses: 2 lets the device run
# one step ahead of a consumer that keeps up, and bounds the work done for one that stopped reading.
MAX_UNTAKEN = 2


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
    """The jitted step over every row of the batch: decode, and prefill while the batch has one row.

    ``graphdef`` is the decoder's structure (``nnx.split``, closed over as static); ``params`` its
    state. ``(params, cache, token_ids [S, T] int32, cache_len [S] int32, logits_at [S] int32,
    advancing [S] bool, state, settings, allowed_bits [S, ceil(V / 32)] int32, previous: Sample [S])
    -> (cache, state, Sample)``: run row b's T tokens through the model at its slots
    [cache_len[b], cache_len[b] + T) and sample from the logits of its token ``logits_at[b]``. Rows
    not advancing (free slots, paused or still prefilling sequences) keep their sampler state and
    their previous sample; their cache write lands past their valid slots, so it changes nothing.
    Compiled once per (S, T, cache capacity); the cache is donated so XLA updates it in place.
    """

    def run(params, cache, token_ids, cache_len, logits_at, advancing, state, settings, allowed_bits,
            previous):
        T = token_ids.shape[1]
        positions = cache_len[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        logits, cache = model.forward(graphdef, params, token_ids, positions, cache, cache_len, logits_at)
        result, new_state = sampling.sample(logits, state, settings, allowed_bits)

        def keep_unless_advancing(new: jax.Array, old: jax.Array) -> jax.Array:
            return jnp.where(advancing.reshape((-1,) + (1,) * (new.ndim - 1)), new, jnp.asarray(old))

        state = jax.tree.map(keep_unless_advancing, new_state, sampling.SamplerState(*state))
        result = jax.tree.map(keep_unless_advancing, result, previous)
        return cache, state, result

    return jax.jit(run, donate_argnums=1, compiler_options=backend.compiler_options())


@functools.lru_cache(maxsize=8)
def row_prefill_program(config: ModelConfig, graphdef: nnx.GraphDef) -> Callable:
    """The jitted prefill of one row of a batch of several.

    ``(params, cache, row [] int32, token_ids [1, T], cache_len [1], logits_at [1], state, settings,
    allowed_bits [1, W]) -> (cache, state, Sample)`` with the one row's sampler state, settings and
    sample: only row ``row`` of the cache is read and written (taken out, run, put back), so the
    other rows' T-token compute is not paid for. Compiled once per (S, T, capacity).
    """

    def run(params, cache, row, token_ids, cache_len, logits_at, state, settings, allowed_bits):
        T = token_ids.shape[1]
        positions = cache_len[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
        row_cache = jax.tree.map(lambda buffer: jax.lax.dynamic_slice_in_dim(buffer, row, 1, axis=0), cache)
        logits, row_cache = model.forward(
            graphdef, params, token_ids, positions, row_cache, cache_len, logits_at
        )
        cache = jax.tree.map(
            lambda buffer, part: jax.lax.dynamic_update_slice_in_dim(buffer, part, row, axis=0),
            cache,
            row_cache,
        )
        result, state = sampling.sample(logits, state, settings, allowed_bits)
        return cache, state, result

    return jax.jit(run, donate_argnums=1, compiler_options=backend.compiler_options())


@functools.partial(jax.jit, donate_argnums=0)
def _set_row(batch: tuple, row: jax.Array, one_row: tuple) -> tuple:
    """Row ``row`` of every array of ``batch`` replaced by ``one_row``'s (arrays with one row)."""
    return jax.tree.map(
        lambda whole, part: jax.lax.dynamic_update_slice_in_dim(whole, part.astype(whole.dtype), row, axis=0),
        batch,
        one_row,
    )


@jax.jit
def _take_rows(batch: tuple, rows: jax.Array) -> tuple:
    """Every array of ``batch`` with rows ``rows`` [S'] (an index past the end gives a zero row): the
    batch grown, shrunk or reordered."""
    return jax.tree.map(lambda whole: jnp.take(whole, rows, axis=0, mode="fill", fill_value=0), batch)


@dataclass(eq=False)
class _Sequence:
    """One generation: what its consumer asked for, and what the scheduler hands it. The fields
    under "shared" are read and written under the Generator's lock."""

    prompt: list[int]
    sampling_params: SamplingParams
    seed: int
    max_new_tokens: int
    stop_ids: frozenset[int]
    constraint: TokenConstraint | None
    owner: int  # the consumer's thread: a thread that holds every slot cannot wait for one
    ready: threading.Condition  # notified when an event, an error or the end arrives
    # shared
    events: deque[TokenEvent] = field(default_factory=deque)  # produced, not taken by the consumer yet
    error: BaseException | None = None
    ended: bool = False  # no event comes after the queued ones
    cancelled: bool = False
    # the scheduler's
    produced: int = 0  # tokens delivered

    @property
    def keeping_up(self) -> bool:
        """Under the lock: whether its consumer has taken enough for its row to advance."""
        return len(self.events) < MAX_UNTAKEN


@dataclass(eq=False)
class _Slot:
    """One row of the batch: the token ids whose k/v the row holds at slots [0, len(ids)), and the
    sequence using it (None: free, its ids kept for a returning prefix).

    A decoding sequence's current token is row ``row`` of the batch sample on device: ``unread``
    while the host has not read it (it may be fed to the next step before it is read), else
    ``pending`` holds it until a step feeds it."""

    row: int
    ids: list[int] = field(default_factory=list)
    sequence: _Sequence | None = None
    last_used: int = 0
    chunks: list[tuple[int, int, int]] = field(default_factory=list)  # prefill chunks still to run
    capacities: list[int] = field(default_factory=list)  # the cache capacity of each of them
    unread: bool = False
    pending: int | None = None
    fed: bool = False  # during one step: the step feeds this row's current token

    def release(self) -> None:
        self.sequence, self.chunks, self.capacities = None, [], []
        self.unread, self.pending, self.fed = False, None, False


class Generator:
    """Owns the jitted programs and the KV cache of one loaded model; serves many sequences at once.

    Safe to use from several threads: each ``generate()`` iterator is a sequence of its own.
    """

    def __init__(self, config: ModelConfig, decoder: model.Decoder, mesh: jax.sharding.Mesh | None = None):
        """``mesh``: the devices to shard parameters and cache over (``sharding.py``); None runs on
        the default device."""
        jax_setup.enable_persistent_compilation_cache()
        jax_setup.watch_compiles()
        self._config = config
        self._mesh = mesh
        graphdef, self._params = nnx.split(decoder)  # once: the hot path is a plain jit over the state
        if mesh is not None:
            self._params = sharding.place_parameters(self._params, config, mesh)
            nnx.update(decoder, self._params)  # the decoder holds the placed arrays: weights held once
        self._program = step_program(config, graphdef)
        self._row_program = row_prefill_program(config, graphdef)
        self._mask_words = -(-config.vocab_size // 32)
        self._all_allowed: dict[int, jax.Array] = {}  # per batch size
        self._no_bias = np.zeros((1, config.vocab_size), np.float32)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the scheduler waits here for work
        self._forgotten = threading.Condition(self._lock)  # drop_cache waits here
        self._waiting: deque[_Sequence] = deque()  # submitted, no slot yet
        self._live: set[_Sequence] = set()  # submitted, not ended
        self._thread: threading.Thread | None = None
        self._forget_requested = False
        # The scheduler's own (only its thread touches them while it runs): the slots, one per row,
        # and the batch on device. Invariant, kept through errors: either the cache exists and every
        # slot's ids are what its row holds, or the cache is None and no slot holds ids.
        self._slots: list[_Slot] = []
        self._cache: kv_cache.KVCache | None = None
        self._state: sampling.SamplerState | None = None
        self._settings: sampling.SamplingArrays | None = None
        self._result: sampling.Sample | None = None
        self._underused_steps = 0
        self._admissions = 0
        self._last_slot: _Slot | None = None
        self.last_reused_tokens = 0  # prompt tokens the last admitted sequence took from the cache

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def mesh(self) -> jax.sharding.Mesh | None:
        return self._mesh

    @property
    def context_length(self) -> int:
        return self._config.context_length

    @property
    def batch_size(self) -> int:
        """Rows (slots) of the current batch."""
        return len(self._slots)

    @property
    def cached_token_count(self) -> int:
        """How many tokens of the last admitted sequence its slot holds for reuse."""
        return len(self._last_slot.ids) if self._last_slot is not None else 0

    def drop_cache(self) -> None:
        """Forget every cached prefix, so the next prompts are prefilled whole; when no sequence is
        running, also free the cache buffers and go back to one slot."""
        with self._lock:
            thread = self._thread
            if self._live:
                self._forget_requested = True
                self._wake.notify()
                while self._forget_requested:
                    self._forgotten.wait()
                return
        if thread is not None:
            thread.join()  # it is leaving: nothing is live
        with self._lock:
            if self._thread is None and not self._live:
                self._reset_batch()
            else:  # a new sequence came meanwhile
                self._forget_requested = True
                self._wake.notify()

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
        iteration; otherwise it ends after max_new_tokens. The sequence starts when the iterator is
        first advanced and runs beside any others. Closing the iterator (close(), break,
        GeneratorExit, KeyboardInterrupt) stops it within one step and leaves the engine usable.
        Raises ValueError before compute when the prompt is empty or has ids outside the vocabulary,
        when len(prompt_ids) + max_new_tokens > context_length or a sampling setting cannot run (the
        chat API checks a request's fields before; these are the engine's invariants). An error inside
        a step is raised by the iterator of every sequence it hit;
        EngineBusyError if this thread already holds every slot with open iterators."""
        prompt = self._validated_prompt(prompt_ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompt) + max_new_tokens > self.context_length:
            raise ValueError(f"{len(prompt)} prompt tokens + max_new_tokens={max_new_tokens} exceed the "
                             f"context of {self.context_length} tokens")
        sampling.validate(sampling_params, self._config.vocab_size)
        sequence = _Sequence(
            prompt=prompt,
            sampling_params=sampling_params,
            seed=secrets.randbits(64) if sampling_params.seed is None else sampling_params.seed,
            max_new_tokens=int(max_new_tokens),
            stop_ids=frozenset(int(t) for t in stop_ids),
            constraint=constraint,
            owner=threading.get_ident(),
            ready=threading.Condition(self._lock),
        )
        return self._consume(sequence)

    def _validated_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty: there must be at least one token")
        vocab = self._config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        return prompt

    # -- the consumer's side -------------------------------------------------------------------------

    def _consume(self, sequence: _Sequence) -> Iterator[TokenEvent]:
        self._submit(sequence)
        try:
            while True:
                with self._lock:
                    while not sequence.events and not sequence.ended:
                        sequence.ready.wait()
                    if sequence.events:
                        event = sequence.events.popleft()
                        self._wake.notify()  # its row may be waiting for this consumer
                    elif sequence.error is not None:
                        raise sequence.error
                    else:
                        return
                yield event
        finally:
            with self._lock:
                if not sequence.ended:
                    sequence.cancelled = True  # its slot is freed before the next step
                    self._live.discard(sequence)  # and a new sequence may take it already
                    self._wake.notify()

    def _submit(self, sequence: _Sequence) -> None:
        with self._lock:
            most = SLOT_BUCKETS[-1]
            if len(self._live) >= most and all(other.owner == sequence.owner for other in self._live):
                raise EngineBusyError(
                    f"This thread holds all {most} of the engine's slots with open generations, so a new "
                    "one could never start. Iterate one to the end or call its close() first."
                )
            self._waiting.append(sequence)
            self._live.add(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="nbchat-generator", daemon=True)
                self._thread.start()
            else:
                self._wake.notify()

    # -- the scheduler: bookkeeping under the lock ---------------------------------------------------

    def _serve(self) -> None:
        """The scheduler thread: one iteration per step until no sequence is left."""
        while True:
            with self._lock:
                while not self._has_work():
                    if not self._live:
                        self._thread = None
                        return
                    self._wake.wait()
                if self._forget_requested:
                    self._forget_requested = False
                    for slot in self._slots:
                        if slot.sequence is None:
                            slot.ids = []
                    self._forgotten.notify_all()
                for slot in self._slots:
                    if slot.sequence is not None and slot.sequence.cancelled:
                        self._end(slot, None)
                admitted = self._admit()
            try:
                for slot in admitted:
                    self._plan_prefill(slot)
                self._iterate()
            except BaseException as error:  # noqa: BLE001 - raised by every sequence it hit
                with self._lock:
                    for slot in self._slots:
                        if slot.sequence is not None:
                            self._end(slot, error)
                    self._reset_batch()

    def _has_work(self) -> bool:
        if self._forget_requested or (self._waiting and self._has_room()):
            return True
        for slot in self._slots:
            sequence = slot.sequence
            if sequence is not None and (sequence.cancelled or slot.chunks or sequence.keeping_up):
                return True
        return False

    def _has_room(self) -> bool:
        return len(self._slots) < SLOT_BUCKETS[-1] or any(slot.sequence is None for slot in self._slots)

    def _admit(self) -> list[_Slot]:
        """Give waiting sequences a slot, growing the batch when none is free: the free slot holding
        the longest prefix of the prompt, else an empty one, else the least recently used."""
        admitted = []
        while self._waiting and self._has_room():
            sequence = self._waiting.popleft()
            if sequence.cancelled:  # closed before it started
                self._finish(sequence, None)
                continue
            free = [slot for slot in self._slots if slot.sequence is None]
            if not free:
                self._resize_rows(next(size for size in SLOT_BUCKETS if size > len(self._slots)))
                free = [slot for slot in self._slots if slot.sequence is None]

            def preference(slot: _Slot, prompt: list[int] = sequence.prompt) -> tuple[int, bool, int]:
                return (kv_cache.common_prefix_length(slot.ids, prompt), not slot.ids, -slot.last_used)

            slot = max(free, key=preference)
            slot.sequence = sequence
            self._admissions += 1
            slot.last_used = self._admissions
            self._last_slot = slot
            admitted.append(slot)
        return admitted

    def _end(self, slot: _Slot, error: BaseException | None) -> None:
        """Free ``slot`` at once (its ids stay for reuse) and end its sequence."""
        sequence = slot.sequence
        slot.release()
        self._finish(sequence, error)

    def _finish(self, sequence: _Sequence, error: BaseException | None) -> None:
        sequence.error, sequence.ended = error, True
        self._live.discard(sequence)
        sequence.ready.notify()

    def _reset_batch(self) -> None:
        self._slots, self._last_slot, self._underused_steps = [], None, 0
        self._cache = self._state = self._settings = self._result = None

    # -- the scheduler: device work ------------------------------------------------------------------

    def _iterate(self) -> None:
        """One chunk of the oldest admitted sequence's prefill, then one decode step."""
        prefilling = [slot for slot in self._slots if slot.chunks]
        if prefilling:
            self._prefill_chunk(min(prefilling, key=lambda slot: slot.last_used))
        self._decode_step()
        self._maybe_shrink()
        jax_setup.return_freed_memory()  # after a step that compiled: its 100-230 MB of host memory

    def _plan_prefill(self, slot: _Slot) -> None:
        """Plan a newly admitted sequence's prefill chunks and their cache capacities."""
        sequence = slot.sequence
        prompt, context = sequence.prompt, self.context_length
        # Reuse the cached prefix, but prefill at least one token: its logits give the first sample.
        reused = min(kv_cache.common_prefix_length(slot.ids, prompt), len(prompt) - 1)
        self.last_reused_tokens = reused
        slot.ids = slot.ids[:reused]
        chunks = plan_prefill(reused, len(prompt), context)
        last_start, last_padded, _ = chunks[-1]
        reply_room = len(prompt) + min(sequence.max_new_tokens, DECODE_RESERVE)
        decode_end = min(max(last_start + last_padded, reply_room), context)
        decode_capacity = kv_cache.capacity_for(decode_end, context)
        # A one-chunk prompt (a chat turn) is prefilled at the capacity decoding starts with. Alone,
        # the chunks of a long prompt run at the smallest capacity holding each (attention reads
        # every slot of the capacity) and the cache grows for decoding afterwards; beside other
        # sequences the cache only grows.
        if len(chunks) == 1:
            capacities = [decode_capacity]
        else:
            capacities = [kv_cache.capacity_for(start + padded, context) for start, padded, _ in chunks]
            capacities[-1] = max(capacities[-1], decode_capacity)
        alone = all(other is slot or other.sequence is None for other in self._slots)
        if self._cache is not None and not alone:
            capacities = [max(capacity, self._cache.capacity) for capacity in capacities]
        slot.chunks, slot.capacities = chunks, capacities
        if self._cache is None or (len(self._slots) == 1 and reused == 0):
            self._cache = None  # free the old buffers before allocating new ones
            self._cache = self._placed(kv_cache.empty_cache(self._config, len(self._slots), capacities[0]))
            for other in self._slots:
                other.ids = other.ids if other is slot else []

    def _prefill_chunk(self, slot: _Slot) -> None:
        sequence = slot.sequence
        (start, padded, real), capacity = slot.chunks.pop(0), slot.capacities.pop(0)
        last = not slot.chunks
        self._resize_cache(capacity)
        tokens = np.zeros((1, padded), np.int32)
        tokens[0, :real] = sequence.prompt[start : start + real]
        try:
            bits = self._allowed_bits(sequence.constraint) if last else self._all_allowed_bits(1)
        except BaseException as error:  # noqa: BLE001 - the constraint's error is its sequence's
            with self._lock:
                self._end(slot, error)
            return
        row_settings = self._row_settings(sequence.sampling_params)
        row_state = sampling.initial_state([sequence.prompt], self._config.vocab_size, sequence.seed)
        cache_len, logits_at = np.array([start], np.int32), np.array([real - 1], np.int32)
        cache, self._cache = self._cache, None  # donated: gone if the call fails
        if len(self._slots) == 1:
            cache, state, result = self._program(
                self._params, cache, tokens, cache_len, logits_at, np.ones(1, bool), row_state,
                row_settings, bits, self._empty_sample(1),
            )
        else:
            cache, state, result = self._row_program(
                self._params, cache, np.int32(slot.row), tokens, cache_len, logits_at, row_state,
                row_settings, bits,
            )
        self._cache = cache
        slot.ids = sequence.prompt[: start + real]
        if not last:
            return
        if len(self._slots) == 1:
            self._state, self._settings, self._result = state, jax.device_put(row_settings), result
        else:
            if self._state is None:
                self._state, self._settings, self._result = self._empty_batch(len(self._slots))
            self._state, self._settings, self._result = _set_row(
                (self._state, self._settings, self._result), np.int32(slot.row), (state, row_settings, result)
            )
        slot.unread = True

    def _decode_step(self) -> None:
        """Feed every row that may advance its current token; deliver the tokens of the rows whose
        consumers keep up.

        An unconstrained row's token stays on device and is fed before it is read, so the device
        computes while the host delivers (measured on SmolLM2-135M: 23.3 -> 21.5 ms per token); a
        constrained row is read first (its next mask needs the token) and fed in the next step. A
        row whose consumer has fallen behind neither advances nor is read (its token waits on
        device), so it pauses alone.
        """
        with self._lock:
            active = [
                slot for slot in self._slots
                if slot.sequence is not None and not slot.chunks and slot.sequence.keeping_up
            ]
        # A sequence's first token (its prefill's) is read before the step starts: the step may need
        # a program not compiled yet (this batch size or capacity, or the process's first decode:
        # ~1.6 s on SmolLM2 with a warm cache), and the first token should not wait for that.
        first = [slot for slot in active if slot.unread and slot.sequence.produced == 0]
        if first:
            self._deliver(first, self._result)
            with self._lock:
                active = [slot for slot in active if slot.sequence is not None and slot.sequence.keeping_up]
        reading = [slot for slot in active if slot.unread]
        for slot in active:
            sequence = slot.sequence
            more = sequence.produced + slot.unread < sequence.max_new_tokens
            slot.fed = more and not (slot.unread and sequence.constraint is not None)
        feeding = [slot for slot in active if slot.fed]
        previous = self._result
        if feeding:
            bits = self._step_bits(feeding)
            feeding = [slot for slot in feeding if slot.fed]
            if feeding:
                self._dispatch(feeding, bits)
        reading = [slot for slot in reading if slot.sequence is not None]
        if reading:
            self._deliver(reading, previous)
        for slot in self._slots:
            slot.fed = False

    def _step_bits(self, feeding: list[_Slot]) -> jax.Array | np.ndarray:
        """The step's allowed-token masks; a row whose constraint fails ends instead of advancing."""
        constrained = [slot for slot in feeding if slot.sequence.constraint is not None]
        if not constrained:
            return self._all_allowed_bits(len(self._slots))
        bits = np.full((len(self._slots), self._mask_words), -1, np.int32)
        for slot in constrained:
            try:
                bits[slot.row] = self._allowed_bits(slot.sequence.constraint)[0]
            except BaseException as error:  # noqa: BLE001 - the constraint's error is its sequence's
                with self._lock:
                    self._end(slot, error)
        return bits

    def _dispatch(self, feeding: list[_Slot], bits: jax.Array | np.ndarray) -> None:
        """Start the step feeding ``feeding``'s current tokens (still on device) at their next slot."""
        needed = max(len(slot.ids) + 1 for slot in self._slots if slot.sequence is not None)
        if needed > self._cache.capacity:
            context = self.context_length
            self._resize_cache(kv_cache.capacity_for(min(needed - 1 + DECODE_RESERVE, context), context))
        capacity = self._cache.capacity
        for slot in self._slots:
            if slot.sequence is None and len(slot.ids) >= capacity:
                slot.ids = slot.ids[: capacity - 1]  # its row's (unused) write lands on the last slot
        cache_len = np.array([len(slot.ids) for slot in self._slots], np.int32)
        advancing = np.array([slot.fed for slot in self._slots], bool)
        cache, self._cache = self._cache, None  # donated: gone if the call fails
        cache, self._state, self._result = self._program(
            self._params, cache, self._result.token_ids[:, None], cache_len, np.zeros_like(cache_len),
            advancing, self._state, self._settings, bits, self._result,
        )
        self._cache = cache
        for slot in feeding:
            if not slot.unread:  # a token read earlier: its k/v are being written now
                slot.ids.append(slot.pending)
                slot.unread, slot.pending = True, None  # the step makes its next token
        busy = sum(slot.sequence is not None for slot in self._slots)
        self._underused_steps = self._underused_steps + 1 if busy * 2 <= len(self._slots) else 0

    def _deliver(self, reading: list[_Slot], result: sampling.Sample) -> None:
        """Read the tokens of ``reading`` from ``result`` (the batch sample before the step just
        started) and hand each to its sequence; a stop id or the last allowed token ends it."""
        wanted = [result.token_ids, result.logprobs]
        if any(slot.sequence.sampling_params.top_logprobs for slot in reading):
            wanted += [result.top_ids, result.top_logprobs]
        host = jax.device_get(wanted)
        for slot in reading:
            sequence, row = slot.sequence, slot.row
            token_id = int(host[0][row])
            n_top = sequence.sampling_params.top_logprobs
            top = tuple(
                (int(t), float(lp)) for t, lp in zip(host[2][row, :n_top], host[3][row, :n_top], strict=True)
            ) if n_top else ()
            if slot.fed:  # the step just started feeds it: its k/v are being written
                slot.ids.append(token_id)
            else:
                slot.unread, slot.pending = False, token_id
            sequence.produced += 1
            error = None
            if sequence.constraint is not None:
                try:
                    sequence.constraint.advance(token_id)
                except BaseException as raised:  # noqa: BLE001 - the constraint's error is its sequence's
                    error = raised
            with self._lock:
                sequence.events.append(TokenEvent(token_id, float(host[1][row]), top))
                sequence.ready.notify()
                last = sequence.produced >= sequence.max_new_tokens
                if error is not None or token_id in sequence.stop_ids or last:
                    self._end(slot, error)

    # -- the batch's shape ---------------------------------------------------------------------------

    def _resize_cache(self, capacity: int) -> None:
        """The cache at ``capacity`` slots per row (a copy); rows keep their first slots."""
        if self._cache.capacity == capacity:
            return
        self._cache = self._placed(kv_cache.resized(self._cache, capacity))
        for slot in self._slots:
            slot.ids = slot.ids[:capacity]

    def _resize_rows(self, size: int, kept: list[_Slot] | None = None) -> None:
        """The batch at ``size`` rows: ``kept``'s rows in that order (default: every row), then
        empty ones."""
        kept = self._slots if kept is None else kept
        rows = np.array([slot.row for slot in kept] + list(range(len(self._slots), len(self._slots) + size)),
                        np.int32)[:size]
        if self._cache is not None:
            self._cache, self._state, self._settings, self._result = _take_rows(
                (self._cache, self._state, self._settings, self._result), rows
            )
            self._cache = self._placed(self._cache)
        for index, slot in enumerate(kept):
            slot.row = index
        self._slots = kept[:size] + [_Slot(row=index) for index in range(len(kept), size)]
        self._all_allowed.clear()

    def _maybe_shrink(self) -> None:
        """After SHRINK_AFTER_STEPS steps with half the rows or more unused, drop to the smallest
        bucket holding the busy rows, keeping the most recently used free rows' prefixes."""
        if len(self._slots) == 1 or self._underused_steps < SHRINK_AFTER_STEPS:
            return
        busy = [slot for slot in self._slots if slot.sequence is not None]
        size = next(size for size in SLOT_BUCKETS if size >= max(len(busy), 1))
        free = sorted(
            (slot for slot in self._slots if slot.sequence is None), key=lambda slot: -slot.last_used
        )
        kept = (busy + free)[:size]
        if self._last_slot not in kept:
            self._last_slot = None
        self._resize_rows(size, kept)
        self._underused_steps = 0

    # -- arrays --------------------------------------------------------------------------------------

    def _placed(self, cache: kv_cache.KVCache) -> kv_cache.KVCache:
        """``cache`` split over the mesh as ``sharding.cache_specs`` says (no mesh: as it is). A new
        or reshaped cache is placed explicitly; the steps keep the placement of the cache they
        were given (propagated from it and the parameters)."""
        return cache if self._mesh is None else sharding.place_cache(cache, self._config, self._mesh)

    def _row_settings(self, sampling_params: SamplingParams) -> sampling.SamplingArrays:
        settings = sampling.sampling_arrays([sampling_params], self._config.vocab_size)
        if not sampling_params.logit_bias:  # the common case: skip building V zeros
            settings = settings._replace(logit_bias=self._no_bias)
        return settings

    def _empty_sample(self, size: int) -> sampling.Sample:
        n_top = min(sampling.MAX_TOP_LOGPROBS, sampling.MAX_CANDIDATES, self._config.vocab_size)
        return sampling.Sample(
            np.zeros(size, np.int32), np.zeros(size, np.float32),
            np.zeros((size, n_top), np.int32), np.zeros((size, n_top), np.float32),
        )

    def _empty_batch(self, size: int) -> tuple:
        """Sampler state, settings and sample for ``size`` rows, none in use."""
        vocab = self._config.vocab_size
        state = sampling.initial_state([[]] * size, vocab, 0)
        settings = sampling.sampling_arrays([SamplingParams()] * size, vocab)
        return jax.device_put((state, settings, self._empty_sample(size)))

    def _all_allowed_bits(self, size: int) -> jax.Array:
        if size not in self._all_allowed:
            self._all_allowed[size] = jnp.full((size, self._mask_words), -1, jnp.int32)
        return self._all_allowed[size]

    def _allowed_bits(self, constraint: TokenConstraint | None) -> jax.Array | np.ndarray:
        """One row's mask [1, W]."""
        mask = None if constraint is None else constraint.allowed_bitmask()
        if mask is None:
            return self._all_allowed_bits(1)
        mask = np.asarray(mask, dtype=np.int32).reshape(1, -1)
        if mask.shape[1] != self._mask_words:
            raise ValueError(
                f"The constraint's bitmask has {mask.shape[1]} words; this model needs {self._mask_words} "
                f"(ceil(vocab_size / 32) for vocab_size {self._config.vocab_size})."
            )
        return mask
