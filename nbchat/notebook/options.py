"""What the words of a ``%%chat`` line and of ``%chat set`` mean: the settings, the options, the request.

Holds ``ChatSettings`` (every setting described once, as a trait: type, default, help; the setting
table and ``%chat set`` parsing are read off the traits), the ``%%chat`` options (IPython
``magic_arguments``) and the help they print (the ``%chat`` commands, read off the magic's
``_cmd_*`` docstrings, and the cell grammar), shell-style splitting of a line, the settings a cell's
options set, the notebook variables options name (``--schema VAR``, ``--tools F``) resolved to a
``response_format`` and to a tool, and the chat completion request built from settings (validated
before any model loads). Every mistake is a one-line ``UsageError`` naming the option. Nothing here
loads a model, streams, runs a tool or keeps state.
"""

from __future__ import annotations

import json
import keyword
import re
import sys
import textwrap
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from nbchat.errors import InvalidRequestError
from nbchat.notebook import cells
from nbchat.notebook.render import FORMATS, one_line
from nbchat.notebook.settings import (
    REQUEST_SETTINGS,
    SET_KEYS,
    check_tool_steps,
    decode_escapes,
    suggest,
)
from nbchat.protocol import TOOL_NAME_PATTERN
from nbchat.tools import Tool

TOOL_CHOICE_MODES = ("auto", "required", "none")

_GENERAL_HELP = """\
Settings resolve as: cell option > %chat set (per conversation) > %config ChatMagics.<name>; \
the keys of %chat set KEY=VALUE are {setting_keys}.
--system and a system: block apply to that cell only, except in the cell that starts a conversation,
where they become its system prompt. Re-running a cell replaces the exchange it produced before.
An interrupt (Stop button) ends the reply: the partial text is kept, marked as interrupted.

Structured output: --json asks for a JSON object, --schema VAR for JSON valid for the schema in VAR
(a dict, a JSON-schema string or a pydantic model class). The reply shows as formatted JSON and
--out VAR stores the parsed value (a validated instance for a pydantic class); a reply cut off at
max_tokens is marked and --out stores its text.
Tools: --tools F,G offers the notebook's functions F and G (or nbchat Tools) with the conversation's
tools; %chat tools add|remove F offers / stops offering them in every chat, %chat tools allow|deny F
lets F run in this kernel or not (allow adds F if needed). A call the model makes is shown (name,
arguments, result); it runs in this kernel only when allowed: --run-tools (this cell), %chat tools
allow F, or @nbchat.tool(allow_run=True). A result (or the error a tool raised) goes back to the
model, which answers or calls again, up to --max-tool-steps rounds (default 5). --tool-choice
required|NAME forces the first step to call a tool; later steps are auto. A call that may not run is
shown with how to allow it, and the cell stops. Tools added with %chat tools belong to the
conversation: reset keeps them, --new starts without them.
"""


def commands_of(magics: type) -> dict[str, tuple[str, str]]:
    """``{NAME: (arguments, description)}`` of every ``_cmd_NAME`` method of ``magics`` (and its bases)
    with a docstring, in definition order. The docstring's first line is the command's help:
    ``ARGUMENTS -- description``, or just the description when it takes none."""
    commands: dict[str, tuple[str, str]] = {}
    for klass in reversed(magics.__mro__):
        for attribute, method in vars(klass).items():
            doc = getattr(method, "__doc__", None)
            if attribute.startswith("_cmd_") and callable(method) and doc and doc.strip():
                first_line = doc.strip().splitlines()[0].strip()
                arguments, _, description = first_line.rpartition(" -- ")
                commands[attribute[len("_cmd_"):]] = (arguments, description)
    return commands


def commands_help(commands: dict[str, tuple[str, str]]) -> str:
    """The ``%chat`` commands' help lines (``  NAME ARGUMENTS  description``), under a title."""
    lines = ["%chat commands (each acts on the current conversation; add -c NAME to pick another):"]
    for name, (arguments, description) in commands.items():
        usage = f"{name} {arguments}".strip()
        lines.append(f"  {usage:<23} {description}")
    return "\n".join(lines)


def help_epilog(commands: dict[str, tuple[str, str]]) -> str:
    """The text after the options in ``%chat help``: the commands, the settings and the cell grammar."""
    general = _GENERAL_HELP.format(setting_keys=", ".join(SET_KEYS))
    general = "\n".join(textwrap.fill(line, width=100) if line.startswith("Settings resolve") else line
                        for line in general.split("\n"))
    return commands_help(commands) + "\n\n" + general + "\n" + _cell_grammar_help()


def _cell_grammar_help() -> str:
    doc = cells.__doc__ or ""
    return doc[doc.index("Role headers") :].strip() if "Role headers" in doc else doc


# The %%chat options, in the order the help lists them.
_CELL_ARGUMENTS = (
    argument("-s", "--system", help="System prompt for this cell (or for the conversation it starts)."),
    argument("--new", action="store_true", help="Start a fresh conversation (the old one is discarded)."),
    argument("-c", "--conversation", metavar="NAME", help="Use conversation NAME for this cell."),
    argument("--model", help="Model for this cell: a registry name, a .gguf path, a model directory or "
             "an endpoint URL (NAME@URL for one of its models)."),
    argument("-t", "--temperature", type=float, help="Sampling temperature; 0 = greedy."),
    argument("--top-p", type=float, help="Nucleus sampling: keep the smallest set of tokens with this mass."),
    argument("--top-k", type=int, help="Sample among the K most likely tokens."),
    argument("--max-tokens", type=int, help="Most tokens in the reply."),
    argument(
        "--stop", action="append", metavar="TEXT", help="Stop at TEXT (repeatable; \\n and \\t escapes)."
    ),
    argument("--seed", type=int, help="Sampling seed: the same seed and settings give the same reply."),
    argument("-f", "--format", choices=list(FORMATS), help="Show the reply as markdown, text, code or json."),
    argument("--no-stream", action="store_true", help="Show the reply only once it is complete."),
    argument(
        "--out",
        metavar="VAR",
        help="Store the reply in the variable VAR: its text, or the parsed value with --json/--schema.",
    ),
    argument("--json", action="store_true", help="Reply with a JSON object, shown formatted."),
    argument(
        "--schema",
        metavar="VAR",
        help="Reply with JSON valid for the schema in VAR: a dict, a JSON-schema string or a pydantic "
        "model class (then --out stores a validated instance).",
    ),
    argument(
        "--tools",
        action="append",
        metavar="NAMES",
        help="Offer the notebook's functions (or nbchat Tools) NAMES, comma-separated, to the model, "
        "with the conversation's tools (%%chat tools).",
    ),
    argument(
        "--run-tools",
        action="store_true",
        help="Run every tool the model calls in this cell (else only those allowed with %%chat tools allow).",
    ),
    argument(
        "--tool-choice",
        metavar="MODE",
        help="auto (default), required (must call a tool), none, or a tool NAME; forces the first step only.",
    ),
    argument(
        "--max-tool-steps",
        type=int,
        metavar="N",
        help="Most rounds of running tools and sending results back (default 5; 0 = never run).",
    ),
    argument("--show-prompt", action="store_true", help="Show the templated prompt before the reply."),
    argument(
        "--probs",
        action="store_true",
        help="Show the reply as its tokens shaded by probability, with the alternatives on hover.",
    ),
    argument(
        "--compare",
        metavar="SPEC",
        help='Run the turn once per value and show the replies side by side: "temperature=0,0.7,1.4", '
        '"seed=1,2,3", "top_p=...", "top_k=...", "max_tokens=..." or "model=a,b".',
    ),
    argument(
        "--keep", type=int, metavar="N", help="With --compare: continue with reply N (from 1; default 1)."
    ),
    argument(
        "--step",
        action="store_true",
        help="Step mode: no reply yet; %%chat step [N] adds N tokens, %%chat step --pick K the K-th one.",
    ),
    argument("--no-interpolate", action="store_true", help="Send {name} placeholders as written."),
    argument("-h", "--help", action="store_true", help="Show this help."),
)


def cell_arguments(magic: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator giving a magic the ``%%chat`` options: ``magic.parser`` parses them; the magic's
    docstring becomes the full help once :func:`set_help_epilog` adds the commands (known only when
    the class holding them exists)."""
    # In a decorator stack the one closest to the function applies first: apply the list from its end.
    for declaration in reversed(_CELL_ARGUMENTS):
        magic = declaration(magic)
    return magic_arguments(name="%chat")(magic)  # shown as %%chat in the usage


def set_help_epilog(magic: Callable[..., Any], epilog: str) -> None:
    """Put ``epilog`` after the options in ``magic``'s help (its docstring, as ``magic_arguments``
    builds it)."""
    magic.parser.epilog = epilog  # type: ignore[attr-defined]
    magic.__doc__ = magic.parser.format_help()  # type: ignore[attr-defined]


# --- words and values -----------------------------------------------------------------------------


def split_words(text: str) -> list[str]:
    """Shell-style words (quotes removed, unlike IPython's parse_argstring, which keeps them)."""
    from IPython.utils.process import arg_split

    try:
        return arg_split(text, posix=True, strict=True)
    except ValueError as error:
        raise UsageError(f"cannot parse {text!r}: {error}") from None


def pop_option(
    tokens: list[str], flags: tuple[str, ...], what: str
) -> tuple[str | None, list[str]]:
    """Take ``FLAG VALUE`` / ``--long=VALUE`` (any of ``flags``; the last one given wins) out of a
    command's tokens; a flag without its value is a UsageError saying the flag needs ``what``."""
    rest: list[str] = []
    value: str | None = None
    long_forms = tuple(f"{flag}=" for flag in flags if flag.startswith("--"))
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in flags:
            if index + 1 >= len(tokens):
                raise UsageError(f"{token} needs {what}")
            value = tokens[index + 1]
            index += 2
            continue
        if token.startswith(long_forms):
            value = token.partition("=")[2]
        else:
            rest.append(token)
        index += 1
    return value, rest


def pop_conversation_option(tokens: list[str]) -> tuple[str | None, list[str]]:
    """Take ``-c NAME`` / ``--conversation NAME`` / ``--conversation=NAME`` out of a command's tokens."""
    return pop_option(tokens, ("-c", "--conversation"), "a conversation name")


def split_names(values: Iterable[str]) -> list[str]:
    """``["f,g", "h"]`` -> ``["f", "g", "h"]`` (commas or spaces between names; repeats dropped)."""
    names: list[str] = []
    for value in values:
        for name in re.split(r"[,\s]+", value.strip()):
            if name and name not in names:
                names.append(name)
    return names


def check_variable_name(name: str) -> None:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"--out {name!r}: not a valid Python variable name")


def _tool_choice(text: str) -> str | dict[str, Any]:
    """``--tool-choice`` as the request's ``tool_choice``: a mode, or a tool's name."""
    if text in TOOL_CHOICE_MODES:
        return text
    return {"type": "function", "function": {"name": text}}


# --- a cell's options -----------------------------------------------------------------------------


def cell_options(args: Any, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a cell's parsed options set (only those given), keyed like :data:`SETTINGS`, plus
    the request's ``response_format`` / ``tools`` / ``tool_choice`` and ``run_tools``."""
    options: dict[str, Any] = {}
    for key in ("model", "temperature", "top_p", "top_k", "max_tokens", "seed", "format"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    if args.stop:
        options["stop"] = [decode_escapes(stop) for stop in args.stop]
    if args.no_stream:
        options["stream"] = False
    if args.no_interpolate:
        options["interpolate"] = False
    if args.json and args.schema:
        raise UsageError("--json and --schema both ask for JSON; keep one (--schema also sets its shape)")
    if args.json:
        options["response_format"] = {"type": "json_object"}
    if args.schema:
        options["response_format"] = schema_format(args.schema, namespace)
    if "response_format" in options and args.format is None:
        options["format"] = "json"
    if args.tools:
        options["tools"] = split_names(args.tools)
        for tool_name in options["tools"]:
            tool_from_namespace(tool_name, "--tools", namespace)  # fail now, not after the model loads
    if args.run_tools:
        options["run_tools"] = True
    if args.tool_choice:
        options["tool_choice"] = _tool_choice(args.tool_choice)
    if args.max_tool_steps is not None:
        options["max_tool_steps"] = check_tool_steps(args.max_tool_steps, "--max-tool-steps")
    return options


def check_view_options(args: Any) -> None:
    """The teaching-view options of a cell go together only in ways that mean something."""
    if args.compare is not None and args.step:
        raise UsageError("--compare and --step are two ways to run a turn: keep one of them")
    if args.probs and (args.compare is not None or args.step):
        raise UsageError("--probs shows one reply's tokens; --compare and --step show their own views")
    if args.keep is not None and args.compare is None:
        raise UsageError("--keep N chooses among the replies of --compare; add --compare KEY=V1,V2,...")


def pydantic_model_class(value: Any) -> type | None:
    """``value`` when it is a pydantic model class (pydantic is only looked at if already imported)."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, type) and issubclass(value, pydantic.BaseModel):
        return value
    return None


def _describe(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__}"
    return f"a value of type {type(value).__name__}"


def _schema_name(name: str) -> str:
    """A name OpenAI's json_schema accepts (``TOOL_NAME_PATTERN``) from a variable or class name."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64] or "schema"


def schema_format(variable: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """``--schema VAR`` as a json_schema response_format (strict), from a dict, a JSON string or a
    pydantic model class in the user namespace."""
    expected = "a dict, a JSON-schema string or a pydantic model class"
    if variable not in namespace:
        names = [name for name in namespace if not name.startswith("_")]
        raise UsageError(
            f"--schema {variable!r}: no variable named {variable!r}{suggest(variable, names)}; "
            f"define it as {expected}"
        )
    value = namespace[variable]
    name = variable
    model_class = pydantic_model_class(value)
    if model_class is not None:
        schema, name = model_class.model_json_schema(), model_class.__name__
    elif isinstance(value, str):
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as error:
            raise UsageError(
                f"--schema {variable!r}: the string is not JSON ({error.msg} at line {error.lineno} "
                f"column {error.colno})"
            ) from None
    elif isinstance(value, dict):
        schema = value
    else:
        raise UsageError(f"--schema {variable!r}: expected {expected}, not {_describe(value)}")
    if not isinstance(schema, dict):
        raise UsageError(
            f'--schema {variable!r}: a JSON schema is an object like {{"type": "object", ...}}, '
            f"not a {type(schema).__name__}"
        )
    try:
        schema = json.loads(json.dumps(schema))
    except (TypeError, ValueError) as error:
        raise UsageError(f"--schema {variable!r}: the schema is not JSON data ({error})") from None
    json_schema = {"name": _schema_name(name), "schema": schema, "strict": True}
    return {"type": "json_schema", "json_schema": json_schema}


def tool_from_namespace(name: str, where: str, namespace: Mapping[str, Any]) -> Tool:
    """The tool for the notebook variable ``name``: an nbchat Tool, a function marked with
    ``@tool``, or any function (its schema built from its signature and docstring)."""
    if name not in namespace:
        functions = [key for key, item in namespace.items() if callable(item) and not key.startswith("_")]
        raise UsageError(f"{where}: no function named {name!r} in the notebook{suggest(name, functions)}")
    value = namespace[name]
    if isinstance(value, Tool):
        return value
    marked = getattr(value, "__nbchat_tool__", None)
    if isinstance(marked, Tool):
        return marked
    if not callable(value) or isinstance(value, type):
        raise UsageError(f"{where}: {name!r} is {_describe(value)}, not a function")
    own_name = getattr(value, "__name__", "")
    tool_name = own_name if re.fullmatch(TOOL_NAME_PATTERN, own_name) else name
    try:
        return Tool.from_function(value, name=tool_name)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{where}: {name!r} cannot be a tool: {one_line(error)}") from None


# --- the request ----------------------------------------------------------------------------------


def build_request(
    messages: list[dict[str, Any]],
    settings: Mapping[str, Any],
    *,
    tools: list[dict[str, Any]] | None = None,
    tool_choice: Any = None,
) -> dict[str, Any]:
    """The streamed chat completion request for ``messages`` (validated by the engine, or before the
    model loads by :func:`check_request`)."""
    request: dict[str, Any] = {
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for key in REQUEST_SETTINGS:
        value = settings.get(key)
        if value is not None and value != []:
            request[key] = value
    if settings.get("response_format"):
        request["response_format"] = settings["response_format"]
    if tools:
        request["tools"] = tools
    if tool_choice is not None:
        request["tool_choice"] = tool_choice
    return request


def check_request(request: dict[str, Any]) -> dict[str, Any]:
    """``request``, validated now (before any model loads); a mistake is a one-line UsageError."""
    from nbchat.protocol.requests import validate_request

    try:
        validate_request(request)
    except InvalidRequestError as error:
        raise UsageError(str(error)) from None
    return request
