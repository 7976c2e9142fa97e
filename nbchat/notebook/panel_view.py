"""What the chat panel shows: the transcript entries of a conversation's turns (role, text, safe
HTML, interrupted) and :class:`PanelReplyView`, the reply being generated as the panels draw it
(a ``nbchat.turns.TurnObserver`` sending throttled deltas). Nothing here knows about widgets,
kernels or conversations' storage: ``panel.py`` hands over a ``broadcast`` function and turns.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import Any

from nbchat.conversation import Turn
from nbchat.notebook.markup import code_html, markdown_html
from nbchat.notebook.render import DEFAULT_MIN_INTERVAL, TOOL_CALL_STATES, ToolCallView

# The id of the reply being streamed, in the front end's message list.
PENDING_ID = "pending"


class PanelReplyView:
    """The reply being generated, as the panels draw it (a ``nbchat.turns.TurnObserver``): deltas
    sent at most every ``min_interval`` seconds (the text added and the message's HTML), tool calls
    as small blocks, and when the first token came, for the status line's speed."""

    def __init__(
        self,
        broadcast: Callable[[dict[str, Any]], None],
        *,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._broadcast = broadcast
        self.min_interval = min_interval
        self.clock = clock
        self.text = ""
        self.parts: list[str | ToolCallView] = []
        self.calls: list[ToolCallView] = []
        self.warnings: list[str] = []
        self.redraws = 0
        self.pieces = 0  # text deltas streamed: one per decoded token the detokenizer could release
        self.started: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._pending = ""
        self._last_redraw = float("-inf")

    def start(self, metadata: dict[str, Any] | None = None) -> None:
        self.started = self.clock()

    def append(self, delta: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = self.clock()
        self.pieces += 1
        self.text += delta
        self._pending += delta
        self._throttled()

    def tool_call_delta(self, index: int, *, name: str | None = None, arguments: str = "") -> ToolCallView:
        while len(self.calls) <= index:
            self.calls.append(ToolCallView(name=""))
        call = self.calls[index]
        call.name += name or ""
        call.arguments += arguments
        self._throttled()
        return call

    def end_step(self) -> list[ToolCallView]:
        calls = self.calls
        if self.text:
            self.parts.append(self.text)
        self.parts.extend(calls)
        self.text, self.calls = "", []
        self._redraw()
        return calls

    def show_call(self, call: Any) -> None:
        self._redraw()

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def discard(self) -> None:
        self._broadcast({"kind": "discard", "id": PENDING_ID})

    def finish(
        self, *, interrupted: bool = False, truncated: bool = False, metadata: dict[str, Any] | None = None
    ) -> None:
        self.finished_at = self.clock()
        self._redraw(interrupted=interrupted)

    def html(self) -> str:
        pieces = [
            _call_html(part) if isinstance(part, ToolCallView) else markdown_html(part) for part in self.parts
        ]
        pieces.append(markdown_html(self.text) if self.text else "")
        pieces += [_call_html(call) for call in self.calls]
        return "".join(pieces)

    def tokens_per_second(self, usage: dict[str, Any]) -> float | None:
        """The reply's decode speed: its tokens after the first over the time since the first (an
        interrupted reply has no usage: its streamed pieces count)."""
        tokens = usage.get("completion_tokens") or self.pieces
        if not tokens or tokens < 2 or self.first_token_at is None or self.finished_at is None:
            return None
        elapsed = self.finished_at - self.first_token_at
        return round((tokens - 1) / elapsed, 1) if elapsed > 0 else None

    def _throttled(self) -> None:
        if self.clock() - self._last_redraw >= self.min_interval:
            self._redraw()

    def _redraw(self, *, interrupted: bool = False) -> None:
        message = {"kind": "delta", "id": PENDING_ID, "append": self._pending, "html": self.html()}
        if interrupted:
            message["interrupted"] = True
        self._broadcast(message)
        self._pending = ""
        self._last_redraw = self.clock()
        self.redraws += 1


def _call_html(call: ToolCallView) -> str:
    state = TOOL_CALL_STATES.get(call.state, call.state)
    signature = html.escape(call.signature())
    head = f'<div class="nbchat-tool-call">Tool call <code>{signature}</code> · {state}</div>'
    result = code_html(call.result, "json") if call.result is not None and call.state != "not run" else ""
    note = f'<div class="nbchat-note">{html.escape(call.note)}</div>' if call.note else ""
    return head + result + note


def _message_html(message: dict[str, Any]) -> str:
    content = message.get("content")
    text = content if isinstance(content, str) else ("" if content is None else str(content))
    if message.get("role") == "tool":
        return code_html(text, "json")
    calls = [
        _call_html(ToolCallView(name=function["name"], arguments=function["arguments"], state="ran"))
        for function in (call["function"] for call in message.get("tool_calls") or ())
    ]
    return markdown_html(text) + "".join(calls)


def turn_entries(start: int, messages: list[dict[str, Any]], *, interrupted: bool) -> list[dict[str, Any]]:
    """The message-list entries of ``messages`` (system messages are the drawer's, not shown)."""
    shown = [message for message in messages if message.get("role") != "system"]
    last_assistant = max((at for at, m in enumerate(shown) if m.get("role") == "assistant"), default=None)
    return [
        {
            "id": f"m{start + at}",
            "role": message["role"],
            "text": message.get("content") if isinstance(message.get("content"), str) else "",
            "html": _message_html(message),
            "interrupted": interrupted and at == last_assistant,
        }
        for at, message in enumerate(shown)
    ]


def transcript_entries(turns: list[Turn]) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for turn in turns:
        entries += turn_entries(len(entries), turn.prompt, interrupted=False)
        entries += turn_entries(len(entries), turn.reply, interrupted=turn.interrupted)
    return entries
