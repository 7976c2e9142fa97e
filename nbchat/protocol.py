"""OpenAI-shaped chat completion types: the validated request, the response and the stream chunk.

Holds the pydantic models of a chat completion request (strict: an unknown field is an error, a known
OpenAI field nbchat does not implement is an error saying so), the rules that span several messages
(tool calls answered, conversation ending), the translation of pydantic's errors into
``InvalidRequestError`` with a ``param`` path such as ``messages[3].role``, and the response and chunk
models whose ``model_dump()`` validates as ``openai.types.chat.ChatCompletion`` /
``ChatCompletionChunk``.

Must not: import the engine, a tokenizer or JAX; render templates; generate. Rules that need the model
(vocabulary size, context length, what the chat template allows) live where the model is known.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from nbchat.errors import InvalidRequestError

TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_CHOICES = 16
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# OpenAI request fields nbchat knows but does not implement, with the reason, and the values that
# ask for nothing beyond what nbchat does anyway (clients often send those explicitly).
UNSUPPORTED_FIELDS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "audio": ("audio output needs a speech model; nbchat runs text-only models", ()),
    "modalities": ("nbchat runs text-only models: only ['text'] is possible", (["text"], ("text",))),
    "prediction": ("predicted outputs (speculative decoding) are not implemented", ()),
    "web_search_options": ("nbchat runs locally and has no web search", ()),
    "service_tier": ("there is one local service tier", ("auto", "default")),
    "store": ("nbchat does not store completions", (False,)),
    "metadata": ("nbchat does not store completions, so it has nowhere to keep metadata", ()),
    "reasoning_effort": ("it applies to reasoning models only", ()),
    "verbosity": ("it applies to reasoning models only", ()),
    "moderation": ("nbchat has no moderation model", ()),
    "prompt_cache_retention": ("nbchat keeps one prompt's cache in memory and nothing longer", ()),
    "prompt_cache_options": ("nbchat keeps one prompt's cache in memory and nothing longer", ()),
    "functions": ("'functions' is OpenAI's deprecated form of tools: pass 'tools' instead", ()),
    "function_call": ("'function_call' is OpenAI's deprecated form of tool_choice: pass 'tool_choice'", ()),
}
# Accepted and ignored: identifiers of the end user and cache-routing hints change nothing in a local
# engine (prefix caching is automatic).
IGNORED_FIELDS = ("user", "safety_identifier", "prompt_cache_key")

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")

# Why a field's value was wrong is told by pydantic's error; how to fix it is told by these hints.
_FIELD_HINTS = {
    "temperature": "Use a number from 0 to 2 (0 = greedy).",
    "top_p": "Use a number greater than 0 and at most 1 (1 = off).",
    "top_k": "Use an integer >= 0 (0 = off).",
    "min_p": "Use a number from 0 to 1 (0 = off).",
    "frequency_penalty": "Use a number from -2 to 2.",
    "presence_penalty": "Use a number from -2 to 2.",
    "repetition_penalty": "Use a number greater than 0 and at most 100 (1 = off).",
    "max_tokens": "Use an integer >= 1, or leave it out to generate until the end of the reply.",
    "max_completion_tokens": "Use an integer >= 1, or leave it out to generate until the end of the reply.",
    "n": f"Use an integer from 1 to {MAX_CHOICES}.",
    "top_logprobs": f"Use an integer from 0 to {MAX_TOP_LOGPROBS}, with logprobs=True.",
    "seed": "Use a 64-bit integer.",
    "logit_bias": "Map token ids to numbers from -100 to 100.",
}


class RequestFieldError(ValueError):
    """Raised inside validators: a message for the user and where, relative to the validated value,
    the fault is (``"[1].type"`` under ``messages[0].content``). Turned into InvalidRequestError."""

    def __init__(self, message: str, *, field: str = "", code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code


# --------------------------------------------------------------------------------------------------
# Request: messages


class _RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


StrictStr = Annotated[str, Strict()]
StrictBool = Annotated[bool, Strict()]
ToolName = Annotated[str, Strict(), Field(pattern=TOOL_NAME_PATTERN)]


class TextPart(_RequestModel):
    """One ``{"type": "text", "text": ...}`` part of a message's content."""

    type: Literal["text"]
    text: StrictStr


# Part types OpenAI defines per role that a text-only model cannot take.
_UNSUPPORTED_PART_TYPES = {
    "user": {"image_url": "image input", "input_audio": "audio input", "file": "file input"},
    "assistant": {"refusal": "refusal parts"},
}


def _check_content(value: Any, role: str) -> Any:
    """Content is a string or a list of text parts; name the offending part otherwise."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list | tuple):
        raise RequestFieldError(
            f"Invalid type for content of a {role} message: expected a string or a list of text parts "
            f"like [{{'type': 'text', 'text': '...'}}], but got {_describe(value)}.",
            code="invalid_type",
        )
    for index, part in enumerate(value):
        if not isinstance(part, Mapping):
            raise RequestFieldError(
                f"Invalid type for a content part: expected an object like "
                f"{{'type': 'text', 'text': '...'}}, but got {_describe(part)}.",
                field=f"[{index}]",
                code="invalid_type",
            )
        part_type = part.get("type")
        if part_type == "text":
            continue
        unsupported = _UNSUPPORTED_PART_TYPES.get(role, {})
        if part_type in unsupported:
            raise RequestFieldError(
                f"{unsupported[part_type].capitalize()} is not supported: nbchat runs text-only models. "
                f"Send the content as text parts ({{'type': 'text', 'text': '...'}}).",
                field=f"[{index}].type",
                code="unsupported_value",
            )
        if part_type is None:
            raise RequestFieldError(
                "Missing required parameter: the content part has no 'type'. "
                "Use {'type': 'text', 'text': '...'}.",
                field=f"[{index}].type",
                code="missing_required_parameter",
            )
        raise RequestFieldError(
            f"Invalid content part type {part_type!r}: a {role} message accepts only text parts "
            f"({{'type': 'text', 'text': '...'}}).",
            field=f"[{index}].type",
        )
    return value


Content = Annotated[
    Annotated[str, Tag("@string")] | Annotated[tuple[TextPart, ...], Tag("@parts")],
    Discriminator(lambda value: "@string" if isinstance(value, str) else "@parts"),
]


def content_text(content: Content | None) -> str | None:
    """The text of a message's content; text parts are joined with newlines (as vLLM does)."""
    if content is None or isinstance(content, str):
        return content
    return "\n".join(part.text for part in content)


class SystemMessage(_RequestModel):
    """A system message; ``developer`` is OpenAI's newer name for it and is treated the same."""

    role: Literal["system", "developer"]
    content: Content
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _check_content(value, "system")


class UserMessage(_RequestModel):
    role: Literal["user"]
    content: Content
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _check_content(value, "user")


class FunctionCall(_RequestModel):
    name: ToolName
    arguments: StrictStr  # a JSON text, as OpenAI sends it


class ToolCall(_RequestModel):
    """A tool call an assistant message made earlier in the conversation."""

    id: Annotated[str, Strict(), Field(min_length=1)]
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_RequestModel):
    role: Literal["assistant"]
    content: Content | None = None
    name: StrictStr | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    refusal: None = None  # echoed back as null from a previous response; nbchat never refuses

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return value if value is None else _check_content(value, "assistant")

    @model_validator(mode="after")
    def _content_or_tool_calls(self) -> AssistantMessage:
        if self.content is None and not self.tool_calls:
            raise RequestFieldError(
                "Missing required parameter: an assistant message needs 'content' "
                "unless it has 'tool_calls'.",
                field="content",
                code="missing_required_parameter",
            )
        if self.tool_calls is not None and not self.tool_calls:
            raise RequestFieldError(
                "Invalid 'tool_calls': empty array. Leave 'tool_calls' out when the message made no call.",
                field="tool_calls",
                code="empty_array",
            )
        ids = [call.id for call in self.tool_calls or ()]
        for index, call_id in enumerate(ids):
            if call_id in ids[:index]:
                raise RequestFieldError(
                    f"Duplicate tool call id {call_id!r}: each call in a message needs its own id.",
                    field=f"tool_calls[{index}].id",
                )
        return self


class ToolMessage(_RequestModel):
    role: Literal["tool"]
    content: Content
    tool_call_id: Annotated[str, Strict(), Field(min_length=1)]

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _check_content(value, "tool")


# Union tags start with "@" so the error translator can drop them from a param path.
_ROLE_TAGS = {
    "system": "@system",
    "developer": "@system",
    "user": "@user",
    "assistant": "@assistant",
    "tool": "@tool",
}


def _message_tag(value: Any) -> str | None:
    role = value.get("role") if isinstance(value, Mapping) else getattr(value, "role", None)
    return _ROLE_TAGS.get(role) if isinstance(role, str) else None


Message = Annotated[
    Annotated[SystemMessage, Tag("@system")]
    | Annotated[UserMessage, Tag("@user")]
    | Annotated[AssistantMessage, Tag("@assistant")]
    | Annotated[ToolMessage, Tag("@tool")],
    Discriminator(_message_tag),
]


def _message_as_mapping(message: Any) -> Any:
    """Accept a message object of a previous response (nbchat's or openai's) as its dict."""
    if isinstance(message, BaseModel):
        dumped = message.model_dump(exclude_none=True)
        if not dumped.get("annotations"):
            dumped.pop("annotations", None)  # openai's response messages carry an empty list
        return dumped
    return message


def _check_message_shapes(messages: Any) -> list[Any]:
    """The structure pydantic cannot word well: list, objects, roles, misplaced tool fields."""
    if not isinstance(messages, list | tuple):
        raise RequestFieldError(
            f"Invalid type for 'messages': expected a list of message objects like "
            f"[{{'role': 'user', 'content': 'Hello'}}], but got {_describe(messages)}.",
            code="invalid_type",
        )
    if not messages:
        raise RequestFieldError(
            "Invalid 'messages': empty array. Expected at least one message, "
            "e.g. [{'role': 'user', 'content': 'Hello'}].",
            code="empty_array",
        )
    checked = []
    for index, message in enumerate(messages):
        message = _message_as_mapping(message)
        if not isinstance(message, Mapping):
            raise RequestFieldError(
                "Invalid type for a message: expected an object like "
                f"{{'role': 'user', 'content': 'Hello'}}, but got {_describe(message)}.",
                field=f"[{index}]",
                code="invalid_type",
            )
        message = dict(message)  # a copy: nothing below may touch the caller's dict
        role = message.get("role")
        if role is None:
            raise RequestFieldError(
                "Missing required parameter: the message has no 'role'. "
                f"Use one of {_quoted(MESSAGE_ROLES)}.",
                field=f"[{index}].role",
                code="missing_required_parameter",
            )
        if role == "function":
            raise RequestFieldError(
                "The 'function' role is OpenAI's deprecated form of tool results: send "
                "{'role': 'tool', 'tool_call_id': ..., 'content': ...} instead.",
                field=f"[{index}].role",
                code="unsupported_value",
            )
        if role not in MESSAGE_ROLES:
            raise RequestFieldError(
                f"Invalid value for the message role: {role!r}. "
                f"Supported values are: {_quoted(MESSAGE_ROLES)}.",
                field=f"[{index}].role",
            )
        if "tool_call_id" in message and role != "tool":
            raise RequestFieldError(
                f"'tool_call_id' is only allowed on tool messages, not on a {role} message. Remove it, or "
                "send the tool's result as {'role': 'tool', 'tool_call_id': ..., 'content': ...}.",
                field=f"[{index}].tool_call_id",
            )
        if "tool_calls" in message and role != "assistant":
            raise RequestFieldError(
                f"'tool_calls' is only allowed on assistant messages, not on a {role} message.",
                field=f"[{index}].tool_calls",
            )
        checked.append(message)
    return checked


def _check_tool_call_answers(messages: Sequence[Any]) -> None:
    """Each tool message answers a call of the latest assistant tool-call turn, and every call of
    such a turn is answered before the conversation moves on (or ends)."""
    pending: dict[str, int] = {}  # call id -> index of the assistant message that made it
    for index, message in enumerate(messages):
        if isinstance(message, ToolMessage):
            if message.tool_call_id not in pending:
                raise RequestFieldError(
                    f"The tool message answers no earlier tool call: no assistant message before it has an "
                    f"unanswered tool call with id {message.tool_call_id!r}. Send tool results right after "
                    f"the assistant message whose 'tool_calls' they answer, with the call's id.",
                    field=f"[{index}].tool_call_id",
                )
            del pending[message.tool_call_id]
            continue
        if pending:
            _raise_unanswered(messages, pending)
        if isinstance(message, AssistantMessage) and message.tool_calls:
            pending = {call.id: index for call in message.tool_calls}
    if pending:
        _raise_unanswered(messages, pending)


def _raise_unanswered(messages: Sequence[Any], pending: Mapping[str, int]) -> None:
    assistant_index = next(iter(pending.values()))
    raise RequestFieldError(
        "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
        f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(pending)}.",
        field=f"[{assistant_index}].tool_calls",
    )


# --------------------------------------------------------------------------------------------------
# Request: structured output and tools (validated here; api.plan_generation builds their grammar)


class JsonSchemaFormat(_RequestModel):
    name: ToolName
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TextResponseFormat(_RequestModel):
    type: Literal["text"]


class JsonObjectResponseFormat(_RequestModel):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(_RequestModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


_RESPONSE_FORMAT_TYPES = {"text": "@text", "json_object": "@json_object", "json_schema": "@json_schema"}


def _response_format_tag(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, Mapping) else getattr(value, "type", None)
    return _RESPONSE_FORMAT_TYPES.get(kind) if isinstance(kind, str) else None


def _check_response_format_shape(value: Any) -> Any:
    if value is None or isinstance(value, BaseModel):
        return value
    if not isinstance(value, Mapping):
        raise RequestFieldError(
            "Invalid type for 'response_format': expected an object like {'type': 'json_object'}, but got "
            f"{_describe(value)}.",
            code="invalid_type",
        )
    if "type" not in value:
        raise RequestFieldError(
            "Missing required parameter: 'response_format.type'. "
            f"Use one of {_quoted(_RESPONSE_FORMAT_TYPES)}.",
            field="type",
            code="missing_required_parameter",
        )
    if value["type"] not in _RESPONSE_FORMAT_TYPES:
        raise RequestFieldError(
            f"Invalid value for 'response_format.type': {value['type']!r}. Supported values are: "
            f"{_quoted(_RESPONSE_FORMAT_TYPES)}.",
            field="type",
        )
    return value


ResponseFormat = Annotated[
    Annotated[TextResponseFormat, Tag("@text")]
    | Annotated[JsonObjectResponseFormat, Tag("@json_object")]
    | Annotated[JsonSchemaResponseFormat, Tag("@json_schema")],
    Discriminator(_response_format_tag),
]


class FunctionDefinition(_RequestModel):
    name: ToolName
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments
    strict: StrictBool | None = None


class Tool(_RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_RequestModel):
    name: StrictStr


class NamedToolChoice(_RequestModel):
    type: Literal["function"]
    function: NamedFunction


def _tool_choice_tag(value: Any) -> str:
    return "@mode" if isinstance(value, str) else "@named"


ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("@mode")] | Annotated[NamedToolChoice, Tag("@named")],
    Discriminator(_tool_choice_tag),
]

_TOOL_CHOICE_USAGE = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'


def _check_tool_choice_shape(value: Any) -> Any:
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


# --------------------------------------------------------------------------------------------------
# Request


class StreamOptions(_RequestModel):
    include_usage: StrictBool | None = None


def _float_in(low: float | None = None, high: float | None = None, *, above: float | None = None) -> Any:
    return Annotated[float, Strict(), Field(ge=low, le=high, gt=above)]


def _int_in(low: int | None = None, high: int | None = None) -> Any:
    return Annotated[int, Strict(), Field(ge=low, le=high)]


class ChatCompletionRequest(_RequestModel):
    """A validated chat completion request. ``None`` means "not given": defaults are the engine's.

    Build it with ``validate_request(payload)``; the fields are OpenAI's, plus nbchat's extensions
    ``top_k``, ``min_p``, ``repetition_penalty``, ``continue_final_message`` and ``chat_template``.
    """

    messages: tuple[Message, ...]
    model: StrictStr | None = None
    max_tokens: _int_in(1) | None = None
    max_completion_tokens: _int_in(1) | None = None
    temperature: _float_in(0.0, 2.0) | None = None
    top_p: _float_in(None, 1.0, above=0.0) | None = None
    top_k: _int_in(0) | None = None
    min_p: _float_in(0.0, 1.0) | None = None
    seed: _int_in(INT64_MIN, INT64_MAX) | None = None
    stop: tuple[str, ...] | None = None
    frequency_penalty: _float_in(-2.0, 2.0) | None = None
    presence_penalty: _float_in(-2.0, 2.0) | None = None
    repetition_penalty: _float_in(None, 100.0, above=0.0) | None = None
    logit_bias: dict[int, _float_in(-100.0, 100.0)] | None = None
    n: _int_in(1, MAX_CHOICES) | None = None
    logprobs: StrictBool | None = None
    top_logprobs: _int_in(0, MAX_TOP_LOGPROBS) | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: tuple[Tool, ...] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None  # False: at most one tool call per reply
    continue_final_message: StrictBool | None = None
    chat_template: StrictStr | None = None
    user: StrictStr | None = None
    safety_identifier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            raise RequestFieldError(
                f"A chat completion request is a set of keyword arguments (a dict), not {_describe(data)}.",
                code="invalid_type",
            )
        for field, (reason, harmless_values) in UNSUPPORTED_FIELDS.items():
            if field in data and data[field] is not None and not _is_among(data[field], harmless_values):
                raise RequestFieldError(
                    f"'{field}' is not supported: {reason}. Remove it from the request.",
                    field=field,
                    code="unsupported_parameter",
                )
        if "messages" not in data:
            raise RequestFieldError(
                "Missing required parameter: 'messages'. "
                "Pass messages=[{'role': 'user', 'content': 'Hello'}].",
                field="messages",
                code="missing_required_parameter",
            )
        return {key: value for key, value in data.items() if key not in UNSUPPORTED_FIELDS}

    @field_validator("messages", mode="before")
    @classmethod
    def _messages(cls, value: Any) -> Any:
        return _check_message_shapes(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list | tuple):
            raise RequestFieldError(
                f"Invalid type for 'stop': expected a string or a list of up to {MAX_STOP_STRINGS} strings, "
                f"but got {_describe(value)}.",
                code="invalid_type",
            )
        if len(stops) > MAX_STOP_STRINGS:
            raise RequestFieldError(
                f"Invalid 'stop': {len(stops)} stop strings; at most {MAX_STOP_STRINGS} are allowed.",
            )
        for index, stop in enumerate(stops):
            field = "" if isinstance(value, str) else f"[{index}]"
            if not isinstance(stop, str):
                raise RequestFieldError(
                    f"Invalid type for a stop string: expected a string, but got {_describe(stop)}.",
                    field=field,
                    code="invalid_type",
                )
            if not stop:
                raise RequestFieldError(
                    "Invalid 'stop': an empty string would stop before the first character. Remove it.",
                    field=field,
                )
        return tuple(stops)

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise RequestFieldError(
                f"Invalid type for 'logit_bias': expected an object mapping token ids to biases, like "
                f"{{'50256': -100}}, but got {_describe(value)}.",
                code="invalid_type",
            )
        biases = {}
        for key, bias in value.items():
            token_id = key
            if isinstance(key, str) and re.fullmatch(r"\d+", key.strip()):
                token_id = int(key)
            if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
                raise RequestFieldError(
                    f"Invalid key in 'logit_bias': {key!r} is not a token id. Keys are token ids "
                    "(non-negative integers, or strings of them).",
                )
            biases[token_id] = bias
        return biases

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, value: Any) -> Any:
        return _check_response_format_shape(value)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        return _check_tool_choice_shape(value)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise RequestFieldError(
                "when using `top_logprobs`, `logprobs` must be set to true.", field="top_logprobs"
            )
        if self.stream_options is not None and not self.stream:
            raise RequestFieldError(
                "Stream options can only be defined when `stream=True`.", field="stream_options"
            )
        if (self.n or 1) > 1 and self.temperature == 0:
            raise RequestFieldError(
                f"n={self.n} with temperature 0 would return {self.n} identical choices (greedy decoding "
                "is deterministic). Set temperature > 0, or n=1.",
                field="n",
            )
        self._check_tools()
        try:
            _check_tool_call_answers(self.messages)
        except RequestFieldError as exc:
            exc.field = f"messages{exc.field}"
            raise
        last = len(self.messages) - 1
        ends_in_assistant = self.messages[last].role == "assistant"
        if ends_in_assistant and not self.continue_final_message:
            raise RequestFieldError(
                "The conversation ends with an assistant message, so there is nothing to reply to. Add a "
                "user message, or pass continue_final_message=True to have the model continue that message.",
                field=f"messages[{last}].role",
            )
        if self.continue_final_message and not ends_in_assistant:
            raise RequestFieldError(
                "continue_final_message=True continues a final assistant message, but the last message is "
                f"a {self.messages[last].role} message. Append the assistant text to continue, or drop "
                "the flag.",
                field="continue_final_message",
            )
        if self.continue_final_message and self._is_constrained():
            raise RequestFieldError(
                "continue_final_message=True cannot be combined with a JSON response_format or with tools: "
                "their grammar constrains a whole reply, not the rest of a started one. Drop one of them.",
                field="continue_final_message",
            )
        return self

    def _is_constrained(self) -> bool:
        """Whether generation follows a grammar (a JSON response_format, or tools the reply may call)."""
        json_format = self.response_format is not None and self.response_format.type != "text"
        return json_format or (bool(self.tools) and self.effective_tool_choice != "none")

    def _check_tools(self) -> None:
        if self.tools is not None:
            if not self.tools:
                raise RequestFieldError(
                    "Invalid 'tools': empty array. Expected an array with minimum length 1, but got an empty "
                    "array instead. Leave 'tools' out to call no tool.",
                    field="tools",
                    code="empty_array",
                )
            names = [tool.function.name for tool in self.tools]
            for index, name in enumerate(names):
                if name in names[:index]:
                    raise RequestFieldError(
                        f"Duplicate tool name {name!r}: each tool needs its own name.",
                        field=f"tools[{index}].function.name",
                    )
        if self.tool_choice is None or self.tool_choice == "none":
            return
        if self.tools is None:
            raise RequestFieldError("When using `tool_choice`, `tools` must be set.", field="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in {tool.function.name for tool in self.tools}:
                raise RequestFieldError(
                    "The tool specified in `tool_choice` does not match any of the specified `tools`",
                    field="tool_choice.function.name",
                )

    # ---- resolved views (what the engine uses) ----

    @property
    def completion_token_limit(self) -> int | None:
        """max_completion_tokens wins over max_tokens; None = until end of reply or full context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def completion_token_limit_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def stop_strings(self) -> tuple[str, ...]:
        return self.stop or ()

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        """OpenAI's default: "auto" when tools are given, "none" otherwise."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    @property
    def allows_parallel_tool_calls(self) -> bool:
        """OpenAI's default: a reply may make several tool calls unless parallel_tool_calls=False."""
        return self.parallel_tool_calls is not False

    def response_format_spec(self) -> dict[str, Any] | None:
        """response_format as OpenAI's plain dict (``json_schema.schema`` under its own name), or None."""
        if self.response_format is None:
            return None
        return self.response_format.model_dump(by_alias=True, exclude_none=True)

    def template_messages(self) -> list[dict[str, Any]]:
        """Fresh plain dicts for a chat template: text content, ``developer`` as ``system``."""
        rendered = []
        for message in self.messages:
            item: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role}
            text = content_text(message.content)
            if text is not None:
                item["content"] = text
            if getattr(message, "name", None) is not None:
                item["name"] = message.name
            if isinstance(message, AssistantMessage) and message.tool_calls:
                item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
            if isinstance(message, ToolMessage):
                item["tool_call_id"] = message.tool_call_id
            rendered.append(item)
        return rendered

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as plain dicts (OpenAI's shape, which HF chat templates read), or None."""
        if not self.tools:
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


def validate_request(payload: Mapping[str, Any]) -> ChatCompletionRequest:
    """Validate a chat completion request (keyword arguments of ``create``).

    Raises InvalidRequestError naming the field (``param``) and the fix; never a pydantic error.
    Nothing of ``payload`` is changed.
    """
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as exc:
        raise _invalid_request(exc) from None


# --------------------------------------------------------------------------------------------------
# pydantic errors -> InvalidRequestError

_EXPECTED_BY_ERROR_TYPE = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean (True or False)",
    "dict_type": "an object (dict)",
    "model_type": "an object (dict)",
    "model_attributes_type": "an object (dict)",
    "list_type": "a list",
    "tuple_type": "a list",
    "finite_number": "a finite number",
    "none_required": "null (None)",
}
_RANGE_WORDS = {
    "greater_than": "greater than {gt}",
    "greater_than_equal": ">= {ge}",
    "less_than": "less than {lt}",
    "less_than_equal": "<= {le}",
}


def _invalid_request(exc: ValidationError) -> InvalidRequestError:
    error = exc.errors(include_url=False)[0]
    path = _loc_to_path(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    cause = ctx.get("error")
    if isinstance(cause, RequestFieldError):
        param = _join_path(path, cause.field) or None
        return InvalidRequestError(cause.message, param=param, code=cause.code)
    hint = _FIELD_HINTS.get(path.split("[")[0].split(".")[0], "")
    if kind == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{path}'.", param=path, code="missing_required_parameter"
        )
    if kind == "extra_forbidden":
        unknown = [_loc_to_path(other["loc"]) for other in exc.errors(include_url=False)
                   if other["type"] == "extra_forbidden"]
        fixes = []
        for unknown_path in unknown:
            field = unknown_path.rsplit(".", 1)[-1]
            suggestion = difflib.get_close_matches(field, _KNOWN_FIELD_NAMES, n=1, cutoff=0.75) or [
                name for name in _KNOWN_FIELD_NAMES if len(field) >= 4 and field in name
            ]
            if suggestion:
                fixes.append(f"did you mean '{suggestion[0]}' for '{field}'?")
        where = "request argument" if "." not in path else "field"
        names = ", ".join(f"'{name}'" for name in unknown)
        fix = f" Remove {'it' if len(unknown) == 1 else 'them'}"
        fix += f", or fix the spelling: {' '.join(fixes)}" if fixes else "."
        return InvalidRequestError(
            f"Unrecognized {where}{'s' if len(unknown) > 1 else ''} supplied: {names}.{fix}",
            param=path,
            code="unknown_parameter",
        )
    if kind in _EXPECTED_BY_ERROR_TYPE:
        return InvalidRequestError(
            f"Invalid type for '{path}': expected {_EXPECTED_BY_ERROR_TYPE[kind]}, but got "
            f"{_describe(value)} instead. {hint}".rstrip(),
            param=path,
            code="invalid_type",
        )
    if kind in _RANGE_WORDS:
        bound = _RANGE_WORDS[kind].format(**{k: _number(v) for k, v in ctx.items()})
        return InvalidRequestError(
            f"Invalid value for '{path}': expected a value {bound}, "
            f"but got {_number(value)}. {hint}".rstrip(),
            param=path,
            code="invalid_value",
        )
    if kind == "literal_error":
        return InvalidRequestError(
            f"Invalid value for '{path}': {value!r}. Supported values are: {ctx.get('expected')}.",
            param=path,
            code="invalid_value",
        )
    if kind == "string_pattern_mismatch":
        return InvalidRequestError(
            f"Invalid '{path}': string does not match pattern. Expected a string that matches the pattern "
            f"'{ctx.get('pattern')}', but got {value!r}.",
            param=path,
            code="invalid_value",
        )
    if kind == "string_too_short":
        return InvalidRequestError(f"Invalid '{path}': it must not be empty.", param=path,
                                   code="invalid_value")
    return InvalidRequestError(
        f"Invalid value for '{path}': {error['msg']}.", param=path, code="invalid_value"
    )


def _loc_to_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith("@"):
            continue  # a union tag, not a field
        elif part == "[key]":
            continue
        else:
            path += f".{part}" if path else part
    return path


def _join_path(path: str, field: str) -> str:
    if not field:
        return path
    if field.startswith("[") or not path:
        return path + field
    return f"{path}.{field}"


def _describe(value: Any) -> str:
    """A short phrase for what the user passed: ``a string ('0.5')``."""
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "an object",
             list: "a list", tuple: "a tuple", type(None): "None"}
    kind = names.get(type(value), f"a {type(value).__name__}")
    if value is None or isinstance(value, dict | list | tuple):
        return kind
    shown = repr(value)
    return f"{kind} ({shown if len(shown) <= 40 else shown[:37] + '...'})"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _is_among(value: Any, harmless_values: Sequence[Any]) -> bool:
    return any(type(value) is type(ok) and value == ok for ok in harmless_values)


def _field_names(*models: type[BaseModel]) -> set[str]:
    names = set()
    for model in models:
        names.update(field.alias or name for name, field in model.model_fields.items())
    return names


_KNOWN_FIELD_NAMES = sorted(
    _field_names(
        ChatCompletionRequest, SystemMessage, UserMessage, AssistantMessage, ToolMessage, ToolCall,
        FunctionCall, TextPart, JsonSchemaFormat, FunctionDefinition, Tool, StreamOptions,
    )
    | set(UNSUPPORTED_FIELDS)
)


# --------------------------------------------------------------------------------------------------
# Response and stream chunk (shaped as openai.types.chat.ChatCompletion / ChatCompletionChunk)

FinishReason = Literal["stop", "length", "tool_calls"]


class TopLogprob(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(BaseModel):
    """One generated token with its log-probability and the most likely alternatives."""

    token: str
    bytes: list[int] | None
    logprob: float
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ChatCompletionMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = None


class ChoiceDeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ChoiceDeltaToolCall(BaseModel):
    """A fragment of a tool call: the first carries id, type and name; later ones argument text."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChoiceDeltaFunctionCall | None = None


class ChoiceDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChoiceDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
