"""Several sequences in one Generator at once (continuous batching), on a tiny random-weight model:
at temperature 0 each sequence of a batch produces exactly the tokens it produces alone, sequences
join and leave mid-batch, a closed sequence frees its slot, sampling settings, seeds and constraint
masks are per slot, and a returning conversation finds its prefix in its slot."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from flax import nnx

from nbchat.engine import generate as generate_module
from nbchat.engine import model
from nbchat.engine.generate import Generator, SamplingParams, TokenEvent
from nbchat.errors import EngineBusyError
from tests.test_generate import AllowOnly, assert_greedy_matches_reference, prompt, token_ids
from tests.tiny_model import TINY_ENGINE_CONFIG as TINY

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def params():
    return model.Decoder(TINY, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def alone(params):
    """A Generator that only ever runs one sequence at a time: the reference for batched runs."""
    return Generator(TINY, params)


def run_alone(alone: Generator, prompt_ids, settings=GREEDY, **options) -> list[TokenEvent]:
    events = list(alone.generate(prompt_ids, settings, **options))
    assert alone.batch_size == 1
    return events


def round_robin(iterators: list) -> list[list[TokenEvent]]:
    """Advance each iterator by one event in turn until all are done (one thread, deterministic)."""
    collected: list[list[TokenEvent]] = [[] for _ in iterators]
    running = dict(enumerate(iterators))
    while running:
        for index, events in list(running.items()):
            event = next(events, None)
            if event is None:
                del running[index]
            else:
                collected[index].append(event)
    return collected


def test_greedy_sequences_in_a_batch_produce_exactly_their_tokens_alone(params, alone):
    prompts = [prompt(n, seed=40 + n) for n in (5, 20, 33, 64, 90)]
    lengths = [30, 12, 25, 7, 18]
    generator = Generator(TINY, params)
    results: list[list[TokenEvent] | None] = [None] * len(prompts)

    def run(index: int) -> None:
        results[index] = list(generator.generate(prompts[index], GREEDY, max_new_tokens=lengths[index]))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert generator.batch_size == 8  # five at once: the 8-slot bucket
    for prompt_ids, length, events in zip(prompts, lengths, results, strict=True):
        expected = run_alone(alone, prompt_ids, max_new_tokens=length)
        assert token_ids(events) == token_ids(expected)
        np.testing.assert_allclose([e.logprob for e in events], [e.logprob for e in expected], atol=1e-4)
        assert_greedy_matches_reference(params, prompt_ids, events)


def test_sequences_join_and_leave_mid_batch(params, alone):
    generator = Generator(TINY, params)
    prompts = {"long": prompt(30, seed=50), "short": prompt(12, seed=51), "late": prompt(40, seed=52)}
    lengths = {"long": 40, "short": 6, "late": 10}

    def start(name: str):
        return generator.generate(prompts[name], GREEDY, max_new_tokens=lengths[name])

    running = {"long": start("long")}
    events = {name: [] for name in prompts}
    events["long"] = [next(running["long"]) for _ in range(5)]  # alone at first
    running["short"] = start("short")  # joins at the long one's sixth token
    while running:
        for name, iterator in list(running.items()):
            event = next(iterator, None)
            if event is not None:
                events[name].append(event)
                continue
            del running[name]
            if name == "short":  # the late one joins after the short one left, in its slot
                running["late"] = start("late")
    assert len(events["long"]) == 40 and generator.batch_size == 2
    for name, prompt_ids in prompts.items():
        expected = run_alone(alone, prompt_ids, max_new_tokens=lengths[name])
        assert token_ids(events[name]) == token_ids(expected), name


def test_closing_a_sequence_frees_its_slot_at_once(params, alone):
    generator = Generator(TINY, params)
    kept, closed = generator.generate(prompt(20, seed=60), GREEDY, max_new_tokens=30), None
    head = [next(kept) for _ in range(2)]
    closed = generator.generate(prompt(25, seed=61), GREEDY, max_new_tokens=30)
    next(closed)
    closed.close()
    assert generator.batch_size == 2
    newcomer = generator.generate(prompt(15, seed=62), GREEDY, max_new_tokens=8)
    rest, newcomer_events = round_robin([kept, newcomer])
    assert generator.batch_size == 2  # the newcomer took the closed one's slot
    assert token_ids(head + rest) == token_ids(run_alone(alone, prompt(20, seed=60), max_new_tokens=30))
    assert token_ids(newcomer_events) == token_ids(run_alone(alone, prompt(15, seed=62), max_new_tokens=8))


def test_sampling_settings_and_seeds_are_per_slot(params, alone):
    generator = Generator(TINY, params)
    prompt_ids = prompt(20, seed=70)
    sampled = SamplingParams(temperature=1.0, seed=5)
    others = [
        SamplingParams(temperature=0.7, top_k=5, seed=9),
        SamplingParams(temperature=0.0, frequency_penalty=2.0, repetition_penalty=1.3),
        SamplingParams(logit_bias={77: 100.0}, seed=1, top_logprobs=3),
    ]
    together = round_robin(
        [generator.generate(prompt_ids, sampled, max_new_tokens=20)]
        + [generator.generate(prompt_ids, settings, max_new_tokens=20) for settings in others]
    )
    assert generator.batch_size == 4
    assert token_ids(together[0]) == token_ids(run_alone(alone, prompt_ids, sampled, max_new_tokens=20))
    for settings, events in zip(others, together[1:], strict=True):
        expected = run_alone(alone, prompt_ids, settings, max_new_tokens=20)
        assert token_ids(events) == token_ids(expected)
        assert [e.top_logprobs != () for e in events] == [settings.top_logprobs > 0] * 20
    assert token_ids(together[3]) == [77] * 20 and 77 not in token_ids(together[0])[:3]


def test_constraint_masks_are_per_slot(params, alone):
    generator = Generator(TINY, params)
    prompt_ids = prompt(20, seed=80)
    first, second = AllowOnly([5, 9, 130, 255]), AllowOnly([1, 2, 3])
    settings = SamplingParams(seed=3)
    together = round_robin([
        generator.generate(prompt_ids, settings, max_new_tokens=15, constraint=first),
        generator.generate(prompt_ids, GREEDY, max_new_tokens=15),
        generator.generate(prompt_ids, settings, max_new_tokens=15, constraint=second),
    ])
    assert set(token_ids(together[0])) <= {5, 9, 130, 255} and first.advanced == token_ids(together[0])
    assert set(token_ids(together[2])) <= {1, 2, 3} and second.advanced == token_ids(together[2])
    assert token_ids(together[1]) == token_ids(run_alone(alone, prompt_ids, max_new_tokens=15))
    again = AllowOnly([5, 9, 130, 255])
    expected = run_alone(alone, prompt_ids, settings, max_new_tokens=15, constraint=again)
    assert token_ids(together[0]) == token_ids(expected)


def test_a_returning_conversation_lands_on_the_slot_holding_its_prefix(params):
    generator = Generator(TINY, params)
    first_turns = [prompt(30, seed=90), prompt(35, seed=91)]
    replies = round_robin([generator.generate(p, GREEDY, max_new_tokens=8) for p in first_turns])
    follow_ups = [
        turn + token_ids(reply) + prompt(5, seed=92 + i)
        for i, (turn, reply) in enumerate(zip(first_turns, replies, strict=True))
    ]
    # A reply ended by max_new_tokens: its last token was sampled but never fed, so not cached.
    # open both follow-ups, in the other order: each finds its own conversation's slot
    second = generator.generate(follow_ups[1], GREEDY, max_new_tokens=4)
    next(second)
    assert generator.last_reused_tokens == len(first_turns[1]) + 7
    first = generator.generate(follow_ups[0], GREEDY, max_new_tokens=4)
    next(first)
    assert generator.last_reused_tokens == len(first_turns[0]) + 7
    assert generator.batch_size == 2
    first.close()
    second.close()


def test_the_batch_shrinks_after_steps_with_half_of_it_unused(params, alone, monkeypatch):
    monkeypatch.setattr(generate_module, "SHRINK_AFTER_STEPS", 5)
    generator = Generator(TINY, params)
    long_prompt = prompt(20, seed=95)
    together = round_robin([
        generator.generate(long_prompt, GREEDY, max_new_tokens=30),
        generator.generate(prompt(10, seed=96), GREEDY, max_new_tokens=3),
    ])
    assert generator.batch_size == 1  # back to one slot after the short one left
    assert token_ids(together[0]) == token_ids(run_alone(alone, long_prompt, max_new_tokens=30))


def test_a_thread_holding_every_slot_is_told_instead_of_waiting_forever(params, monkeypatch):
    monkeypatch.setattr(generate_module, "SLOT_BUCKETS", (1, 2, 4))  # fewer programs to compile
    generator = Generator(TINY, params)
    most = 4
    open_ones = [generator.generate(prompt(4, seed=i), GREEDY, max_new_tokens=50) for i in range(most)]
    for events in open_ones:
        next(events)
    with pytest.raises(EngineBusyError, match="close"):
        next(generator.generate(prompt(4), GREEDY, max_new_tokens=2))
    open_ones[0].close()
    assert len(list(generator.generate(prompt(4), GREEDY, max_new_tokens=2))) == 2
    for events in open_ones:
        events.close()


@pytest.fixture(scope="module")
def smollm2():
    """(config, Decoder) of the real default model (packed Q4_1/Q8_0 codes), or a skip."""
    from nbchat.engine.weights import load_gguf
    from nbchat.errors import ModelNotFoundError
    from nbchat.models import DEFAULT_MODEL, resolve

    try:
        source = resolve(DEFAULT_MODEL, progress=False)
    except ModelNotFoundError as missing:
        pytest.skip(f"the default model file is not available: {missing}")
    return load_gguf(source.path, "float32", progress=False)


def golden_cases() -> tuple[list[dict], int]:
    import json
    from pathlib import Path

    golden = json.loads((Path(__file__).parent / "golden" / "smollm2_greedy.json").read_text())
    return golden["cases"], golden["new_tokens"]


def golden_divergences(cases: list[dict], results: list[list[TokenEvent]]) -> list[str]:
    """Each greedy stream against its transformers reference: the step where it diverges and the
    reference's top-1/top-2 logit gap there."""
    divergences = []
    for case, events in zip(cases, results, strict=False):
        generated = token_ids(events)
        step = next((i for i, (a, b) in enumerate(zip(generated, case["generated_ids"], strict=True))
                     if a != b), None)
        if step is not None:
            divergences.append(f"{case['messages'][-1]['content'][:30]!r}: step {step}, reference "
                               f"top-1/top-2 logit gap {case['top1_top2_logit_gap'][step]:.4f}")
    return divergences


@pytest.mark.integration
def test_the_golden_prompts_batched_give_their_reference_tokens(smollm2):
    """The golden prompts of tests/golden/smollm2_greedy.json at once, on the real default model,
    each twice with other settings beside them: every greedy stream equals the transformers
    reference (which the same prompts alone equal, test_golden.py)."""
    generator = Generator(*smollm2)
    cases, new_tokens = golden_cases()
    greedy = [generator.generate(case["prompt_ids"], GREEDY, max_new_tokens=new_tokens) for case in cases]
    sampled = [generator.generate(case["prompt_ids"], SamplingParams(temperature=1.0, seed=i),
                                  max_new_tokens=new_tokens) for i, case in enumerate(cases)]
    results = round_robin(greedy + sampled)
    assert generator.batch_size == 8
    divergences = golden_divergences(cases, results)
    assert not divergences, "; ".join(divergences)


@pytest.mark.integration
@pytest.mark.parametrize(("streams", "batch_size"), [(2, 2), (3, 4)])
def test_a_small_batch_of_golden_prompts_gives_their_reference_tokens(smollm2, streams, batch_size):
    # Up to 4 rows take another path through the packed weights (one fused product per row).
    generator = Generator(*smollm2)
    cases, new_tokens = golden_cases()
    cases = cases[:streams]
    results = round_robin(
        [generator.generate(case["prompt_ids"], GREEDY, max_new_tokens=new_tokens) for case in cases]
    )
    assert generator.batch_size == batch_size
    divergences = golden_divergences(cases, results)
    assert not divergences, "; ".join(divergences)
