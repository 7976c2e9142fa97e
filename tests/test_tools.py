"""Python functions as tools (nbchat.tools): schemas from signatures and docstrings, the registry and
running calls."""

from __future__ import annotations

import enum
import json
from typing import Annotated, Literal, Optional

import jsonschema
import llguidance
import pytest
from pydantic import BaseModel, Field

from nbchat.tools import Tool, ToolRegistry, function_schema, parse_docstring, tool


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
