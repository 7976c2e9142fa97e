"""Cell text -> chat messages: the role-header grammar and ``{name}`` interpolation of ``%%chat`` cells.

Pure text processing: no IPython, no model. The magic calls :func:`parse_cell` on the raw cell, then
:func:`interpolate` on each message's content (headers are found first, so a variable whose value
contains ``user:`` can never inject a message).

Role headers
------------
A cell is one user message unless it contains role headers. A role header is a line that is exactly

* ``system:``, ``user:`` or ``assistant:`` at the very start of the line (lower case, no indentation),
  optionally followed by text on the same line, which becomes the first line of the message; or
* a Markdown heading whose whole text is a role: ``## user``, ``# Assistant``, ``### system:``
  (one to six ``#``, any case, an optional trailing colon, nothing else on the line).

Each header starts a message that runs until the next header. Text before the first header is a user
message. Blank lines around a message are dropped; indentation inside it is kept. Lines inside a
fenced code block (between fence lines of three or more backticks or tildes) are never headers, so
pasted YAML or chat logs inside a fence stay text.

To write a literal header line, start it with a backslash: ``\\user: hi`` is the text ``user: hi`` and
``\\## system`` is the text ``## system``. One backslash is removed only from lines that would otherwise
be headers (or escaped headers: ``\\\\user:`` is the text ``\\user:``); other lines that start with a
backslash (LaTeX, regexes) are left alone.

Rules: a ``system`` message may only come first; every message must have content; the last message
must be a user message, since it is the one the model answers.

Interpolation
-------------
``{name}`` is replaced by ``str()`` of a variable of the user namespace, ``{In[3]}`` by the source of
input 3, ``{Out[3]}`` by output 3, ``{_}`` / ``{__}`` / ``{___}`` by the last outputs. ``{{`` and ``}}``
stand for literal braces. Anything else in braces -- code like ``{"a": 1}`` or ``{x}`` when ``x`` is
not defined -- is left exactly as written. The cell is never passed to ``str.format``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")

_ROLE_ALTERNATION = "|".join(ROLES)
# ``user: text`` -- lower case, at column 0; group 2 is the text after the colon on the same line.
_COLON_HEADER = re.compile(rf"^({_ROLE_ALTERNATION}):[ \t]?(.*)$")
# ``## User`` / ``# assistant:`` -- the whole line is the heading.
_HEADING_HEADER = re.compile(rf"^#{{1,6}}[ \t]+({_ROLE_ALTERNATION})[ \t]*:?[ \t]*$", re.IGNORECASE)
_FENCE = re.compile(r"^[ \t]{0,3}(`{3,}|~{3,})")


def fence_state(line: str, fence: str | None) -> tuple[bool, str | None]:
    """Whether ``line`` is a fence line, and the fence open after it (None: outside any fence), given
    the fence open before it. A fence closes only with a marker of its own character, as long or
    longer (CommonMark's rule)."""
    match = _FENCE.match(line)
    if not match:
        return False, fence
    marker = match.group(1)
    if fence is None:
        return True, marker
    if marker[0] == fence[0] and len(marker) >= len(fence):
        return True, None
    return True, fence

# One pass, left to right: ``{{``, ``}}``, ``{In[n]}`` / ``{Out[n]}``, ``{identifier}``.
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(In|Out)\[(-?\d+)\]\}|\{([A-Za-z_][A-Za-z_0-9]*)\}")


class CellSyntaxError(ValueError):
    """A ``%%chat`` cell whose role headers do not form a valid message list; names the line."""


@dataclass
class CellMessages:
    """The messages a cell contributes: an optional system prompt and the rest, in order."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)


def _header_role(line: str) -> tuple[str, str] | None:
    """``(role, text on the header line)`` when ``line`` is a role header, else None."""
    match = _COLON_HEADER.match(line)
    if match:
        return match.group(1), match.group(2)
    match = _HEADING_HEADER.match(line)
    if match:
        return match.group(1).lower(), ""
    return None


def _unescape_header(line: str) -> str | None:
    """The literal text of an escaped header line (one backslash removed), or None if not one."""
    if not line.startswith("\\"):
        return None
    rest = line[1:]
    if _header_role(rest) is not None or _unescape_header(rest) is not None:
        return rest
    return None


def _trim_blank_lines(lines: list[str]) -> str:
    while lines and not lines[0].strip():
        lines = lines[1:]
    return "\n".join(lines).rstrip()


def parse_cell(text: str) -> CellMessages:
    """Split a ``%%chat`` cell into messages following the role-header grammar (module docstring).

    Raises :class:`CellSyntaxError` naming the offending line for a misplaced ``system`` message, an
    empty message, a cell that does not end with a user message, or an empty cell.
    """
    # (role, header line number, content lines)
    blocks: list[tuple[str, int, list[str]]] = [("user", 0, [])]
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        is_fence, fence = fence_state(line, fence)
        if is_fence:
            blocks[-1][2].append(line)
            continue
        if fence is None:
            header = _header_role(line)
            if header is not None:
                role, first_line = header
                blocks.append((role, number, [first_line] if first_line.strip() else []))
                continue
            literal = _unescape_header(line)
            if literal is not None:
                line = literal
        blocks[-1][2].append(line)

    leading_role, _, leading_lines = blocks[0]
    leading_text = _trim_blank_lines(leading_lines)
    parsed: list[tuple[str, int, str]] = [(leading_role, 1, leading_text)] if leading_text else []
    for role, number, lines in blocks[1:]:
        content = _trim_blank_lines(lines)
        if not content:
            raise CellSyntaxError(
                f"line {number}: the {role} message is empty; write its text after the header"
            )
        parsed.append((role, number, content))

    if not parsed:
        raise CellSyntaxError("the cell is empty: write the message to send below %%chat")
    result = CellMessages()
    for position, (role, number, content) in enumerate(parsed):
        if role == "system":
            if position != 0:
                raise CellSyntaxError(
                    f"line {number}: a system message may only come first in the cell; move it to the top"
                )
            result.system = content
        else:
            result.messages.append({"role": role, "content": content})
    if not result.messages or result.messages[-1]["role"] != "user":
        last_line = parsed[-1][1]
        raise CellSyntaxError(
            f"line {last_line}: the cell must end with a user message (the one the model answers); "
            "add a 'user:' block at the end"
        )
    return result


def interpolate(text: str, namespace: Mapping[str, object]) -> str:
    """Replace ``{name}``, ``{In[n]}``, ``{Out[n]}`` and ``{_}`` with values from ``namespace``.

    ``{{`` / ``}}`` become single braces; every other brace, and a placeholder whose name or history
    entry does not exist, is left exactly as written.
    """

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        history_name, index, name = match.group(1), match.group(2), match.group(3)
        if history_name is not None:
            history = namespace.get(history_name)
            try:
                return str(history[int(index)])  # type: ignore[index]
            except (TypeError, LookupError):
                return token
        if name in namespace:
            return str(namespace[name])
        return token

    return _PLACEHOLDER.sub(replace, text)
