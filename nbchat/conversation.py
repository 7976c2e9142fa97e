"""Conversation: the history, system prompt and settings of one chat, with undo, retry and JSON files.

A conversation is a list of turns. A turn is what one ``%%chat`` cell (or one ``chat()`` call of any
surface) added: the messages it sent (one user message, or a few-shot list ending with a user
message) and the model's reply. Keeping turns rather than a flat message list is what makes
"re-running a cell replaces its turn" (``key``), "undo drops the last exchange" and "retry regenerates
the last reply" simple and exact.

Messages are OpenAI-shaped dicts (``{"role": ..., "content": ...}``, assistant ``tool_calls`` and
``tool`` results included) of JSON types only, so :meth:`Conversation.to_dict` /
:meth:`Conversation.from_dict` round-trip losslessly. A conversation also holds the tools (Python
functions) its chats may offer the model; they live in the kernel and are not written to files.
Pure Python: no IPython, no JAX, no model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nbchat.errors import ConversationError
from nbchat.tools import ToolRegistry

FILE_FORMAT = "nbchat.conversation"
FILE_VERSION = 1


@dataclass
class Turn:
    """One exchange: the messages a cell sent and the reply the model gave.

    ``reply`` holds the messages the model's side produced: one assistant message, or, when the model
    called tools, each assistant message with ``tool_calls`` followed by the ``tool`` messages that
    answer them, and the final assistant message (absent when the exchange stopped at a call).
    ``key`` identifies the cell that produced the turn (its cell id, or its execution count when the
    front end sends no id). ``system`` is a system prompt used for this turn only; ``options`` are
    the request settings the cell set, kept so a retry reproduces the same request. ``interrupted``
    marks a reply cut short by the user: its partial text is kept.
    """

    prompt: list[dict[str, Any]]
    reply: list[dict[str, Any]] = field(default_factory=list)
    key: str | None = None
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    interrupted: bool = False
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    # What reproduces the reply: model name, file sha256, dtype, every sampling setting and the seed
    # used (drawn when none was given), and a digest of the messages it answered (``%chat replay``).
    reproduce: dict[str, Any] | None = None

    @property
    def reply_text(self) -> str:
        """The text of the last assistant message of the reply ('' when there is none yet)."""
        for message in reversed(self.reply):
            if message.get("role") == "assistant" and isinstance(message.get("content"), str):
                return message["content"]
        return ""

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [*self.prompt, *self.reply]


@dataclass
class Conversation:
    """A named chat: system prompt, per-conversation settings (``%chat set``), turns, and the tools
    its chats offer the model (``tools``: kept in memory only, like the functions it holds)."""

    name: str = "default"
    system: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)
    tools: ToolRegistry = field(default_factory=ToolRegistry, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.turns)

    def messages(self, *, default_system: str | None = None) -> list[dict[str, Any]]:
        """The whole history as a message list, system prompt first."""
        return self.context(len(self.turns), default_system=default_system)

    def context(
        self, index: int, *, system: str | None = None, default_system: str | None = None
    ) -> list[dict[str, Any]]:
        """The messages before turn ``index``: a system prompt, then every earlier turn's prompt and
        reply. A new turn at ``index`` is generated from ``context(index) + its prompt``.

        The system prompt is the first of ``system`` (a one-turn override), the conversation's own,
        and ``default_system`` (the surface's configured default) that is set.
        """
        if not 0 <= index <= len(self.turns):
            raise self._out_of_range(index)
        system_prompt = next((text for text in (system, self.system, default_system) if text), None)
        messages: list[dict[str, Any]] = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        for turn in self.turns[:index]:
            messages.extend(turn.messages)
        return messages

    def request_messages(
        self, index: int, turn: Turn, *, default_system: str | None = None
    ) -> list[dict[str, Any]]:
        """The messages to send to generate ``turn``'s reply when it sits at position ``index``."""
        return self.context(index, system=turn.system, default_system=default_system) + list(turn.prompt)

    def index_of(self, key: str | None) -> int | None:
        """Position of the turn produced by ``key`` (a re-run cell), or None."""
        if key is None:
            return None
        for index, turn in enumerate(self.turns):
            if turn.key == key:
                return index
        return None

    def put(self, turn: Turn, index: int | None = None) -> int:
        """Store ``turn`` at ``index`` (replacing the turn there) or append it; returns its position."""
        if index is None or index == len(self.turns):
            self.turns.append(turn)
            return len(self.turns) - 1
        if not 0 <= index < len(self.turns):
            raise self._out_of_range(index)
        self.turns[index] = turn
        return index

    def _out_of_range(self, index: int) -> ConversationError:
        return ConversationError(f"turn index {index} is out of range: the conversation has {len(self)}")

    def last(self) -> Turn:
        if not self.turns:
            raise ConversationError(f"conversation {self.name!r} is empty: there is no last exchange")
        return self.turns[-1]

    def undo(self) -> Turn:
        """Drop the last exchange (its prompt and reply) and return it."""
        self.last()
        return self.turns.pop()

    def reset(self) -> None:
        """Forget every turn; the system prompt and settings stay."""
        self.turns.clear()

    # --- files -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "name": self.name,
            "system": self.system,
            "settings": dict(self.settings),
            "turns": [asdict(turn) for turn in self.turns],
        }

    @classmethod
    def from_dict(cls, data: Any) -> Conversation:
        """Rebuild a conversation from :meth:`to_dict` output; errors name the bad field."""
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ConversationError(
                f"not an nbchat conversation: expected a JSON object with format={FILE_FORMAT!r}"
            )
        if data.get("version") != FILE_VERSION:
            raise ConversationError(
                f"unsupported conversation file version {data.get('version')!r}; this nbchat reads version "
                f"{FILE_VERSION}"
            )
        name = data.get("name", "default")
        system = data.get("system")
        settings = data.get("settings", {})
        turns = data.get("turns", [])
        _expect(isinstance(name, str), "name", "a string")
        _expect(system is None or isinstance(system, str), "system", "a string or null")
        _expect(isinstance(settings, dict), "settings", "an object")
        _expect(isinstance(turns, list), "turns", "a list")
        known_fields = set(Turn.__dataclass_fields__)
        parsed_turns = []
        for position, raw in enumerate(turns):
            where = f"turns[{position}]"
            _expect(isinstance(raw, dict), where, "an object")
            unknown = sorted(set(raw) - known_fields)
            if unknown:
                raise ConversationError(f"bad conversation file: {where} has an unknown field {unknown[0]!r}")
            _expect(isinstance(raw.get("prompt"), list), f"{where}.prompt", "a list of messages")
            _expect(isinstance(raw.get("reply", []), list), f"{where}.reply", "a list of messages")
            for part in ("prompt", "reply"):
                for number, message in enumerate(raw.get(part, [])):
                    _check_message(message, f"{where}.{part}[{number}]")
            parsed_turns.append(Turn(**raw))
        return cls(name=name, system=system, settings=dict(settings), turns=parsed_turns)

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON (UTF-8, indented) and return the path."""
        target = Path(path).expanduser()
        target.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | Path) -> Conversation:
        source = Path(path).expanduser()
        try:
            text = source.read_text(encoding="utf-8")
        except OSError as error:
            raise ConversationError(f"cannot read {str(source)!r}: {error.strerror or error}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConversationError(f"{str(source)!r} is not valid JSON: {error}") from None
        return cls.from_dict(data)


def _check_message(message: Any, where: str) -> None:
    """A stored message has a role; tool calls and tool results have the fields that pair them."""
    has_role = isinstance(message, dict) and isinstance(message.get("role"), str)
    _expect(has_role, where, "a message object with a role")
    calls = message.get("tool_calls")
    if calls is not None:
        _expect(isinstance(calls, list), f"{where}.tool_calls", "a list of tool calls")
        for number, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            _expect(
                isinstance(call, dict)
                and isinstance(call.get("id"), str)
                and isinstance(function, dict)
                and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str),
                f"{where}.tool_calls[{number}]",
                'a tool call {"id", "type": "function", "function": {"name", "arguments"}}',
            )
    if message["role"] == "tool":
        _expect(isinstance(message.get("tool_call_id"), str), f"{where}.tool_call_id", "a string")


def _expect(condition: bool, field_name: str, expected: str) -> None:
    if not condition:
        raise ConversationError(f"bad conversation file: {field_name} must be {expected}")
