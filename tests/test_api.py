"""The chat completion API end to end on the tiny random-weight model (and a few integration tests on
the real default model): errors before compute, stream and non-stream agreement, chunk order, n > 1
seeds, logprobs, stop strings, early close, one generation at a time, OpenAI shapes."""

from __future__ import annotations

import copy
import math
import threading
import time

import pytest

from nbchat.api import ChatCompletionStream, Engine, ModelInfo
from nbchat.engine.generate import MAX_UNTAKEN
from nbchat.errors import ContextLengthError, InvalidRequestError
from tests.openai_shapes import assert_exact_openai_shape

USER = [{"role": "user", "content": "Hello! How are you today?"}]
GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir)).load()


def create(engine, **request):
    return engine.chat.completions.create(**{"messages": USER, **request})


def chunks_of(engine, **request) -> list:
    return list(create(engine, stream=True, **request))


def streamed_text(chunks, index: int = 0) -> str:
    parts = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
    return "".join(part.delta.content or "" for part in parts)


def assert_same_logprobs(first, second) -> None:
    """Same tokens and alternatives; the values may differ in the last float bits (a prompt prefilled
    from the KV cache of an earlier request rounds differently than one prefilled afresh)."""
    assert [(e.token, e.bytes, [(a.token, a.bytes) for a in e.top_logprobs]) for e in first] == [
        (e.token, e.bytes, [(a.token, a.bytes) for a in e.top_logprobs]) for e in second]
    def values(entries):
        return [value for e in entries for value in (e.logprob, *(a.logprob for a in e.top_logprobs))]

    assert values(first) == pytest.approx(values(second), abs=1e-4)


# ---- errors before compute, and the engine stays usable


ENGINE_ERRORS = [
    ("model-not-loaded", {"model": "gpt-4o"}, InvalidRequestError, "model", "not loaded"),
    ("logit-bias-outside-vocab", {"logit_bias": {"100000": 5}}, InvalidRequestError, "logit_bias",
     "vocabulary"),
    ("max-tokens-over-context", {"max_tokens": 5000}, ContextLengthError, "messages",
     "maximum context length"),
    ("prompt-over-context", {"messages": [{"role": "user", "content": "Hello " * 3000}]},
     ContextLengthError, "messages", "reduce the length"),
    ("json-schema-invalid",
     {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strng"}}}},
     InvalidRequestError, "response_format", "invalid schema"),
    ("tool-parameters-invalid",
     {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strng"}}}]},
     InvalidRequestError, "tools[0].function.parameters", "invalid schema"),
    ("template-unknown", {"chat_template": "vicuna"}, InvalidRequestError, "chat_template", "built-in"),
    ("template-raises", {"chat_template": "llama-2", "messages": [*USER, *USER]}, InvalidRequestError,
     "messages", "alternate"),
    ("late-system",
     {"chat_template": "gemma", "messages": [*USER, {"role": "system", "content": "x"}, *USER]},
     InvalidRequestError, "messages[1].role", "system message after"),
    ("bad-field", {"temperature": 5}, InvalidRequestError, "temperature", "<= 2"),
    ("n-greedy", {"n": 3, "temperature": 0}, InvalidRequestError, "n", "identical"),
]


@pytest.mark.parametrize(
    ("request_body", "error_type", "param", "word"),
    [pytest.param(body, kind, param, word, id=name) for name, body, kind, param, word in ENGINE_ERRORS],
)
def test_engine_rejects_bad_request_then_serves_a_good_one(engine, request_body, error_type, param, word):
    body = {"messages": copy.deepcopy(USER), "max_tokens": 4, **request_body}
    snapshot = copy.deepcopy(body)
    for stream in (False, True):
        with pytest.raises(error_type) as caught:
            create(engine, stream=stream, **body)
        assert caught.value.param == param
        assert word.lower() in caught.value.message.lower()
        assert body == snapshot  # the caller's messages and dicts are not changed
    assert create(engine, max_tokens=3, **GREEDY).usage.completion_tokens <= 3


def test_context_length_error_names_the_numbers(engine):
    context = engine.model_info.context_length
    with pytest.raises(ContextLengthError) as caught:
        create(engine, max_tokens=context)
    error = caught.value
    assert error.code == "context_length_exceeded"
    assert error.context_length == context and error.completion_tokens == context
    assert str(error.prompt_tokens) in error.message and str(context) in error.message


def test_messages_are_not_mutated_by_a_successful_request(engine):
    messages = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Once"},
    ]
    snapshot = copy.deepcopy(messages)
    create(engine, messages=messages, continue_final_message=True, max_tokens=3, **GREEDY)
    assert messages == snapshot


# ---- stream and non-stream


def test_stream_and_non_stream_agree_at_temperature_zero(engine):
    request = {"max_tokens": 24, "logprobs": True, "top_logprobs": 3, **GREEDY}
    response = create(engine, **request)
    chunks = chunks_of(engine, stream_options={"include_usage": True}, **request)
    choice = response.choices[0]
    assert choice.message.content == streamed_text(chunks)
    assert choice.finish_reason == [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    assert response.usage == chunks[-1].usage
    streamed_logprobs = [lp for c in chunks if c.choices and c.choices[0].logprobs
                         for lp in c.choices[0].logprobs.content]
    assert_same_logprobs(choice.logprobs.content, streamed_logprobs)
    assert create(engine, **request).choices[0].message.content == choice.message.content  # deterministic


def test_chunk_sequence_is_openai_shaped(engine):
    chunks = chunks_of(engine, max_tokens=12, n=2, temperature=1.0, seed=3,
                       stream_options={"include_usage": True})
    assert len({(c.id, c.created, c.model) for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and not mine[0].delta.content  # role first
        middle = mine[1:-1]
        assert all(part.delta.content and part.delta.role is None for part in middle)  # never empty
        assert all(part.finish_reason is None for part in mine[:-1])
        last = mine[-1]
        assert last.finish_reason in ("stop", "length")
        assert last.delta.content is None and last.delta.role is None  # the finish chunk's delta is empty
    assert all(len(c.choices) == 1 for c in chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens == (
        usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_no_usage_chunk_without_include_usage(engine):
    chunks = chunks_of(engine, max_tokens=3, **GREEDY)
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason is not None
    assert all(c.usage is None for c in chunks)


def test_responses_and_chunks_validate_as_openai_types(engine):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    response = create(engine, max_tokens=6, n=2, temperature=0.8, seed=1, logprobs=True, top_logprobs=2)
    assert_exact_openai_shape(response, ChatCompletion)
    assert response.object == "chat.completion" and response.system_fingerprint.startswith("nbchat-")
    request = {"max_tokens": 6, "logprobs": True, "top_logprobs": 2,
               "stream_options": {"include_usage": True}}
    for chunk in chunks_of(engine, **request, **GREEDY):
        assert_exact_openai_shape(chunk, ChatCompletionChunk)


def test_max_tokens_ends_with_length(engine):
    no_specials = {str(i): -100 for i in engine.tokenizer.all_special_ids}
    response = create(engine, max_tokens=5, logit_bias=no_specials, **GREEDY)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 5


def test_without_max_tokens_generation_runs_until_the_context_is_full(engine):
    context = engine.model_info.context_length
    words = context
    while True:  # a prompt that leaves room for exactly 3 tokens
        prompt_tokens = len(engine.render_prompt([{"role": "user", "content": "a " * words}])[1])
        if prompt_tokens <= context - 3:
            break
        words -= max(1, (prompt_tokens - (context - 3)) // 2)
    messages = [{"role": "user", "content": "a " * words}]
    no_stop = {str(i): -100 for i in engine.tokenizer.all_special_ids}
    response = create(engine, messages=messages, logit_bias=no_stop, **GREEDY)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.total_tokens == context
    assert response.usage.completion_tokens == context - prompt_tokens >= 3


def test_max_completion_tokens_wins_over_max_tokens(engine):
    response = create(engine, max_tokens=2, max_completion_tokens=4,
                      logit_bias={str(i): -100 for i in engine.tokenizer.all_special_ids}, **GREEDY)
    assert response.usage.completion_tokens == 4


def test_eos_ends_with_stop_and_is_not_shown(engine):
    im_end = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    response = create(engine, max_tokens=20, logit_bias={str(im_end): 100}, **GREEDY)
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].message.content == ""
    assert response.usage.completion_tokens == 1


# ---- stop strings


def test_stop_string_cuts_the_reply_before_it(engine):
    full = create(engine, max_tokens=30, **GREEDY).choices[0].message.content
    assert len(full) > 6
    stop = full[4:7]
    cut = full[: full.index(stop)]
    response = create(engine, max_tokens=30, stop=[stop, "\x00never"], **GREEDY)
    assert response.choices[0].message.content == cut
    assert response.choices[0].finish_reason == "stop"
    chunks = chunks_of(engine, max_tokens=30, stop=stop, **GREEDY)
    shown = ""
    for chunk in chunks:  # no chunk ever shows a stop string or text after it
        shown += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        assert stop not in shown
    assert shown == cut


# ---- n > 1 and seeds


def test_n_choices_use_consecutive_seeds(engine):
    request = {"max_tokens": 10, "temperature": 1.0}
    three = create(engine, n=3, seed=41, **request)
    texts = [choice.message.content for choice in three.choices]
    assert [choice.index for choice in three.choices] == [0, 1, 2]
    assert len(set(texts)) > 1  # different seeds, different samples
    for offset, text in enumerate(texts):
        assert create(engine, n=1, seed=41 + offset, **request).choices[0].message.content == text
    assert three.usage.completion_tokens == sum(
        create(engine, seed=41 + i, **request).usage.completion_tokens for i in range(3))
    assert three.usage.prompt_tokens == create(engine, seed=41, **request).usage.prompt_tokens


def test_same_seed_same_text_and_stream_agrees(engine):
    request = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first = create(engine, **request).choices[0].message.content
    assert create(engine, **request).choices[0].message.content == first
    assert streamed_text(chunks_of(engine, **request)) == first


# ---- logprobs


def test_logprobs_are_sane(engine):
    response = create(engine, max_tokens=8, logprobs=True, top_logprobs=5, **GREEDY)
    content = response.choices[0].logprobs.content
    assert content
    for entry in content:
        alternatives = entry.top_logprobs
        assert len(alternatives) == 5
        assert sum(math.exp(alt.logprob) for alt in alternatives) <= 1.0 + 1e-5
        assert all(-9999.0 <= alt.logprob <= 0.0 for alt in alternatives)
        values = [alt.logprob for alt in alternatives]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(alternatives[0].logprob)  # greedy picks the most likely
        assert entry.token == alternatives[0].token and entry.bytes == alternatives[0].bytes
    # The tokens' bytes are the reply (a random model may emit invalid UTF-8: shown as U+FFFD).
    text_bytes = b"".join(bytes(entry.bytes) for entry in content)
    assert text_bytes.decode("utf-8", errors="replace") == response.choices[0].message.content


def test_sampled_token_logprob_matches_its_entry_among_the_alternatives(engine):
    response = create(engine, max_tokens=12, temperature=1.0, seed=5, logprobs=True, top_logprobs=20)
    found = 0
    for entry in response.choices[0].logprobs.content:
        same = [alt for alt in entry.top_logprobs if alt.token == entry.token and alt.bytes == entry.bytes]
        if same:
            found += 1
            assert same[0].logprob == pytest.approx(entry.logprob)
        else:  # a sampled token outside the top 20 is less likely than all of them
            assert entry.logprob <= entry.top_logprobs[-1].logprob
    assert found


def test_logprobs_are_never_infinite():
    from nbchat.api import _finite_logprob

    assert _finite_logprob(float("-inf")) == -9999.0
    assert _finite_logprob(float("nan")) == -9999.0
    assert _finite_logprob(-12345.0) == -9999.0
    assert _finite_logprob(-0.25) == -0.25


def test_logprobs_without_top_logprobs(engine):
    response = create(engine, max_tokens=4, logprobs=True, **GREEDY)
    assert all(entry.top_logprobs == [] for entry in response.choices[0].logprobs.content)
    assert create(engine, max_tokens=4, **GREEDY).choices[0].logprobs is None


def test_logit_bias_forces_a_token(engine):
    token_id = engine.tokenizer.encode("Hello", add_special_tokens=False)[0]
    piece = engine.tokenizer.decode([token_id])
    response = create(engine, max_tokens=3, logit_bias={token_id: 100}, **GREEDY)
    assert response.choices[0].message.content == piece * 3


# ---- early close, interrupts, several generations at once


def test_closing_the_stream_early_stops_and_frees_the_engine(engine):
    stream = create(engine, stream=True, max_tokens=200, **GREEDY)
    assert isinstance(stream, ChatCompletionStream)
    taken = [next(stream) for _ in range(3)]
    assert taken[0].choices[0].delta.role == "assistant"
    stream.close()
    prompt_tokens = len(engine.render_prompt(USER)[1])
    # No step after the close: cached are the 2 tokens delivered, the ones the scheduler produced ahead
    # for this consumer (MAX_UNTAKEN) and the step in flight when it closed, far from max_tokens.
    cached = engine._generator.cached_token_count
    assert cached <= prompt_tokens + 2 + MAX_UNTAKEN + 1
    time.sleep(0.2)
    assert engine._generator.cached_token_count == cached
    with pytest.raises(StopIteration):
        next(stream)
    assert create(engine, max_tokens=2, **GREEDY).usage.completion_tokens == 2


def test_a_second_completion_runs_while_a_stream_is_open_in_the_same_thread(engine):
    # Each stream has its own slot in the engine: neither waits for the other to finish.
    whole = streamed_text(chunks_of(engine, max_tokens=12, **GREEDY))
    stream = create(engine, stream=True, max_tokens=12, **GREEDY)
    head = [next(stream) for _ in range(3)]
    other = create(engine, messages=[{"role": "user", "content": "Another question"}], max_tokens=3, **GREEDY)
    assert other.usage.completion_tokens == 3
    assert streamed_text(head + list(stream)) == whole


def test_break_and_interrupt_in_a_with_block_free_the_engine(engine):
    with create(engine, stream=True, max_tokens=200, **GREEDY) as stream:
        for index, _ in enumerate(stream):
            if index == 2:
                break
    with pytest.raises(KeyboardInterrupt):
        with create(engine, stream=True, max_tokens=200, **GREEDY) as stream:
            for index, _ in enumerate(stream):
                if index == 2:
                    raise KeyboardInterrupt
    assert create(engine, max_tokens=2, **GREEDY).usage.completion_tokens == 2


def test_interrupt_inside_generation_leaves_the_engine_usable(engine, monkeypatch):
    calls = []
    real_token_logprob = engine._token_logprob

    def interrupt_on_third_token(event):
        calls.append(event.token_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kernel interrupt lands while a token is processed
        return real_token_logprob(event)

    monkeypatch.setattr(engine, "_token_logprob", interrupt_on_third_token)
    for stream in (False, True):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            no_stop = {str(i): -100 for i in engine.tokenizer.all_special_ids}
            result = create(engine, stream=stream, max_tokens=50, logprobs=True, logit_bias=no_stop, **GREEDY)
            list(result)  # the streamed case runs here
        assert len(calls) == 3
    monkeypatch.undo()
    assert create(engine, max_tokens=2, logprobs=True, **GREEDY).usage.completion_tokens == 2


def test_dropping_a_half_read_stream_frees_the_engine(engine):
    stream = create(engine, stream=True, max_tokens=200, **GREEDY)
    next(stream)
    del stream
    assert create(engine, max_tokens=2, **GREEDY).usage.completion_tokens == 2


def test_an_unread_stream_holds_nothing(engine):
    create(engine, stream=True, max_tokens=5, **GREEDY)  # never iterated
    assert create(engine, max_tokens=2, **GREEDY).usage.completion_tokens == 2


def test_concurrent_requests_do_not_interleave(engine):
    requests = [{"max_tokens": 10, "temperature": 1.0, "seed": seed} for seed in range(4)]
    expected = [create(engine, **request).choices[0].message.content for request in requests]
    results: list[str | None] = [None] * len(requests)

    def run(index: int) -> None:
        results[index] = streamed_text(chunks_of(engine, **requests[index]))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == expected


# ---- prompts, continuing a message, model info, defaults


def test_render_prompt_returns_text_and_ids(engine):
    text, ids = engine.render_prompt(USER)
    assert text == "<|im_start|>user\nHello! How are you today?<|im_end|>\n<|im_start|>assistant\n"
    assert ids == engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert create(engine, max_tokens=1, **GREEDY).usage.prompt_tokens == len(ids)
    text, _ = engine.render_prompt(USER, chat_template="zephyr")
    assert text.startswith("<|user|>\n")
    with pytest.raises(InvalidRequestError) as caught:
        engine.render_prompt([*USER, {"role": "assistant", "content": "x"}])
    assert caught.value.param == "messages[1].role"


def test_continue_final_message_continues_the_text(engine):
    start = "Hello! How"
    messages = [*USER, {"role": "assistant", "content": start}]
    text, ids = engine.render_prompt(messages, continue_final_message=True)
    assert text.endswith(start)
    continued = create(engine, messages=messages, continue_final_message=True, max_tokens=6, **GREEDY)
    alone = create(engine, max_tokens=6, **GREEDY)
    assert continued.usage.prompt_tokens == len(ids)
    assert continued.choices[0].message.content != alone.choices[0].message.content


def test_model_info(engine, tiny_model_dir):
    info = engine.model_info
    assert isinstance(info, ModelInfo)
    assert info.name == tiny_model_dir.name and info.dtype == "float32" and info.device
    assert info.context_length > 0 and info.architecture == "llama" and info.num_layers == 2
    assert create(engine, max_tokens=1, **GREEDY).model == info.name
    assert create(engine, model=str(tiny_model_dir), max_tokens=1, **GREEDY).model == info.name


def test_engine_defaults_apply_and_requests_override_them(tiny_model_dir, engine):
    greedy_by_default = Engine(str(tiny_model_dir), temperature=0.0, max_tokens=5)
    response = greedy_by_default.chat.completions.create(messages=USER, temperature=None)
    assert response.usage.completion_tokens <= 5
    expected = create(engine, max_tokens=5, **GREEDY).choices[0].message.content
    assert response.choices[0].message.content == expected
    assert greedy_by_default.chat.completions.create(messages=USER, max_tokens=2).usage.completion_tokens <= 2


@pytest.mark.parametrize(
    ("defaults", "param"),
    [({"temperature": 9}, "temperature"), ({"tempreature": 1}, "tempreature"),
     ({"messages": USER}, "messages"), ({"stream": True}, "stream"), ({"chat_template": 3}, "chat_template")],
)
def test_bad_engine_defaults_are_refused_at_construction(defaults, param):
    with pytest.raises(InvalidRequestError) as caught:
        Engine("does-not-matter", **defaults)
    assert caught.value.param == param


def test_importing_the_api_loads_no_model():
    engine = Engine("no-such-model-anywhere")
    assert "not loaded" in repr(engine)


# ---- the real default model


@pytest.fixture(scope="module")
def smollm2_engine():
    return Engine().load()


@pytest.mark.integration
def test_smollm2_answers_a_question(smollm2_engine):
    response = smollm2_engine.chat.completions.create(
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        temperature=0, max_tokens=16,
    )
    assert "Paris" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"


@pytest.mark.integration
def test_smollm2_stream_equals_non_stream(smollm2_engine):
    request = {"messages": [{"role": "user", "content": "Name three colors."}], "temperature": 0,
               "max_tokens": 32, "logprobs": True}
    response = smollm2_engine.chat.completions.create(**request)
    chunks = list(smollm2_engine.chat.completions.create(stream=True, **request))
    assert streamed_text(chunks) == response.choices[0].message.content
    assert response.choices[0].message.content.strip()
