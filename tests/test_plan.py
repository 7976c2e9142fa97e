"""How a request generates (nbchat.plan): the grammar its tools / tool_choice / response_format ask
for, in the Hermes format, on SmolLM2's tokenizer: which replies each tool_choice admits, compact
arguments, forced prefixes, special-token tags, and schema errors naming their field."""

from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from nbchat.engine.constraints import GrammarCompiler, GrammarConstraint
from nbchat.errors import InvalidRequestError
from nbchat.plan import build_constraint
from nbchat.protocol.requests import validate_request
from tests.test_constraints import EOS, PERSON, allowed_ids, is_allowed, sample_under_mask, walk


def tool_calls(compiler: GrammarCompiler, tools: list, tool_choice=None, *, parallel_tool_calls=None,
               response_format=None) -> GrammarConstraint | None:
    """The constraint of a request offering ``tools``, through the request's validation."""
    request = {"messages": [{"role": "user", "content": "Hi"}], "tools": tools, "tool_choice": tool_choice,
               "parallel_tool_calls": parallel_tool_calls, "response_format": response_format}
    return build_constraint(validate_request({k: v for k, v in request.items() if v is not None}), compiler)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "a } in a description"},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now"}}  # no parameters: an empty argument object
TOOLS = [WEATHER, CLOCK]

WEATHER_CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris","unit":"celsius"}}'
                "\n</tool_call>")
CLOCK_CALL = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'


def accepts(backend, constraint: GrammarConstraint, text: str) -> bool:
    """Whether every token of ``text`` is allowed and the grammar then accepts (stop id allowed)."""
    constraint.reset()
    for token_id in backend.encode(text).ids:
        if not is_allowed(constraint.allowed_bitmask(), token_id):
            return False
        constraint.advance(token_id)
    return constraint.is_accepting and is_allowed(constraint.allowed_bitmask(), EOS)


@pytest.mark.parametrize(
    ("text", "auto", "required", "named_clock", "required_single"),
    [
        ("The weather is nice.", True, False, False, False),
        (WEATHER_CALL, True, True, False, True),
        (CLOCK_CALL, True, True, True, True),
        ("Let me look.\n" + WEATHER_CALL, True, False, False, False),
        (WEATHER_CALL + "\n" + CLOCK_CALL, True, True, False, False),
        (CLOCK_CALL + "\n" + CLOCK_CALL, True, True, False, False),
        (WEATHER_CALL.replace('"celsius"', '"kelvin"'), False, False, False, False),
        (WEATHER_CALL.replace(',"unit":"celsius"', ""), False, False, False, False),
        (CLOCK_CALL.replace("{}", '{"tz":"UTC"}'), False, False, False, False),
        (CLOCK_CALL.replace('"now"', '"sleep"'), False, False, False, False),
        (CLOCK_CALL + " and some text after it", False, False, False, False),
        ("Text that mentions <tool_call> but then rambles", False, False, False, False),
    ],
)
def test_tool_call_grammar_per_tool_choice(backend, compiler, text, auto, required, named_clock,
                                           required_single):
    assert accepts(backend, tool_calls(compiler, TOOLS, "auto"), text) is auto
    assert accepts(backend, tool_calls(compiler, TOOLS, "required"), text) is required
    named = tool_calls(compiler, TOOLS, {"type": "function", "function": {"name": "now"}})
    assert accepts(backend, named, text) is named_clock
    single = tool_calls(compiler, TOOLS, "required", parallel_tool_calls=False)
    assert accepts(backend, single, text) is required_single


def test_auto_tool_choice_with_a_json_response_format(backend, compiler):
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    constraint = tool_calls(compiler, TOOLS, "auto", response_format=response_format)
    assert accepts(backend, constraint, '{"name": "Ada", "age": 36}')
    assert accepts(backend, constraint, CLOCK_CALL + "\n" + WEATHER_CALL)
    assert not accepts(backend, constraint, "The weather is nice.")
    assert not accepts(backend, constraint, '{"name": "Ada"}')
    assert not accepts(backend, constraint, '{"name": "Ada", "age": 36}' + CLOCK_CALL)
    bad_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": 1}}}
    with pytest.raises(InvalidRequestError) as info:
        tool_calls(compiler, TOOLS, "auto", response_format=bad_format)
    assert info.value.param == "response_format"


def test_tool_choice_none_builds_no_constraint(compiler):
    assert tool_calls(compiler, TOOLS, "none") is None


def test_forced_tool_call_fast_forwards_to_the_arguments(compiler):
    named = tool_calls(compiler, TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named.forced_text() == b'<tool_call>\n{"name": "get_weather", "arguments": {"city":"'
    assert tool_calls(compiler, TOOLS, "required").forced_text() == b'<tool_call>\n{"name": "'


def test_sampled_tool_calls_parse_and_match_their_schemas(backend, compiler, structural_ids):
    from nbchat.chat_format.hermes import parse_tool_calls

    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in TOOLS}
    # In auto mode the model writes some text, then opens a call: from there the mask takes over.
    for choice, prefix in [("required", ""), ({"type": "function", "function": {"name": "get_weather"}}, ""),
                           ("auto", "Let me check.\n<tool_call>")]:
        constraint = tool_calls(compiler, TOOLS, choice)
        for seed in range(6):
            constraint.reset()
            walk(constraint, backend.encode(prefix).ids)
            text, stopped = sample_under_mask(backend, constraint, structural_ids, seed)
            assert stopped, text
            content, calls = parse_tool_calls(prefix + text)
            assert content == ("Let me check." if prefix else None)
            assert len(calls) == (prefix + text).count("<tool_call>") >= 1
            for call in calls:
                arguments = json.loads(call["function"]["arguments"])
                jsonschema.validate(arguments, schemas[call["function"]["name"]])


def test_special_token_trigger_is_matched_as_that_token(backend):
    with_tags = copy.copy(backend)
    with_tags.add_special_tokens(["<tool_call>", "</tool_call>"])
    open_id, close_id = with_tags.token_to_id("<tool_call>"), with_tags.token_to_id("</tool_call>")
    compiler = GrammarCompiler(with_tags, vocab_size=with_tags.get_vocab_size(), stop_ids=[EOS])
    required = tool_calls(compiler, TOOLS, "required")
    assert allowed_ids(required.allowed_bitmask()).tolist() == [open_id]
    auto = tool_calls(compiler, TOOLS, "auto")
    ids = with_tags.encode("Sure." + CLOCK_CALL).ids
    assert open_id in ids and close_id in ids
    walk(auto, ids)
    assert auto.is_accepting


@pytest.mark.parametrize("tool_choice", ["auto", "required"])
def test_a_tool_schema_llguidance_cannot_compile_names_its_field(compiler, tool_choice):
    tools = [WEATHER, {"type": "function", "function": {"name": "bad", "parameters": {"type": "strng"}}}]
    with pytest.raises(InvalidRequestError) as info:
        tool_calls(compiler, tools, tool_choice)
    assert info.value.param == "tools[1].function.parameters"
    assert "Invalid type: strng" in info.value.message


def test_arguments_are_compact_json(backend, compiler):
    required = tool_calls(compiler, TOOLS, "required")
    assert accepts(backend, required, WEATHER_CALL)
    spaced = WEATHER_CALL.replace('{"city":"Paris","unit":"celsius"}', '{"city": "Paris", "unit": "celsius"}')
    assert not accepts(backend, required, spaced)
    pretty = WEATHER_CALL.replace('{"city":', '{\n    "city":')
    assert not accepts(backend, required, pretty)


def test_a_newline_after_a_call_does_not_force_another_call(backend, compiler):
    for parallel in (True, False):
        required = tool_calls(compiler, TOOLS, "required", parallel_tool_calls=parallel)
        assert accepts(backend, required, CLOCK_CALL + "\n")
        assert accepts(backend, required, CLOCK_CALL + "\n" + CLOCK_CALL) is parallel


def test_response_format_schema_errors_name_the_field(compiler):
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}
    with pytest.raises(InvalidRequestError) as info:
        build_constraint(validate_request({"messages": [{"role": "user", "content": "Hi"}],
                                           "response_format": bad}), compiler)
    assert info.value.param == "response_format" and "Invalid type: strng" in info.value.message


def feed_in_pieces(output, text: str, size: int = 3) -> list[dict]:
    deltas = []
    for start in range(0, len(text), size):
        deltas += output.feed(text[start:start + size])
        if output.ended:
            break
    return deltas + output.finish()


def test_a_repeated_call_ends_the_reply_and_is_dropped():
    from nbchat.plan import ToolCallOutput

    paris = WEATHER_CALL
    london = WEATHER_CALL.replace("Paris", "London")
    output = ToolCallOutput(named_choice=False)
    deltas = feed_in_pieces(output, paris + "\n" + london + "\n" + paris + "\n" + paris[:30])
    assert output.ended and output.finish_reason("stop") == "tool_calls"
    announced = [piece["index"] for d in deltas for piece in d.get("tool_calls", ()) if "id" in piece]
    assert announced == [0, 1]  # the repeat of the first call never went out
    arguments = {}
    for d in deltas:
        for piece in d.get("tool_calls", ()):
            arguments[piece["index"]] = arguments.get(piece["index"], "") + piece["function"]["arguments"]
    assert arguments == {0: '{"city":"Paris","unit":"celsius"}', 1: '{"city":"London","unit":"celsius"}'}
    assert not any("content" in d for d in deltas)


def test_a_call_that_starts_like_an_earlier_one_is_released_once_it_differs():
    from nbchat.plan import ToolCallOutput

    output = ToolCallOutput(named_choice=False)
    first = WEATHER_CALL
    second = WEATHER_CALL.replace('"celsius"', '"fahrenheit"')
    deltas = feed_in_pieces(output, first + "\n" + second)
    assert not output.ended
    announced = [piece for d in deltas for piece in d.get("tool_calls", ()) if "id" in piece]
    assert [piece["index"] for piece in announced] == [0, 1]


def test_a_close_tag_cut_by_max_tokens_is_not_content():
    from nbchat.chat_format.hermes import parse_tool_calls

    for cut in ("\n</tool", "\n<", "\n"):
        content, calls = parse_tool_calls(WEATHER_CALL[: -len("\n</tool_call>")] + cut)
        assert content is None and len(calls) == 1
    content, calls = parse_tool_calls(WEATHER_CALL + "\n<tool_call>\n{\"na")  # cut before a name
    assert content is None and len(calls) == 1
