"""Tool (function) calling: Python callables as OpenAI tool schemas, a registry of tools the user may
let run, the Hermes/Qwen tool-call syntax (parsing whole replies and streams, and a built-in tool
prompt for chat templates without tool support), and running a call into a ``tool`` message.

The model calls tools in this syntax (one block per call; several blocks are parallel calls)::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

and sees results as ``<tool_response>...</tool_response>`` in a user turn (built-in prompt) or as
``tool`` messages rendered by the model's own template. The grammar that forces this syntax lives in
``nbchat.engine.constraints``; this module holds no model or engine code.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import secrets
import string
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

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


# -- Python callables -> schemas ------------------------------------------------------------------

_SECTION_ALIASES = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments",
                    "other parameters"}
_GOOGLE_HEADER = re.compile(r"^([A-Za-z][A-Za-z ]*):\s*$")
_GOOGLE_PARAM = re.compile(r"^\*{0,2}(\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")
_NUMPY_PARAM = re.compile(r"^\*{0,2}(\w+)\s*(?::\s*(.*))?$")
_SPHINX_PARAM = re.compile(r"^:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(summary, {parameter: description}) from a Google-, numpy- or Sphinx-style docstring.

    The summary is the text before the first section; a description's continuation lines are joined
    with spaces. Anything not recognised is left out rather than guessed.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    summary: list[str] = []
    params: dict[str, str] = {}
    i = 0
    current: str | None = None
    in_summary = True
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        is_numpy_header = i + 1 < len(lines) and stripped and set(lines[i + 1].strip()) == {"-"}
        google = _GOOGLE_HEADER.match(stripped) if not line.startswith(" ") else None
        if is_numpy_header or google or stripped.startswith(":"):
            in_summary = False
        if in_summary:
            summary.append(line)
            i += 1
            continue
        if is_numpy_header:  # numpy: "Parameters" / "----------", entries "name : type", indented text
            section = stripped.lower()
            i += 2
            current = None
            while i < len(lines) and not (i + 1 < len(lines) and lines[i].strip()
                                          and set(lines[i + 1].strip()) == {"-"}):
                entry = lines[i]
                if section in _SECTION_ALIASES and entry.strip():
                    match = _NUMPY_PARAM.match(entry) if not entry.startswith(" ") else None
                    if match:
                        current = match.group(1)
                        params[current] = ""
                    elif current:
                        params[current] = (params[current] + " " + entry.strip()).strip()
                i += 1
            current = None
            continue
        if google:  # Google: "Args:", entries "name (type): text" indented one level
            section = google.group(1).strip().lower()
            i += 1
            current, entry_indent = None, None
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
                entry = lines[i]
                indent = len(entry) - len(entry.lstrip())
                if section in _SECTION_ALIASES and entry.strip():
                    match = _GOOGLE_PARAM.match(entry.strip())
                    if match and (entry_indent is None or indent <= entry_indent):
                        entry_indent = indent
                        current = match.group(1)
                        params[current] = match.group(3).strip()
                    elif current:
                        params[current] = (params[current] + " " + entry.strip()).strip()
                i += 1
            current = None
            continue
        match = _SPHINX_PARAM.match(stripped)
        if match:
            current = match.group(1)
            params[current] = match.group(2).strip()
        elif stripped.startswith(":"):
            current = None
        elif current and stripped:
            params[current] = (params[current] + " " + stripped).strip()
        i += 1
    return " ".join(" ".join(summary).split()), {k: v for k, v in params.items() if v}


def _argument_adapter(fn: Callable) -> Any:
    """A pydantic TypeAdapter over ``fn``'s named parameters (``*args``/``**kwargs`` are not exposed
    to the model) that validates a dict of arguments and calls ``fn`` with them."""
    from pydantic import TypeAdapter

    signature = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    params, annotations, positional_only = [], {}, []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.kind is p.POSITIONAL_ONLY:
            positional_only.append(p.name)
        if p.name in hints:
            annotations[p.name] = hints[p.name]
        elif p.default is not p.empty and type(p.default) in (int, float, str, bool):
            annotations[p.name] = type(p.default)  # an unannotated default still says its type
        params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                                annotation=annotations.get(p.name, inspect.Parameter.empty)))

    def call_with_keywords(**arguments: Any) -> Any:
        positional = [arguments.pop(name) for name in positional_only if name in arguments]
        return fn(*positional, **arguments)

    call_with_keywords.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    call_with_keywords.__annotations__ = annotations
    call_with_keywords.__name__ = getattr(fn, "__name__", "tool")
    call_with_keywords.__qualname__ = call_with_keywords.__name__
    return TypeAdapter(call_with_keywords)


# Keys whose values are data, not schemas: titles inside them are not pydantic's titles.
_DATA_KEYS = {"default", "enum", "const", "examples", "example"}
_SCHEMA_MAPS = {"properties", "$defs", "definitions", "patternProperties", "dependentSchemas"}


def _without_titles(node: Any, *, in_map: bool = False) -> Any:
    """pydantic's ``title`` keywords removed (they cost prompt tokens and tell the model nothing)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "title" and not in_map and isinstance(value, str):
                continue
            if key in _DATA_KEYS and not in_map:
                out[key] = value
            else:
                out[key] = _without_titles(value, in_map=not in_map and key in _SCHEMA_MAPS)
        return out
    if isinstance(node, list):
        return [_without_titles(item) for item in node]
    return node


@dataclass
class Tool:
    """A function the model may call: its OpenAI name, description and parameters schema, the Python
    callable (None for a schema-only tool) and whether the user allowed it to run."""

    name: str
    description: str
    parameters: dict
    function: Callable | None = None
    allow_run: bool = False
    _adapter: Any = field(default=None, repr=False, compare=False)  # validates arguments, then calls

    @classmethod
    def from_function(cls, fn: Callable, *, name: str | None = None, description: str | None = None,
                      allow_run: bool = False) -> Tool:
        """Build the schema from ``fn``'s signature, type hints (int, float, str, bool, list[...],
        dict[...], Literal, Enum, Optional, pydantic models, Annotated[..., Field(...)]) and docstring
        (summary and Google/numpy/Sphinx parameter descriptions)."""
        if not callable(fn):
            raise TypeError(f"a tool must be callable, got {type(fn).__name__}")
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"{getattr(fn, '__name__', fn)!r} is async; tools must be plain functions")
        name = name or getattr(fn, "__name__", "")
        if not TOOL_NAME_PATTERN.match(name):
            raise ValueError(f"tool name {name!r} must match ^[a-zA-Z0-9_-]{{1,64}}$; pass name=...")
        summary, param_docs = parse_docstring(inspect.getdoc(fn))
        try:
            adapter = _argument_adapter(fn)
            parameters = _without_titles(adapter.json_schema())
        except Exception as exc:  # pydantic cannot express a hint: say which function
            raise TypeError(f"cannot build a JSON schema for the parameters of {name!r}: {exc}") from exc
        for param, text in param_docs.items():
            prop = parameters.get("properties", {}).get(param)
            if prop is not None and "description" not in prop:
                prop["description"] = text
        parameters.setdefault("properties", {})
        return cls(name=name, description=description if description is not None else summary,
                   parameters=parameters, function=fn, allow_run=allow_run, _adapter=adapter)

    @classmethod
    def from_openai(cls, spec: Mapping[str, Any]) -> Tool:
        """A schema-only tool from an OpenAI ``{"type": "function", "function": {...}}`` dict."""
        fn = spec.get("function", spec)
        return cls(name=fn["name"], description=fn.get("description", ""),
                   parameters=dict(fn.get("parameters") or {"type": "object", "properties": {}}))

    def to_openai(self) -> dict:
        """``{"type": "function", "function": {"name", "description", "parameters", "strict"}}``.

        A Python function's schema is strict (no argument the function does not take), so the grammar
        keeps a small model from adding arguments the call would then reject."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        if not self.description:
            del function["description"]
        if self.function is not None:
            function["strict"] = True
        return {"type": "function", "function": function}

    def invoke(self, arguments: Mapping[str, Any]) -> Any:
        """Validate ``arguments`` against the signature (coercing to Enums, pydantic models ...) and
        call the function; raises pydantic's ValidationError or whatever the function raises."""
        if self.function is None:
            raise TypeError(f"tool {self.name!r} has only a schema, no Python function to run")
        return self._adapter.validate_python(dict(arguments))


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         allow_run: bool = False) -> Any:
    """Decorator marking a function as a tool: ``@tool`` or ``@tool(name=..., allow_run=True)``.

    The function is returned unchanged (still callable as before) with its ``Tool`` in
    ``fn.__nbchat_tool__``; a ``ToolRegistry`` picks that up. ``allow_run`` opts the tool into being
    run when the model calls it.
    """

    def mark(function: Callable) -> Callable:
        function.__nbchat_tool__ = Tool.from_function(  # type: ignore[attr-defined]
            function, name=name, description=description, allow_run=allow_run)
        return function

    return mark(fn) if fn is not None else mark


def function_schema(fn: Callable, *, name: str | None = None, description: str | None = None) -> dict:
    """The OpenAI tool schema of a Python function (see ``Tool.from_function``)."""
    return Tool.from_function(fn, name=name, description=description).to_openai()


# -- running calls ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolResult:
    """The outcome of running one tool call: the value or the error, and ``content``, the string
    the model sees (the value as JSON, a string as is, or ``{"error": "..."}``)."""

    call_id: str
    name: str
    arguments: dict | None
    value: Any
    error: str | None
    content: str

    @property
    def ok(self) -> bool:
        return self.error is None

    def message(self) -> dict:
        """The ``tool`` role message that carries the result back to the model."""
        return {"role": "tool", "tool_call_id": self.call_id, "content": self.content}


def _result_content(value: Any) -> str:
    if isinstance(value, str):
        return value
    from pydantic_core import to_json

    return to_json(value, fallback=repr).decode()


class ToolRegistry:
    """Named tools: their schemas for the request, and the functions the user allowed to run."""

    def __init__(self, tools: Iterable[Any] = ()):
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.add(item)

    def add(self, item: Any, *, name: str | None = None, description: str | None = None,
            allow_run: bool | None = None) -> Tool:
        """Register a function (decorated with ``@tool`` or not), a ``Tool``, or an OpenAI tool dict
        (schema only). ``allow_run`` overrides the tool's own opt-in. A name already there is replaced."""
        if isinstance(item, Tool):
            entry = item
        elif isinstance(item, Mapping):
            entry = Tool.from_openai(item)
        elif getattr(item, "__nbchat_tool__", None) is not None and name is None and description is None:
            entry = item.__nbchat_tool__
        else:
            marked = getattr(item, "__nbchat_tool__", None)
            entry = Tool.from_function(item, name=name, description=description,
                                       allow_run=marked.allow_run if marked else False)
        # A copy: opting in here must not change the Tool on a decorated function or in another registry.
        entry = dataclasses.replace(entry, allow_run=entry.allow_run if allow_run is None else allow_run)
        self._tools[entry.name] = entry
        return entry

    def remove(self, name: str) -> None:
        del self._tools[name]

    def __getitem__(self, name: str) -> Tool:
        return self._tools[name]

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def set_allow_run(self, name: str, allowed: bool = True) -> None:
        """Opt one tool in (or out) of being run when the model calls it."""
        self._tools[name].allow_run = allowed

    def can_run(self, name: str, *, allow_all: bool = False) -> bool:
        """Whether a call to ``name`` would run: a known tool with a function, opted in (or all are)."""
        entry = self._tools.get(name)
        return entry is not None and entry.function is not None and (entry.allow_run or allow_all)

    def schemas(self) -> list[dict]:
        """The OpenAI ``tools`` list of every registered tool."""
        return [entry.to_openai() for entry in self._tools.values()]

    def run(self, call: Mapping[str, Any], *, allow_all: bool = False) -> ToolResult:
        """Run one OpenAI tool call (``{"id", "type", "function": {"name", "arguments"}}``).

        An unknown tool, arguments that are not a JSON object or fail validation, and an exception in
        the function all become an error result for the model. A known tool the user did not allow to
        run (and ``allow_all`` false), or one with no function, raises PermissionError: the caller
        decides what may run (check ``can_run`` first).
        """
        call_id = call.get("id") or new_tool_call_id()
        fn = call.get("function") or {}
        name = fn.get("name", "")

        def failed(message: str, arguments: dict | None = None) -> ToolResult:
            return ToolResult(call_id, name, arguments, None, message, json.dumps({"error": message}))

        entry = self._tools.get(name)
        if entry is None:
            return failed(f"unknown tool {name!r}; the tools are: {', '.join(self._tools) or 'none'}")
        if entry.function is None:
            raise PermissionError(f"tool {name!r} has only a schema, no Python function to run")
        if not self.can_run(name, allow_all=allow_all):
            raise PermissionError(f"tool {name!r} is not allowed to run; allow it with "
                                  f"registry.set_allow_run({name!r}) or @tool(allow_run=True)")
        raw = fn.get("arguments") or "{}"
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except json.JSONDecodeError as exc:
            return failed(f"arguments are not valid JSON: {exc}")
        if not isinstance(arguments, dict):
            return failed(f"arguments must be a JSON object, got {type(arguments).__name__}")
        try:
            value = entry.invoke(arguments)
            content = _result_content(value)
        except Exception as exc:  # the model gets the error and may retry; the cell never crashes
            return failed(f"{type(exc).__name__}: {exc}", arguments)
        return ToolResult(call_id, name, arguments, value, None, content)


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
        """Flush: held-back text becomes content; an unterminated call ends where the text ends."""
        deltas: list[dict] = []
        if self._scanner is not None:
            self._end_call(deltas, truncated=True)
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
        if scanner.name is None:  # never named: not a call; give the block back as text
            raw, self._call_raw = self._call_raw, ""
            self._emit_text(raw + (self._text if truncated else ""), deltas)
            if truncated:
                self._text = ""
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

