"""The Generator on a tiny random-weight model: greedy tokens are the full forward's argmax, prefix
reuse and cache growth change nothing, settings never recompile, and stopping, closing or
interrupting a generation at any point leaves the engine usable. Batched sequences (several at once)
are tested in test_batching.py."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nbchat.engine import model
from nbchat.engine.generate import Generator, SamplingParams, TokenEvent, plan_prefill, step_program
from nbchat.errors import InvalidRequestError
from tests.tiny_model import TINY_ENGINE_CONFIG as TINY

GREEDY = SamplingParams(temperature=0.0)
full_forward = jax.jit(model.forward, static_argnums=0)


@pytest.fixture(scope="module")
def params():
    return model.Decoder(TINY, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def generator(params):
    return Generator(TINY, params)


def prompt(n: int, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, TINY.vocab_size, n).tolist()


def token_ids(events: list[TokenEvent]) -> list[int]:
    return [event.token_id for event in events]


def reference_log_probs(params, prompt_ids: list[int], generated: list[int]) -> np.ndarray:
    """Teacher forcing: log_softmax of the full (cache-free) forward at the positions that
    predicted each generated token -> [len(generated), V]."""
    sequence = np.array([prompt_ids + generated], np.int32)
    logits, _ = full_forward(*nnx.split(params), sequence, np.arange(sequence.shape[1], dtype=np.int32)[None])
    predicting = np.asarray(logits[0, len(prompt_ids) - 1 : -1])
    return np.asarray(jax.nn.log_softmax(jnp.asarray(predicting), axis=-1))


def assert_greedy_matches_reference(params, prompt_ids, events):
    generated = token_ids(events)
    expected = reference_log_probs(params, prompt_ids, generated)
    assert generated == expected.argmax(-1).tolist()
    np.testing.assert_allclose([e.logprob for e in events], expected.max(-1), atol=1e-4)


def test_greedy_tokens_are_the_argmax_of_the_full_forward(generator, params):
    prompt_ids = prompt(20)
    events = list(
        generator.generate(prompt_ids, SamplingParams(temperature=0.0, top_logprobs=5), max_new_tokens=30)
    )
    assert len(events) == 30
    assert_greedy_matches_reference(params, prompt_ids, events)
    expected = reference_log_probs(params, prompt_ids, token_ids(events))
    first = events[0].top_logprobs
    assert [t for t, _ in first] == np.argsort(-expected[0])[:5].tolist()
    np.testing.assert_allclose([lp for _, lp in first], np.sort(expected[0])[::-1][:5], atol=1e-4)


def test_prefix_reuse_gives_the_same_tokens_and_logprobs_as_a_fresh_prefill(generator, params):
    first_prompt = prompt(25, seed=2)
    reply = token_ids(list(generator.generate(first_prompt, GREEDY, max_new_tokens=10)))
    follow_up = first_prompt + reply + prompt(7, seed=3)
    reused = list(generator.generate(follow_up, GREEDY, max_new_tokens=12))
    # the last reply token was sampled but never fed back, so it is not in the cache
    assert generator.last_reused_tokens == len(first_prompt) + len(reply) - 1
    fresh_engine = Generator(TINY, params)
    fresh = list(fresh_engine.generate(follow_up, GREEDY, max_new_tokens=12))
    assert fresh_engine.last_reused_tokens == 0
    assert token_ids(reused) == token_ids(fresh)
    np.testing.assert_allclose([e.logprob for e in reused], [e.logprob for e in fresh], atol=1e-4)
    assert_greedy_matches_reference(params, follow_up, reused)


def test_the_same_prompt_again_reuses_all_but_one_token(generator):
    prompt_ids = prompt(30, seed=4)
    first = token_ids(list(generator.generate(prompt_ids, GREEDY, max_new_tokens=5)))
    again = token_ids(list(generator.generate(prompt_ids, GREEDY, max_new_tokens=5)))
    assert generator.last_reused_tokens == len(prompt_ids) - 1
    assert again == first


def test_a_diverging_prompt_reuses_only_the_common_prefix(generator, params):
    base = prompt(40, seed=5)
    list(generator.generate(base, GREEDY, max_new_tokens=3))
    diverged = base[:15] + prompt(10, seed=6)
    events = list(generator.generate(diverged, GREEDY, max_new_tokens=8))
    assert generator.last_reused_tokens == 15
    assert_greedy_matches_reference(params, diverged, events)


def test_the_cache_grows_during_a_long_generation_without_changing_tokens(generator, params):
    prompt_ids = prompt(100, seed=7)
    events = list(generator.generate(prompt_ids, GREEDY, max_new_tokens=200))
    assert generator._cache.capacity == 384  # started at 256 (100 + 128 reserved), grew at 256
    assert_greedy_matches_reference(params, prompt_ids, events)


def test_a_long_prompt_is_prefilled_in_chunks(generator, params):
    prompt_ids = prompt(600, seed=8)
    events = list(generator.generate(prompt_ids, GREEDY, max_new_tokens=4))
    assert generator.last_reused_tokens == 0
    assert generator._cache.capacity == 768  # 512 slots for the first chunk, then 608 + 4 tokens
    assert_greedy_matches_reference(params, prompt_ids, events)


def test_plan_prefill_pads_to_buckets_and_keeps_the_last_chunk_inside_the_context():
    assert plan_prefill(5, 20, 1024) == [(5, 16, 15)]
    assert plan_prefill(0, 530, 8192) == [(0, 512, 512), (512, 32, 18)]
    # the last chunk would end at 1024 > 1000: it starts earlier and recomputes 24 cached tokens
    assert plan_prefill(0, 1000, 1000) == [(0, 512, 512), (488, 512, 512)]
    assert plan_prefill(0, 10, 12) == [(0, 12, 10)]
    assert plan_prefill(41, 42, 1024) == [(41, 1, 1)]  # the same prompt again: the decode program


def test_stop_id_is_yielded_and_ends_the_generation(generator):
    prompt_ids = prompt(20)
    free = token_ids(list(generator.generate(prompt_ids, GREEDY, max_new_tokens=30)))
    stop = free[4]
    stopped = token_ids(list(generator.generate(prompt_ids, GREEDY, max_new_tokens=30, stop_ids={stop})))
    assert stopped == free[: free.index(stop) + 1]


def test_a_reply_ended_by_a_stop_id_is_cached_whole_and_reused_correctly(generator, params):
    # The step after each token (but the first: it is delivered before the next step starts) starts
    # before the token is delivered, so a reply that ends on a stop id has the stop id's k/v cached
    # too: a next turn that repeats it reuses all of it.
    first_prompt = prompt(25, seed=5)  # the tiny model's reply changes token once, at its 9th
    free = token_ids(list(generator.generate(first_prompt, GREEDY, max_new_tokens=12)))
    stop = next(token for index, token in enumerate(free) if index >= 2 and token not in free[:index])
    reply = token_ids(list(generator.generate(first_prompt, GREEDY, max_new_tokens=12, stop_ids={stop})))
    assert reply[-1] == stop
    assert generator.cached_token_count == len(first_prompt) + len(reply)
    follow_up = first_prompt + reply + prompt(6, seed=5)
    reused = list(generator.generate(follow_up, GREEDY, max_new_tokens=8))
    assert generator.last_reused_tokens == len(first_prompt) + len(reply)
    assert_greedy_matches_reference(params, follow_up, reused)


def test_same_seed_same_tokens_other_seed_other_tokens(generator):
    prompt_ids = prompt(20)

    def run(seed):
        settings = SamplingParams(temperature=1.0, seed=seed)
        return token_ids(list(generator.generate(prompt_ids, settings, max_new_tokens=20)))

    assert run(11) == run(11)
    assert run(11) != run(12)
    assert len(run(None)) == 20


def test_changing_sampling_settings_never_recompiles(generator, params):
    prompt_ids = prompt(20)
    list(generator.generate(prompt_ids, SamplingParams(), max_new_tokens=3))
    program = step_program(TINY, nnx.graphdef(params))
    compiled = program._cache_size()
    variants = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.3, top_p=0.8, top_k=10, min_p=0.1, seed=1),
        SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.2, seed=2),
        SamplingParams(logit_bias={3: 50.0, 4: -100.0}, top_logprobs=20, seed=3),
    ]
    for settings in variants:
        events = list(generator.generate(prompt_ids, settings, max_new_tokens=3))
        assert len(events) == 3 and len(events[0].top_logprobs) == settings.top_logprobs
    assert program._cache_size() == compiled


def test_logit_bias_forces_a_token(generator):
    events = list(
        generator.generate(prompt(20), SamplingParams(logit_bias={77: 100.0}, seed=0), max_new_tokens=5)
    )
    assert token_ids(events) == [77] * 5


def test_frequency_penalty_reduces_repeats(generator):
    prompt_ids = prompt(10, seed=9)

    def most_repeated(settings):
        tokens = token_ids(list(generator.generate(prompt_ids, settings, max_new_tokens=60)))
        return np.bincount(tokens).max()

    plain = most_repeated(GREEDY)
    penalized = most_repeated(SamplingParams(temperature=0.0, frequency_penalty=2.0))
    assert plain > 10  # this random model falls into a loop
    assert penalized < plain / 2


class AllowOnly:
    """A TokenConstraint allowing a fixed set of tokens; records what it saw."""

    def __init__(self, allowed: list[int], interrupt_at: int | None = None):
        words = np.zeros(-(-TINY.vocab_size // 32), np.uint32)
        for token in allowed:
            words[token // 32] |= np.uint32(1) << np.uint32(token % 32)
        self.mask = words.view(np.int32)
        self.interrupt_at = interrupt_at
        self.mask_calls = 0
        self.advanced: list[int] = []

    def allowed_bitmask(self):
        self.mask_calls += 1
        if self.mask_calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self.mask

    def advance(self, token_id: int) -> None:
        self.advanced.append(token_id)


def test_a_constraint_restricts_every_token_and_sees_each_one(generator):
    allowed = [5, 9, 130, 255]
    constraint = AllowOnly(allowed)
    events = token_ids(
        list(generator.generate(prompt(20), SamplingParams(seed=3), max_new_tokens=15, constraint=constraint))
    )
    assert set(events) <= set(allowed)
    assert constraint.advanced == events
    assert constraint.mask_calls == 15


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda g: g.generate([], GREEDY, max_new_tokens=5), "empty"),
        (lambda g: g.generate([1, 256], GREEDY, max_new_tokens=5), "outside the vocabulary"),
        (lambda g: g.generate([1] * 1000, GREEDY, max_new_tokens=25), "exceed the context"),
        (lambda g: g.generate([1, 2], GREEDY, max_new_tokens=0), "max_new_tokens"),
        (lambda g: g.generate([1, 2], SamplingParams(temperature=-1), max_new_tokens=5), "temperature"),
        (lambda g: g.generate([1, 2], SamplingParams(top_logprobs=25), max_new_tokens=5), "top_logprobs"),
    ],
)
def test_what_the_engine_cannot_run_fails_before_any_compute(generator, call, words):
    # Plain errors: the chat API checks a request's fields (and names them) before it calls this.
    with pytest.raises(ValueError, match=words) as raised:
        call(generator)  # not iterated: the error comes from the call itself
    assert not isinstance(raised.value, InvalidRequestError)


def test_closing_the_iterator_midway_leaves_the_engine_usable(generator, params):
    events = generator.generate(prompt(20, seed=10), GREEDY, max_new_tokens=50)
    for _ in range(3):
        next(events)
    events.close()
    follow_up = prompt(30, seed=11)
    assert_greedy_matches_reference(
        params, follow_up, list(generator.generate(follow_up, GREEDY, max_new_tokens=10))
    )


def test_keyboard_interrupt_inside_the_loop_leaves_the_engine_usable(generator, params):
    prompt_ids = prompt(20, seed=12)
    with pytest.raises(KeyboardInterrupt):
        for _ in generator.generate(
            prompt_ids, GREEDY, max_new_tokens=20, constraint=AllowOnly([1, 2, 3], 4)
        ):
            pass
    events = list(generator.generate(prompt_ids, GREEDY, max_new_tokens=10))
    assert_greedy_matches_reference(params, prompt_ids, events)


def test_an_error_during_a_step_drops_the_cache_and_the_next_generation_starts_fresh(params):
    engine = Generator(TINY, params)
    prompt_ids = prompt(20, seed=13)
    list(engine.generate(prompt_ids, GREEDY, max_new_tokens=5))
    program = engine._program
    calls = 0

    def failing_after_dispatch(*args):
        nonlocal calls
        calls += 1
        result = program(*args)  # the cache was donated: its buffers are gone
        if calls == 3:
            raise RuntimeError("the device went away")
        return result

    engine._program = failing_after_dispatch
    with pytest.raises(RuntimeError, match="went away"):  # raised in the consumer, from the step
        list(engine.generate(prompt_ids + [7, 8], GREEDY, max_new_tokens=10))
    assert engine.cached_token_count == 0
    engine._program = program
    events = list(engine.generate(prompt_ids, GREEDY, max_new_tokens=10))
    assert engine.last_reused_tokens == 0
    assert_greedy_matches_reference(params, prompt_ids, events)


def test_the_first_token_reaches_its_consumer_before_the_next_step_starts(params):
    # The next step may need a program that is not compiled yet (in a fresh process, the decode
    # step's): the first token, sampled by the prefill, must not wait for it.
    engine = Generator(TINY, params)
    program = engine._program
    first_taken = threading.Event()
    seen_before_step = []

    def decode_step_waiting_for_the_first_token(*args):
        if args[2].shape[1] == 1:  # token_ids [S, 1]: a decode step, not the prompt's prefill
            seen_before_step.append(first_taken.wait(timeout=10))
        return program(*args)

    engine._program = decode_step_waiting_for_the_first_token
    prompt_ids = prompt(20, seed=17)
    stream = engine.generate(prompt_ids, GREEDY, max_new_tokens=4)
    head = [next(stream)]
    first_taken.set()
    events = head + list(stream)

    assert seen_before_step and all(seen_before_step)
    assert_greedy_matches_reference(params, prompt_ids, events)


def test_two_open_iterators_both_run_to_their_own_tokens(generator, params):
    first_prompt, second_prompt = prompt(20, seed=30), prompt(27, seed=31)
    first = generator.generate(first_prompt, GREEDY, max_new_tokens=10)
    head = [next(first)]
    second = list(generator.generate(second_prompt, GREEDY, max_new_tokens=6))
    rest = list(first)
    assert len(head + rest) == 10 and len(second) == 6
    assert_greedy_matches_reference(params, first_prompt, head + rest)
    assert_greedy_matches_reference(params, second_prompt, second)


def test_drop_cache_makes_the_next_prompt_prefill_whole(generator):
    prompt_ids = prompt(20, seed=14)
    first = token_ids(list(generator.generate(prompt_ids, GREEDY, max_new_tokens=4)))
    generator.drop_cache()
    assert generator.cached_token_count == 0
    assert token_ids(list(generator.generate(prompt_ids, GREEDY, max_new_tokens=4))) == first
    assert generator.last_reused_tokens == 0


def test_a_second_generation_of_the_same_shapes_compiles_nothing(params):
    config = dataclasses.replace(TINY, context_length=1000)  # a config of its own: fresh programs
    engine = Generator(config, params)
    list(engine.generate(prompt(20, seed=15), GREEDY, max_new_tokens=3))
    program = step_program(config, nnx.graphdef(params))
    compiled = program._cache_size()
    assert compiled == 2  # one prefill bucket, one decode step (a single sequence runs at batch 1)
    list(engine.generate(prompt(20, seed=16), GREEDY, max_new_tokens=3))  # no reuse: a fresh prefill
    assert engine.last_reused_tokens == 0
    assert program._cache_size() == compiled


def test_memory_a_compile_freed_is_returned_after_it_once():
    from nbchat.engine import jax_setup

    jax_setup.watch_compiles()
    jax_setup.return_freed_memory()  # whatever compiled before this test
    assert jax_setup.return_freed_memory() is False  # nothing compiled since
    jax.jit(lambda x: x * 3 + 1)(np.arange(11, dtype=np.int32))  # a program of its own: compiled here
    trims = jax_setup._malloc_trim() is not None  # glibc (Linux); elsewhere nothing to return
    assert jax_setup.return_freed_memory() is trims
    assert jax_setup.return_freed_memory() is False


def test_the_generator_turns_on_the_persistent_compilation_cache_keyed_per_machine(generator, monkeypatch):
    from nbchat.engine import jax_setup

    if jax_setup.enable_persistent_compilation_cache() is None:
        pytest.skip("this process configured its own JAX compilation cache directory")
    assert jax.config.jax_compilation_cache_dir == str(jax_setup.compilation_cache_dir())
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
    key = jax_setup.machine_key()
    assert len(key) == 16 and key == jax_setup.machine_key()
    monkeypatch.setenv("NBCHAT_HOME", "/somewhere/else")
    assert jax_setup.compilation_cache_dir() == Path("/somewhere/else/jax-cache") / key
