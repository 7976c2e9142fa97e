"""Structured output and tool calling through the chat API: response_format (JSON object / JSON
schema) outputs that parse and validate, truncation to a valid prefix, every request error before
compute, tool_choice none/auto/required/named, parallel calls, streamed tool-call deltas equal to the
non-streamed calls, and a tool-call round trip through the chat template.

Tests on the tiny random-weight model check the plumbing deterministically (the grammar forces valid
output whatever the weights); tests marked ``integration`` run the real default model (SmolLM2-135M).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest

from nbchat.api import Engine
from nbchat.chat_format.hermes import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from nbchat.errors import ContextLengthError, InvalidRequestError

# ---- schemas of increasing difficulty (bounded, so every reply can finish within max_tokens)

ENUMS = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]},
                   "size": {"type": "string", "enum": ["small", "medium", "large"]}},
    "required": ["color", "size"],
}
NESTED = {
    "type": "object",
    "properties": {
        "person": {"type": "object",
                   "properties": {"name": {"type": "string", "maxLength": 16},
                                  "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                   "required": ["name", "age"]},
        "city": {"type": "string", "maxLength": 16},
    },
    "required": ["person", "city"],
}
ARRAYS = {
    "type": "object",
    "properties": {
        "fruits": {"type": "array", "items": {"type": "string", "maxLength": 12},
                   "minItems": 1, "maxItems": 3},
        "counts": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                   "maxItems": 3},
    },
    "required": ["fruits", "counts"],
}
BOUNDED_NUMBERS = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "balance": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "verified": {"type": "boolean"},
    },
    "required": ["age", "rating", "balance", "verified"],
}
INVENTORY = {  # refs, arrays of objects, enums, bounded numbers, a nullable field, an optional field
    "$defs": {"item": {"type": "object",
                       "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                      "kind": {"enum": ["tool", "food", "toy"]},
                                      "label": {"anyOf": [{"type": "string", "maxLength": 10},
                                                          {"type": "null"}]}},
                       "required": ["id", "kind", "label"]}},
    "type": "object",
    "properties": {
        "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 2},
        "open": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["items", "open"],
}
SCHEMAS = {"enums": ENUMS, "nested": NESTED, "arrays": ARRAYS, "bounded_numbers": BOUNDED_NUMBERS,
           "inventory": INVENTORY}
PROMPTS = {
    "enums": "Pick a color and a size for a t-shirt. Answer in JSON.",
    "nested": "Give a person's name and age and the city they live in, as JSON.",
    "arrays": "List up to three fruits and how many of each you have, as JSON.",
    "bounded_numbers": "Describe a bank customer's age, rating, balance and whether they are verified, "
                       "as JSON.",
    "inventory": "Describe the items in a small shop's inventory as JSON.",
}


def schema_format(schema: dict, *, strict: bool = True, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


def strict_copy(schema: dict) -> dict:
    """The schema as OpenAI's strict mode reads it: no property the schema does not name."""
    from nbchat.plan import strict_schema

    return strict_schema(schema)


# ---- tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 20, "description": "The city name"},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone.",
                                          "parameters": {"type": "object",
                                                         "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                                         "required": ["tz"], "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]
SCHEMA_OF = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
NAMED_CLOCK = {"type": "function", "function": {"name": "get_time"}}

USER = [{"role": "user", "content": "Hello! How are you today?"}]
GREEDY = {"temperature": 0.0}


def create(engine: Engine, **request):
    return engine.chat.completions.create(**{"messages": USER, **request})


def assert_valid_calls(message, *, at_least: int = 1) -> list[tuple[str, dict]]:
    """Every call is OpenAI-shaped, names a tool and has arguments valid for its schema."""
    calls = message.tool_calls or []
    assert len(calls) >= at_least
    parsed = []
    for call in calls:
        assert call.type == "function"
        assert call.id.startswith("call_") and len(call.id) == len("call_") + 24
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMA_OF[call.function.name])
        parsed.append((call.function.name, arguments))
    assert len({call.id for call in calls}) == len(calls)
    return parsed


def streamed_message(chunks) -> tuple[str, list[dict], str | None]:
    """(content, tool calls, finish_reason) of choice 0, merged from stream chunks, checking the tool
    call delta rules on the way: a call's first delta has index, id, type and name (arguments "");
    later ones only argument fragments."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for part in chunk.choices:
            content += part.delta.content or ""
            for delta in part.delta.tool_calls or ():
                if delta.index not in calls:
                    assert delta.id.startswith("call_") and delta.type == "function"
                    assert delta.function.name and delta.function.arguments == ""
                    calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
                else:
                    assert delta.id is None and delta.type is None and delta.function.name is None
                    calls[delta.index]["arguments"] += delta.function.arguments
            finish = part.finish_reason or finish
    assert sorted(calls) == list(range(len(calls)))
    return content, [calls[index] for index in sorted(calls)], finish


def same_calls(message, streamed: list[dict]) -> bool:
    """The same names and byte-identical arguments (ids are fresh per response)."""
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or ()] == [
        (c["name"], c["arguments"]) for c in streamed]


def assert_openai_shapes(response, chunks) -> None:
    """Both validate as openai's types, with no field those types do not know."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    from tests.openai_shapes import assert_exact_openai_shape

    assert_exact_openai_shape(response, ChatCompletion)
    for chunk in chunks:
        assert_exact_openai_shape(chunk, ChatCompletionChunk)


# ==================================================================================================
# The tiny random-weight model: deterministic checks of the plumbing


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(str(tiny_model_dir)).load()


def whitespace_bias(engine: Engine) -> dict[int, float]:
    """A logit_bias against whitespace-only tokens: a random model would fill every gap the JSON
    grammar allows (up to 20 characters) with them and run out of tokens."""
    tokenizer = engine.tokenizer
    return {token_id: -100.0 for token_id in range(len(tokenizer))
            if not tokenizer.decode([token_id]).strip() and token_id not in tokenizer.all_special_ids}


@pytest.fixture(scope="module")
def less_whitespace(engine) -> dict[int, float]:
    return whitespace_bias(engine)


@pytest.mark.parametrize("name", ["enums", "nested", "inventory"])
@pytest.mark.parametrize("sampling", [GREEDY, {"temperature": 1.0, "seed": 3}], ids=["greedy", "sampled"])
def test_schema_output_parses_and_validates_whatever_the_weights(engine, less_whitespace, name, sampling):
    response = create(engine, response_format=schema_format(SCHEMAS[name]), max_tokens=160,
                      logit_bias=less_whitespace, **sampling)
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), strict_copy(SCHEMAS[name]))
    assert choice.message.tool_calls is None


def test_n_choices_each_follow_the_schema(engine, less_whitespace):
    response = create(engine, response_format=schema_format(ENUMS), n=3, temperature=1.0, seed=11,
                      max_tokens=60, logit_bias=less_whitespace)
    values = [json.loads(choice.message.content) for choice in response.choices]
    for value in values:
        jsonschema.validate(value, strict_copy(ENUMS))
    assert all(choice.finish_reason == "stop" for choice in response.choices)


def test_truncated_output_ends_with_length_and_is_a_valid_prefix(engine):
    from nbchat.engine.constraints import GrammarCompiler

    response = create(engine, response_format=schema_format(NESTED), max_tokens=6, **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 6
    text = choice.message.content
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    loaded = engine._loaded
    compiler = GrammarCompiler.for_tokenizer(loaded.tokenizer, vocab_size=loaded.config.vocab_size,
                                             stop_ids=loaded.stop_ids)
    constraint = compiler.json_schema(strict_copy(NESTED))
    for token_id in engine.tokenizer(text, add_special_tokens=False)["input_ids"]:
        mask = constraint.allowed_bitmask()
        assert (int(mask[token_id // 32]) >> (token_id % 32)) & 1, text
        constraint.advance(token_id)
    assert not constraint.is_accepting  # a prefix of a valid reply, not a whole one


def test_json_stream_equals_non_stream(engine, less_whitespace):
    request = {"response_format": schema_format(INVENTORY), "max_tokens": 160, "temperature": 0.8, "seed": 5,
               "logit_bias": less_whitespace}
    response = create(engine, **request)
    chunks = list(create(engine, stream=True, **request))
    content, calls, finish = streamed_message(chunks)
    assert content == response.choices[0].message.content and calls == []
    assert finish == response.choices[0].finish_reason == "stop"


# ---- request errors, all before compute, and the engine stays usable

BAD_SCHEMA = {"type": "strng"}
REQUEST_ERRORS = [
    ("schema-invalid", {"response_format": schema_format(BAD_SCHEMA)}, "response_format", "strng"),
    ("schema-uncompilable", {"response_format": schema_format({"type": "string", "pattern": "(?=a)b"})},
     "response_format", "invalid schema"),
    ("schema-bad-ref", {"response_format": schema_format({"$ref": "#/$defs/missing"})},
     "response_format", "invalid schema"),
    ("schema-not-object", {"response_format": schema_format([])}, "response_format.json_schema.schema",
     "object"),
    ("schema-missing-json-schema", {"response_format": {"type": "json_schema"}},
     "response_format.json_schema", "missing"),
    ("schema-name-invalid", {"response_format": schema_format(ENUMS, name="has space")},
     "response_format.json_schema.name", "pattern"),
    ("schema-strict-not-bool",
     {"response_format": {"type": "json_schema",
                          "json_schema": {"name": "a", "schema": ENUMS, "strict": "yes"}}},
     "response_format.json_schema.strict", "boolean"),
    ("response-format-type", {"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
    ("tool-parameters-invalid",
     {"tools": [WEATHER, {"type": "function", "function": {"name": "bad", "parameters": BAD_SCHEMA}}]},
     "tools[1].function.parameters", "strng"),
    ("tool-parameters-invalid-even-when-named-elsewhere",
     {"tools": [{"type": "function", "function": {"name": "bad", "parameters": BAD_SCHEMA}}, CLOCK],
      "tool_choice": "required"}, "tools[0].function.parameters", "strng"),
    ("tools-empty", {"tools": []}, "tools", "empty array"),
    ("tool-name-invalid", {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name", "pattern"),
    ("tool-choice-without-tools", {"tool_choice": "required"}, "tool_choice", "`tools` must be set"),
    ("tool-choice-unknown-name",
     {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice.function.name", "does not match"),
    ("tool-choice-malformed", {"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function",
     "Correct usage"),
    ("tool-choice-bad-mode", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "are supported"),
    ("parallel-not-bool", {"tools": TOOLS, "parallel_tool_calls": 0}, "parallel_tool_calls", "boolean"),
    ("continue-with-schema", {"messages": [*USER, {"role": "assistant", "content": "{"}],
                              "continue_final_message": True, "response_format": {"type": "json_object"}},
     "continue_final_message", "whole reply"),
]


@pytest.mark.parametrize(("body", "param", "words"),
                         [pytest.param(b, p, w, id=name) for name, b, p, w in REQUEST_ERRORS])
def test_bad_structured_request_is_refused_before_compute(engine, body, param, words):
    body = {"messages": copy.deepcopy(USER), "max_tokens": 4, **copy.deepcopy(body)}
    snapshot = copy.deepcopy(body)
    cached = engine._generator.cached_token_count
    for stream in (False, True):
        with pytest.raises(InvalidRequestError) as caught:
            create(engine, stream=stream, **body)
        assert caught.value.param == param
        assert words.lower() in caught.value.message.lower()
    assert body == snapshot
    assert engine._generator.cached_token_count == cached  # nothing ran
    assert create(engine, max_tokens=2, response_format={"type": "json_object"}, **GREEDY).choices


def test_context_length_is_checked_with_the_tool_prompt_included(engine):
    context = engine.model_info.context_length
    plain = create(engine, max_tokens=1, **GREEDY).usage.prompt_tokens
    with_tools = create(engine, max_tokens=1, tools=TOOLS, tool_choice="required", **GREEDY)
    with_tools = with_tools.usage.prompt_tokens
    assert with_tools > plain
    with pytest.raises(ContextLengthError) as caught:
        create(engine, max_tokens=context - with_tools + 1, tools=TOOLS)
    assert caught.value.prompt_tokens == with_tools


# ---- tool_choice modes on the tiny model


def test_required_makes_only_valid_calls(engine, less_whitespace):
    response = create(engine, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                      max_tokens=80, logit_bias=less_whitespace, **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(assert_valid_calls(choice.message)) == 1


def test_named_choice_calls_that_tool_and_finishes_with_stop(engine, less_whitespace):
    for seed in range(3):
        response = create(engine, tools=TOOLS, tool_choice=NAMED_CLOCK, max_tokens=60, temperature=1.0,
                          seed=seed, logit_bias=less_whitespace)
        choice = response.choices[0]
        assert choice.finish_reason == "stop"  # OpenAI: a forced function call finishes with stop
        assert choice.message.content is None
        assert [name for name, _ in assert_valid_calls(choice.message)] == ["get_time"]


def test_none_generates_text_without_showing_the_tools(engine):
    plain = create(engine, max_tokens=12, **GREEDY)
    response = create(engine, tools=TOOLS, tool_choice="none", max_tokens=12, **GREEDY)
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].message.content == plain.choices[0].message.content
    assert response.usage.prompt_tokens == plain.usage.prompt_tokens
    assert response.choices[0].finish_reason == plain.choices[0].finish_reason


def test_auto_text_or_calls_always_well_formed(engine):
    for seed in range(4):
        response = create(engine, tools=TOOLS, max_tokens=40, temperature=1.0, seed=seed)
        choice = response.choices[0]
        if choice.message.tool_calls:
            assert_valid_calls(choice.message)
            assert choice.finish_reason in ("tool_calls", "length")
        else:
            assert TOOL_CALL_OPEN not in (choice.message.content or "")
            assert choice.finish_reason in ("stop", "length")


def test_auto_with_a_json_response_format_gives_that_json_or_calls(engine, less_whitespace):
    for seed in range(4):  # which of the two a random model picks is its business; each is well formed
        response = create(engine, tools=TOOLS, response_format=schema_format(ENUMS), max_tokens=120,
                          temperature=1.0, seed=seed, logit_bias=less_whitespace)
        message = response.choices[0].message
        if message.tool_calls:
            assert message.content is None
            assert_valid_calls(message)
            assert response.choices[0].finish_reason == "tool_calls"
        else:
            jsonschema.validate(json.loads(message.content), strict_copy(ENUMS))
            assert response.choices[0].finish_reason == "stop"


def test_parallel_calls_until_cut(engine, less_whitespace):
    """The model may not stop (EOS banned), so it keeps calling tools: several calls, cut by max_tokens.
    Sampled: greedy decoding repeats its first call, and a repeated call ends the reply."""
    newline = engine.tokenizer.convert_tokens_to_ids("\u010a")  # byte-level BPE's "\n"
    no_stop = {token_id: -100 for token_id in engine._loaded.stop_ids}
    request = {"tools": TOOLS, "tool_choice": "required", "max_tokens": 150,
               "logit_bias": {**less_whitespace, newline: 0, **no_stop}}
    greedy = create(engine, **request, **GREEDY).choices[0]
    calls = [(call.function.name, call.function.arguments) for call in greedy.message.tool_calls]
    assert greedy.finish_reason == "tool_calls" and len(set(calls)) == len(calls) >= 1
    request.update(temperature=1.0, seed=1, max_tokens=220)
    response = create(engine, **request)
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    complete = [call for call in choice.message.tool_calls if _is_json(call.function.arguments)]
    assert len(complete) >= 2
    for call in complete:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])
    # parallel_tool_calls=False: one call, then the grammar allows only the end, whatever the bias.
    single = create(engine, **request, parallel_tool_calls=False).choices[0]
    assert single.finish_reason == "tool_calls" and len(assert_valid_calls(single.message)) == 1


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


@pytest.mark.parametrize("request_body", [
    {"tool_choice": "required", "temperature": 1.0, "seed": 4},
    {"tool_choice": NAMED_CLOCK, **GREEDY},
    {"tool_choice": "required", "logprobs": True, "top_logprobs": 2, **GREEDY},
], ids=["required-sampled", "named", "logprobs"])
def test_streamed_tool_calls_equal_the_non_streamed_ones(engine, less_whitespace, request_body):
    request = {"tools": TOOLS, "max_tokens": 120, "logit_bias": less_whitespace, **request_body}
    response = create(engine, **request)
    chunks = list(create(engine, stream=True, stream_options={"include_usage": True}, **request))
    content, calls, finish = streamed_message(chunks)
    message = response.choices[0].message
    assert same_calls(message, calls)
    assert (content or None) == message.content
    assert finish == response.choices[0].finish_reason
    assert chunks[-1].usage == response.usage
    assert_openai_shapes(response, chunks)
    if request_body.get("logprobs"):  # every generated token but the stop id has its logprob
        entries = response.choices[0].logprobs.content
        ended_by_stop = response.choices[0].finish_reason != "length"
        assert len(entries) == response.usage.completion_tokens - ended_by_stop
        text = b"".join(bytes(entry.bytes) for entry in entries).decode()
        assert text.count(TOOL_CALL_OPEN) == text.count(TOOL_CALL_CLOSE) == len(message.tool_calls)


# ---- a tokenizer where <tool_call> is one special token (as in Qwen / Hermes models)


@pytest.fixture(scope="module")
def special_tags_dir(tmp_path_factory) -> Path:
    """The tiny model with <tool_call> and </tool_call> added as special tokens (and embedding rows)."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer

    from tests.tiny_model import TINY_CONFIG, _random_weights, make_tiny_model_dir

    directory = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-tool-tags"))
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.add_special_tokens([TOOL_CALL_OPEN, TOOL_CALL_CLOSE])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = dict(TINY_CONFIG, vocab_size=tokenizer.get_vocab_size())
    (directory / "config.json").write_text(json.dumps(config))
    save_file(_random_weights(config, seed=1), str(directory / "model.safetensors"))
    return directory


def test_auto_call_with_special_token_tags(special_tags_dir):
    engine = Engine(str(special_tags_dir)).load()
    open_id = engine.tokenizer.convert_tokens_to_ids(TOOL_CALL_OPEN)
    assert engine.tokenizer.backend_tokenizer.get_added_tokens_decoder()[open_id].special
    request = {"tools": TOOLS, "max_tokens": 80, "parallel_tool_calls": False,
               "logit_bias": {**whitespace_bias(engine), open_id: 100}, **GREEDY}  # open a call at once
    response = create(engine, **request)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert len(assert_valid_calls(choice.message)) == 1
    content, calls, finish = streamed_message(list(create(engine, stream=True, **request)))
    assert content == "" and same_calls(choice.message, calls) and finish == "tool_calls"
    # Without the bias the random model writes text; the tags never leak into it.
    text = create(engine, tools=TOOLS, max_tokens=30, temperature=1.0, seed=0).choices[0].message
    assert TOOL_CALL_OPEN not in (text.content or "")


# ---- a tool-call round trip: the calls and results go back through the chat template


def round_trip_messages(response) -> list:
    message = response.choices[0].message
    results = [{"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": call.function.name})}
               for call in message.tool_calls]
    return [*USER, message, *results]  # the response's message object itself, as OpenAI clients send it


def test_round_trip_renders_calls_and_results_and_runs(engine, less_whitespace):
    response = create(engine, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=80,
                      logit_bias=less_whitespace, **GREEDY)
    call = response.choices[0].message.tool_calls[0]
    messages = round_trip_messages(response)
    text, _ = engine.render_prompt(messages, tools=TOOLS)
    from nbchat.chat_format.hermes import tool_prompt

    arguments = json.loads(call.function.arguments)
    expected_call = json.dumps({"name": call.function.name, "arguments": arguments})
    assert text == (
        f"<|im_start|>system\n{tool_prompt(TOOLS)}<|im_end|>\n"
        "<|im_start|>user\nHello! How are you today?<|im_end|>\n"
        f"<|im_start|>assistant\n<tool_call>\n{expected_call}\n</tool_call><|im_end|>\n"
        f'<|im_start|>user\n<tool_response>\n{{"ok": "{call.function.name}"}}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n"
    )
    follow_up = create(engine, messages=messages, tools=TOOLS, max_tokens=8, **GREEDY)
    assert follow_up.usage.prompt_tokens == len(engine.render_prompt(messages, tools=TOOLS)[1])
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_round_trip_through_a_template_that_knows_tools(engine, less_whitespace):
    """A tool-aware template (as Qwen's or Llama 3.1's) gets the tools and the arguments as objects."""
    template = (
        "{%- if tools %}TOOLS {{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{%- for m in messages %}"
        "{%- if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} "
        "{{ c.function.arguments | tojson }} city={{ c.function.arguments.city + '\\n' }}{% endfor %}"
        "{%- elif m.role == 'tool' %}RESULT {{ m.tool_call_id }} {{ m.content + '\\n' }}"
        "{%- else %}{{ m.role }}: {{ m.content + '\\n' }}{% endif %}"
        "{%- endfor %}assistant:"
    )
    messages = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"}]
    text, _ = engine.render_prompt(messages, tools=TOOLS, chat_template=template)
    assert text == (
        "TOOLS get_weather,get_time\n"
        "user: Hello! How are you today?\n"
        'CALL get_weather {"city": "Paris", "unit": "celsius"} city=Paris\n'
        "RESULT call_1 18C\n"
        "assistant:"
    )
    response = create(engine, messages=messages, tools=TOOLS, chat_template=template, tool_choice="required",
                      parallel_tool_calls=False, max_tokens=80, logit_bias=less_whitespace, **GREEDY)
    assert_valid_calls(response.choices[0].message)


# ==================================================================================================
# The real default model (SmolLM2-135M-Instruct)


@pytest.fixture(scope="module")
def smollm2_engine():
    return Engine().load()


def smollm2_create(engine: Engine, prompt: str, **request):
    return engine.chat.completions.create(messages=[{"role": "user", "content": prompt}], **request)


SAMPLINGS = {"greedy": GREEDY, "seed-1": {"temperature": 0.8, "seed": 1},
             "seed-2": {"temperature": 0.8, "seed": 2}}


@pytest.mark.integration
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_smollm2_schema_outputs_are_always_valid(smollm2_engine, name, sampling):
    response = smollm2_create(smollm2_engine, PROMPTS[name], response_format=schema_format(SCHEMAS[name]),
                              max_tokens=120, **SAMPLINGS[sampling])
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), strict_copy(SCHEMAS[name]))


@pytest.mark.integration
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_smollm2_json_object_mode_gives_an_object(smollm2_engine, sampling):
    prompt = "Return a JSON object with the keys country and capital for France."
    response = smollm2_create(smollm2_engine, prompt, response_format={"type": "json_object"}, max_tokens=80,
                              **SAMPLINGS[sampling])
    choice = response.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.integration
def test_smollm2_truncated_json_is_cut_with_length(smollm2_engine):
    response = smollm2_create(smollm2_engine, PROMPTS["nested"], response_format=schema_format(NESTED),
                              max_tokens=8, **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice.message.content)


WEATHER_QUESTION = "What is the weather in Paris?"


@pytest.mark.integration
def test_smollm2_required_call_and_its_round_trip(smollm2_engine):
    first = smollm2_create(smollm2_engine, WEATHER_QUESTION, tools=TOOLS, tool_choice="required",
                           parallel_tool_calls=False, max_tokens=60, **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [(name, arguments)] = assert_valid_calls(choice.message)
    assert name == "get_weather" and arguments["city"] == "Paris"
    # The call and its result go back through the template (SmolLM2's has no tool support: the
    # built-in prompt), and the next request runs on that history.
    call = choice.message.tool_calls[0]
    result = '{"temperature": "18 C"}'
    messages = [{"role": "user", "content": WEATHER_QUESTION}, choice.message,
                {"role": "tool", "tool_call_id": call.id, "content": result}]
    text, _ = smollm2_engine.render_prompt(messages, tools=TOOLS)
    assert text.endswith(
        f"<|im_start|>user\n{WEATHER_QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        f'{{"name": "get_weather", "arguments": {json.dumps(arguments)}}}\n'
        "</tool_call><|im_end|>\n"
        f"<|im_start|>user\n<tool_response>\n{result}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    answer = smollm2_engine.chat.completions.create(messages=messages, tools=TOOLS, max_tokens=40, **GREEDY)
    assert answer.usage.prompt_tokens == len(smollm2_engine.render_prompt(messages, tools=TOOLS)[1])
    assert answer.choices[0].message.content or answer.choices[0].message.tool_calls


@pytest.mark.integration
def test_smollm2_named_choice(smollm2_engine):
    response = smollm2_create(smollm2_engine, WEATHER_QUESTION, tools=TOOLS,
                              tool_choice={"type": "function", "function": {"name": "get_weather"}},
                              max_tokens=60, **GREEDY)
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    [(name, arguments)] = assert_valid_calls(choice.message)
    assert name == "get_weather" and arguments["city"] == "Paris"


@pytest.mark.integration
def test_smollm2_required_call_ends_after_the_call_and_leaks_no_tag(smollm2_engine):
    """Greedy, with parallel calls allowed: this model would repeat its first call until max_tokens
    (ending in content "</tool"); a repeat ends the reply, and content never holds tag syntax."""
    weather = {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"]}}}
    request = {"tools": [weather], "tool_choice": "required", "max_tokens": 80, **GREEDY}
    response = smollm2_create(smollm2_engine, "What's the weather in Paris?", **request)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.arguments == '{"city":"Paris","unit":"celsius"}'  # compact JSON
    chunks = list(smollm2_create(smollm2_engine, "What's the weather in Paris?", stream=True, **request))
    content, streamed, finish = streamed_message(chunks)
    assert content == "" and same_calls(choice.message, streamed) and finish == "tool_calls"


@pytest.mark.integration
def test_smollm2_parallel_calls_streamed_and_not(smollm2_engine):
    request = {"tools": TOOLS, "tool_choice": "required", "max_tokens": 100, **GREEDY}
    question = "What is the weather in Paris and in London?"
    response = smollm2_create(smollm2_engine, question, **request)
    calls = response.choices[0].message.tool_calls
    assert [json.loads(call.function.arguments)["city"] for call in calls[:2]] == ["Paris", "London"]
    chunks = list(smollm2_create(smollm2_engine, question, stream=True, **request))
    _, streamed, finish = streamed_message(chunks)
    assert same_calls(response.choices[0].message, streamed) and finish == response.choices[0].finish_reason
    assert_openai_shapes(response, chunks)


@pytest.mark.integration
def test_smollm2_auto_and_none(smollm2_engine):
    """auto: the model chooses (this small one answers in text); none: text, tools not shown."""
    auto = smollm2_create(smollm2_engine, "Hi! Who are you?", tools=TOOLS, max_tokens=40, **GREEDY)
    choice = auto.choices[0]
    if choice.message.tool_calls:
        assert_valid_calls(choice.message)
    else:
        assert choice.message.content and TOOL_CALL_OPEN not in choice.message.content
    none = smollm2_create(smollm2_engine, WEATHER_QUESTION, tools=TOOLS, tool_choice="none", max_tokens=16,
                          **GREEDY)
    plain = smollm2_create(smollm2_engine, WEATHER_QUESTION, max_tokens=16, **GREEDY)
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content
