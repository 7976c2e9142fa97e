"""How chat output looks in a notebook: the streaming reply view, reply formats, transcripts, the
Markdown blocks and tables of ``%chat`` commands, and one-line warnings.

A reply streams through ONE display handle (``IPython.display``), updated at most ~15 times a second
however fast tokens come, and ends with a final render: Markdown (the front end highlights fenced
code), plain text, a code block or formatted JSON. In terminal IPython, where display updates cannot
redraw, the reply is written to stdout as plain text delta by delta instead (no escape codes, no
repeated reprs).

Reply formats are a table (:data:`FORMATS`). A reply that calls tools is drawn in the same display:
each step's text, then its tool calls as collapsible blocks (name, arguments, result or error) that
change state as the calls stream, run or are refused (:class:`ToolCallView`). Nothing here knows
about models, tools' code or conversations' storage; the magic hands over text, calls and metadata.

The final render also carries :data:`REPLY_MIMETYPE` (:func:`reply_payload`): the reply as data for
the JupyterLab extension, which draws the same Markdown with code-block actions and finish-state
badges. Front ends without the extension skip it and show the Markdown or the plain text.
"""

from __future__ import annotations

import html
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from IPython.display import DisplayHandle, display

from nbchat.turns import NOT_RUN_PREFIX

INTERRUPTED_MARKDOWN = "*⏹ interrupted*"
INTERRUPTED_TEXT = "[interrupted]"
TRUNCATED_MARKDOWN = "*✂ cut off at max_tokens: the JSON is incomplete*"
TRUNCATED_TEXT = "[cut off at max_tokens: the JSON is incomplete]"
STREAMING_CURSOR = "▌"
# The JupyterLab extension's renderer reads this MIME type; the payload's shape is versioned.
REPLY_MIMETYPE = "application/vnd.nbchat.reply+json"
REPLY_PAYLOAD_VERSION = 1
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
    # A shell that knows its front end says so (the chat kernel: a console cannot redraw, a notebook can).
    live = getattr(shell, "live_updates", None)
    if live is not None:
        return bool(live)
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
    """How a reply is drawn while it streams (``partial``) and once it is done (``final(text,
    interrupted, truncated)``; ``truncated``: max_tokens cut the reply, which only JSON marks)."""

    partial: Callable[[str], Bundle]
    final: Callable[[str, bool, bool], Bundle]


def _markdown_partial(text: str) -> Bundle:
    return {"text/markdown": text + STREAMING_CURSOR, "text/plain": text}


def _markdown_final(text: str, interrupted: bool, truncated: bool = False) -> Bundle:
    if interrupted:
        return {
            "text/markdown": f"{text}\n\n{INTERRUPTED_MARKDOWN}".lstrip("\n"),
            "text/plain": f"{text} {INTERRUPTED_TEXT}".lstrip(),
        }
    return {"text/markdown": text, "text/plain": text}


def _text_partial(text: str) -> Bundle:
    return {"text/plain": text}


def _text_final(text: str, interrupted: bool, truncated: bool = False) -> Bundle:
    return {"text/plain": f"{text} {INTERRUPTED_TEXT}".lstrip() if interrupted else text}


def _code_final(text: str, interrupted: bool, truncated: bool = False) -> Bundle:
    code, language = extract_code(text)
    bundle = {"text/markdown": fence(code, language), "text/plain": code}
    if interrupted:
        bundle["text/markdown"] += f"\n\n{INTERRUPTED_MARKDOWN}"
        bundle["text/plain"] += f"\n{INTERRUPTED_TEXT}"
    return bundle


def reply_payload(
    *,
    text: str,
    format: str,
    markdown: str | None,
    interrupted: bool,
    metadata: dict[str, Any],
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The reply as data (:data:`REPLY_MIMETYPE`): its ``text``, its ``format``, the ``markdown`` the
    reply is drawn as without the finish-state note (None for the text format: drawn as plain text),
    how it ended (``finish_reason``, ``interrupted``), the ``model``, the token ``usage`` and, when the
    request asked for them, the per-token ``logprobs`` (OpenAI's ``logprobs.content`` entries).
    ``metadata`` is the reply's ``nbchat`` output metadata (model, finish_reason, usage)."""
    payload: dict[str, Any] = {
        "version": REPLY_PAYLOAD_VERSION,
        "text": text,
        "format": format,
        "markdown": markdown,
        "finish_reason": metadata.get("finish_reason"),
        "interrupted": interrupted,
        "model": metadata.get("model"),
        "usage": metadata.get("usage"),
    }
    if logprobs is not None:
        payload["logprobs"] = logprobs
    return payload


def parse_json(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when ``text`` is one JSON value, else ``(False, None)``."""
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False, None


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _json_partial(text: str) -> Bundle:
    return {"text/markdown": fence(text + STREAMING_CURSOR, "json"), "text/plain": text}


def _json_final(text: str, interrupted: bool, truncated: bool = False) -> Bundle:
    """Formatted JSON (``application/json`` for front ends with a JSON viewer, a fenced ``json`` block
    and indented text); a reply that is not complete JSON is shown as written, with the reason."""
    complete, value = parse_json(text)
    if complete and not interrupted and not truncated:
        pretty = pretty_json(value)
        bundle: Bundle = {"text/markdown": fence(pretty, "json"), "text/plain": pretty}
        if isinstance(value, (dict, list)):  # the JSON viewers expect an object or an array
            bundle = {"application/json": value, **bundle}
        return bundle
    markdown, plain = fence(text, "json"), text
    if interrupted:
        markdown, plain = f"{markdown}\n\n{INTERRUPTED_MARKDOWN}", f"{plain} {INTERRUPTED_TEXT}".lstrip()
    elif truncated:
        markdown, plain = f"{markdown}\n\n{TRUNCATED_MARKDOWN}", f"{plain} {TRUNCATED_TEXT}".lstrip()
    return {"text/markdown": markdown, "text/plain": plain}


FORMATS: dict[str, ReplyFormat] = {
    "markdown": ReplyFormat(partial=_markdown_partial, final=_markdown_final),
    "text": ReplyFormat(partial=_text_partial, final=_text_final),
    # While a code reply streams, the model's own fences render as they come.
    "code": ReplyFormat(partial=_markdown_partial, final=_code_final),
    "json": ReplyFormat(partial=_json_partial, final=_json_final),
}


# --- tool calls -----------------------------------------------------------------------------------

# A call's state, as its block's summary line says it.
TOOL_CALL_STATES = {
    "calling": "⋯ calling",
    "running": "⏳ running",
    "ran": "✓ ran",
    "error": "✗ error",
    "not run": "⏸ not run",
}
_PREVIEW_CHARS = 80


@dataclass
class ToolCallView:
    """One tool call as the user sees it: the name, the arguments as the model wrote them (JSON
    text), the state (a key of :data:`TOOL_CALL_STATES`), the result or error sent back to the
    model, and an optional one-line note under the block (why it did not run, how to allow it)."""

    name: str
    arguments: str = ""
    state: str = "calling"
    result: str | None = None
    note: str | None = None

    def signature(self) -> str:
        """``name(key=value, ...)`` from the arguments, shortened to one readable line."""
        complete, value = parse_json(self.arguments)
        if complete and isinstance(value, dict):
            inner = ", ".join(f"{key}={json.dumps(item, ensure_ascii=False)}" for key, item in value.items())
        else:
            inner = " ".join(self.arguments.split())
        if len(inner) > _PREVIEW_CHARS:
            inner = inner[: _PREVIEW_CHARS - 1] + "…"
        return f"{self.name}({inner})"

    def markdown(self) -> str:
        """A collapsible block (``<details>``, open for an error) with the arguments and the result."""
        state = TOOL_CALL_STATES.get(self.state, self.state)
        summary = f"🔧 <code>{html.escape(self.signature())}</code> · {state}"
        sections = [f"arguments\n\n{fence(_as_pretty_json(self.arguments) or '{}', 'json')}"]
        if self.result is not None and self.state != "not run":  # the note says why it did not run
            label = "error" if self.state == "error" else "result"
            sections.append(f"{label}\n\n{fence(_as_pretty_json(self.result), 'json')}")
        is_open = " open" if self.state == "error" else ""
        body = "\n\n".join(sections)
        block = f"<details{is_open}><summary>{summary}</summary>\n\n{body}\n\n</details>"
        return f"{block}\n\n*{self.note}*" if self.note else block

    def bundle(self) -> Bundle:
        return {"text/markdown": self.markdown(), "text/plain": self.text()}

    def text(self) -> str:
        line = f"[tool] {self.signature()}"
        if self.state == "ran":
            line += f" -> {' '.join((self.result or '').split())}"
        elif self.state == "error":
            line += f" -> error: {' '.join(_error_text(self.result).split())}"
        else:
            line += f" {TOOL_CALL_STATES.get(self.state, self.state)}"
        return f"{line}\n  {self.note}" if self.note else line


def _as_pretty_json(text: str | None) -> str:
    complete, value = parse_json(text or "")
    return pretty_json(value) if complete else (text or "")


def _error_text(content: str | None) -> str:
    """The message of an ``{"error": "..."}`` result, or the content as it is."""
    complete, value = parse_json(content or "")
    if complete and isinstance(value, dict) and isinstance(value.get("error"), str):
        return value["error"]
    return content or ""


def _compose(pieces: list[Bundle], keys: list[str]) -> Bundle:
    """One bundle of several parts (earlier steps' text, tool call blocks, the current text) in the
    text MIME types ``keys`` of the reply's format; a part without a type gives its plain text."""
    return {key: "\n\n".join(piece.get(key, piece.get("text/plain", "")) for piece in pieces) for key in keys}


class ReplyView:
    """One reply on screen, from the first token to the final render.

    In a notebook: ``start`` shows a placeholder through a new display handle, ``append`` redraws it
    no more often than every ``min_interval`` seconds, ``finish`` draws the final format with the
    output metadata. In a terminal (``live=False``): deltas are written to ``out`` as they come and
    ``finish`` ends the line. ``stream=False`` draws only the final render.

    A reply that calls tools has several steps (model text, tool calls, model text ...):
    ``tool_call_delta`` draws a call as its arguments stream, ``end_step`` closes the step (its text
    and calls stay on screen above the next step's), and ``show_call`` redraws a call whose state
    changed (in a terminal: prints its line once it is settled).
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
        self.format_name = format
        self.live = live
        self.stream = stream
        self.min_interval = min_interval
        self.clock = clock
        self.out = out
        self.text = ""  # the current step's text
        self.calls: list[ToolCallView] = []  # the current step's tool calls
        self.parts: list[str | ToolCallView] = []  # what earlier steps left on screen
        self.redraws = 0
        self.handle: DisplayHandle | None = None
        self.metadata: dict[str, Any] = {}
        self.final_bundle: Bundle | None = None
        self.final_metadata: dict[str, Any] = {}
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
        self._redraw_throttled()

    def tool_call_delta(self, index: int, *, name: str | None = None, arguments: str = "") -> ToolCallView:
        """A streamed piece of the current step's call ``index`` (its name first, then arguments)."""
        while len(self.calls) <= index:
            self.calls.append(ToolCallView(name=""))
        call = self.calls[index]
        if name:
            call.name = name
        call.arguments += arguments
        if self.live and self.stream:
            self._redraw_throttled()
        return call

    def end_step(self) -> list[ToolCallView]:
        """Close the current step: its text and calls stay above what comes next. Returns the calls."""
        calls = self.calls
        if not self.live:
            self._stdout.write(self.text[self._written :])
            if self.text:
                self._stdout.write("\n")
            self._stdout.flush()
        if self.text:
            self.parts.append(self.text)
        self.parts.extend(calls)
        self.text, self.calls, self._written = "", [], 0
        if self.live:
            self._redraw(self._bundle(final=False))
        return calls

    def show_call(self, call: ToolCallView) -> None:
        """Redraw after ``call`` changed state; in a terminal print its line once it is settled."""
        if self.live:
            self._redraw(self._bundle(final=False))
        elif call.state not in ("calling", "running"):
            self._stdout.write(call.text() + "\n")
            self._stdout.flush()

    def finish(
        self,
        *,
        interrupted: bool = False,
        truncated: bool = False,
        metadata: dict[str, Any] | None = None,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> None:
        """The final render; ``logprobs`` (per-token entries, when the request asked for them) go
        into the reply's :data:`REPLY_MIMETYPE` data only."""
        if self.live:
            metadata = {**self.metadata, **(metadata or {})}
            bundle = self._bundle(final=True, interrupted=interrupted, truncated=truncated)
            body = self._bundle(final=True) if interrupted or truncated else bundle
            texts = [part for part in self.parts if isinstance(part, str)]
            texts += [self.text] if self.text else []
            payload = reply_payload(
                text="\n\n".join(texts),
                format=self.format_name,
                markdown=body.get("text/markdown"),
                interrupted=interrupted,
                metadata=metadata.get("nbchat") or {},
                logprobs=logprobs,
            )
            self.final_bundle, self.final_metadata = {REPLY_MIMETYPE: payload, **bundle}, metadata
            self._redraw(self.final_bundle, self.final_metadata)
            return
        # Terminal: write what has not been written yet (all of it when not streaming), then end the line.
        self._stdout.write(self.text[self._written :])
        self._written = len(self.text)
        if interrupted:
            self._stdout.write(f" {INTERRUPTED_TEXT}" if self.text else INTERRUPTED_TEXT)
        self._stdout.write("\n")
        self._stdout.flush()

    def warn(self, message: str) -> None:
        """A warning under the reply (the turn stopped early but kept what happened)."""
        warn(message)

    def add_to_final(self, extra: Bundle) -> None:
        """Redraw the finished reply with more representations (a teaching view's ``text/html``),
        which front ends prefer to its Markdown. A terminal shows nothing more."""
        if self.live and self.final_bundle is not None:
            # Without the reply data: the lab extension's renderer ranks above every other one and
            # would hide the view.
            kept = {k: v for k, v in self.final_bundle.items() if k not in extra and k != REPLY_MIMETYPE}
            self._redraw({**extra, **kept}, self.final_metadata)

    def discard(self) -> None:
        """Blank the placeholder of a reply that never came (the request failed)."""
        if self.live and self.handle is not None:
            self.handle.update({"text/plain": ""}, raw=True, metadata=self.metadata)

    def _bundle(self, *, final: bool, interrupted: bool = False, truncated: bool = False) -> Bundle:
        """What the display shows: earlier steps, then the current text (partial or final) and calls."""
        if not self.parts and not self.calls:
            if final:
                return self.format.final(self.text, interrupted, truncated)
            return self.format.partial(self.text)
        pieces = [
            part.bundle() if isinstance(part, ToolCallView) else self.format.final(part, False, False)
            for part in self.parts
        ]
        if final:
            ended = self.text or interrupted
            current = self.format.final(self.text, interrupted, truncated) if ended else None
        else:
            current = self.format.partial(self.text) if self.text or not self.calls else None
        pieces += ([current] if current else []) + [call.bundle() for call in self.calls]
        keys = [key for key in self.format.final("", False, False) if key.startswith("text/")]
        return _compose(pieces, keys)

    def _redraw_throttled(self) -> None:
        now = self.clock()
        if now - self._last_redraw >= self.min_interval:
            self._redraw(self._bundle(final=False))
            self._last_redraw = now

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


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table of ``rows`` under ``header``; cells go in as written (format them first)."""
    lines = [f"| {' | '.join(header)} |", "|---" * len(header) + "|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines) + "\n"


def warn(message: str) -> None:
    """A warning under the reply (stderr: front ends show it apart from the output)."""
    print(f"Warning: {message}", file=sys.stderr, flush=True)


def one_line(error: Exception) -> str:
    """An error's message on one line (a UsageError or a warning is one line)."""
    return " ".join(str(error).split())


def transcript(
    messages: list[dict[str, Any]], interrupted: set[int] | frozenset[int] = frozenset()
) -> tuple[str, str]:
    """``(markdown, text)`` of a message list; ``interrupted`` holds indexes of interrupted replies.

    An assistant message's tool calls are drawn as call blocks holding their results (the ``tool``
    messages that answer them, matched by id); a tool message that answers no call is shown alone.
    """
    results = {
        message.get("tool_call_id"): _text_of(message.get("content"))
        for message in messages
        if message.get("role") == "tool"
    }
    shown_results: set[Any] = set()
    markdown_parts: list[str] = []
    text_parts: list[str] = []
    for index, message in enumerate(messages):
        role = str(message.get("role", "?"))
        content = _text_of(message.get("content"))
        if role == "tool" and message.get("tool_call_id") in shown_results:
            continue
        markdown_body, text_body = [content] if content else [], [content] if content else []
        for call in message.get("tool_calls") or []:
            view = _call_from_message(call, results)
            shown_results.add(call.get("id"))
            markdown_body.append(view.markdown())
            text_body.append(view.text())
        markdown, text = "\n\n".join(markdown_body), "\n".join(text_body)
        if index in interrupted:
            markdown_parts.append(f"**{role}**\n\n{markdown}\n\n{INTERRUPTED_MARKDOWN}")
            text_parts.append(f"{role}: {text} {INTERRUPTED_TEXT}")
        else:
            markdown_parts.append(f"**{role}**\n\n{markdown}")
            text_parts.append(f"{role}: {text}")
    return "\n\n---\n\n".join(markdown_parts), "\n\n".join(text_parts)


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    return content if isinstance(content, str) else str(content)


def _call_from_message(call: dict[str, Any], results: dict[Any, str]) -> ToolCallView:
    """The view of a stored OpenAI tool call, with its result when a tool message answered it."""
    function = call.get("function") or {}
    result = results.get(call.get("id"))
    if result is None:
        state, note = "not run", None
    else:
        complete, value = parse_json(result)
        is_error = complete and isinstance(value, dict) and set(value) == {"error"}
        note = None
        if not is_error:
            state = "ran"
        elif str(value["error"]).startswith(NOT_RUN_PREFIX):
            state, note = "not run", f"Not run: {value['error'][len(NOT_RUN_PREFIX):]}."
        else:
            state = "error"
    return ToolCallView(
        name=str(function.get("name", "?")),
        arguments=str(function.get("arguments") or ""),
        state=state,
        result=result,
        note=note,
    )
