"""What a ``%%chat`` returns: :class:`ChatReply`, a cell's result (its ``Out``, and what ``--out``
stores), made from the ``nbchat.turns.Exchange`` a turn produced; :func:`structured_value` is the
value of a ``--json`` / ``--schema`` reply. Nothing here builds requests, streams, runs tools, loads
models or keeps conversations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nbchat.notebook.render import one_line, parse_json, warn
from nbchat.turns import Exchange, StreamOutcome


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


def chat_reply(exchange: Exchange, text: str, value: Any) -> ChatReply:
    """A cell's result from the turn's :class:`~nbchat.turns.Exchange`, given the reply's text and its
    value (see :class:`ChatReply`); the exchange's metadata names the model, conversation and turn."""
    metadata = exchange.metadata
    return ChatReply(
        text=text,
        messages=[*exchange.messages, *exchange.reply],
        usage=exchange.usage,
        finish_reason=exchange.last.finish_reason,
        interrupted=exchange.last.interrupted,
        model=metadata["model"],
        conversation=metadata["conversation"],
        turn=metadata["turn"],
        settings=dict(metadata["settings"]),
        value=value,
        tool_calls=exchange.tool_calls,
    )


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
