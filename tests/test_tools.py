"""Tool calling (nbchat.tools): schemas from Python functions, the registry and running calls, parsing
Hermes/Qwen tool calls from whole replies and from streams, and the built-in tool prompt."""

from __future__ import annotations

import enum
import json
import random
import re
from typing import Annotated, Literal, Optional

import jsonschema
import llguidance
import pytest
from pydantic import BaseModel, Field

from nbchat.tools import (
    Tool,
    ToolCallParser,
    ToolRegistry,
    format_tool_call,
    function_schema,
    inline_tools,
    new_tool_call_id,
    parse_docstring,
    parse_tool_calls,
    tool,
    tool_prompt,
)


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Point(BaseModel):
    x: float
    y: float = 0.0


def parameters_of(fn, **kwargs) -> dict:
    schema = function_schema(fn, **kwargs)
    assert schema["type"] == "function"
    parameters = schema["function"]["parameters"]
    jsonschema.Draft202012Validator.check_schema(parameters)
    # The grammar library must compile every schema we generate.
    grammar = llguidance.LLMatcher.grammar_from_json_schema(parameters)
    assert llguidance.LLMatcher.validate_grammar(grammar) == ""
    return parameters


# -- schemas from functions -------------------------------------------------------------------------

def test_scalar_types_and_required_parameters():
    def f(count: int, ratio: float, label: str, flag: bool = False):
        pass

    parameters = parameters_of(f)
    assert parameters["properties"] == {
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "label": {"type": "string"},
        "flag": {"type": "boolean", "default": False},
    }
    assert parameters["required"] == ["count", "ratio", "label"]
    assert parameters["type"] == "object" and parameters["additionalProperties"] is False


def test_container_literal_enum_and_optional_types():
    def f(ids: list[int], weights: dict[str, float], mode: Literal["fast", "slow"], unit: Unit,
          limit: Optional[int] = None, names: tuple[str, ...] = ()):  # noqa: UP045 (users still write it)
        pass

    props = parameters_of(f)["properties"]
    assert props["ids"] == {"type": "array", "items": {"type": "integer"}}
    assert props["weights"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert props["mode"] == {"type": "string", "enum": ["fast", "slow"]}
    assert props["limit"]["anyOf"] == [{"type": "integer"}, {"type": "null"}]
    assert props["names"]["type"] == "array"
    unit = props["unit"]
    assert unit == {"$ref": "#/$defs/Unit"}


def test_pydantic_models_and_annotated_fields():
    def f(origin: Point, radius: Annotated[float, Field(description="In metres.", gt=0)], title: str):
        pass

    parameters = parameters_of(f)
    assert parameters["$defs"]["Point"] == {
        "type": "object",
        "properties": {"x": {"type": "number"}, "y": {"type": "number", "default": 0.0}},
        "required": ["x"],
    }
    assert parameters["properties"]["origin"] == {"$ref": "#/$defs/Point"}
    assert parameters["properties"]["radius"] == {"type": "number", "exclusiveMinimum": 0,
                                                  "description": "In metres."}
    # pydantic's "title" keywords are dropped, a parameter called title is not
    assert parameters["properties"]["title"] == {"type": "string"}
    jsonschema.validate({"origin": {"x": 1}, "radius": 2.5, "title": "t"}, parameters)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"origin": {"x": 1}, "radius": 0, "title": "t"}, parameters)


def test_a_function_without_parameters_takes_an_empty_object():
    def now() -> str:
        pass

    assert parameters_of(now) == {"type": "object", "properties": {}, "additionalProperties": False}


def test_unannotated_star_args_and_positional_only_parameters():
    def f(a, /, b=3, *rest, c: str = "x", **options):
        pass

    parameters = parameters_of(f)
    assert parameters["properties"] == {"a": {}, "b": {"type": "integer", "default": 3},
                                        "c": {"type": "string", "default": "x"}}
    assert parameters["required"] == ["a"]


GOOGLE_DOC = """Look up the weather.

    More detail that is still the summary.

    Args:
        city (str): The city name,
            for example Paris.
        unit: Temperature unit.

    Returns:
        dict: not a parameter.

    A closing paragraph that belongs to no parameter.
    """

NUMPY_DOC = """Look up the weather.

    Parameters
    ----------
    city : str
        The city name,
        for example Paris.
    unit : Unit, optional
        Temperature unit.

    Returns
    -------
    dict
        not a parameter.
    """

SPHINX_DOC = """Look up the weather.

    :param city: The city name,
        for example Paris.
    :param Unit unit: Temperature unit.
    :returns: not a parameter.
    """


@pytest.mark.parametrize("doc", [GOOGLE_DOC, NUMPY_DOC, SPHINX_DOC], ids=["google", "numpy", "sphinx"])
def test_docstring_styles_give_summary_and_parameter_descriptions(doc):
    summary, params = parse_docstring(doc)
    assert summary.startswith("Look up the weather.")
    assert params == {"city": "The city name, for example Paris.", "unit": "Temperature unit."}


def test_docstring_descriptions_land_in_the_schema():
    def get_weather(city: str, unit: Unit = Unit.CELSIUS) -> dict:
        pass

    get_weather.__doc__ = GOOGLE_DOC
    schema = function_schema(get_weather)["function"]
    assert schema["name"] == "get_weather"
    assert schema["description"] == "Look up the weather. More detail that is still the summary."
    assert schema["parameters"]["properties"]["city"] == {"type": "string",
                                                          "description": "The city name, for example Paris."}
    assert schema["parameters"]["properties"]["unit"]["description"] == "Temperature unit."
    assert schema["parameters"]["properties"]["unit"]["default"] == "celsius"


def test_name_and_description_overrides_and_bad_functions():
    schema = function_schema(lambda x: x, name="identity", description="Return x.")["function"]
    assert (schema["name"], schema["description"]) == ("identity", "Return x.")
    with pytest.raises(ValueError, match="must match"):
        function_schema(lambda x: x)
    with pytest.raises(TypeError, match="async"):
        async def fetch(url: str):
            pass

        function_schema(fetch)
    with pytest.raises(TypeError, match="callable"):
        Tool.from_function(42)


def test_tool_decorator_keeps_the_function_and_records_opt_in():
    @tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @tool(name="multiply", allow_run=True)
    def mul(a: int, b: int) -> int:
        return a * b

    assert add(2, 3) == 5 and mul(2, 3) == 6
    assert add.__nbchat_tool__.allow_run is False and add.__nbchat_tool__.description == "Add two numbers."
    registry = ToolRegistry([add, mul])
    assert registry.names == ["add", "multiply"]
    assert not registry.can_run("add") and registry.can_run("multiply")
    registry.set_allow_run("add")
    assert registry.can_run("add") and not ToolRegistry([add]).can_run("add")  # opt-in is per registry
    assert registry.can_run("add", allow_all=True)
    assert [s["function"]["name"] for s in registry.schemas()] == ["add", "multiply"]


# -- the registry and running calls ----------------------------------------------------------------

def call(name: str, arguments: str, call_id: str = "call_test") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture
def registry() -> ToolRegistry:
    def divide(a: float, b: float) -> float:
        """Divide a by b."""
        return a / b

    def describe(point: Point, unit: Unit = Unit.CELSIUS, *, tags: list[str] = ()) -> dict:
        return {"norm": (point.x ** 2 + point.y ** 2) ** 0.5, "unit": unit, "tags": list(tags)}

    def greet(name, /, excited: bool = False) -> str:
        return f"Hello, {name}{'!' if excited else '.'}"

    registry = ToolRegistry()
    for fn in (divide, describe, greet):
        registry.add(fn, allow_run=True)
    registry.add({"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}})
    return registry


def test_run_returns_the_tool_message_with_the_result(registry):
    result = registry.run(call("divide", '{"a": 7, "b": 2}', "call_abc"))
    assert result.ok and result.value == 3.5 and result.arguments == {"a": 7, "b": 2}
    assert result.message() == {"role": "tool", "tool_call_id": "call_abc", "content": "3.5"}


def test_run_validates_and_coerces_arguments(registry):
    arguments = '{"point": {"x": 3, "y": 4}, "unit": "fahrenheit", "tags": ["a"]}'
    result = registry.run(call("describe", arguments))
    assert result.value == {"norm": 5.0, "unit": Unit.FAHRENHEIT, "tags": ["a"]}
    assert json.loads(result.content) == {"norm": 5.0, "unit": "fahrenheit", "tags": ["a"]}
    assert registry.run(call("greet", '{"name": "Ada", "excited": true}')).content == "Hello, Ada!"


@pytest.mark.parametrize(
    ("tool_call", "error"),
    [
        (call("divide", '{"a": 1, "b": 0}'), "ZeroDivisionError: float division by zero"),
        (call("divide", '{"a": 1}'), "ValidationError"),
        (call("divide", '{"a": "one", "b": 2}'), "ValidationError"),
        (call("divide", '{"a": 1, "b": 2'), "arguments are not valid JSON"),
        (call("divide", "[1, 2]"), "arguments must be a JSON object, got list"),
        (call("launch", "{}"), "unknown tool 'launch'"),
    ],
)
def test_failures_become_error_results_for_the_model(registry, tool_call, error):
    result = registry.run(tool_call)
    assert not result.ok and error in result.error
    assert json.loads(result.message()["content"]) == {"error": result.error}
    assert result.message()["tool_call_id"] == "call_test"


def test_tools_not_opted_in_do_not_run(registry):
    registry.set_allow_run("divide", False)
    with pytest.raises(PermissionError, match="not allowed to run"):
        registry.run(call("divide", '{"a": 1, "b": 2}'))
    assert registry.run(call("divide", '{"a": 1, "b": 2}'), allow_all=True).value == 0.5
    with pytest.raises(PermissionError, match="no Python function"):
        registry.run(call("search", "{}"), allow_all=True)


# -- parsing tool calls -----------------------------------------------------------------------------

WEATHER = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"a": "}"}]}}\n'
           "</tool_call>")

REPLIES = {
    "text": ("Hello there!\n", "Hello there!", []),
    "one call": (WEATHER, None, [("get_weather", '{"city": "Paris", "days": [1, {"a": "}"}]}')]),
    "text then call": ("Let me check.\n\n" + WEATHER, "Let me check.",
                       [("get_weather", '{"city": "Paris", "days": [1, {"a": "}"}]}')]),
    "parallel": ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
                 '<tool_call>\n{"arguments": {"x": 1}, "name": "b"}\n</tool_call>',
                 None, [("a", "{}"), ("b", '{"x": 1}')]),
    "no arguments": ('<tool_call>\n{"name": "now"}\n</tool_call>', None, [("now", "{}")]),
    "string arguments": ('<tool_call>\n{"name": "s", "arguments": "{\\"q\\": 1}"}\n</tool_call>', None,
                         [("s", '{"q": 1}')]),
    "close tag inside an argument": ('<tool_call>\n{"name": "echo", "arguments": {"s": "</tool_call>"}}\n'
                                     "</tool_call>\nDone.", "Done.", [("echo", '{"s": "</tool_call>"}')]),
    "tag as text": ("I like <tool_call> tags", "I like <tool_call> tags", []),
    "unnamed block": ('<tool_call>{"nam": 1}</tool_call> after', '<tool_call>{"nam": 1}</tool_call> after',
                      []),
    "cut by max_tokens": ('x <tool_call>\n{"name": "t", "arguments": {"q": "ab', "x", [("t", '{"q": "ab')]),
    "partial tag at the end": ("a <tool_c", "a <tool_c", []),
    "missing close tag": ('<tool_call>\n{"name": "a", "arguments": {"k": 2}} and more', "and more",
                          [("a", '{"k": 2}')]),
}


@pytest.mark.parametrize("name", list(REPLIES))
def test_parse_tool_calls(name):
    text, content, calls = REPLIES[name]
    parsed_content, parsed_calls = parse_tool_calls(text)
    assert parsed_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed_calls] == calls
    for parsed in parsed_calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", parsed["id"]) and parsed["type"] == "function"


def collect_stream(text: str, rng: random.Random) -> tuple[list[dict], ToolCallParser]:
    parser = ToolCallParser()
    deltas, i = [], 0
    while i < len(text):
        size = rng.randint(1, 6)
        deltas += parser.feed(text[i:i + size])
        i += size
    deltas += parser.finish()
    return deltas, parser


@pytest.mark.parametrize("name", list(REPLIES))
def test_streamed_deltas_concatenate_to_the_parsed_message(name):
    text, content, calls = REPLIES[name]
    rng = random.Random(name)
    for _ in range(25):
        deltas, parser = collect_stream(text, rng)
        assert "".join(d.get("content", "") for d in deltas) == (content or "")
        arguments, ids = {}, {}
        for delta in deltas:
            assert set(delta) in ({"content"}, {"tool_calls"})
            for piece in delta.get("tool_calls", []):
                if piece["index"] not in ids:  # a call's first delta names it
                    assert set(piece) == {"index", "id", "type", "function"}
                    assert piece["type"] == "function" and piece["function"]["arguments"] == ""
                    assert piece["index"] == len(ids)
                    ids[piece["index"]] = (piece["id"], piece["function"]["name"])
                    arguments[piece["index"]] = ""
                else:
                    assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                    arguments[piece["index"]] += piece["function"]["arguments"]
        assert [(ids[i][1], arguments[i]) for i in sorted(ids)] == calls
        assert parser.content == content
        assert [(c["id"], c["function"]["arguments"]) for c in parser.tool_calls] == \
            [(ids[i][0], arguments[i]) for i in sorted(ids)]


def test_stream_holds_back_a_possible_tag_and_releases_it_when_it_is_not_one():
    parser = ToolCallParser()
    assert parser.feed("Hi <tool_") == [{"content": "Hi"}]
    assert parser.feed("x> y") == [{"content": " <tool_x> y"}]
    assert parser.feed(" <tool_call>\n") == []
    assert parser.feed('{"name": "f", "arg') == [
        {"tool_calls": [{"index": 0, "id": parser.tool_calls[0]["id"], "type": "function",
                         "function": {"name": "f", "arguments": ""}}]}]
    assert parser.feed('uments": {"a"') == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}]
    assert parser.feed(": 1}}\n</tool_call>") == [
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}]
    assert parser.finish() == []
    assert parser.content == "Hi <tool_x> y"
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_tool_call_ids_are_openai_shaped_and_unique():
    ids = {new_tool_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


# -- the built-in tool prompt ---------------------------------------------------------------------

def test_tool_prompt_lists_tools_and_the_call_syntax():
    def get_weather(city: str):
        """Weather now."""

    schemas = [function_schema(get_weather)]
    prompt = tool_prompt(schemas)
    listed = prompt.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in listed.splitlines()] == schemas
    syntax = '<tool_call>\n{"name": <function-name>, "arguments": <arguments-as-a-JSON-object>}\n</tool_call>'
    assert syntax in prompt


def test_format_tool_call_round_trips_through_the_parser():
    original = call("get_weather", '{"city": "Paris"}')
    content, calls = parse_tool_calls(format_tool_call(original))
    assert content is None
    assert calls[0]["function"] == original["function"]


def test_inline_tools_rewrites_a_tool_conversation_for_a_plain_template():
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time and date?"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("now", "{}", "c1"), call("today", "{}", "c2")]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        {"role": "tool", "tool_call_id": "c2", "content": "Monday"},
    ]
    out = inline_tools(messages, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"] == "Be brief.\n\n" + tool_prompt(tools)
    assert out[2]["content"] == format_tool_call(messages[2]["tool_calls"][0]) + "\n" + \
        format_tool_call(messages[2]["tool_calls"][1])
    assert out[3]["content"] == ("<tool_response>\n12:00\n</tool_response>\n"
                                 "<tool_response>\nMonday\n</tool_response>")
    assert messages[0]["content"] == "Be brief."  # the input is left alone
    without_system = inline_tools(messages[1:2], tools)
    assert without_system[0] == {"role": "system", "content": tool_prompt(tools)}
    assert inline_tools(messages[1:2], None) == messages[1:2]
