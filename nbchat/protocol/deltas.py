"""Tool-call ids and the merge of streamed tool-call fragments into whole OpenAI tool calls.

Imports no pydantic, so the notebook layer can read streams without it. Must not: parse model text
(``nbchat.chat_format``) or validate requests (``nbchat.protocol.requests``).
"""

from __future__ import annotations

import secrets
import string
from typing import Any

_ID_ALPHABET = string.ascii_letters + string.digits


def new_tool_call_id() -> str:
    """A fresh id in OpenAI's shape: ``call_`` and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def add_tool_call_delta(calls: list[dict[str, Any]], delta: Any) -> None:
    """Merge one streamed tool-call delta (an OpenAI ``ChoiceDeltaToolCall``) into ``calls``, OpenAI
    tool-call dicts by index: the first delta of a call carries its id and name, later ones pieces
    of the arguments. One merge for every consumer of a stream, so they cannot disagree."""
    while len(calls) <= delta.index:
        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[delta.index]
    if delta.id:
        call["id"] = delta.id
    elif not call["id"]:
        call["id"] = new_tool_call_id()
    if delta.function is not None:
        call["function"]["name"] += delta.function.name or ""
        call["function"]["arguments"] += delta.function.arguments or ""
