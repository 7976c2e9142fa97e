"""The ``%%chat`` cell magic and ``%chat`` commands: ``ChatMagics`` and the extension hooks.

``%load_ext nbchat`` registers them and nothing else: no JAX import, no model. The model loads on the
first chat (``nbchat.api.Engine``, one shared instance per model name and dtype) with the loader's
progress bars and a one-line summary. Settings are traitlets traits tagged ``config=True`` (so
``%config ChatMagics.temperature = 0.2`` and ``ipython_config.py`` work), overridden per
conversation by ``%chat set`` and per cell by options. Every error a user can cause is shown as one
``UsageError`` line and leaves the conversation unchanged.

Structured output and tools: ``--json`` / ``--schema VAR`` become the request's ``response_format``
and the reply's value is the parsed JSON. ``--tools`` and the conversation's registry (``%chat tools``)
become ``tools``; when the model calls one, the call is shown and, only if the user allowed that tool
to run, the function runs in the kernel and its result goes back to the model, round after round,
until a text answer or the step limit (:meth:`ChatMagics._generate`). The API request is built in one
place (:meth:`ChatMagics._request`); reply formats are the table ``render.FORMATS``.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, kwds, magic_arguments
from traitlets import Bool, Enum, Float, Int, List, Unicode

from nbchat.conversation import Conversation, ConversationError, Turn
from nbchat.errors import InvalidRequestError, NbchatError
from nbchat.models import DEFAULT_MODEL
from nbchat.notebook import cells, render
from nbchat.notebook.cells import CellSyntaxError, interpolate, parse_cell
from nbchat.notebook.render import FORMATS, ReplyView, ToolCallView, supports_live_updates
from nbchat.tools import Tool, ToolRegistry, new_tool_call_id

DEFAULT_CONVERSATION = "default"

# Request fields a setting maps to one-to-one (None = not sent: the engine's default applies).
REQUEST_SETTINGS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed")
# Every setting `%chat set` accepts and a cell option can override, in display order.
SETTINGS = ("model", *REQUEST_SETTINGS, "format", "stream", "interpolate", "max_tool_steps")
TOOL_CHOICE_MODES = ("auto", "required", "none")

# Engines loaded in this process, by (model, dtype): loading is slow, so every conversation, every
# re-load of the extension and every surface in the kernel shares one.
_ENGINES: dict[tuple[str, str | None], Any] = {}

COMMANDS_HELP = """\
%chat commands (each acts on the current conversation; add -c NAME to pick another):
  history                 show the conversation so far
  reset                   forget every exchange (system prompt and settings stay)
  undo                    drop the last exchange
  retry [options]         regenerate the last reply (options as for %%chat, e.g. --seed 3)
  model [NAME]            show the default model, or make NAME the default and load it
  models                  models in the registry, in the cache and loaded in this kernel
  set KEY=VALUE ...       make a setting the conversation's default (VALUE none removes it); keys:
{setting_keys}
  settings                every setting, its value and where it comes from
  system [-c NAME] [TEXT] show or set the conversation's system prompt
  tools                   the conversation's tools (Python functions the model may call)
  tools add|remove F ...  offer / stop offering the notebook's functions F ... in every chat
  tools allow|deny F ...  let F run in this kernel when the model calls it (allow adds F if needed)
  prompt                  the exact templated prompt of the last reply and its token count
  save FILE / load FILE   write / read the conversation as JSON
  conversations           list the conversations
  help                    this text

Settings resolve as: cell option > %chat set (per conversation) > %config ChatMagics.<name>.
--system and a system: block apply to that cell only, except in the cell that starts a conversation,
where they become its system prompt. Re-running a cell replaces the exchange it produced before.
An interrupt (Stop button) ends the reply: the partial text is kept, marked as interrupted.

Structured output: --json asks for a JSON object, --schema VAR for JSON valid for the schema in VAR
(a dict, a JSON-schema string or a pydantic model class). The reply shows as formatted JSON and
--out VAR stores the parsed value (a validated instance for a pydantic class); a reply cut off at
max_tokens is marked and --out stores its text.
Tools: --tools F,G offers the notebook's functions F and G (or nbchat Tools) with the conversation's
tools. A call the model makes is shown (name, arguments, result); it runs in this kernel only when
allowed: --run-tools (this cell), %chat tools allow F, or @nbchat.tool(allow_run=True). A result
(or the error a tool raised) goes back to the model, which answers or calls again, up to
--max-tool-steps rounds (default 5). --tool-choice required|NAME forces the first step to call a
tool; later steps are auto. A call that may not run is shown with how to allow it, and the cell stops.
Tools added with %chat tools belong to the conversation: reset keeps them, --new starts without them.
"""


def _cell_grammar_help() -> str:
    doc = cells.__doc__ or ""
    return doc[doc.index("Role headers") :].strip() if "Role headers" in doc else doc


_SETTING_KEYS = textwrap.fill(
    ", ".join((*SETTINGS, "system", "conversation")),
    width=100,
    initial_indent=" " * 26,
    subsequent_indent=" " * 26,
)
HELP_EPILOG = COMMANDS_HELP.format(setting_keys=_SETTING_KEYS) + "\n" + _cell_grammar_help()


@dataclass(repr=False)
class ChatReply:
    """The result of a ``%%chat`` cell: the reply text, the full message list and the token usage.

    ``value`` is what ``--out`` stores: the parsed JSON of a ``--json`` / ``--schema`` reply (an
    instance of the pydantic class given to ``--schema``), else the text -- also when the JSON is
    incomplete. ``tool_calls`` are the calls the model made in this exchange (OpenAI dicts); their
    results are among ``messages``. ``usage`` adds up every request of the exchange.

    Its repr is a one-line summary, so the cell's ``Out`` does not print the streamed reply again.
    """

    text: str
    messages: list[dict[str, Any]]
    usage: dict[str, Any] | None
    finish_reason: str | None
    interrupted: bool
    model: str
    conversation: str
    turn: int
    settings: dict[str, Any] = field(default_factory=dict)
    value: Any = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        tokens = (self.usage or {}).get("completion_tokens")
        parts = [f"conversation={self.conversation!r}", f"turn={self.turn}"]
        if tokens is not None:
            parts.append(f"{tokens} tokens")
        if self.tool_calls:
            count = len(self.tool_calls)
            parts.append(f"{count} tool call{'' if count == 1 else 's'}")
        parts.append("interrupted" if self.interrupted else f"finish_reason={self.finish_reason!r}")
        return f"ChatReply({', '.join(parts)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))


@dataclass
class _StreamOutcome:
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    interrupted: bool = False
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI tool calls, by index


def _add_usage(total: dict[str, Any] | None, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Token usage of an exchange of several requests: every count added up."""
    if usage is None:
        return total
    if total is None:
        return dict(usage)
    return {key: total.get(key, 0) + value for key, value in usage.items() if isinstance(value, int)}


def _tool_specs(registry: ToolRegistry) -> list[dict[str, Any]] | None:
    """The request's ``tools``: a Python function's schema is strict (no argument it does not take),
    so the grammar keeps a small model from adding arguments the call would then reject."""
    specs = []
    for tool in registry:
        spec = tool.to_openai()
        if tool.function is not None:
            spec["function"]["strict"] = True
        specs.append(spec)
    return specs or None


def _gather_tool_call(calls: list[dict[str, Any]], delta: Any) -> None:
    """Add one streamed tool-call delta to ``calls`` (OpenAI dicts, by index): the first delta of a
    call carries its id and name, later ones pieces of the arguments."""
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


def _as_dict(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return dict(value)


def _decode_escapes(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in an option value, so ``--stop "\\n\\n"`` means two newlines."""
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def _parse_bool(text: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise UsageError(f"{key} must be true or false, not {text!r}")


def _parse_setting(key: str, text: str) -> Any:
    """The value of ``%chat set KEY=TEXT``, converted to the setting's type (None = remove)."""
    if text.strip().lower() in ("none", "null", "default", ""):
        return None
    try:
        if key in ("temperature", "top_p"):
            return float(text)
        if key in ("top_k", "max_tokens", "seed"):
            return int(text)
        if key == "max_tool_steps":
            return _check_tool_steps(int(text), key)
    except ValueError:
        kind = "a number" if key in ("temperature", "top_p") else "an integer"
        raise UsageError(f"{key} must be {kind}, not {text!r}") from None
    if key == "stop":
        if text.lstrip().startswith("["):
            try:
                stops = json.loads(text)
            except json.JSONDecodeError:
                raise UsageError(f"stop: {text!r} is not a JSON list of strings") from None
            if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
                raise UsageError(f"stop: {text!r} is not a JSON list of strings")
            return stops
        return [_decode_escapes(text)]
    if key == "format":
        if text not in FORMATS:
            raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {text!r}")
        return text
    if key in ("stream", "interpolate"):
        return _parse_bool(text, key)
    return text


def _check_tool_steps(steps: int, name: str) -> int:
    if steps < 0:
        raise UsageError(f"{name} must be 0 or more (0: show tool calls, never run them), not {steps}")
    return steps


def _split_names(values: Iterable[str]) -> list[str]:
    """``["f,g", "h"]`` -> ``["f", "g", "h"]`` (commas or spaces between names; repeats dropped)."""
    names: list[str] = []
    for value in values:
        for name in re.split(r"[,\s]+", value.strip()):
            if name and name not in names:
                names.append(name)
    return names


def _tool_choice(text: str) -> str | dict[str, Any]:
    """``--tool-choice`` as the request's ``tool_choice``: a mode, or a tool's name."""
    if text in TOOL_CHOICE_MODES:
        return text
    return {"type": "function", "function": {"name": text}}


def _after_first_step(choice: Any) -> Any:
    """The tool_choice of the steps after the first: a forced call (required or named) is asked for
    once, then the model may answer in text (else every step would call a tool until the limit)."""
    return "auto" if choice == "required" or isinstance(choice, dict) else choice


def _schema_name(name: str) -> str:
    """A name OpenAI's json_schema accepts (``^[a-zA-Z0-9_-]{1,64}$``) from a variable or class name."""
    return re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64] or "schema"


def _pydantic_model_class(value: Any) -> type | None:
    """``value`` when it is a pydantic model class (pydantic is only looked at if already imported)."""
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(value, type) and issubclass(value, pydantic.BaseModel):
        return value
    return None


def _describe(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__name__}"
    return f"a value of type {type(value).__name__}"


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _warn(message: str) -> None:
    """A warning under the reply (stderr: front ends show it apart from the output)."""
    print(f"Warning: {message}", file=sys.stderr, flush=True)


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_variable_name(name: str) -> None:
    import keyword

    if not name.isidentifier() or keyword.iskeyword(name):
        raise UsageError(f"--out {name!r}: not a valid Python variable name")


def _pop_conversation_option(tokens: list[str]) -> tuple[str | None, list[str]]:
    """Take ``-c NAME`` / ``--conversation NAME`` / ``--conversation=NAME`` out of a command's tokens."""
    rest: list[str] = []
    name: str | None = None
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token in ("-c", "--conversation"):
            if index + 1 >= len(tokens):
                raise UsageError(f"{token} needs a conversation name")
            name = tokens[index + 1]
            index += 2
            continue
        if token.startswith("--conversation="):
            name = token.partition("=")[2]
        else:
            rest.append(token)
        index += 1
    return name, rest


def _split_words(text: str) -> list[str]:
    from IPython.utils.process import arg_split

    try:
        return arg_split(text, posix=True, strict=True)
    except ValueError as error:
        raise UsageError(f"cannot parse {text!r}: {error}") from None


@magics_class
class ChatMagics(Magics):
    """Chat with a local model from notebook cells: ``%%chat`` sends a cell, ``%chat`` manages."""

    model = Unicode(
        DEFAULT_MODEL, help="Model for new chats: a registry name, a .gguf path or a model directory."
    ).tag(config=True)
    dtype = Unicode(
        None, allow_none=True, help="Weight dtype (float32 or bfloat16); None: the engine's default."
    ).tag(config=True)
    system_prompt = Unicode(
        None, allow_none=True, help="System prompt of conversations that set none themselves."
    ).tag(config=True)
    temperature = Float(
        None, allow_none=True, help="Sampling temperature (0 = greedy); None: the engine's default."
    ).tag(config=True)
    top_p = Float(None, allow_none=True, help="Nucleus sampling mass; None: off.").tag(config=True)
    top_k = Int(None, allow_none=True, help="Sample among the k most likely tokens; None: off.").tag(
        config=True
    )
    max_tokens = Int(
        512, allow_none=True, help="Most tokens in one reply; None: up to the context length."
    ).tag(config=True)
    stop = List(Unicode(), help="Strings that end a reply.").tag(config=True)
    seed = Int(
        None, allow_none=True, help="Sampling seed for reproducible replies; None: fresh randomness."
    ).tag(config=True)
    format = Enum(list(FORMATS), default_value="markdown", help="How replies are shown.").tag(config=True)
    stream = Bool(True, help="Show the reply as it is generated.").tag(config=True)
    interpolate = Bool(True, help="Replace {name}, {In[n]}, {Out[n]} in cells with their values.").tag(
        config=True
    )
    max_tool_steps = Int(
        5, help="Most rounds of running tool calls and sending their results back in one exchange."
    ).tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.conversations: dict[str, Conversation] = {
            DEFAULT_CONVERSATION: Conversation(DEFAULT_CONVERSATION)
        }
        self.current = DEFAULT_CONVERSATION
        self._cell_id: str | None = None
        self._keys_this_run: Counter[str] = Counter()

    # --- IPython events ---------------------------------------------------------------------------

    def _before_cell(self, info: Any) -> None:
        """Remember the id the front end sent for the cell about to run (JupyterLab, nbclient)."""
        self._cell_id = getattr(info, "cell_id", None)
        self._keys_this_run.clear()

    def _after_cell(self, result: Any) -> None:
        self._cell_id = None

    def _cell_key(self) -> str:
        """The key of the turn a ``%%chat`` produces: the cell id, or the execution count when the
        front end sends none; a second chat in the same run gets ``#1``, ``#2``..."""
        base = f"cell:{self._cell_id}" if self._cell_id else f"exec:{self.shell.execution_count}"
        occurrence = self._keys_this_run[base]
        self._keys_this_run[base] += 1
        return base if occurrence == 0 else f"{base}#{occurrence}"

    # --- the magic --------------------------------------------------------------------------------

    @magic_arguments(name="%chat")  # shown as %%chat in the usage line
    @kwds(epilog=HELP_EPILOG)
    @argument("-s", "--system", help="System prompt for this cell (or for the conversation it starts).")
    @argument("--new", action="store_true", help="Start a fresh conversation (the old one is discarded).")
    @argument("-c", "--conversation", metavar="NAME", help="Use conversation NAME for this cell.")
    @argument("--model", help="Model for this cell: a registry name, a .gguf path or a model directory.")
    @argument("-t", "--temperature", type=float, help="Sampling temperature; 0 = greedy.")
    @argument("--top-p", type=float, help="Nucleus sampling: keep the smallest set of tokens with this mass.")
    @argument("--top-k", type=int, help="Sample among the K most likely tokens.")
    @argument("--max-tokens", type=int, help="Most tokens in the reply.")
    @argument(
        "--stop", action="append", metavar="TEXT", help="Stop at TEXT (repeatable; \\n and \\t escapes)."
    )
    @argument("--seed", type=int, help="Sampling seed: the same seed and settings give the same reply.")
    @argument("-f", "--format", choices=list(FORMATS), help="Show the reply as markdown, text, code or json.")
    @argument("--no-stream", action="store_true", help="Show the reply only once it is complete.")
    @argument(
        "--out",
        metavar="VAR",
        help="Store the reply in the variable VAR: its text, or the parsed value with --json/--schema.",
    )
    @argument("--json", action="store_true", help="Reply with a JSON object, shown formatted.")
    @argument(
        "--schema",
        metavar="VAR",
        help="Reply with JSON valid for the schema in VAR: a dict, a JSON-schema string or a pydantic "
        "model class (then --out stores a validated instance).",
    )
    @argument(
        "--tools",
        action="append",
        metavar="NAMES",
        help="Offer the notebook's functions (or nbchat Tools) NAMES, comma-separated, to the model, "
        "with the conversation's tools (%%chat tools).",
    )
    @argument(
        "--run-tools",
        action="store_true",
        help="Run every tool the model calls in this cell (else only those allowed with %%chat tools allow).",
    )
    @argument(
        "--tool-choice",
        metavar="MODE",
        help="auto (default), required (must call a tool), none, or a tool NAME; forces the first step only.",
    )
    @argument(
        "--max-tool-steps",
        type=int,
        metavar="N",
        help="Most rounds of running tools and sending results back (default 5; 0 = never run).",
    )
    @argument("--show-prompt", action="store_true", help="Show the templated prompt before the reply.")
    @argument("--no-interpolate", action="store_true", help="Send {name} placeholders as written.")
    @argument("-h", "--help", action="store_true", help="Show this help.")
    @line_cell_magic
    def chat(self, line: str, cell: str | None = None) -> ChatReply | None:
        """Chat with a local language model.

        %%chat [options]  -- the cell is sent to the model (see the grammar below); the reply streams in
        place, and later %%chat cells continue the conversation.
        %chat COMMAND     -- manage conversations and settings (see %chat help).
        """
        if cell is None:
            return self._command(line)
        return self._chat_cell(line, cell)

    # --- %%chat -----------------------------------------------------------------------------------

    def _chat_cell(self, line: str, cell: str) -> ChatReply | None:
        args = self._parse_options(line)
        if args.help:
            print(self.chat.__doc__)
            return None
        name = args.conversation or self.current
        conversation = Conversation(name) if args.new else self._conversation(name)
        if args.out is not None:
            _check_variable_name(args.out)
        try:
            parsed = parse_cell(cell)
        except CellSyntaxError as error:
            raise UsageError(f"%%chat cell, {error}") from None
        if args.system is not None and parsed.system is not None:
            raise UsageError("both --system and a system: block are given; keep one of them")
        options = self._cell_options(args)
        schema_class = _pydantic_model_class(self.shell.user_ns.get(args.schema)) if args.schema else None
        settings = self._settings(conversation, options)
        prompt = parsed.messages
        if settings["interpolate"]:
            namespace = self.shell.user_ns
            prompt = [
                {**message, "content": interpolate(message["content"], namespace)} for message in prompt
            ]

        key = self._cell_key()
        index = conversation.index_of(key)
        index = len(conversation) if index is None else index
        cell_system = args.system if args.system is not None else parsed.system
        turn = Turn(prompt=prompt, key=key, system=cell_system, options=options, model=settings["model"])
        reply = self._generate(
            conversation, index, turn, settings, show_prompt=args.show_prompt, schema_class=schema_class
        )
        if reply is None:
            return None
        if index == 0 and cell_system is not None:
            # The cell that starts a conversation sets its system prompt for the cells that follow.
            conversation.system = cell_system
            turn.system = None
        self.conversations[name] = conversation
        if args.out is not None:
            self.shell.user_ns[args.out] = reply.value
        return reply

    def _parse_options(self, line: str) -> Any:
        # Shell-style words (quotes removed, unlike IPython's parse_argstring, which keeps them).
        return self.chat.parser.parse_args(_split_words(line))  # type: ignore[attr-defined]

    def _cell_options(self, args: Any) -> dict[str, Any]:
        """The settings a cell's options set (only those given), keyed like :data:`SETTINGS`."""
        options: dict[str, Any] = {}
        for key in ("model", "temperature", "top_p", "top_k", "max_tokens", "seed", "format"):
            value = getattr(args, key)
            if value is not None:
                options[key] = value
        if args.stop:
            options["stop"] = [_decode_escapes(stop) for stop in args.stop]
        if args.no_stream:
            options["stream"] = False
        if args.no_interpolate:
            options["interpolate"] = False
        if args.json and args.schema:
            raise UsageError("--json and --schema both ask for JSON; keep one (--schema also sets its shape)")
        if args.json:
            options["response_format"] = {"type": "json_object"}
        if args.schema:
            options["response_format"] = self._schema_format(args.schema)
        if "response_format" in options and args.format is None:
            options["format"] = "json"
        if args.tools:
            options["tools"] = _split_names(args.tools)
            for tool_name in options["tools"]:
                self._tool_from_namespace(tool_name, "--tools")  # fail now, not after the model loads
        if args.run_tools:
            options["run_tools"] = True
        if args.tool_choice:
            options["tool_choice"] = _tool_choice(args.tool_choice)
        if args.max_tool_steps is not None:
            options["max_tool_steps"] = _check_tool_steps(args.max_tool_steps, "--max-tool-steps")
        return options

    def _schema_format(self, variable: str) -> dict[str, Any]:
        """``--schema VAR`` as a json_schema response_format (strict), from a dict, a JSON string or a
        pydantic model class in the user namespace."""
        namespace = self.shell.user_ns
        expected = "a dict, a JSON-schema string or a pydantic model class"
        if variable not in namespace:
            names = [name for name in namespace if not name.startswith("_")]
            raise UsageError(
                f"--schema {variable!r}: no variable named {variable!r}{_suggest(variable, names)}; "
                f"define it as {expected}"
            )
        value = namespace[variable]
        name = variable
        model_class = _pydantic_model_class(value)
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
                f"--schema {variable!r}: a JSON schema is an object like {{\"type\": \"object\", ...}}, "
                f"not a {type(schema).__name__}"
            )
        try:
            schema = json.loads(json.dumps(schema))
        except (TypeError, ValueError) as error:
            raise UsageError(f"--schema {variable!r}: the schema is not JSON data ({error})") from None
        json_schema = {"name": _schema_name(name), "schema": schema, "strict": True}
        return {"type": "json_schema", "json_schema": json_schema}

    def _tool_from_namespace(self, name: str, where: str) -> Tool:
        """The tool for the notebook variable ``name``: an nbchat Tool, a function marked with
        ``@tool``, or any function (its schema built from its signature and docstring)."""
        namespace = self.shell.user_ns
        if name not in namespace:
            functions = [key for key, item in namespace.items() if callable(item) and not key.startswith("_")]
            suggestion = _suggest(name, functions)
            raise UsageError(f"{where}: no function named {name!r} in the notebook{suggestion}")
        value = namespace[name]
        if isinstance(value, Tool):
            return value
        marked = getattr(value, "__nbchat_tool__", None)
        if isinstance(marked, Tool):
            return marked
        if not callable(value) or isinstance(value, type):
            raise UsageError(f"{where}: {name!r} is {_describe(value)}, not a function")
        own_name = getattr(value, "__name__", "")
        tool_name = own_name if re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", own_name) else name
        try:
            return Tool.from_function(value, name=tool_name)
        except (TypeError, ValueError) as error:
            raise UsageError(f"{where}: {name!r} cannot be a tool: {_one_line(error)}") from None

    def _tools_for(self, conversation: Conversation, names: Iterable[str]) -> ToolRegistry:
        """The tools one request offers: the conversation's, then the cell's ``--tools`` (which win on
        a name both have). A copy: allowing a tool for one cell changes nothing else."""
        registry = ToolRegistry(conversation.tools)
        for name in names:
            tool = self._tool_from_namespace(name, "--tools")
            allowed_before = tool.name in registry and registry[tool.name].allow_run
            registry.add(tool, allow_run=tool.allow_run or allowed_before)
        return registry

    def _settings(self, conversation: Conversation, options: dict[str, Any]) -> dict[str, Any]:
        """Every setting's value for one request: cell option > conversation > configured trait."""
        settings = {key: getattr(self, key) for key in SETTINGS}
        settings.update({key: value for key, value in conversation.settings.items() if key in SETTINGS})
        settings.update(options)
        settings["stop"] = list(settings["stop"] or [])
        return settings

    def _setting_sources(self, conversation: Conversation) -> dict[str, str]:
        """Where each setting's value comes from: the conversation, %config, or the built-in default."""
        defaults = self.trait_defaults(*SETTINGS)
        return {
            key: "conversation"
            if key in conversation.settings
            else ("default" if getattr(self, key) == defaults[key] else "config")
            for key in SETTINGS
        }

    def _conversation(self, name: str | None) -> Conversation:
        name = name or self.current
        if name not in self.conversations:
            known = ", ".join(sorted(self.conversations))
            raise UsageError(
                f"no conversation named {name!r}{_suggest(name, self.conversations)}; known: {known}. "
                f"Start one with %%chat --new -c {name}"
            )
        return self.conversations[name]

    # --- generation -------------------------------------------------------------------------------

    def _request(
        self,
        messages: list[dict[str, Any]],
        settings: dict[str, Any],
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
    ) -> dict[str, Any]:
        """The chat completion request for ``messages``, validated before any model loads."""
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
        from nbchat.protocol import validate_request

        try:
            validate_request(request)
        except InvalidRequestError as error:
            raise UsageError(str(error)) from None
        return request

    def _generate(
        self,
        conversation: Conversation,
        index: int,
        turn: Turn,
        settings: dict[str, Any],
        *,
        show_prompt: bool,
        schema_class: type | None = None,
    ) -> ChatReply | None:
        """Generate ``turn``'s reply at position ``index``, showing it as it streams; store the turn.

        When the model calls tools, each step's calls are shown, the allowed ones run
        (:meth:`_run_tool_calls`) and the model gets their results in the next request, until it
        answers in text, a call may not run, or ``max_tool_steps`` rounds ran. The first request, and
        the tool_choice later steps use, are checked before the model loads. Returns None
        (conversation unchanged) when interrupted before the first token.
        """
        messages = conversation.request_messages(index, turn, default_system=self.system_prompt)
        registry = self._tools_for(conversation, settings.get("tools") or [])
        tools = _tool_specs(registry)
        tool_choice = settings.get("tool_choice")
        request = self._request(messages, settings, tools=tools, tool_choice=tool_choice)
        if tools and tool_choice != _after_first_step(tool_choice):
            self._request(messages, settings, tools=tools, tool_choice=_after_first_step(tool_choice))
        engine = self._engine(settings["model"])
        if show_prompt:
            self._show_prompt(engine, messages, tools=tools)
        view = ReplyView(
            format=settings["format"], live=supports_live_updates(self.shell), stream=settings["stream"]
        )
        metadata: dict[str, Any] = {
            "model": settings["model"],
            "conversation": conversation.name,
            "turn": index,
            "settings": {
                key: value
                for key, value in request.items()
                if key in (*REQUEST_SETTINGS, "response_format", "tool_choice")
            },
        }
        if tools:
            metadata["tools"] = registry.names
        view.start({"nbchat": metadata})
        reply: list[dict[str, Any]] = []
        calls_made: list[dict[str, Any]] = []
        usage: dict[str, Any] | None = None
        steps = 0
        outcome = _StreamOutcome()
        while True:
            try:
                outcome = self._stream_reply(engine, request, view)
            except NbchatError as error:
                if not reply:
                    view.discard()
                    raise UsageError(str(error)) from None
                # A later step failed (a long tool result can overflow the context): keep what happened.
                _warn(f"the exchange stopped after {steps} tool step(s): {error}")
                break
            usage = _add_usage(usage, outcome.usage)
            if outcome.interrupted and not outcome.text and not outcome.tool_calls and not reply:
                view.finish(interrupted=True, metadata={"nbchat": {**metadata, "interrupted": True}})
                print("Interrupted before the model replied; the conversation is unchanged.")
                return None
            message: dict[str, Any] = {"role": "assistant", "content": outcome.text}
            if outcome.tool_calls:
                message["content"] = outcome.text or None
                message["tool_calls"] = outcome.tool_calls
            reply.append(message)
            if not outcome.tool_calls:
                break
            calls_made += outcome.tool_calls
            results, go_on = self._run_tool_calls(
                registry,
                outcome,
                view.end_step(),
                view,
                allow_all=bool(settings.get("run_tools")),
                steps_left=settings["max_tool_steps"] - steps,
            )
            reply += results
            if not go_on:
                break
            steps += 1
            try:
                request = self._request(
                    messages + reply, settings, tools=tools, tool_choice=_after_first_step(tool_choice)
                )
            except UsageError as error:
                _warn(f"the exchange stopped after {steps} tool step(s): {error}")
                break
        interrupted = outcome.interrupted
        structured = bool(settings.get("response_format"))
        truncated = outcome.finish_reason == "length"
        metadata.update(finish_reason=outcome.finish_reason, usage=usage, interrupted=interrupted)
        if tools:
            metadata["tool_steps"] = steps
        view.finish(interrupted=outcome.interrupted, truncated=truncated, metadata={"nbchat": metadata})
        turn.reply = reply
        turn.interrupted = interrupted
        turn.finish_reason = outcome.finish_reason
        turn.usage = usage
        turn.model = settings["model"]
        conversation.put(turn, index)
        text = turn.reply_text
        value: Any = text
        if structured and not outcome.tool_calls:
            value = self._structured_value(text, outcome, settings, schema_class)
        if settings["format"] == "code" and not interrupted:
            code, _ = render.extract_code(text)
            if code.strip():
                self.shell.set_next_input(code)
        return ChatReply(
            text=text,
            messages=[*messages, *reply],
            usage=usage,
            finish_reason=outcome.finish_reason,
            interrupted=interrupted,
            model=settings["model"],
            conversation=conversation.name,
            turn=index,
            settings=dict(metadata["settings"]),
            value=value,
            tool_calls=calls_made,
        )

    def _structured_value(
        self, text: str, outcome: _StreamOutcome, settings: dict[str, Any], schema_class: type | None
    ) -> Any:
        """The parsed JSON of a structured reply (validated with ``schema_class`` when given); the
        text, with a warning, when the reply is not complete JSON."""
        if outcome.interrupted or outcome.finish_reason == "length":
            limit = settings["max_tokens"]
            why = "was interrupted" if outcome.interrupted else f"was cut off at max_tokens={limit}"
            _warn(f"the reply {why}, so it is not complete JSON; its value (and --out) is the text.")
            return text
        complete, value = render.parse_json(text)
        if not complete:
            _warn("the reply is not valid JSON; its value (and --out) is the text.")
            return text
        if schema_class is None:
            return value
        try:
            return schema_class.model_validate(value)
        except Exception as error:  # pydantic's ValidationError (the grammar checked only the schema)
            _warn(
                f"the JSON does not validate as {schema_class.__name__} ({_one_line(error)}); "
                "its value (and --out) is the parsed JSON."
            )
            return value

    def _run_tool_calls(
        self,
        registry: ToolRegistry,
        outcome: _StreamOutcome,
        views: list[ToolCallView],
        view: ReplyView,
        *,
        allow_all: bool,
        steps_left: int,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Run one step's tool calls where allowed; returns the ``tool`` messages (one per call) and
        whether the model should get them (False: stop here).

        A call runs only when its tool may run (``allow_all`` or the tool's opt-in). A call that does
        not run is shown with the reason and answered with an ``{"error": "not run: ..."}`` message,
        so the stored exchange stays a valid conversation; the exchange then stops, except for a
        call cut off by max_tokens after complete ones that ran. An exception in a tool becomes an
        error result the model sees; an interrupt while a tool runs stops the exchange.
        """
        stop_reason = None
        if outcome.interrupted:
            stop_reason = "the reply was interrupted while the call was written"
        elif steps_left <= 0:
            stop_reason = "the step limit was reached (raise --max-tool-steps)"
        results: list[dict[str, Any]] = []
        go_on, ran_any = stop_reason is None, False
        for call, shown in zip(outcome.tool_calls, views, strict=True):
            name = call["function"]["name"]
            why_not = stop_reason
            _, arguments = render.parse_json(call["function"]["arguments"])
            if why_not is None and outcome.finish_reason == "length" and not isinstance(arguments, dict):
                why_not = "the call was cut off at max_tokens (raise --max-tokens)"
            elif why_not is None and name in registry and not registry.can_run(name, allow_all=allow_all):
                if registry[name].function is None:
                    why_not = f"the tool {name!r} has no Python function"
                else:
                    why_not = f"the tool {name!r} is not allowed to run"
                    shown.note = (
                        f"{name} was not run: allow it with `%chat tools allow {name}`, "
                        "or re-run the cell with `--run-tools`."
                    )
                go_on = False
            if why_not is not None:
                content = json.dumps({"error": f"{render.NOT_RUN_PREFIX}{why_not}"})
                shown.state, shown.result = "not run", content
                shown.note = shown.note or f"Not run: {why_not}."
                results.append({"role": "tool", "tool_call_id": call["id"], "content": content})
                view.show_call(shown)
                continue
            shown.state = "running"
            view.show_call(shown)
            try:
                result = registry.run(call, allow_all=allow_all)
            except KeyboardInterrupt:
                outcome.interrupted = True
                stop_reason, go_on = "the user interrupted the tool", False
                content = json.dumps({"error": "interrupted by the user"})
                shown.state, shown.result = "error", content
                results.append({"role": "tool", "tool_call_id": call["id"], "content": content})
                view.show_call(shown)
                continue
            shown.state, shown.result = ("ran" if result.ok else "error"), result.content
            results.append(result.message())
            view.show_call(shown)
            ran_any = True
        return results, go_on and ran_any

    def _open_stream(self, engine: Any, request: dict[str, Any]) -> Iterable[Any]:
        """Start a streamed chat completion (one place, so tools and tests can wrap the stream)."""
        return engine.chat.completions.create(**request)

    def _stream_reply(self, engine: Any, request: dict[str, Any], view: ReplyView) -> _StreamOutcome:
        """Consume one stream into ``view``: text deltas and tool-call deltas (gathered by index). A
        KeyboardInterrupt ends it and keeps what arrived; an NbchatError propagates."""
        outcome = _StreamOutcome()
        stream = None
        try:
            stream = self._open_stream(engine, request)
            for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    outcome.usage = _as_dict(chunk.usage)
                for choice in chunk.choices:
                    if choice.delta.content:
                        outcome.text += choice.delta.content
                        view.append(choice.delta.content)
                    for delta in choice.delta.tool_calls or ():
                        _gather_tool_call(outcome.tool_calls, delta)
                        function = delta.function
                        view.tool_call_delta(
                            delta.index,
                            name=function.name if function else None,
                            arguments=(function.arguments or "") if function else "",
                        )
                    if choice.finish_reason is not None:
                        outcome.finish_reason = choice.finish_reason
        except KeyboardInterrupt:
            outcome.interrupted = True
        except NbchatError:
            raise
        except Exception:
            view.discard()
            raise
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        return outcome

    def _engine(self, model: str) -> Any:
        """The shared engine for ``model``. On first use: load it (the loader shows progress bars),
        compile it with a two-token warm-up reply, and print a one-line summary."""
        key = (model, self.dtype)
        if key in _ENGINES:
            return _ENGINES[key]
        print(f"Loading {model} (first use in this kernel)...", flush=True)
        started = time.perf_counter()
        from nbchat.api import Engine

        options = {"dtype": self.dtype} if self.dtype else {}
        try:
            engine = Engine(model=model, **options).load()
        except (NbchatError, OSError) as error:
            raise UsageError(f"cannot load model {model!r}: {error}") from None
        _ENGINES[key] = engine
        loaded = time.perf_counter()
        print("Compiling (first use only)...", flush=True)
        # Through the public API, so the programs a short chat needs are the ones compiled.
        warm_up = engine.chat.completions.create(
            messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0.0, stream=True
        )
        with warm_up:
            for _ in warm_up:
                pass
        done = time.perf_counter()
        timing = (
            f"in {done - started:.1f} s (weights {loaded - started:.1f} s, compile {done - loaded:.1f} s)"
        )
        print(f"Loaded {_engine_summary(engine)} {timing}", flush=True)
        return engine

    def _show_prompt(
        self, engine: Any, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None
    ) -> None:
        try:
            text, ids = engine.render_prompt(messages, tools=tools)
        except NbchatError as error:
            raise UsageError(str(error)) from None
        count = f"{len(ids)} tokens"
        render.show(f"{render.fence(text, 'text')}\n\n*{count}*", f"{text}\n[{count}]")

    # --- %chat commands ---------------------------------------------------------------------------

    COMMANDS: dict[str, str] = {
        "history": "_cmd_history",
        "reset": "_cmd_reset",
        "undo": "_cmd_undo",
        "retry": "_cmd_retry",
        "model": "_cmd_model",
        "models": "_cmd_models",
        "set": "_cmd_set",
        "settings": "_cmd_settings",
        "system": "_cmd_system",
        "prompt": "_cmd_prompt",
        "save": "_cmd_save",
        "load": "_cmd_load",
        "conversations": "_cmd_conversations",
        "tools": "_cmd_tools",
        "help": "_cmd_help",
    }

    def _command(self, line: str) -> Any:
        words = line.strip().split(None, 1)
        if not words:
            return self._cmd_help("")
        command, rest = words[0], (words[1] if len(words) > 1 else "")
        if command in ("-h", "--help"):
            command = "help"
        if command not in self.COMMANDS:
            raise UsageError(
                f"unknown %chat command {command!r}{_suggest(command, self.COMMANDS)}; "
                f"commands: {', '.join(self.COMMANDS)}. Use %%chat (two %) to send a message."
            )
        try:
            return getattr(self, self.COMMANDS[command])(rest)
        except (ConversationError, InvalidRequestError) as error:
            raise UsageError(str(error)) from None

    def _target(self, rest: str) -> tuple[Conversation, list[str]]:
        name, words = _pop_conversation_option(_split_words(rest))
        return self._conversation(name), words

    def _no_arguments(self, command: str, words: list[str]) -> None:
        if words:
            raise UsageError(f"%chat {command} takes no arguments (got {' '.join(words)!r})")

    def _cmd_help(self, rest: str) -> None:
        print(self.chat.__doc__)

    def _cmd_history(self, rest: str) -> None:
        conversation, words = self._target(rest)
        self._no_arguments("history", words)
        messages = conversation.messages(default_system=self.system_prompt)
        if not conversation.turns:
            print(f"Conversation {conversation.name!r} is empty.")
            return
        interrupted = set()
        position = len(messages) - sum(len(turn.messages) for turn in conversation.turns)
        for turn in conversation.turns:
            position += len(turn.messages)
            if turn.interrupted:
                interrupted.add(position - 1)
        markdown, text = render.transcript(messages, interrupted)
        render.show(
            markdown, text, {"nbchat": {"conversation": conversation.name, "turns": len(conversation)}}
        )

    def _cmd_reset(self, rest: str) -> None:
        conversation, words = self._target(rest)
        self._no_arguments("reset", words)
        count = len(conversation)
        conversation.reset()
        print(f"Conversation {conversation.name!r} reset ({count} exchanges forgotten).")

    def _cmd_undo(self, rest: str) -> None:
        conversation, words = self._target(rest)
        self._no_arguments("undo", words)
        turn = conversation.undo()
        question = turn.prompt[-1]["content"] if turn.prompt else ""
        preview = question if len(question) <= 40 else question[:39] + "…"
        print(f"Removed the last exchange of {conversation.name!r} ({preview!r}); {len(conversation)} left.")

    def _cmd_retry(self, rest: str) -> ChatReply | None:
        name, words = _pop_conversation_option(_split_words(rest))
        conversation = self._conversation(name)
        args = self.chat.parser.parse_args(words)  # type: ignore[attr-defined]
        if args.new or args.system is not None or args.out or args.help:
            raise UsageError(
                "%chat retry accepts sampling and display options only (e.g. --seed 3, --temperature 1)"
            )
        last = conversation.last()
        options = {**last.options, **self._cell_options(args)}
        settings = self._settings(conversation, options)
        turn = Turn(
            prompt=last.prompt, key=last.key, system=last.system, options=options, model=settings["model"]
        )
        return self._generate(
            conversation, len(conversation) - 1, turn, settings, show_prompt=args.show_prompt
        )

    def _cmd_model(self, rest: str) -> None:
        words = _split_words(rest)
        if len(words) > 1:
            raise UsageError("%chat model takes one model name (quote a path with spaces)")
        if not words:
            engine = _ENGINES.get((self.model, self.dtype))
            state = _engine_summary(engine) if engine else "not loaded yet: it loads on the first chat"
            print(f"Default model: {self.model} ({state})")
            return
        self._engine(words[0])
        self.model = words[0]

    def _cmd_models(self, rest: str) -> None:
        self._no_arguments("models", _split_words(rest))
        from nbchat.models import REGISTRY, cached_models

        cached = set(cached_models())
        loaded = {model for model, _ in _ENGINES}
        rows = [(name, entry.description, name in cached, name in loaded) for name, entry in REGISTRY.items()]
        rows += [
            (name, "cached from the Hugging Face Hub", True, name in loaded)
            for name in sorted(cached - set(REGISTRY))
        ]
        rows += [(name, "local path", False, True) for name in sorted(loaded - cached - set(REGISTRY))]
        yes = {True: "yes", False: ""}
        markdown = "| model | description | cached | loaded |\n|---|---|---|---|\n" + "".join(
            f"| `{name}` | {description} | {yes[is_cached]} | {yes[is_loaded]} |\n"
            for name, description, is_cached, is_loaded in rows
        )
        text = "\n".join(
            f"{name}{' [cached]' if is_cached else ''}{' [loaded]' if is_loaded else ''}: {description}"
            for name, description, is_cached, is_loaded in rows
        )
        render.show(markdown + f"\nDefault: `{self.model}`", text + f"\nDefault: {self.model}")

    def _cmd_set(self, rest: str) -> None:
        conversation, words = self._target(rest)
        if not words:
            raise UsageError(
                f"%chat set needs KEY=VALUE pairs; keys: {', '.join(SETTINGS)}, system, conversation"
            )
        updates: dict[str, Any] = {}
        for word in words:
            key, equals, value = word.partition("=")
            key = key.strip().replace("-", "_")
            if not equals:
                raise UsageError(f"%chat set: expected KEY=VALUE, got {word!r}")
            if key not in (*SETTINGS, "system", "conversation"):
                keys = (*SETTINGS, "system", "conversation")
                raise UsageError(f"unknown setting {key!r}{_suggest(key, keys)}; settings: {', '.join(keys)}")
            updates[key] = value if key in ("system", "conversation") else _parse_setting(key, value)
        if "conversation" in updates:
            self._conversation(updates["conversation"])
        new_settings = {**conversation.settings, **{k: v for k, v in updates.items() if k in SETTINGS}}
        new_settings = {key: value for key, value in new_settings.items() if value is not None}
        # Validate the request fields now, so a bad value fails here and not at the next chat.
        self._request([{"role": "user", "content": "check"}], self._settings(Conversation(), new_settings))
        conversation.settings = new_settings
        if "system" in updates:
            conversation.system = updates["system"] or None
        if "conversation" in updates:
            self.current = updates["conversation"]
        shown = ", ".join(f"{key}={value!r}" for key, value in updates.items())
        print(f"Set {shown} (conversation {conversation.name!r}).")

    def _cmd_settings(self, rest: str) -> None:
        conversation, words = self._target(rest)
        self._no_arguments("settings", words)
        settings = self._settings(conversation, {})
        sources = self._setting_sources(conversation)
        system = conversation.system or self.system_prompt
        system_source = (
            "conversation" if conversation.system else ("config" if self.system_prompt else "default")
        )
        rows = [(key, settings[key], sources[key]) for key in SETTINGS]
        rows += [
            ("system", system, system_source),
            ("dtype", self.dtype, "config" if self.dtype else "default"),
        ]
        markdown = (
            f"Conversation `{conversation.name}`\n\n| setting | value | from |\n|---|---|---|\n"
            + "".join(f"| {key} | `{json.dumps(value)}` | {source} |\n" for key, value, source in rows)
        )
        text = f"Conversation {conversation.name!r}\n" + "\n".join(
            f"  {key} = {json.dumps(value)}  ({source})" for key, value, source in rows
        )
        render.show(markdown, text)

    def _cmd_system(self, rest: str) -> None:
        name = None
        words = rest.split(None, 2)
        if words and words[0] in ("-c", "--conversation"):
            if len(words) < 2:
                raise UsageError(f"{words[0]} needs a conversation name")
            name, rest = words[1], (words[2] if len(words) > 2 else "")
        conversation = self._conversation(name)
        text = rest.strip()  # the raw rest of the line: apostrophes and quotes are part of the prompt
        if not text:
            current = conversation.system or self.system_prompt
            print(f"System prompt of {conversation.name!r}: {current!r}" if current else "No system prompt.")
            return
        conversation.system = text
        print(f"System prompt of {conversation.name!r} set.")

    def _cmd_prompt(self, rest: str) -> None:
        """The prompt that produced the last reply, exactly as the model read it."""
        conversation, words = self._target(rest)
        self._no_arguments("prompt", words)
        last = conversation.last()
        messages = conversation.request_messages(
            len(conversation) - 1, last, default_system=self.system_prompt
        )
        # After tool calls, the last reply was generated from the calls and results before it.
        replies = [at for at, message in enumerate(last.reply) if message.get("role") == "assistant"]
        messages += last.reply[: replies[-1]] if replies else []
        tools = _tool_specs(self._tools_for(conversation, last.options.get("tools") or []))
        model = last.model or self._settings(conversation, {})["model"]
        self._show_prompt(self._engine(model), messages, tools=tools)

    def _cmd_save(self, rest: str) -> None:
        conversation, words = self._target(rest)
        if len(words) != 1:
            raise UsageError("%chat save needs one FILE (quote a path with spaces)")
        try:
            path = conversation.save(words[0])
        except OSError as error:
            raise UsageError(f"cannot write {words[0]!r}: {error.strerror or error}") from None
        print(f"Saved {conversation.name!r} ({len(conversation)} exchanges) to {path}.")

    def _cmd_load(self, rest: str) -> None:
        name, words = _pop_conversation_option(_split_words(rest))
        if len(words) != 1:
            raise UsageError("%chat load needs one FILE (quote a path with spaces)")
        loaded = Conversation.load(words[0])
        loaded.name = name or self.current
        if loaded.name in self.conversations:  # tools live in the kernel, not in the file: keep them
            loaded.tools = self.conversations[loaded.name].tools
        self.conversations[loaded.name] = loaded
        print(f"Loaded {len(loaded)} exchanges into {loaded.name!r} from {words[0]}.")

    def _cmd_tools(self, rest: str) -> None:
        """``%chat tools [add|remove|allow|deny NAME ...]``: show or change the conversation's tools."""
        conversation, words = self._target(rest)
        registry = conversation.tools
        if not words:
            self._show_tools(conversation)
            return
        action, names = words[0], _split_names(words[1:])
        actions = ("add", "remove", "allow", "deny")
        if action not in actions:
            raise UsageError(
                f"unknown %chat tools action {action!r}{_suggest(action, actions)}; "
                f"use %chat tools [{'|'.join(actions)}] NAME ..."
            )
        if not names:
            raise UsageError(f"%chat tools {action} needs the names of functions from the notebook")
        if action in ("remove", "deny"):
            unknown = [name for name in names if name not in registry]
            if unknown:
                raise UsageError(
                    f"%chat tools {action}: {unknown[0]!r} is not a tool of {conversation.name!r}; "
                    f"its tools: {', '.join(registry.names) or 'none'}"
                )
        new_tools = [
            self._tool_from_namespace(name, f"%chat tools {action}")
            for name in names
            if action == "add" or (action == "allow" and name not in registry)
        ]
        for tool in new_tools:  # re-adding a function keeps its permission
            allowed_before = tool.name in registry and registry[tool.name].allow_run
            registry.add(tool, allow_run=tool.allow_run or allowed_before)
        added = [tool.name for tool in new_tools]
        named = [*added, *(name for name in names if name in registry and name not in added)]
        for name in named:
            if action == "remove":
                registry.remove(name)
            elif action in ("allow", "deny"):
                registry.set_allow_run(name, action == "allow")
        done = {
            "add": "Added",
            "remove": "Removed",
            "allow": "Allowed to run",
            "deny": "No longer allowed to run",
        }[action]
        print(f"{done}: {', '.join(named)} (conversation {conversation.name!r}).")

    def _show_tools(self, conversation: Conversation) -> None:
        registry = conversation.tools
        if not len(registry):
            print(
                f"Conversation {conversation.name!r} has no tools. Add the notebook's functions with "
                "%chat tools add F G, or offer them to one cell with %%chat --tools F,G."
            )
            return
        rows = []
        for tool in registry:
            parameters = ", ".join(tool.parameters.get("properties", {}))
            runs = "yes" if tool.allow_run else ("no function" if tool.function is None else "no")
            rows.append((f"{tool.name}({parameters})", runs, " ".join(tool.description.split())))
        markdown = (
            f"Tools of `{conversation.name}`\n\n| tool | runs when called | description |\n|---|---|---|\n"
            + "".join(
                f"| `{name}` | {runs} | {description.replace('|', chr(92) + '|')} |\n"
                for name, runs, description in rows
            )
        )
        text = f"Tools of {conversation.name!r}\n" + "\n".join(
            f"  {name}  runs: {runs}" + (f"  -- {description}" if description else "")
            for name, runs, description in rows
        )
        render.show(markdown, text)

    def _cmd_conversations(self, rest: str) -> None:
        self._no_arguments("conversations", _split_words(rest))
        for name, conversation in sorted(self.conversations.items()):
            marker = "*" if name == self.current else " "
            count = len(conversation)
            print(f"{marker} {name}: {count} exchange{'' if count == 1 else 's'}")


def _engine_summary(engine: Any) -> str:
    """One line about a loaded engine: model, dtype, device and context length."""
    info = engine.model_info
    return f"{info.name} · {info.dtype} · {info.device} · context {info.context_length} tokens"


def load_ipython_extension(shell: Any) -> None:
    """Register ``%%chat`` / ``%chat`` on ``shell``; loads no model and imports no JAX."""
    magics = ChatMagics(shell=shell)
    shell.register_magics(magics)
    shell.events.register("pre_run_cell", magics._before_cell)
    shell.events.register("post_run_cell", magics._after_cell)


def unload_ipython_extension(shell: Any) -> None:
    """Remove the magics, their config entry and event hooks (loaded engines stay for a reload)."""
    magics = shell.magics_manager.registry.pop("ChatMagics", None)
    if magics is None:
        return
    for kind in ("line", "cell"):
        table = shell.magics_manager.magics[kind]
        if table.get("chat") == magics.chat:
            del table["chat"]
    if magics in shell.configurables:
        shell.configurables.remove(magics)
    for event, callback in (("pre_run_cell", magics._before_cell), ("post_run_cell", magics._after_cell)):
        if callback in shell.events.callbacks[event]:
            shell.events.unregister(event, callback)
