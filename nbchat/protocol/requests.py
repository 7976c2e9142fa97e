"""The chat completion request: its pydantic type, the rules across its fields, and
``validate_request``, the one place a request is validated.

Strict: an unknown field is an error (with a spelling suggestion), a known OpenAI field nbchat does
not implement is an error saying why. ``ChatCompletionRequest`` also offers the resolved views the
API builds a job from (the completion token limit, the JSON schema a ``response_format`` asks for,
the effective ``tool_choice``, plain dicts for the chat template). Must not: know the model
(vocabulary, context length, template), render or generate.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from nbchat.engine.limits import MAX_TOP_LOGPROBS
from nbchat.protocol.errors import RequestFieldError, describe, invalid_request
from nbchat.protocol.formats import (
    FunctionDefinition,
    JsonSchemaFormat,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolChoice,
    check_response_format_shape,
    check_tool_choice_shape,
)
from nbchat.protocol.messages import (
    AssistantMessage,
    FunctionCall,
    Message,
    RequestModel,
    StrictBool,
    StrictStr,
    SystemMessage,
    TextPart,
    ToolCall,
    ToolMessage,
    UserMessage,
    check_message_shapes,
    check_tool_call_answers,
    content_text,
)

MAX_STOP_STRINGS = 4
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


# --------------------------------------------------------------------------------------------------
# Request


class StreamOptions(RequestModel):
    include_usage: StrictBool | None = None


def _float_in(low: float | None = None, high: float | None = None, *, above: float | None = None) -> Any:
    return Annotated[float, Strict(), Field(ge=low, le=high, gt=above)]


def _int_in(low: int | None = None, high: int | None = None) -> Any:
    return Annotated[int, Strict(), Field(ge=low, le=high)]


class ChatCompletionRequest(RequestModel):
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
                f"A chat completion request is a set of keyword arguments (a dict), not {describe(data)}.",
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
        return check_message_shapes(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list | tuple):
            raise RequestFieldError(
                f"Invalid type for 'stop': expected a string or a list of up to {MAX_STOP_STRINGS} strings, "
                f"but got {describe(value)}.",
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
                    f"Invalid type for a stop string: expected a string, but got {describe(stop)}.",
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
                f"{{'50256': -100}}, but got {describe(value)}.",
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
        return check_response_format_shape(value)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        return check_tool_choice_shape(value)

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
            check_tool_call_answers(self.messages)
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
        raise invalid_request(exc, hints=_FIELD_HINTS, known_fields=_KNOWN_FIELD_NAMES) from None


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

