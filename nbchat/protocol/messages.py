"""The messages of a chat completion request: their pydantic types and the rules that span several
messages (every tool call answered, tool results answering a call).

Strict: an unknown field is an error; a message object of a previous response (nbchat's or openai's)
is accepted as its dict. Errors are ``RequestFieldError``s with the position (``[3].role``), turned
into ``InvalidRequestError`` by ``nbchat.protocol.errors``. Must not: hold the request's other
fields (``requests``) or know the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    field_validator,
    model_validator,
)

from nbchat.protocol import TOOL_NAME_PATTERN
from nbchat.protocol.errors import RequestFieldError, describe, quoted

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")




class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


StrictStr = Annotated[str, Strict()]
StrictBool = Annotated[bool, Strict()]
ToolName = Annotated[str, Strict(), Field(pattern=TOOL_NAME_PATTERN)]


class TextPart(RequestModel):
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
            f"like [{{'type': 'text', 'text': '...'}}], but got {describe(value)}.",
            code="invalid_type",
        )
    for index, part in enumerate(value):
        if not isinstance(part, Mapping):
            raise RequestFieldError(
                f"Invalid type for a content part: expected an object like "
                f"{{'type': 'text', 'text': '...'}}, but got {describe(part)}.",
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


class SystemMessage(RequestModel):
    """A system message; ``developer`` is OpenAI's newer name for it and is treated the same."""

    role: Literal["system", "developer"]
    content: Content
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _check_content(value, "system")


class UserMessage(RequestModel):
    role: Literal["user"]
    content: Content
    name: StrictStr | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any) -> Any:
        return _check_content(value, "user")


class FunctionCall(RequestModel):
    name: ToolName
    arguments: StrictStr  # a JSON text, as OpenAI sends it


class ToolCall(RequestModel):
    """A tool call an assistant message made earlier in the conversation."""

    id: Annotated[str, Strict(), Field(min_length=1)]
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(RequestModel):
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


class ToolMessage(RequestModel):
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


def check_message_shapes(messages: Any) -> list[Any]:
    """The structure pydantic cannot word well: list, objects, roles, misplaced tool fields."""
    if not isinstance(messages, list | tuple):
        raise RequestFieldError(
            f"Invalid type for 'messages': expected a list of message objects like "
            f"[{{'role': 'user', 'content': 'Hello'}}], but got {describe(messages)}.",
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
                f"{{'role': 'user', 'content': 'Hello'}}, but got {describe(message)}.",
                field=f"[{index}]",
                code="invalid_type",
            )
        message = dict(message)  # a copy: nothing below may touch the caller's dict
        role = message.get("role")
        if role is None:
            raise RequestFieldError(
                "Missing required parameter: the message has no 'role'. "
                f"Use one of {quoted(MESSAGE_ROLES)}.",
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
                f"Supported values are: {quoted(MESSAGE_ROLES)}.",
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


def check_tool_call_answers(messages: Sequence[Any]) -> None:
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

