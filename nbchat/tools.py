"""Python callables as tools: OpenAI tool schemas from signatures and docstrings, a registry of the
tools the user may let run, and running a call into a ``tool`` message.

Must not: know a model's tool-call syntax (``nbchat.chat_format``), validate requests
(``nbchat.protocol``) or hold model or engine code.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from nbchat.protocol import TOOL_NAME_PATTERN
from nbchat.protocol.deltas import new_tool_call_id

_TOOL_NAME = re.compile(TOOL_NAME_PATTERN)


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


def _schema_without_titles(adapter: Any) -> dict:
    """The adapter's JSON schema without the titles pydantic derives from field and class names
    (they cost prompt tokens and tell the model nothing); a title the code sets itself stays."""
    from pydantic.json_schema import GenerateJsonSchema

    class WithoutDerivedTitles(GenerateJsonSchema):
        def field_title_should_be_set(self, schema: Any) -> bool:
            return False

        def generate_inner(self, schema: Any) -> Any:
            generated = super().generate_inner(schema)
            name = getattr(schema.get("cls"), "__name__", None) if isinstance(schema, dict) else None
            if name is not None:  # a class (model, dataclass, enum): its title is its name
                ref = generated.get("$ref", "") if isinstance(generated, dict) else ""
                target = self.definitions.get(ref.rpartition("/")[2], generated) if ref else generated
                if isinstance(target, dict) and target.get("title") == name:
                    del target["title"]
            return generated

    return adapter.json_schema(schema_generator=WithoutDerivedTitles)


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
        if not _TOOL_NAME.match(name):
            raise ValueError(f"tool name {name!r} must match {TOOL_NAME_PATTERN}; pass name=...")
        summary, param_docs = parse_docstring(inspect.getdoc(fn))
        try:
            adapter = _argument_adapter(fn)
            parameters = _schema_without_titles(adapter)
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
