"""The ``%%chat`` cell magic and ``%chat`` commands: ``ChatMagics`` and the extension hooks.

``%load_ext nbchat`` registers them and nothing else: no JAX import, no model. The model loads on the
first chat (``nbchat.api.Engine``, one shared instance per model name and dtype) with the loader's
progress bars and a one-line summary. Settings are traitlets traits tagged ``config=True`` (so
``%config ChatMagics.temperature = 0.2`` and ``ipython_config.py`` work), overridden per
conversation by ``%chat set`` and per cell by options. Every error a user can cause is shown as one
``UsageError`` line and leaves the conversation unchanged.

Extension points (structured output and tools, issue 5): options are plain ``@argument`` lines on
:meth:`ChatMagics.chat`, whose values reach :meth:`ChatMagics._cell_options`; the API request is built
in one place (:meth:`ChatMagics._request`); reply formats are the table ``render.FORMATS``.
"""

from __future__ import annotations

import difflib
import json
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
from nbchat.notebook.render import FORMATS, ReplyView, supports_live_updates

DEFAULT_CONVERSATION = "default"

# Request fields a setting maps to one-to-one (None = not sent: the engine's default applies).
REQUEST_SETTINGS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed")
# Every setting `%chat set` accepts and a cell option can override, in display order.
SETTINGS = ("model", *REQUEST_SETTINGS, "format", "stream", "interpolate")

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
  prompt                  the exact templated prompt of the last reply and its token count
  save FILE / load FILE   write / read the conversation as JSON
  conversations           list the conversations
  help                    this text

Settings resolve as: cell option > %chat set (per conversation) > %config ChatMagics.<name>.
--system and a system: block apply to that cell only, except in the cell that starts a conversation,
where they become its system prompt. Re-running a cell replaces the exchange it produced before.
An interrupt (Stop button) ends the reply: the partial text is kept, marked as interrupted.
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

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        tokens = (self.usage or {}).get("completion_tokens")
        parts = [f"conversation={self.conversation!r}", f"turn={self.turn}"]
        if tokens is not None:
            parts.append(f"{tokens} tokens")
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
    @argument("-f", "--format", choices=list(FORMATS), help="Show the reply as markdown, text or code.")
    @argument("--no-stream", action="store_true", help="Show the reply only once it is complete.")
    @argument("--out", metavar="VAR", help="Store the reply text in the variable VAR.")
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
        reply = self._generate(conversation, index, turn, settings, show_prompt=args.show_prompt)
        if reply is None:
            return None
        if index == 0 and cell_system is not None:
            # The cell that starts a conversation sets its system prompt for the cells that follow.
            conversation.system = cell_system
            turn.system = None
        self.conversations[name] = conversation
        if args.out is not None:
            self.shell.user_ns[args.out] = reply.text
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
        return options

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

    def _request(self, messages: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
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
    ) -> ChatReply | None:
        """Generate ``turn``'s reply at position ``index``, showing it as it streams; store the turn.

        Returns None (conversation unchanged) when interrupted before the first token.
        """
        messages = conversation.request_messages(index, turn, default_system=self.system_prompt)
        request = self._request(messages, settings)
        engine = self._engine(settings["model"])
        if show_prompt:
            self._show_prompt(engine, messages)
        view = ReplyView(
            format=settings["format"], live=supports_live_updates(self.shell), stream=settings["stream"]
        )
        metadata = {
            "model": settings["model"],
            "conversation": conversation.name,
            "turn": index,
            "settings": {key: value for key, value in request.items() if key in REQUEST_SETTINGS},
        }
        view.start({"nbchat": metadata})
        outcome = self._stream_reply(engine, request, view)
        metadata.update(
            finish_reason=outcome.finish_reason, usage=outcome.usage, interrupted=outcome.interrupted
        )
        view.finish(interrupted=outcome.interrupted, metadata={"nbchat": metadata})
        if outcome.interrupted and not outcome.text:
            print("Interrupted before the model replied; the conversation is unchanged.")
            return None
        reply_message = {"role": "assistant", "content": outcome.text}
        turn.reply = [reply_message]
        turn.interrupted = outcome.interrupted
        turn.finish_reason = outcome.finish_reason
        turn.usage = outcome.usage
        turn.model = settings["model"]
        conversation.put(turn, index)
        if settings["format"] == "code" and not outcome.interrupted:
            code, _ = render.extract_code(outcome.text)
            if code.strip():
                self.shell.set_next_input(code)
        return ChatReply(
            text=outcome.text,
            messages=[*messages, reply_message],
            usage=outcome.usage,
            finish_reason=outcome.finish_reason,
            interrupted=outcome.interrupted,
            model=settings["model"],
            conversation=conversation.name,
            turn=index,
            settings=dict(metadata["settings"]),
        )

    def _open_stream(self, engine: Any, request: dict[str, Any]) -> Iterable[Any]:
        """Start a streamed chat completion (one place, so tools and tests can wrap the stream)."""
        return engine.chat.completions.create(**request)

    def _stream_reply(self, engine: Any, request: dict[str, Any], view: ReplyView) -> _StreamOutcome:
        """Consume the stream into ``view``; a KeyboardInterrupt ends it and keeps the partial text."""
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
                    if choice.finish_reason is not None:
                        outcome.finish_reason = choice.finish_reason
        except KeyboardInterrupt:
            outcome.interrupted = True
        except NbchatError as error:
            view.discard()
            raise UsageError(str(error)) from None
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

    def _show_prompt(self, engine: Any, messages: list[dict[str, Any]]) -> None:
        try:
            text, ids = engine.render_prompt(messages)
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
        model = last.model or self._settings(conversation, {})["model"]
        self._show_prompt(self._engine(model), messages)

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
        self.conversations[loaded.name] = loaded
        print(f"Loaded {len(loaded)} exchanges into {loaded.name!r} from {words[0]}.")

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
