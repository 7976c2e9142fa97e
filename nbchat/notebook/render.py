"""How chat output looks in a notebook: the streaming reply view, reply formats, transcripts.

A reply streams through ONE display handle (``IPython.display``), updated at most ~15 times a second
however fast tokens come, and ends with a final render: Markdown (the front end highlights fenced
code), plain text, or a code block. In terminal IPython, where display updates cannot redraw, the
reply is written to stdout as plain text delta by delta instead (no escape codes, no repeated reprs).

Reply formats are a table (:data:`FORMATS`) so a new one (JSON) is one entry. Nothing here knows
about models or conversations' storage; the magic hands over text and metadata.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from IPython.display import DisplayHandle, display

INTERRUPTED_MARKDOWN = "*⏹ interrupted*"
INTERRUPTED_TEXT = "[interrupted]"
STREAMING_CURSOR = "▌"
# ~15 redraws a second: smooth to the eye, and a 100 tok/s model does not flood the front end.
DEFAULT_MIN_INTERVAL = 1 / 15

# An opening fence (group 1) with an optional language (group 2), the body (group 3), then the same
# fence or the end of the text (a reply cut off inside a code block).
_FENCED_BLOCK = re.compile(
    r"^[ \t]*(`{3,}|~{3,})[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)", re.M | re.S
)

Bundle = dict[str, str]


def supports_live_updates(shell: Any) -> bool:
    """Whether the shell's front end can redraw a display in place (a notebook can, a terminal cannot)."""
    if shell is None:
        return False
    return not any(cls.__name__ == "TerminalInteractiveShell" for cls in type(shell).__mro__)


def extract_code(text: str) -> tuple[str, str]:
    """``(code, language)`` from a reply: the fenced blocks' contents joined (fences stripped), or the
    whole reply when it has no fence. An unclosed fence (a cut-off reply) runs to the end."""
    blocks = [(match.group(2), match.group(3)) for match in _FENCED_BLOCK.finditer(text)]
    if not blocks:
        return text.strip("\n"), ""
    language = next((lang for lang, _ in blocks if lang), "")
    return "\n\n".join(body.rstrip("\n") for _, body in blocks), language


def fence(code: str, language: str = "") -> str:
    """``code`` as a Markdown fenced block, with a fence longer than any backtick run inside it."""
    longest_run = max((len(run) for run in re.findall(r"`+", code)), default=0)
    marker = "`" * max(3, longest_run + 1)
    return f"{marker}{language}\n{code}\n{marker}"


@dataclass(frozen=True)
class ReplyFormat:
    """How a reply is drawn while it streams (``partial``) and once it is done (``final``)."""

    partial: Callable[[str], Bundle]
    final: Callable[[str, bool], Bundle]


def _markdown_partial(text: str) -> Bundle:
    return {"text/markdown": text + STREAMING_CURSOR, "text/plain": text}


def _markdown_final(text: str, interrupted: bool) -> Bundle:
    if interrupted:
        return {
            "text/markdown": f"{text}\n\n{INTERRUPTED_MARKDOWN}".lstrip("\n"),
            "text/plain": f"{text} {INTERRUPTED_TEXT}".lstrip(),
        }
    return {"text/markdown": text, "text/plain": text}


def _text_partial(text: str) -> Bundle:
    return {"text/plain": text}


def _text_final(text: str, interrupted: bool) -> Bundle:
    return {"text/plain": f"{text} {INTERRUPTED_TEXT}".lstrip() if interrupted else text}


def _code_final(text: str, interrupted: bool) -> Bundle:
    code, language = extract_code(text)
    bundle = {"text/markdown": fence(code, language), "text/plain": code}
    if interrupted:
        bundle["text/markdown"] += f"\n\n{INTERRUPTED_MARKDOWN}"
        bundle["text/plain"] += f"\n{INTERRUPTED_TEXT}"
    return bundle


FORMATS: dict[str, ReplyFormat] = {
    "markdown": ReplyFormat(partial=_markdown_partial, final=_markdown_final),
    "text": ReplyFormat(partial=_text_partial, final=_text_final),
    # While a code reply streams, the model's own fences render as they come.
    "code": ReplyFormat(partial=_markdown_partial, final=_code_final),
}


class ReplyView:
    """One reply on screen, from the first token to the final render.

    In a notebook: ``start`` shows a placeholder through a new display handle, ``append`` redraws it
    no more often than every ``min_interval`` seconds, ``finish`` draws the final format with the
    output metadata. In a terminal (``live=False``): deltas are written to ``out`` as they come and
    ``finish`` ends the line. ``stream=False`` draws only the final render.
    """

    def __init__(
        self,
        *,
        format: str = "markdown",
        live: bool = True,
        stream: bool = True,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        out: TextIO | None = None,
    ) -> None:
        if format not in FORMATS:
            raise ValueError(f"unknown reply format {format!r}; choose one of {', '.join(FORMATS)}")
        self.format = FORMATS[format]
        self.live = live
        self.stream = stream
        self.min_interval = min_interval
        self.clock = clock
        self.out = out
        self.text = ""
        self.redraws = 0
        self.handle: DisplayHandle | None = None
        self.metadata: dict[str, Any] = {}
        self._last_redraw = float("-inf")
        self._written = 0

    @property
    def _stdout(self) -> TextIO:
        return self.out if self.out is not None else sys.stdout

    def start(self, metadata: dict[str, Any] | None = None) -> None:
        self.metadata = dict(metadata or {})
        if self.live:
            self.handle = display(self.format.partial(""), raw=True, metadata=self.metadata, display_id=True)
            self._last_redraw = self.clock()

    def append(self, delta: str) -> None:
        if not delta:
            return
        self.text += delta
        if not self.stream:
            return
        if not self.live:
            self._stdout.write(delta)
            self._stdout.flush()
            self._written = len(self.text)
            return
        now = self.clock()
        if now - self._last_redraw >= self.min_interval:
            self._redraw(self.format.partial(self.text))
            self._last_redraw = now

    def finish(self, *, interrupted: bool = False, metadata: dict[str, Any] | None = None) -> None:
        if self.live:
            self._redraw(self.format.final(self.text, interrupted), {**self.metadata, **(metadata or {})})
            return
        # Terminal: write what has not been written yet (all of it when not streaming), then end the line.
        self._stdout.write(self.text[self._written :])
        self._written = len(self.text)
        if interrupted:
            self._stdout.write(f" {INTERRUPTED_TEXT}" if self.text else INTERRUPTED_TEXT)
        self._stdout.write("\n")
        self._stdout.flush()

    def discard(self) -> None:
        """Blank the placeholder of a reply that never came (the request failed)."""
        if self.live and self.handle is not None:
            self.handle.update({"text/plain": ""}, raw=True, metadata=self.metadata)

    def _redraw(self, bundle: Bundle, metadata: dict[str, Any] | None = None) -> None:
        metadata = self.metadata if metadata is None else metadata
        if self.handle is None:
            self.handle = display(bundle, raw=True, metadata=metadata, display_id=True)
        else:
            self.handle.update(bundle, raw=True, metadata=metadata)
        self.redraws += 1


def show(markdown: str, text: str, metadata: dict[str, Any] | None = None) -> None:
    """Display a Markdown block with its plain-text form for front ends (and terminals) without Markdown."""
    display({"text/markdown": markdown, "text/plain": text}, raw=True, metadata=metadata or {})


def transcript(
    messages: list[dict[str, Any]], interrupted: set[int] | frozenset[int] = frozenset()
) -> tuple[str, str]:
    """``(markdown, text)`` of a message list; ``interrupted`` holds indexes of interrupted replies."""
    markdown_parts: list[str] = []
    text_parts: list[str] = []
    for index, message in enumerate(messages):
        role = str(message.get("role", "?"))
        content = message.get("content") or ""
        content = content if isinstance(content, str) else str(content)
        if index in interrupted:
            markdown_parts.append(f"**{role}**\n\n{content}\n\n{INTERRUPTED_MARKDOWN}")
            text_parts.append(f"{role}: {content} {INTERRUPTED_TEXT}")
        else:
            markdown_parts.append(f"**{role}**\n\n{content}")
            text_parts.append(f"{role}: {content}")
    return "\n\n---\n\n".join(markdown_parts), "\n\n".join(text_parts)
