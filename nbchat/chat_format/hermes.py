"""The Hermes/Qwen tool-call format: its tags, the streaming parser that splits a reply into content
and tool calls, how earlier calls and results are written back for templates without tool support
(the built-in tool prompt), and the Lark grammar that makes a reply follow the format.

The model calls tools in this syntax (one block per call; several blocks are parallel calls)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city":"Paris"}}
    </tool_call>

and sees results as ``<tool_response>...</tool_response>`` in a user turn (built-in prompt) or as
``tool`` messages rendered by the model's own template. Must not: run tools (``nbchat.tools``),
validate requests (``nbchat.protocol``) or compile grammars (``nbchat.engine.constraints``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from nbchat.protocol.deltas import new_tool_call_id

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"


# -- parsing model output ---------------------------------------------------------------------------

class _CallScanner:
    """Incremental scan of one tool call's JSON body: finds the top-level "name" and the raw text of
    "arguments" (or "parameters") while the body is still arriving."""

    def __init__(self) -> None:
        self.body = ""
        self.pos = 0                 # next character of body to scan
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False         # the body's first non-space character was "{"
        self.invalid = False         # the body is not a JSON object: the block is not a call
        self.complete_at: int | None = None  # index just past the top-level "}"
        self._string_start = 0
        self._last_string: str | None = None  # the last complete top-level string (a key or value)
        self._key: str | None = None          # the top-level key whose value is being scanned
        self._value_start: int | None = None
        self.name: str | None = None
        self.args_start: int | None = None
        self.args_end: int | None = None

    def feed(self, text: str) -> None:
        self.body += text
        body = self.body
        while self.pos < len(body) and self.complete_at is None and not self.invalid:
            ch = body[self.pos]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 1:
                        try:
                            self._last_string = json.loads(body[self._string_start:self.pos + 1])
                        except json.JSONDecodeError:
                            self._last_string = None
                        if self._key is not None and self._value_start == self._string_start:
                            self._end_value(self.pos + 1)
            elif not self.started:
                if ch == "{":
                    self.started, self.depth = True, 1
                elif not ch.isspace():
                    self.invalid = True
            elif ch == '"':
                self.in_string, self._string_start = True, self.pos
                if self.depth == 1 and self._key is not None and self._value_start is None:
                    self._start_value(self.pos)
            elif ch in "{[":
                if self.depth == 1 and self._key is not None and self._value_start is None:
                    self._start_value(self.pos)
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 1 and self._key is not None and self._value_start is not None:
                    self._end_value(self.pos + 1)
                elif self.depth == 0:
                    if self._key is not None and self._value_start is not None:
                        self._end_value(self.pos)  # a number/literal value ends at the brace
                    self.complete_at = self.pos + 1
            elif self.depth == 1:
                if ch == ":":
                    self._key, self._value_start = self._last_string, None
                elif ch == ",":
                    if self._key is not None and self._value_start is not None:
                        self._end_value(self.pos)
                    self._key = None
                elif not ch.isspace() and self._key is not None and self._value_start is None:
                    self._start_value(self.pos)
            self.pos += 1

    def _start_value(self, index: int) -> None:
        self._value_start = index
        if self._key in ("arguments", "parameters") and self.args_start is None:
            self.args_start = index

    def _end_value(self, end: int) -> None:
        start = self._value_start
        if self._key == "name" and self.body[start] == '"':
            try:
                name = json.loads(self.body[start:end])
            except json.JSONDecodeError:
                name = None
            if isinstance(name, str) and self.name is None:
                self.name = name
        elif self._key in ("arguments", "parameters") and self.args_start == start:
            self.args_end = len(self.body[:end].rstrip())
        self._key, self._value_start = None, None

    @property
    def args_is_string(self) -> bool:
        return self.args_start is not None and self.body[self.args_start] == '"'


class ToolCallParser:
    """Splits a model's reply, fed as text deltas, into content and Hermes/Qwen tool calls, as
    OpenAI streaming deltas.

    ``feed(text)`` and ``finish()`` return a list of deltas, in order, each either
    ``{"content": "..."}`` or ``{"tool_calls": [d]}`` where the first ``d`` of a call is
    ``{"index", "id", "type": "function", "function": {"name", "arguments": ""}}`` and later ones
    ``{"index", "function": {"arguments": fragment}}``; a call's fragments concatenate to exactly its
    final ``arguments`` string. Text that could be the start of ``<tool_call>`` is held back until it
    is not; leading and trailing whitespace of the content is dropped. After ``finish()``, ``content``
    (None when empty) and ``tool_calls`` hold the whole message.
    """

    def __init__(self, *, id_factory: Callable[[], str] = new_tool_call_id):
        self._new_id = id_factory
        self._text = ""              # text not yet emitted or classified
        self._held_space = ""        # whitespace after the last emitted content
        self._content: list[str] = []
        self._calls: list[dict] = []
        self._scanner: _CallScanner | None = None  # the call being read
        self._call_raw = ""          # the raw text of that block, to give back if it is no call
        self._announced = False      # the current call's first delta (id, name) went out
        self._args_emitted = 0       # characters of the current call's arguments sent so far
        self._finished = False

    # public state

    @property
    def in_call(self) -> bool:
        """Whether the text so far ends inside a tool call (its closing tag not seen yet)."""
        return self._scanner is not None

    @property
    def content(self) -> str | None:
        text = "".join(self._content)
        return text or None

    @property
    def tool_calls(self) -> list[dict]:
        return [{"id": c["id"], "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                for c in self._calls]

    def feed(self, text: str) -> list[dict]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        deltas: list[dict] = []
        self._text += text
        while self._text:
            if self._scanner is None:
                start = self._text.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = _partial_suffix(self._text, TOOL_CALL_OPEN)
                    self._emit_text(self._text[: len(self._text) - keep], deltas)
                    self._text = self._text[len(self._text) - keep:]
                    break
                self._emit_text(self._text[:start], deltas)
                self._text = self._text[start + len(TOOL_CALL_OPEN):]
                self._scanner, self._call_raw, self._announced, self._args_emitted = _CallScanner(), \
                    TOOL_CALL_OPEN, False, 0
            if not self._read_call(deltas):
                break
        return deltas

    def finish(self) -> list[dict]:
        """Flush: held-back text becomes content; an unterminated call ends where the text ends. Tag
        syntax cut off by max_tokens after a call's arguments (``</tool``) belongs to the call, so the
        content never holds a piece of a call."""
        deltas: list[dict] = []
        if self._scanner is not None:
            arguments_complete = self._scanner.complete_at is not None
            self._end_call(deltas, truncated=True)
            if arguments_complete and TOOL_CALL_CLOSE.startswith(self._text.strip()):
                self._text = ""
        self._emit_text(self._text, deltas)
        self._text = ""
        self._finished = True
        return deltas

    # internals

    def _read_call(self, deltas: list[dict]) -> bool:
        """Consume ``_text`` into the current call; True when the call ended and text remains."""
        scanner = self._scanner
        assert scanner is not None
        if scanner.complete_at is None:
            scanner.feed(self._text)
            self._call_raw += self._text
            self._text = ""
            if scanner.invalid:  # not a JSON object: the tag was text, and so is what follows
                raw, self._call_raw, self._scanner = self._call_raw, "", None
                self._emit_text(TOOL_CALL_OPEN, deltas)
                self._text = raw[len(TOOL_CALL_OPEN):]
                return True
            self._stream_call(scanner, deltas)
            if scanner.complete_at is None:
                return False
            # What followed the closing brace goes back to _text, to be matched with the close tag.
            tail = scanner.body[scanner.complete_at:]
            scanner.body = scanner.body[: scanner.complete_at]
            self._call_raw = self._call_raw[: len(self._call_raw) - len(tail)]
            self._text = tail
        # After the JSON object: optional whitespace, then the close tag (or anything else: the call
        # simply ends there).
        stripped = self._text.lstrip()
        if not stripped:
            return False
        if stripped.startswith(TOOL_CALL_CLOSE):
            self._call_raw += self._text[: len(self._text) - len(stripped)] + TOOL_CALL_CLOSE
            self._text = stripped[len(TOOL_CALL_CLOSE):]
        elif TOOL_CALL_CLOSE.startswith(stripped):
            return False  # maybe the close tag, still arriving
        else:
            self._text = stripped
        self._end_call(deltas, truncated=False)
        return True

    def _stream_call(self, scanner: _CallScanner, deltas: list[dict]) -> None:
        if scanner.name is None:
            return
        index = len(self._calls)
        if not self._announced:
            self._announced = True
            self._calls.append({"id": self._new_id(), "type": "function",
                                "function": {"name": scanner.name, "arguments": ""}})
            deltas.append({"tool_calls": [{"index": index, "id": self._calls[-1]["id"], "type": "function",
                                           "function": {"name": scanner.name, "arguments": ""}}]})
        if scanner.args_start is None or scanner.args_is_string:
            return  # a string-valued arguments is sent decoded, once complete
        end = scanner.args_end if scanner.args_end is not None else len(scanner.body)
        self._send_args(scanner.body[scanner.args_start + self._args_emitted: end], deltas)

    def _send_args(self, fragment: str, deltas: list[dict]) -> None:
        if not fragment:
            return
        index = len(self._calls) - 1
        self._args_emitted += len(fragment)
        self._calls[index]["function"]["arguments"] += fragment
        deltas.append({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})

    def _end_call(self, deltas: list[dict], *, truncated: bool) -> None:
        scanner = self._scanner
        assert scanner is not None
        self._scanner = None
        if scanner.name is None:  # never named: not a call; give a closed block back as text
            raw, self._call_raw = self._call_raw, ""
            if truncated:  # a call cut off (max_tokens) before its name: tag syntax, not content
                self._text = ""
            else:
                self._emit_text(raw, deltas)
            return
        self._stream_call(scanner, deltas)
        if scanner.args_is_string and scanner.args_end is not None:
            try:
                decoded = json.loads(scanner.body[scanner.args_start: scanner.args_end])
            except json.JSONDecodeError:
                decoded = ""
            self._send_args(decoded, deltas)
        elif scanner.args_start is None and not truncated:
            self._send_args("{}", deltas)  # a call without arguments: OpenAI sends "{}"
        self._call_raw = ""

    def _emit_text(self, text: str, deltas: list[dict]) -> None:
        if not text:
            return
        if not self._content:
            text = text.lstrip()
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body):]
        if body:
            self._content.append(body)
            if deltas and "content" in deltas[-1]:
                deltas[-1]["content"] += body
            else:
                deltas.append({"content": body})


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content or None, [OpenAI tool calls]) of a whole reply; the same rules as the stream parser,
    so streamed and non-streamed replies agree."""
    parser = ToolCallParser()
    parser.feed(text)
    parser.finish()
    return parser.content, parser.tool_calls


# -- the grammar a reply follows ---------------------------------------------------------------------


def tool_call_grammar(functions: Sequence[tuple[str, Mapping[str, Any]]], mode: str, *, parallel: bool,
                      content_schema: Mapping[str, Any] | None = None,
                      special_tags: Collection[str] = ()) -> str:
    """The Lark grammar (llguidance's dialect) of a reply that calls ``functions``, (name, arguments
    JSON schema with its llguidance options) pairs, in this format.

    ``mode``: ``"auto"`` (free text, or text then calls; once ``<tool_call>`` appears the call must
    name one of the functions with arguments valid for its schema), ``"required"`` (only calls) or
    ``"named"`` (one call to the single function given). ``parallel`` allows several calls in a row.
    After a call the reply may end, also after a newline: a newline alone does not commit the model
    to another call (a small model writes one after every call). With ``"auto"``,
    ``content_schema`` (a JSON schema) replaces the free text. A tag in ``special_tags`` is one
    special token of the tokenizer and is named as such (it never occurs inside text).
    """

    def item(text: str) -> str:
        return text if text in special_tags else json.dumps(text)

    bodies = []
    for index, (name, schema) in enumerate(functions):
        prefix = json.dumps({"name": name, "arguments": None})[: -len("null}")]
        bodies.append(f"fn_{index}: {json.dumps(prefix)} %json {json.dumps(dict(schema))} \"}}\"")
    open_tag, close_tag = item(TOOL_CALL_OPEN), item(TOOL_CALL_CLOSE)
    more_calls = '("\\n" call)* "\\n"?' if parallel and mode != "named" else '"\\n"?'
    lines = ["%llguidance {}"]
    if mode == "auto" and content_schema is not None:
        lines += [f"start: content | call {more_calls}", f"content: %json {json.dumps(dict(content_schema))}"]
    elif mode == "auto":
        # A lazy lexeme ends at the first trigger, so free text can never run past "<tool_call>";
        # a special-token trigger cannot occur inside TEXT at all.
        if TOOL_CALL_OPEN in special_tags:
            lines += [f"start: TEXT | TEXT {open_tag} call_rest {more_calls}"]
        else:
            lines += [f"start: TEXT | text_then_open call_rest {more_calls}",
                      f"text_then_open[lazy]: TEXT {open_tag}"]
        lines += ["TEXT: /(.|\\n)*/"]
    else:
        lines += [f"start: call {more_calls}"]
    lines += [f"call: {open_tag} call_rest",
              f'call_rest: "\\n" call_body "\\n" {close_tag}',
              "call_body: " + " | ".join(f"fn_{index}" for index in range(len(functions))),
              *bodies]
    return "\n".join(lines)


# -- the built-in tool prompt (for chat templates without tool support) ---------------------------

TOOL_PROMPT = """# Tools

You may call one or more functions to help with the user's request. The functions are described by \
JSON signatures inside <tools></tools> tags:
<tools>
{tools}
</tools>

To call a function, answer with a JSON object holding its name and arguments inside \
<tool_call></tool_call> tags, one block per call:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-as-a-JSON-object>}}
</tool_call>
Each result comes back inside <tool_response></tool_response> tags."""


def tool_prompt(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system-prompt text describing ``tools`` (OpenAI tool dicts) and the call syntax."""
    return TOOL_PROMPT.format(tools="\n".join(json.dumps(dict(t), ensure_ascii=False) for t in tools))


def format_tool_call(call: Mapping[str, Any]) -> str:
    """One OpenAI tool call in the model's syntax (the arguments string embedded as JSON)."""
    fn = call["function"]
    arguments: Any = fn.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # keep the model's text as a string rather than invent an object
    body = json.dumps({"name": fn["name"], "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, Mapping))


def inline_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
                 ) -> list[dict]:
    """Rewrite a conversation for a chat template that knows no tools: the tool prompt joins the
    system message, assistant ``tool_calls`` become ``<tool_call>`` text, and (consecutive) ``tool``
    messages become one user message of ``<tool_response>`` blocks."""
    out: list[dict] = []
    for message in messages:
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            parts = [_text_of(message.get("content")).strip()]
            parts += [format_tool_call(call) for call in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(p for p in parts if p)})
        elif role == "tool":
            block = f"{TOOL_RESPONSE_OPEN}\n{_text_of(message.get('content'))}\n{TOOL_RESPONSE_CLOSE}"
            if out and out[-1].get("role") == "user" and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
        else:
            out.append({k: v for k, v in message.items() if k != "tool_calls"})
    for message in out:
        message.pop("_tool_responses", None)
    if tools:
        prompt = tool_prompt(tools)
        if out and out[0].get("role") == "system":
            system = _text_of(out[0].get("content")).rstrip()
            out[0] = {**out[0], "content": f"{system}\n\n{prompt}" if system else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out

