"""What a ``%%chat`` returns, and how one streamed reply is read.

:class:`ChatReply` is a cell's result (its ``Out``, and what ``--out`` stores), made from the
:class:`Exchange` the tool loop fills. :func:`stream_reply` reads one streamed chat completion into
a :class:`StreamOutcome` -- text, tool calls gathered from their deltas, finish reason, usage --
drawing it in a ``render.ReplyView`` as it comes; :func:`structured_value` is the value of a
``--json`` / ``--schema`` reply. Nothing here builds requests, runs tools, loads models or keeps
conversations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from nbchat.errors import NbchatError
from nbchat.notebook.render import ReplyView, one_line, parse_json, warn
from nbchat.protocol.deltas import add_tool_call_delta


@dataclass(repr=False)
class ChatReply:
    """The result of a ``%%chat`` cell: the reply text, the full message list and the token usage.

    ``value`` is what ``--out`` stores: the parsed JSON of a ``--json`` / ``--schema`` reply (an
    instance of the pydantic class given to ``--schema``), else the text -- also when the JSON is
    incomplete. ``tool_calls`` are the calls the model made in this exchange (OpenAI dicts); their
    results are among ``messages``. ``usage`` adds up every request of the exchange.

    A cell's result is kept in ``Out[n]`` and ``_`` but shows nothing (the reply was drawn as it
    streamed); its repr is a one-line summary for ``print(repr(reply))``.
    """

    text: str
    messages: list[dict[str, Any]]
    usage: dict[str, Any] | None
    finish_reason: str | None
    interrupted: bool
    model: str
    conversation: str
    turn: int
    settings: dict[str, Any] = field(default_factory=dict)
    value: Any = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        tokens = (self.usage or {}).get("completion_tokens")
        parts = [f"conversation={self.conversation!r}", f"turn={self.turn}"]
        if tokens is not None:
            parts.append(f"{tokens} tokens")
        if self.tool_calls:
            count = len(self.tool_calls)
            parts.append(f"{count} tool call{'' if count == 1 else 's'}")
        parts.append("interrupted" if self.interrupted else f"finish_reason={self.finish_reason!r}")
        return f"ChatReply({', '.join(parts)})"

    def _ipython_display_(self) -> None:
        """Nothing to show: IPython's display hook still stores the value in ``Out`` and ``_``."""


@dataclass
class StreamOutcome:
    """What one streamed request produced: its text, its tool calls (OpenAI dicts, by index), how it
    ended, its token usage, and whether the user interrupted it."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    interrupted: bool = False
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Exchange:
    """What an exchange produced: the request's messages, the reply messages (assistant messages,
    with their tool calls, and tool results), the usage of every request added up, the last reply's
    outcome, the tool steps run, and the output metadata its display ended with (model,
    conversation, turn, request settings, how it ended)."""

    messages: list[dict[str, Any]]
    last: StreamOutcome
    reply: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    steps: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """Every tool call the model made in the exchange, in order."""
        return [call for message in self.reply for call in message.get("tool_calls") or ()]

    def chat_reply(self, text: str, value: Any) -> ChatReply:
        """The cell's result, given the reply's text and its value (see :class:`ChatReply`)."""
        return ChatReply(
            text=text,
            messages=[*self.messages, *self.reply],
            usage=self.usage,
            finish_reason=self.last.finish_reason,
            interrupted=self.last.interrupted,
            model=self.metadata["model"],
            conversation=self.metadata["conversation"],
            turn=self.metadata["turn"],
            settings=dict(self.metadata["settings"]),
            value=value,
            tool_calls=self.tool_calls,
        )


def add_usage(total: dict[str, Any] | None, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Token usage of an exchange of several requests: every count added up."""
    if usage is None:
        return total
    if total is None:
        return dict(usage)
    return {key: total.get(key, 0) + value for key, value in usage.items() if isinstance(value, int)}


def stream_reply(
    open_stream: Callable[[dict[str, Any]], Iterable[Any]], request: dict[str, Any], view: ReplyView
) -> StreamOutcome:
    """Stream ``request`` (through ``open_stream``) into ``view``: text deltas and tool-call deltas
    (gathered by index). A KeyboardInterrupt ends it and keeps what arrived; an NbchatError
    propagates; any other error blanks the view first."""
    outcome = StreamOutcome()
    stream = None
    try:
        stream = open_stream(request)
        for chunk in stream:
            if chunk.usage is not None:
                outcome.usage = chunk.usage.model_dump()
            for choice in chunk.choices:
                if choice.delta.content:
                    outcome.text += choice.delta.content
                    view.append(choice.delta.content)
                for delta in choice.delta.tool_calls or ():
                    add_tool_call_delta(outcome.tool_calls, delta)
                    function = delta.function
                    view.tool_call_delta(
                        delta.index,
                        name=function.name if function else None,
                        arguments=(function.arguments or "") if function else "",
                    )
                if choice.finish_reason is not None:
                    outcome.finish_reason = choice.finish_reason
    except KeyboardInterrupt:
        outcome.interrupted = True
    except NbchatError:
        raise
    except Exception:
        view.discard()
        raise
    finally:
        close = getattr(stream, "close", None)  # a stream a test or a tool wraps may be a plain iterable
        if close is not None:
            close()
    return outcome


def structured_value(
    text: str, outcome: StreamOutcome, max_tokens: int | None, schema_class: type | None
) -> Any:
    """The value of a ``--json`` / ``--schema`` reply: the parsed JSON (validated with
    ``schema_class`` when given); the text, with a warning, when the reply is not complete JSON."""
    if outcome.interrupted or outcome.finish_reason == "length":
        why = "was interrupted" if outcome.interrupted else f"was cut off at max_tokens={max_tokens}"
        warn(f"the reply {why}, so it is not complete JSON; its value (and --out) is the text.")
        return text
    complete, value = parse_json(text)
    if not complete:
        warn("the reply is not valid JSON; its value (and --out) is the text.")
        return text
    if schema_class is None:
        return value
    try:
        return schema_class.model_validate(value)  # type: ignore[attr-defined]
    except Exception as error:  # pydantic's ValidationError (the grammar checked only the schema)
        warn(
            f"the JSON does not validate as {schema_class.__name__} ({one_line(error)}); "
            "its value (and --out) is the parsed JSON."
        )
        return value
