"""The structured-output and tool fields of a request: ``response_format`` (text, JSON object, JSON
schema), ``tools`` (function definitions) and ``tool_choice``, as pydantic types with their shape
errors worded (``tool_choice``'s as vLLM words them, which clients match on).

Must not: compile schemas or know a model's tool-call syntax (``nbchat.plan``, ``nbchat.chat_format``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from nbchat.protocol.errors import RequestFieldError, describe, quoted
from nbchat.protocol.messages import RequestModel, StrictBool, StrictStr, ToolName


class JsonSchemaFormat(RequestModel):
    name: ToolName
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TextResponseFormat(RequestModel):
    type: Literal["text"]


class JsonObjectResponseFormat(RequestModel):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(RequestModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


_RESPONSE_FORMAT_TYPES = {"text": "@text", "json_object": "@json_object", "json_schema": "@json_schema"}


def _response_format_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, Mapping) else getattr(value, "type", None)
    return _RESPONSE_FORMAT_TYPES.get(kind) if isinstance(kind, str) else None


def check_response_format_shape(value: Any) -> Any:
    if value is None or isinstance(value, BaseModel):
        return value
    if not isinstance(value, Mapping):
        raise RequestFieldError(
            "Invalid type for 'response_format': expected an object like {'type': 'json_object'}, but got "
            f"{describe(value)}.",
            code="invalid_type",
        )
    if "type" not in value:
        raise RequestFieldError(
            "Missing required parameter: 'response_format.type'. "
            f"Use one of {quoted(_RESPONSE_FORMAT_TYPES)}.",
            field="type",
            code="missing_required_parameter",
        )
    if value["type"] not in _RESPONSE_FORMAT_TYPES:
        raise RequestFieldError(
            f"Invalid value for 'response_format.type': {value['type']!r}. Supported values are: "
            f"{quoted(_RESPONSE_FORMAT_TYPES)}.",
            field="type",
        )
    return value


ResponseFormat = Annotated[
    Annotated[TextResponseFormat, Tag("@text")]
    | Annotated[JsonObjectResponseFormat, Tag("@json_object")]
    | Annotated[JsonSchemaResponseFormat, Tag("@json_schema")],
    Discriminator(_response_format_tag),
]


class FunctionDefinition(RequestModel):
    name: ToolName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: StrictBool | None = None


class Tool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: StrictStr


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


def _tool_choice_tag(value: Any) -> str:
    return "@mode" if isinstance(value, str) else "@named"


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("@mode")] | Annotated[NamedToolChoice, Tag("@named")],
    Discriminator(_tool_choice_tag),
]

_TOOL_CHOICE_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def check_tool_choice_shape(value: Any) -> Any:
    """Word tool_choice's shape errors as vLLM does (clients written against vLLM match on them)."""
    if value is None or isinstance(value, NamedToolChoice):
        return value
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise RequestFieldError(
                f"Invalid value for `tool_choice`: {value}! "
                'Only named tools, "none", "auto" or "required" are supported.'
            )
        return value
    if not isinstance(value, Mapping):
        raise RequestFieldError(
            f"Invalid value for `tool_choice`: {value}! "
            'Only named tools, "none", "auto" or "required" are supported.',
            code="invalid_type",
        )
    function = value.get("function")
    if not isinstance(function, Mapping):
        raise RequestFieldError(
            f"Invalid value for `function`: `{function}` in `tool_choice`! {_TOOL_CHOICE_USAGE}",
            field="function",
        )
    if "name" not in function:
        raise RequestFieldError(
            f"Expected field `name` in `function` in `tool_choice`! {_TOOL_CHOICE_USAGE}",
            field="function.name",
            code="missing_required_parameter",
        )
    name = function["name"]
    if not isinstance(name, str) or not name:
        raise RequestFieldError(
            f"Invalid `name` in `function`: `{name}` in `tool_choice`! {_TOOL_CHOICE_USAGE}",
            field="function.name",
        )
    if value.get("type") != "function":
        raise RequestFieldError(
            f"Invalid value for `type`: `{value.get('type')}` in `tool_choice`! {_TOOL_CHOICE_USAGE}",
            field="type",
        )
    return value
