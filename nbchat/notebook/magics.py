"""The ``%%chat`` cell magic and ``%chat`` commands: ``ChatMagics`` and the extension hooks.

``%load_ext nbchat`` registers them and nothing else: no JAX import, no model. Settings are traitlets
traits tagged ``config=True`` (so ``%config ChatMagics.temperature = 0.2`` and ``ipython_config.py``
work), overridden per conversation by ``%chat set`` and per cell by options. Every error a user can
cause is shown as one ``UsageError`` line and leaves the conversation unchanged.

This module is the IPython-facing part: the magic, the kernel's conversations and the ``%chat``
commands. It must not hold what the other notebook modules do: the settings (``settings.py``), the
options, their help and the request (``options.py``), the tools (``tool_loop.py``), the turn itself
(``nbchat.turns``), the result type (``reply.py``), loading engines (``engines.py``), the cell
grammar (``cells.py``) or drawing output (``render.py``).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from nbchat.conversation import Conversation, ConversationError, Turn
from nbchat.errors import InvalidRequestError, NbchatError
from nbchat.notebook import render, teaching, tool_loop, views
from nbchat.notebook.cells import CellSyntaxError, interpolate, parse_cell
from nbchat.notebook.engines import (
    backend_model,
    engine_summary,
    known_models,
    loaded_engine,
    release_other_engines,
    remote_models,
    shared_engine,
)
from nbchat.notebook.options import (
    TOOL_CHOICE_MODES,
    build_request,
    cell_arguments,
    cell_options,
    check_request,
    check_variable_name,
    check_view_options,
    commands_help,
    commands_of,
    help_epilog,
    pop_conversation_option,
    pop_option,
    pydantic_model_class,
    set_help_epilog,
    split_names,
    split_words,
)
from nbchat.notebook.render import ReplyView, supports_live_updates
from nbchat.notebook.reply import ChatReply, chat_reply, structured_value
from nbchat.notebook.settings import (
    REQUEST_SETTINGS,
    SETTINGS,
    ChatSettings,
    parse_set_words,
    parse_setting,
    suggest,
)
from nbchat.remote import api_key_and_source, is_endpoint, mask_key
from nbchat.turns import TurnControl, TurnGate, fill_turn, run_turn

__all__ = [
    "COMMANDS_HELP",
    "DEFAULT_CONVERSATION",
    "HELP_EPILOG",
    "REQUEST_SETTINGS",
    "SETTINGS",
    "TOOL_CHOICE_MODES",
    "ChatMagics",
    "ChatReply",
    "ChatSettings",
    "load_ipython_extension",
    "unload_ipython_extension",
]

DEFAULT_CONVERSATION = "default"


@magics_class
class ChatMagics(Magics, ChatSettings):
    """Chat with a local model from notebook cells: ``%%chat`` sends a cell, ``%chat`` manages.

    The settings are ``ChatSettings``' traits; each ``%chat NAME`` command is a ``_cmd_NAME(rest)``
    method whose docstring's first line is its help (``ARGUMENTS -- description``).
    """

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self.conversations: dict[str, Conversation] = {
            DEFAULT_CONVERSATION: Conversation(DEFAULT_CONVERSATION)
        }
        self.current = DEFAULT_CONVERSATION
        self._cell_id: str | None = None
        self._keys_this_run: Counter[str] = Counter()
        # Cells, commands and chat panels take turns on the conversations: one at a time.
        self.turn_gate = TurnGate()
        self._steps: dict[str, teaching.StepState] = {}  # replies in step mode, by conversation

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

    @cell_arguments
    @line_cell_magic
    def chat(self, line: str, cell: str | None = None) -> ChatReply | None:
        """Chat with a local language model.

        %%chat [options]  -- the cell is sent to the model (see the grammar below); the reply streams in
        place, and later %%chat cells continue the conversation.
        %chat COMMAND     -- manage conversations and settings (see %chat help).
        """
        waiting = partial(print, "Waiting for the chat panel's reply to finish...", flush=True)
        if not self.turn_gate.acquire(on_wait=waiting):
            print("Interrupted: the chat panel's reply was stopped (and kept); this cell did not run.")
            return None
        try:
            if cell is None:
                return self._command(line)
            return self._chat_cell(line, cell)
        finally:
            self.turn_gate.release()

    # --- %%chat -----------------------------------------------------------------------------------

    def _chat_cell(self, line: str, cell: str) -> ChatReply | None:
        args = self.chat.parser.parse_args(split_words(line))  # type: ignore[attr-defined]
        if args.help:
            return self._cmd_help("")
        name = args.conversation or self.current
        conversation = Conversation(name) if args.new else self._conversation(name)
        if args.out is not None:
            check_variable_name(args.out)
        try:
            parsed = parse_cell(cell)
        except CellSyntaxError as error:
            raise UsageError(f"%%chat cell, {error}") from None
        if args.system is not None and parsed.system is not None:
            raise UsageError("both --system and a system: block are given; keep one of them")
        namespace = self.shell.user_ns
        options = cell_options(args, namespace)
        schema_class = pydantic_model_class(namespace.get(args.schema)) if args.schema else None
        settings = self._settings(conversation, options)
        prompt = parsed.messages
        if settings["interpolate"]:
            prompt = [
                {**message, "content": interpolate(message["content"], namespace)} for message in prompt
            ]

        key = self._cell_key()
        index = conversation.index_of(key)
        index = len(conversation) if index is None else index
        cell_system = args.system if args.system is not None else parsed.system
        turn = Turn(prompt=prompt, key=key, system=cell_system, options=options)
        check_view_options(args)
        if args.compare is not None:
            reply = self._compare(conversation, index, turn, settings, args.compare, args.keep)
        elif args.step:
            reply = self._start_step(conversation, index, turn, settings)
        else:
            reply = self._generate(
                conversation,
                index,
                turn,
                settings,
                show_prompt=args.show_prompt,
                schema_class=schema_class,
                probs=args.probs,
            )
        if reply is None and not args.step:
            return None
        if index == 0 and cell_system is not None:
            # The cell that starts a conversation sets its system prompt for the cells that follow.
            conversation.system = cell_system
            turn.system = None
        self.conversations[name] = conversation
        if args.out is not None and reply is not None:
            self.shell.user_ns[args.out] = reply.value
        return reply

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
                f"no conversation named {name!r}{suggest(name, self.conversations)}; known: {known}. "
                f"Start one with %%chat --new -c {name}"
            )
        return self.conversations[name]

    # --- generation -------------------------------------------------------------------------------

    def _generate(
        self,
        conversation: Conversation,
        index: int,
        turn: Turn,
        settings: dict[str, Any],
        *,
        show_prompt: bool,
        schema_class: type | None = None,
        probs: bool = False,
    ) -> ChatReply | None:
        """Generate ``turn``'s reply at position ``index`` (tool steps included, ``tool_loop``),
        showing it as it streams; store the turn. The requests are checked before the model loads.
        Returns None (conversation unchanged) when interrupted before the first token."""
        messages = conversation.request_messages(index, turn, default_system=self.system_prompt)
        registry = tool_loop.tools_for(conversation, settings.get("tools") or [], self.shell.user_ns)
        request = tool_loop.first_request(messages, settings, registry)
        engine = self._engine_for(settings["model"])
        if probs:
            teaching.require_local(engine, "--probs")
        if show_prompt:
            self._show_prompt(engine, messages, tools=request.get("tools"))
        view = ReplyView(
            format=settings["format"], live=supports_live_updates(self.shell), stream=settings["stream"]
        )
        # Every reply is reproducible: the seed it used is drawn here when none was given.
        seed, drawn = teaching.draw_seed(settings["seed"])
        reproduce = teaching.reproduce_record(engine, request, seed, drawn)
        extra: dict[str, Any] = {"seed": seed}
        if probs:
            extra.update(logprobs=True, top_logprobs=teaching.PROBS_TOP_LOGPROBS)
        recorders: list[teaching.LogprobRecorder] = []

        def open_stream(step_request: dict[str, Any]) -> Any:
            stream = self._open_stream(engine, {**step_request, **extra})
            if probs:
                recorders.append(teaching.LogprobRecorder(stream))
                return recorders[-1]
            return stream

        metadata = {
            "model": settings["model"],
            "conversation": conversation.name,
            "turn": index,
            "reproduce": reproduce,
        }
        try:
            exchange = self.run_exchange(
                open_stream, request, view, registry, settings, metadata, how_to_allow=tool_loop.HOW_TO_ALLOW
            )
        except NbchatError as error:
            raise UsageError(str(error)) from None
        if exchange is None:
            print("Interrupted before the model replied; the conversation is unchanged.")
            return None
        if probs and recorders:
            ended = (
                "then the end-of-turn token, which shows no text"
                if exchange.last.finish_reason == "stop"
                else ""
            )
            view.add_to_final(teaching.probs_bundle(engine, recorders[-1].content, note=ended))
        turn.reproduce = reproduce
        last = exchange.last
        conversation.put(fill_turn(turn, exchange, settings["model"]), index)
        text = turn.reply_text
        value: Any = text
        if settings.get("response_format") and not last.tool_calls:
            value = structured_value(text, last, settings["max_tokens"], schema_class)
        if settings["format"] == "code" and not last.interrupted:
            code, _ = render.extract_code(text)
            if code.strip():
                self.shell.set_next_input(code)
        return chat_reply(exchange, text, value)

    def run_exchange(
        self,
        open_stream: Callable[[dict[str, Any]], Any],
        request: dict[str, Any],
        view: Any,
        registry: Any,
        settings: dict[str, Any],
        metadata: dict[str, Any],
        *,
        how_to_allow: str,
        control: TurnControl | None = None,
    ) -> Any:
        """Run one turn's model steps (``nbchat.turns.run_turn``, the tool loop included) under the
        turn's settings: the one place a cell and the chat panel start a reply. Returns the exchange,
        or None when interrupted before the first token."""
        return run_turn(
            open_stream,
            request,
            view,
            registry,
            run_tools=bool(settings.get("run_tools")),
            max_tool_steps=settings["max_tool_steps"],
            metadata=tool_loop.turn_metadata(request, metadata),
            control=control,
            how_to_allow=how_to_allow,
        )

    def _engine_for(self, model: str, **load_options: Any) -> Any:
        """The chat backend of ``model``: the shared local engine, or a remote endpoint's client
        (``load_options``: ``shared_engine``'s, e.g. where a first load reports its progress)."""
        backend = backend_model(model, self.base_url)
        return shared_engine(backend, self.dtype, api_key=self.api_key, **load_options)

    def _open_stream(self, engine: Any, request: dict[str, Any]) -> Any:
        """Start a streamed chat completion (one place, so tools and tests can wrap the stream)."""
        return engine.chat.completions.create(**request)

    def _show_prompt(
        self,
        engine: Any,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        chat_template: str | None = None,
    ) -> None:
        try:
            text, ids = engine.render_prompt(messages, tools=tools, chat_template=chat_template)
        except NbchatError as error:
            raise UsageError(str(error)) from None
        count = f"{len(ids)} tokens"
        render.show(f"{render.fence(text, 'text')}\n\n*{count}*", f"{text}\n[{count}]")

    # --- %chat commands ---------------------------------------------------------------------------

    def _command(self, line: str) -> Any:
        words = line.strip().split(None, 1)
        if not words:
            return self._cmd_help("")
        command, rest = words[0], (words[1] if len(words) > 1 else "")
        if command in ("-h", "--help"):
            command = "help"
        if command not in self.COMMANDS:
            raise UsageError(
                f"unknown %chat command {command!r}{suggest(command, self.COMMANDS)}; "
                f"commands: {', '.join(self.COMMANDS)}. Use %%chat (two %) to send a message."
            )
        try:
            return getattr(self, f"_cmd_{command}")(rest)
        except (ConversationError, InvalidRequestError) as error:
            raise UsageError(str(error)) from None

    def _target(self, rest: str) -> tuple[Conversation, list[str]]:
        name, words = pop_conversation_option(split_words(rest))
        return self._conversation(name), words

    def _no_arguments(self, command: str, words: list[str]) -> None:
        if words:
            raise UsageError(f"%chat {command} takes no arguments (got {' '.join(words)!r})")

    def _cmd_help(self, rest: str) -> None:
        """this text"""
        print(self.chat.__doc__)

    def _cmd_history(self, rest: str) -> None:
        """show the conversation so far"""
        conversation, words = self._target(rest)
        self._no_arguments("history", words)
        if not conversation.turns:
            print(f"Conversation {conversation.name!r} is empty.")
            return
        messages = conversation.context(0, default_system=self.system_prompt)  # the system prompt
        interrupted = set()  # positions of interrupted replies in messages
        for turn in conversation.turns:
            messages += turn.messages
            if turn.interrupted:
                interrupted.add(len(messages) - 1)
        markdown, text = render.transcript(messages, interrupted)
        render.show(
            markdown, text, {"nbchat": {"conversation": conversation.name, "turns": len(conversation)}}
        )

    def _cmd_reset(self, rest: str) -> None:
        """forget every exchange (system prompt and settings stay)"""
        conversation, words = self._target(rest)
        self._no_arguments("reset", words)
        count = len(conversation)
        conversation.reset()
        print(f"Conversation {conversation.name!r} reset ({count} exchanges forgotten).")

    def _cmd_undo(self, rest: str) -> None:
        """drop the last exchange"""
        conversation, words = self._target(rest)
        self._no_arguments("undo", words)
        turn = conversation.undo()
        question = turn.prompt[-1]["content"] if turn.prompt else ""
        preview = question if len(question) <= 40 else question[:39] + "…"
        print(f"Removed the last exchange of {conversation.name!r} ({preview!r}); {len(conversation)} left.")

    def _cmd_retry(self, rest: str) -> ChatReply | None:
        """[options] -- regenerate the last reply (options as for %%chat, e.g. --seed 3)"""
        name, words = pop_conversation_option(split_words(rest))
        conversation = self._conversation(name)
        args = self.chat.parser.parse_args(words)  # type: ignore[attr-defined]
        if args.new or args.system is not None or args.out or args.help or args.compare or args.step:
            raise UsageError(
                "%chat retry accepts sampling and display options only (e.g. --seed 3, --temperature 1)"
            )
        last = conversation.last()
        options = {**last.options, **cell_options(args, self.shell.user_ns)}
        settings = self._settings(conversation, options)
        turn = Turn(prompt=last.prompt, key=last.key, system=last.system, options=options)
        return self._generate(
            conversation,
            len(conversation) - 1,
            turn,
            settings,
            show_prompt=args.show_prompt,
            probs=args.probs,
        )

    def _cmd_model(self, rest: str) -> None:
        """[NAME|URL] -- show the default model, or make NAME the default and load it (freeing the old);
        a URL (http://HOST:PORT/v1, or NAME@URL; --api-key KEY) chats with that endpoint"""
        api_key, words = pop_option(split_words(rest), ("--api-key",), "the key")
        if len(words) > 1:
            raise UsageError("%chat model takes one model name or URL (quote a path with spaces)")
        if not words:
            model = backend_model(self.model, self.base_url)
            if is_endpoint(model):
                state = engine_summary(self._engine_for(self.model))
            else:
                engine = loaded_engine(model, self.dtype)
                state = engine_summary(engine) if engine else "not loaded yet: it loads on the first chat"
            print(f"Default model: {model} ({state})")
            return
        model = backend_model(words[0], self.base_url)
        if api_key is not None and not is_endpoint(model):
            raise UsageError("--api-key is for a remote endpoint: give its URL (http://HOST:PORT/v1)")
        if is_endpoint(model):
            self._connect(model, api_key if api_key is not None else self.api_key)
        else:
            self._engine_for(model)
        if api_key is not None:
            self.api_key = api_key
        self.model = words[0]
        for released in release_other_engines(model, self.dtype):
            print(f"Freed {released} (only the default model stays loaded).")

    def _connect(self, model: str, api_key: str | None) -> None:
        """Check that the endpoint ``model`` names answers and serves the model asked for."""
        engine = shared_engine(model, self.dtype, api_key=api_key)
        try:
            served = engine.models()
            name = engine.model
        except NbchatError as error:
            raise UsageError(str(error)) from None
        if name not in served:
            raise UsageError(f"{engine.base_url} does not serve {name!r}{suggest(name, served)}; it serves: "
                             f"{', '.join(served)}")
        print(f"Chatting with {name} at {engine.base_url} (remote endpoint; it serves {', '.join(served)}).")

    def _cmd_models(self, rest: str) -> None:
        """models in the registry, in the cache, loaded, and served by endpoints in use"""
        self._no_arguments("models", split_words(rest))
        current = [backend_model(self.model, self.base_url)]
        current += [backend_model(c.settings["model"], self.base_url) for c in self.conversations.values()
                    if "model" in c.settings]
        rows = known_models() + remote_models(current, self.api_key)
        yes = {True: "yes", False: ""}
        markdown = render.markdown_table(
            ("model", "description", "cached", "loaded"),
            (
                (f"`{name}`", description, yes[cached], yes[loaded])
                for name, description, cached, loaded in rows
            ),
        )
        text = "\n".join(
            f"{name}{' [cached]' if is_cached else ''}{' [loaded]' if is_loaded else ''}: {description}"
            for name, description, is_cached, is_loaded in rows
        )
        render.show(markdown + f"\nDefault: `{self.model}`", text + f"\nDefault: {self.model}")

    def _cmd_set(self, rest: str) -> None:
        """KEY=VALUE ... -- make a setting the conversation's default (VALUE none removes it)"""
        conversation, words = self._target(rest)
        updates = parse_set_words(words)
        if "conversation" in updates:
            self._conversation(updates["conversation"])
        self.apply_settings(conversation, updates)
        if "conversation" in updates:
            self.current = updates["conversation"]
        shown = ", ".join(f"{key}={value!r}" for key, value in updates.items())
        print(f"Set {shown} (conversation {conversation.name!r}).")

    def apply_settings(self, conversation: Conversation, updates: dict[str, Any]) -> None:
        """Make ``updates`` (settings converted to their types, None = remove; ``system``) the
        conversation's own, as ``%chat set`` does; every value is checked before anything changes."""
        new_settings = {**conversation.settings, **{k: v for k, v in updates.items() if k in SETTINGS}}
        new_settings = {key: value for key, value in new_settings.items() if value is not None}
        # Validate the request fields now, so a bad value fails here and not at the next chat.
        check_request(build_request([{"role": "user", "content": "check"}],
                                    self._settings(Conversation(), new_settings)))
        conversation.settings = new_settings
        if "system" in updates:
            conversation.system = updates["system"] or None

    def _cmd_settings(self, rest: str) -> None:
        """every setting, its value and where it comes from"""
        conversation, words = self._target(rest)
        self._no_arguments("settings", words)
        settings = self._settings(conversation, {})
        sources = self._setting_sources(conversation)
        system = conversation.system or self.system_prompt
        system_source = (
            "conversation" if conversation.system else ("config" if self.system_prompt else "default")
        )
        rows = [(key, settings[key], sources[key]) for key in SETTINGS]
        key, key_source = api_key_and_source(self.api_key)
        rows += [
            ("system", system, system_source),
            ("dtype", self.dtype, "config" if self.dtype else "default"),
            ("base_url", self.base_url, "config" if self.base_url else "default"),
            ("api_key", mask_key(key), key_source if key else "default"),
        ]
        markdown = f"Conversation `{conversation.name}`\n\n" + render.markdown_table(
            ("setting", "value", "from"),
            ((key, f"`{json.dumps(value)}`", source) for key, value, source in rows),
        )
        text = f"Conversation {conversation.name!r}\n" + "\n".join(
            f"  {key} = {json.dumps(value)}  ({source})" for key, value, source in rows
        )
        render.show(markdown, text)

    def _cmd_system(self, rest: str) -> None:
        """[-c NAME] [TEXT] -- show or set the conversation's system prompt"""
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
        """[--tokens|--ids] [--template NAME] -- the exact templated prompt of the last reply and its tokens

        --tokens: as token chips by message; --ids: the token ids; --template: as the built-in
        template NAME would write it."""
        conversation, words = self._target(rest)
        template, words = pop_option(words, ("--template",), "a template name (chatml, llama-3, ...)")
        form = words[0] if words else None
        if form not in (None, "--tokens", "--ids") or len(words) > 1:
            raise UsageError(
                f"%chat prompt takes --tokens or --ids and --template NAME (got {' '.join(words)!r})"
            )
        messages, tools, model = self._last_prompt(conversation)
        engine = self._engine_for(model)
        if form is None:
            self._show_prompt(engine, messages, tools=tools, chat_template=template)
            return
        teaching.require_local(engine, f"%chat prompt {form}")
        try:
            prompt = engine.prompt_tokens(messages, tools=tools, chat_template=template)
        except NbchatError as error:
            raise UsageError(str(error)) from None
        ids = [token.token_id for token in prompt.tokens]
        if form == "--ids":
            print(ids)
            return
        roles = [str(message.get("role")) for message in messages]
        views.show(
            {
                "text/html": views.prompt_tokens_html(prompt, roles),
                "text/plain": views.prompt_tokens_text(prompt),
            },
            {
                "nbchat": {
                    "prompt_tokens": len(ids),
                    "context_length": prompt.context_length,
                    "chat_template": template,
                }
            },
        )

    def _last_prompt(self, conversation: Conversation) -> tuple[list[dict[str, Any]], Any, str]:
        """The messages, tools and model of the request that produced the last reply."""
        last = conversation.last()
        messages = conversation.request_messages(
            len(conversation) - 1, last, default_system=self.system_prompt
        )
        # After tool calls, the last reply was generated from the calls and results before it.
        replies = [at for at, message in enumerate(last.reply) if message.get("role") == "assistant"]
        messages += last.reply[: replies[-1]] if replies else []
        registry = tool_loop.tools_for(conversation, last.options.get("tools") or [], self.shell.user_ns)
        tools = registry.schemas() or None
        model = last.model or self._settings(conversation, {})["model"]
        return messages, tools, model

    # --- teaching views: next-token distributions, step mode, replay, compare ------------------------

    def _cmd_next(self, rest: str) -> None:
        """[--top K] [--temperature T1,T2] [TEXT] -- the next-token distribution after the last prompt

        The model's, and after the temperature / top_p / top_k settings; TEXT starts the reply."""
        name, words = pop_conversation_option(split_words(rest))
        conversation = self._conversation(name)
        top, temperatures, text_words = 10, None, []
        while words:
            word = words.pop(0)
            if word in ("--top", "--temperature", "-t"):
                if not words:
                    raise UsageError(f"%chat next {word} needs a value")
                value = words.pop(0)
                if word == "--top":
                    try:
                        top = int(value)
                    except ValueError:
                        raise UsageError(f"%chat next --top must be an integer, not {value!r}") from None
                else:
                    temperatures = [parse_setting("temperature", item) for item in value.split(",") if item]
            else:
                text_words.append(word)
        settings = self._settings(conversation, {})
        step = self._steps.get(conversation.name)
        if step is not None and not step.finished:
            messages, reply_ids, model = step.messages, step.reply_ids, step.model
        else:
            messages, _, model = self._last_prompt(conversation)
            reply_ids = []
        engine = teaching.require_local(self._engine_for(model), "%chat next")
        knobs = {key: settings[key] for key in ("top_p", "top_k", "seed") if settings[key] is not None}
        rows = (
            [{**knobs, "temperature": t} for t in temperatures]
            if temperatures
            else [
                {
                    **knobs,
                    **(
                        {"temperature": settings["temperature"]}
                        if settings["temperature"] is not None
                        else {}
                    ),
                }
            ]
        )
        text = " ".join(text_words)
        try:
            distribution = engine.next_token_distribution(
                messages, reply_text=text or None, reply_ids=reply_ids, settings=rows, top=top
            )
        except NbchatError as error:
            raise UsageError(str(error)) from None
        title = f"after {text!r}" if text else ""
        views.show(
            {
                "text/html": views.distribution_html(distribution, title=title),
                "text/plain": views.distribution_text(distribution),
            },
            {"nbchat": {"next_token": {"prompt_tokens": distribution.prompt_tokens, "rows": rows}}},
        )

    def _start_step(
        self, conversation: Conversation, index: int, turn: Turn, settings: dict[str, Any]
    ) -> None:
        """``%%chat --step``: store the turn with an empty reply and show its first distribution."""
        engine = teaching.require_local(self._engine_for(settings["model"]), "--step")
        messages = conversation.request_messages(index, turn, default_system=self.system_prompt)
        request = build_request(messages, settings)
        seed, drawn = teaching.draw_seed(settings["seed"])
        state = teaching.StepState(
            conversation.name, index, messages, settings, seed, settings["model"], turn
        )
        turn.reply = [{"role": "assistant", "content": ""}]
        turn.model = settings["model"]
        turn.reproduce = {**teaching.reproduce_record(engine, request, seed, drawn), "step_ids": []}
        conversation.put(turn, index)
        self._steps[conversation.name] = state
        try:
            state.distribution(engine)
        except NbchatError as error:
            raise UsageError(str(error)) from None
        self._show_step(state)

    def _show_step(self, state: teaching.StepState) -> None:
        parts, text = [], []
        if state.tokens:
            parts.append(views.reply_tokens_html(state.tokens))
            text.append(state.text)
        if state.finished:
            why = "an end-of-turn token" if state.finished == "stop" else "max_tokens"
            note = f"The reply is finished ({why}); it is in the conversation."
        else:
            parts.append(views.distribution_html(state.shown, title="step mode", picks=True))
            text.append(views.distribution_text(state.shown, picks=True))
            note = "%chat step [N]: add N sampled tokens · %chat step --pick K: add the K-th token above"
        parts.append(f'<div style="font-size: 0.85em; margin-top: 4px;">{html.escape(note)}</div>')
        text.append(note)
        views.show(
            {"text/html": "".join(parts), "text/plain": "\n\n".join(text)},
            {
                "nbchat": {
                    "step": {
                        "conversation": state.conversation,
                        "turn": state.index,
                        "token_ids": list(state.reply_ids),
                        "finished": state.finished,
                    }
                }
            },
        )

    def _cmd_step(self, rest: str) -> None:
        """[N] | --pick K -- step mode (after %%chat --step): add N sampled tokens or the K-th likeliest"""
        name, words = pop_conversation_option(split_words(rest))
        conversation = self._conversation(name)
        state = self._steps.get(conversation.name)
        if state is None or not any(turn is state.turn for turn in conversation.turns):
            raise UsageError(f"no reply in step mode in {conversation.name!r}: start one with %%chat --step")
        if state.finished:
            raise UsageError("the step-mode reply is finished: start another with %%chat --step")
        engine = self._engine_for(state.model)
        pick, count = None, 1
        if words[:1] == ["--pick"]:
            if len(words) != 2 or not words[1].isdigit():
                raise UsageError("%chat step --pick needs the number K of a token in the list (from 1)")
            pick = int(words[1])
            if not 1 <= pick <= len(state.shown.top):
                raise UsageError(f"%chat step --pick {pick}: choose from 1 to {len(state.shown.top)}")
        elif words:
            if len(words) != 1 or not words[0].isdigit() or int(words[0]) < 1:
                raise UsageError("%chat step takes a number of tokens N >= 1, or --pick K")
            count = int(words[0])
        try:
            for _ in range(count):
                if state.shown is None:  # an interrupt came before the last distribution was ready
                    state.distribution(engine)
                choice = state.shown.top[pick - 1] if pick else state.shown.sampled[0].chosen
                state.add(engine, choice, choice.ends_reply)
                if state.finished:
                    break
                state.shown = None
                state.distribution(engine)
        except NbchatError as error:
            raise UsageError(str(error)) from None
        except KeyboardInterrupt:
            print("Interrupted: the tokens added so far are kept.")
        turn = state.turn
        turn.reply = [{"role": "assistant", "content": state.text}]
        turn.reproduce = {**(turn.reproduce or {}), "step_ids": list(state.reply_ids)}
        if state.finished:
            turn.finish_reason = state.finished
            turn.usage = {"completion_tokens": len(state.reply_ids) + (state.finished == "stop")}
        self._show_step(state)

    def _cmd_replay(self, rest: str) -> None:
        """[N] -- regenerate reply N (default: the last) with its recorded model, settings and seed"""
        conversation, words = self._target(rest)
        if len(words) > 1 or (words and not words[0].lstrip("-").isdigit()):
            raise UsageError("%chat replay takes the number N of a reply (0 is the first; default: the last)")
        number = int(words[0]) if words else len(conversation) - 1
        if not 0 <= number < len(conversation):
            raise UsageError(
                f"%chat replay {number}: {conversation.name!r} has replies 0 to {len(conversation) - 1}"
            )
        turn = conversation.turns[number]
        record = turn.reproduce
        if not record or "settings" not in record:
            raise UsageError(
                f"reply {number} has no recorded settings (it was made by a remote endpoint or "
                "an older nbchat), so it cannot be replayed"
            )
        if any(message.get("tool_calls") for message in turn.reply) or "step_ids" in record:
            raise UsageError(
                f"reply {number} called tools or was made in step mode: replay covers plain replies"
            )
        messages = conversation.request_messages(number, turn, default_system=self.system_prompt)
        engine = teaching.require_local(self._engine_for(turn.model or self.model), "%chat replay")
        notes = []
        if teaching.messages_digest(messages) != record.get("messages_sha256"):
            notes.append("the messages before it changed since (an earlier turn or the system prompt)")
        provenance = engine.provenance()
        if provenance["sha256"] != record.get("sha256") or provenance["dtype"] != record.get("dtype"):
            notes.append(
                f"the model differs (sha256 {provenance['sha256'][:12]}, {provenance['dtype']}; "
                f"recorded {str(record.get('sha256'))[:12]}, {record.get('dtype')})"
            )
        recorded = record["settings"]
        request = {
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **{key: value for key, value in recorded.items() if value not in (None, [], {})},
        }
        request.update({key: turn.options[key] for key in ("response_format",) if key in turn.options})
        try:
            outcome, _ = teaching.run_silently(partial(self._open_stream, engine), request)
        except NbchatError as error:
            raise UsageError(str(error)) from None
        original = turn.reply_text
        identical = outcome.text == original
        if identical:
            verdict = (
                f"Reply {number} reproduced exactly: {len(original)} characters, seed {record['seed']}, "
                f"{record['model']} sha256 {str(record['sha256'])[:12]}, {record['dtype']}."
            )
        else:
            at = next(
                (i for i, (a, b) in enumerate(zip(outcome.text, original, strict=False)) if a != b),
                min(len(outcome.text), len(original)),
            )
            verdict = f"Reply {number} was NOT reproduced: the texts differ from character {at}."
        if notes:
            verdict += " Note: " + "; ".join(notes) + "."
        render.show(
            f"{verdict}\n\n{render.fence(outcome.text, 'text')}",
            f"{verdict}\n{outcome.text}",
            {"nbchat": {"replay": {"turn": number, "identical": identical, "text": outcome.text}}},
        )

    def _compare(
        self,
        conversation: Conversation,
        index: int,
        turn: Turn,
        settings: dict[str, Any],
        spec: str,
        keep: int | None,
    ) -> ChatReply | None:
        """``%%chat --compare KEY=V1,V2``: the turn once per value, side by side; keeps reply ``keep``."""
        key, values = teaching.parse_compare(spec, parse_setting)
        keep = 1 if keep is None else keep
        if not 1 <= keep <= len(values):
            raise UsageError(f"--keep {keep}: choose a reply from 1 to {len(values)}")
        if settings.get("tools") or settings.get("response_format"):
            raise UsageError("--compare runs plain replies: leave out --tools, --json and --schema")
        messages = conversation.request_messages(index, turn, default_system=self.system_prompt)
        requests = [
            build_request(messages, {**settings, key: value}) for value in values
        ]  # all checked first
        seed, drawn = teaching.draw_seed(settings["seed"])  # one seed for every column, unless it varies
        columns, records, outcomes = [], [], []
        for value, request in zip(values, requests, strict=True):
            engine = self._engine_for(value if key == "model" else settings["model"])
            column_seed = value if key == "seed" else seed
            records.append(teaching.reproduce_record(engine, request, column_seed, drawn and key != "seed"))
            opener = partial(self._open_compare_stream, engine, {"seed": column_seed, "logprobs": True})
            try:
                outcome, content = teaching.run_silently(opener, request)
            except NbchatError as error:
                raise UsageError(str(error)) from None
            outcomes.append(outcome)
            usage = outcome.usage or {}
            columns.append(
                views.CompareColumn(
                    settings={key: value},
                    text=outcome.text,
                    completion_tokens=usage.get("completion_tokens", 0),
                    mean_logprob=teaching.mean_logprob(content),
                    kept=len(columns) + 1 == keep,
                )
            )
            if outcome.interrupted:
                break
        if len(columns) < keep:
            print("Interrupted before the reply to keep; the conversation is unchanged.")
            return None
        kept, record = outcomes[keep - 1], records[keep - 1]
        turn.reply = [{"role": "assistant", "content": kept.text}]
        turn.interrupted, turn.finish_reason, turn.usage = kept.interrupted, kept.finish_reason, kept.usage
        turn.model = values[keep - 1] if key == "model" else settings["model"]
        turn.reproduce = record
        conversation.put(turn, index)
        metadata = {
            "model": turn.model,
            "conversation": conversation.name,
            "turn": index,
            "reproduce": record,
            "compare": {
                "key": key,
                "keep": keep,
                "columns": [
                    {
                        "value": column.settings[key],
                        "text": column.text,
                        "completion_tokens": column.completion_tokens,
                        "mean_logprob": column.mean_logprob,
                    }
                    for column in columns
                ],
            },
        }
        views.show(
            {"text/html": views.compare_html(columns), "text/plain": views.compare_text(columns)},
            {"nbchat": metadata},
        )
        return ChatReply(
            text=kept.text,
            messages=[*messages, *turn.reply],
            usage=kept.usage,
            finish_reason=kept.finish_reason,
            interrupted=kept.interrupted,
            model=turn.model,
            conversation=conversation.name,
            turn=index,
            settings=dict(requests[keep - 1]),
            value=kept.text,
        )

    def _open_compare_stream(self, engine: Any, extra: dict[str, Any], request: dict[str, Any]) -> Any:
        return self._open_stream(engine, {**request, **extra})

    def _cmd_save(self, rest: str) -> None:
        """FILE -- write the conversation as JSON"""
        conversation, words = self._target(rest)
        if len(words) != 1:
            raise UsageError("%chat save needs one FILE (quote a path with spaces)")
        try:
            path = conversation.save(words[0])
        except OSError as error:
            raise UsageError(f"cannot write {words[0]!r}: {error.strerror or error}") from None
        print(f"Saved {conversation.name!r} ({len(conversation)} exchanges) to {path}.")

    def _cmd_load(self, rest: str) -> None:
        """FILE -- read a conversation written by %chat save"""
        name, words = pop_conversation_option(split_words(rest))
        if len(words) != 1:
            raise UsageError("%chat load needs one FILE (quote a path with spaces)")
        loaded = Conversation.load(words[0])
        loaded.name = name or self.current
        if loaded.name in self.conversations:  # tools live in the kernel, not in the file: keep them
            loaded.tools = self.conversations[loaded.name].tools
        self.conversations[loaded.name] = loaded
        print(f"Loaded {len(loaded)} exchanges into {loaded.name!r} from {words[0]}.")

    def _cmd_tools(self, rest: str) -> None:
        """[add|remove|allow|deny F ...] -- show or change the conversation's tools"""
        conversation, words = self._target(rest)
        if not words:
            self._show_tools(conversation)
            return
        action = words[0]
        named = tool_loop.change_tools(conversation, action, split_names(words[1:]), self.shell.user_ns)
        print(f"{tool_loop.TOOL_ACTIONS[action]}: {', '.join(named)} (conversation {conversation.name!r}).")

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
        markdown = f"Tools of `{conversation.name}`\n\n" + render.markdown_table(
            ("tool", "runs when called", "description"),
            ((f"`{name}`", runs, description.replace("|", "\\|")) for name, runs, description in rows),
        )
        text = f"Tools of {conversation.name!r}\n" + "\n".join(
            f"  {name}  runs: {runs}" + (f"  -- {description}" if description else "")
            for name, runs, description in rows
        )
        render.show(markdown, text)

    def _cmd_panel(self, rest: str) -> None:
        """a chat panel widget on the conversation (its history is the cells' history)"""
        conversation, words = self._target(rest)
        self._no_arguments("panel", words)
        from IPython.display import display

        from nbchat.notebook.panel import ChatPanel

        display(ChatPanel(conversation.name, shell=self.shell))

    def _cmd_conversations(self, rest: str) -> None:
        """list the conversations"""
        self._no_arguments("conversations", split_words(rest))
        for name, conversation in sorted(self.conversations.items()):
            marker = "*" if name == self.current else " "
            count = len(conversation)
            print(f"{marker} {name}: {count} exchange{'' if count == 1 else 's'}")


# The commands and the help are read off the class: each _cmd_NAME method with a docstring.
ChatMagics.COMMANDS = tuple(commands_of(ChatMagics))
COMMANDS_HELP = commands_help(commands_of(ChatMagics))
HELP_EPILOG = help_epilog(commands_of(ChatMagics))
set_help_epilog(ChatMagics.chat, HELP_EPILOG)


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
