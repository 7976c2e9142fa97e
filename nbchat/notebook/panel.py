"""The chat panel: an anywidget (panel.js + panel.css, shipped in the package: no CDN, no build step)
bound to a conversation of the kernel's ``%%chat`` magics, so cells and panels share one history.

The front end sends actions (``send``, ``stop``, ``retry``, ``undo``, ``new_chat``, ``settings``,
``attach``, ``attach_text``, ``detach``) as custom messages to :meth:`ChatPanel.handle_message`; the
Python API (:meth:`ChatPanel.send` ...) goes through the same methods. ``docked_panel`` is the one
the JupyterLab extension docks in the sidebar and sends cells to. A reply is generated off the main thread
(``nbchat.turns.run_turn``) so the kernel stays free for Stop; it streams to every panel of the
conversation as custom-message deltas at most ~15 times a second (the text added and the current
message's HTML, never the whole transcript). Structural changes (a turn stored, undone, a cell's
turn) resync the ``transcript`` trait. Markdown is rendered here (``markup``): the front end only
places HTML that carries no markup of the model's.

Cells and panels take turns through the magics' ``TurnGate``: a ``%%chat`` run while a panel
generates waits (and says so), and a kernel interrupt stops the panel's reply. Errors are one line
in the panel (``error``) and leave the conversation unchanged. Nothing here imports JAX.
"""

from __future__ import annotations

import re
import threading
import uuid
import weakref
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import anywidget
from IPython.core.error import UsageError
from traitlets import Bool, Dict, List, Unicode

from nbchat.conversation import Conversation, ConversationError, Turn
from nbchat.errors import NbchatError
from nbchat.notebook import tool_loop
from nbchat.notebook.cells import interpolate
from nbchat.notebook.engines import known_models, loaded_engine
from nbchat.notebook.panel_view import PENDING_ID, PanelReplyView, transcript_entries, turn_entries
from nbchat.notebook.render import fence, one_line
from nbchat.notebook.settings import parse_setting
from nbchat.turns import TurnControl, fill_turn

_HERE = Path(__file__).parent
# What the settings drawer edits, in its order; the same settings `%chat set` changes.
PANEL_SETTINGS = ("model", "system", "temperature", "top_p", "top_k", "max_tokens", "seed")
ATTACH_PARTS = ("source", "output", "both")
HOW_TO_ALLOW = "allow it with `%chat tools allow {name}`"
_EXPECTED_ERRORS = (UsageError, NbchatError, ConversationError)
# Terminal colour/style codes, as IPython puts in tracebacks.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Every live panel, so a turn (and a cell) updates all panels of its conversation.
_PANELS: weakref.WeakSet[ChatPanel] = weakref.WeakSet()
_HOOKED_SHELLS: weakref.WeakSet[Any] = weakref.WeakSet()


class ChatPanel(anywidget.AnyWidget):
    """A chat panel on conversation ``conversation`` of the kernel's ``%%chat`` magics.

    ``send(text)`` sends like the Send button and returns the reply's text once complete
    (``wait=False``: at once); ``stop()``, ``retry()``, ``undo()``, ``new_chat()`` are the buttons;
    ``messages`` is the conversation's history (OpenAI-style dicts); ``settings`` the settings the
    drawer shows (assign a dict to change some, as ``%chat set`` does).
    """

    _esm = _HERE / "panel.js"
    _css = _HERE / "panel.css"

    conversation_name = Unicode("default").tag(sync=True)
    # The messages on screen: {id, role, text, html, interrupted}; resynced on structural changes only.
    transcript = List().tag(sync=True)
    busy = Bool(False).tag(sync=True)
    # model, context_tokens, context_length, tok_s, note (load/compile progress, waiting).
    status = Dict().tag(sync=True)
    error = Unicode("").tag(sync=True)
    # Per drawer field: the conversation's own value ("" = inherited) and the value in effect.
    settings_state = Dict().tag(sync=True)
    model_choices = List().tag(sync=True)
    # Chips of cells attached to the next message: {id, label, text}.
    attachments = List().tag(sync=True)

    def __init__(self, conversation: str = "default", *, shell: Any = None, **kwargs: Any) -> None:
        if shell is None:
            from IPython import get_ipython

            shell = get_ipython()
        if shell is None:
            raise RuntimeError("ChatPanel runs in an IPython kernel: create it in a notebook")
        super().__init__(conversation_name=conversation, **kwargs)
        self._shell = shell
        magics = self._magics
        if conversation not in magics.conversations:
            magics.conversations[conversation] = Conversation(conversation)
        self._worker: threading.Thread | None = None
        self._control: TurnControl | None = None
        self._failure: str | None = None
        self.last_view: PanelReplyView | None = None
        self.on_msg(self.handle_message)
        _PANELS.add(self)
        _hook_shell(shell)
        self.sync()

    # --- the kernel side the panel is bound to -----------------------------------------------------

    @property
    def _magics(self) -> Any:
        registry = self._shell.magics_manager.registry
        if "ChatMagics" not in registry:
            self._shell.extension_manager.load_extension("nbchat")
        return registry["ChatMagics"]

    @property
    def _conversation(self) -> Conversation:
        # Looked up each time: %chat load and %%chat --new replace the object under the name.
        conversations = self._magics.conversations
        return conversations.setdefault(self.conversation_name, Conversation(self.conversation_name))

    def _peers(self) -> list[ChatPanel]:
        return [panel for panel in list(_PANELS) if panel.conversation_name == self.conversation_name]

    def _broadcast(self, message: dict[str, Any]) -> None:
        for panel in self._peers():
            anywidget.AnyWidget.send(panel, message)

    # --- the front end's messages ------------------------------------------------------------------

    def handle_message(self, widget: Any, content: dict[str, Any], buffers: Any = None) -> None:
        """One action from the front end (``{"action": ..., ...}``); an error becomes the error line."""
        action = content.get("action")
        handlers: dict[str, Callable[[], Any]] = {
            "send": lambda: self._start("send", str(content.get("text", ""))),
            "stop": self.stop,
            "retry": lambda: self._start("retry"),
            "undo": self.undo,
            "new_chat": self.new_chat,
            "settings": lambda: self._apply_settings(dict(content.get("values") or {})),
            "attach": lambda: self.attach(content.get("cell"), str(content.get("part", "source"))),
            "attach_text": lambda: self.attach_text(
                str(content.get("label", "")), str(content.get("text", "")), str(content.get("language", ""))
            ),
            "detach": lambda: self.detach(str(content.get("id", ""))),
        }
        if action not in handlers:
            self.error = f"unknown panel action {action!r}"
            return
        try:
            handlers[action]()
        except _EXPECTED_ERRORS as error:
            self.error = one_line(error)

    # --- the Python API (what the buttons do) -------------------------------------------------------

    def send(self, text: str | dict[str, Any], wait: bool = True, **kwargs: Any) -> str | None:  # type: ignore[override]
        """Send ``text`` as the Send button does; with ``wait``, return the reply's text once complete
        (an error raises it as a UsageError). A dict is a custom message to the front end
        (ipywidgets' ``Widget.send``)."""
        if isinstance(text, dict):  # the widget protocol's custom message to the front end
            return super().send(text, **kwargs)
        self._start("send", text)
        return self._wait() if wait else None

    def stop(self) -> None:
        """Stop the reply being generated (within one decode step); its partial text is kept."""
        if self._control is not None:
            self._control.stop()

    def retry(self, wait: bool = True) -> str | None:
        """Regenerate the last reply (the same messages and options)."""
        self._start("retry")
        return self._wait() if wait else None

    def undo(self) -> None:
        """Drop the last exchange."""
        self._check_idle()
        self._conversation.undo()
        self._changed()

    def new_chat(self) -> None:
        """Forget every exchange (the system prompt and settings stay, as ``%chat reset``)."""
        self._check_idle()
        self._conversation.reset()
        self._changed()

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation's messages as OpenAI-style dicts, system prompt first."""
        return self._conversation.messages(default_system=self._magics.system_prompt)

    @property
    def settings(self) -> dict[str, Any]:
        """The settings in effect for the panel's next message (``settings = {...}`` changes some)."""
        magics, conversation = self._magics, self._conversation
        effective = magics._settings(conversation, {})
        return {
            key: (conversation.system or magics.system_prompt) if key == "system" else effective[key]
            for key in PANEL_SETTINGS
        }

    @settings.setter
    def settings(self, values: dict[str, Any]) -> None:
        self._apply_settings(values)

    def attach(self, cell: int | str | None = None, part: str = "source") -> None:
        """Attach cell ``cell``'s source and/or output (by execution count; None: the cell just run)
        to the next message, as fenced blocks shown as removable chips."""
        if part not in ATTACH_PARTS:
            raise UsageError(f"attach part must be one of {', '.join(ATTACH_PARTS)}, not {part!r}")
        namespace = self._shell.user_ns
        sources, outputs = namespace.get("In", []), namespace.get("Out", {})
        last = self._shell.execution_count - 1
        if cell in (None, ""):
            number = last
        else:
            try:
                number = int(cell)
            except (TypeError, ValueError):
                raise UsageError(f"attach: cell must be an execution count, not {cell!r}") from None
        if not 1 <= number < len(sources):
            raise UsageError(f"attach: no cell [{number}] has run (cells run so far: 1 to {last})")
        chips = []
        if part in ("source", "both"):
            chips.append((f"In [{number}]", fence(sources[number], "python")))
        if part in ("output", "both"):
            if number not in outputs:
                raise UsageError(f"attach: cell [{number}] has no output value")
            shown = self._shell.display_formatter.format(outputs[number])[0].get("text/plain", "")
            chips.append((f"Out [{number}]", fence(shown, "text")))
        self.attachments = [
            *self.attachments,
            *({"id": uuid.uuid4().hex[:8], "label": label, "text": text} for label, text in chips),
        ]

    def attach_text(self, label: str, text: str, language: str = "") -> None:
        """Attach ``text`` (e.g. a cell's source or output sent by the JupyterLab extension) to the
        next message as one fenced block, shown as a chip labelled ``label``; terminal colour codes
        (a traceback's) are dropped."""
        if not label.strip():
            raise UsageError("attach_text: give the chip a label (e.g. 'Cell 3')")
        plain = _ANSI_ESCAPE.sub("", text)
        chip = {"id": uuid.uuid4().hex[:8], "label": label.strip(), "text": fence(plain, language)}
        self.attachments = [*self.attachments, chip]

    def detach(self, chip_id: str) -> None:
        """Remove an attached chip."""
        self.attachments = [chip for chip in self.attachments if chip["id"] != chip_id]

    # --- turns -------------------------------------------------------------------------------------

    def _check_idle(self) -> None:
        if self._magics.turn_gate.busy or any(panel.busy for panel in self._peers()):
            raise UsageError("a reply is being generated: wait for it or press Stop")

    def _start(self, kind: str, text: str = "") -> None:
        """Start a turn (``send`` a new message, or ``retry`` the last) in a worker thread; the
        request is checked here first, so a bad setting fails before anything changes."""
        self._check_idle()
        self.error = ""
        magics, conversation, namespace = self._magics, self._conversation, self._shell.user_ns
        if kind == "send":
            settings = magics._settings(conversation, {})
            content = interpolate(text.strip(), namespace) if settings["interpolate"] else text.strip()
            blocks = [chip["text"] for chip in self.attachments]
            content = "\n\n".join(part for part in (content, *blocks) if part)
            if not content:
                raise UsageError("type a message first")
            turn = Turn(prompt=[{"role": "user", "content": content}], key=f"panel:{uuid.uuid4().hex[:12]}")
            index = len(conversation)
        else:
            last = conversation.last()
            settings = magics._settings(conversation, last.options)
            turn = Turn(prompt=last.prompt, key=last.key, system=last.system, options=dict(last.options))
            index = len(conversation) - 1
        registry = tool_loop.tools_for(conversation, settings.get("tools") or [], namespace)
        messages = conversation.request_messages(index, turn, default_system=magics.system_prompt)
        tool_loop.first_request(messages, settings, registry)
        if kind == "send":
            self.attachments = []
        control = TurnControl()
        for panel in self._peers():
            panel.busy, panel.error, panel._control = True, "", control
        shown = self.transcript if kind == "send" else transcript_entries(conversation.turns[:-1])
        prompt_entries = turn_entries(len(shown), turn.prompt, interrupted=False)
        self._broadcast({"kind": "begin", "keep": len(shown), "entries": prompt_entries})
        self._failure = None
        self._worker = threading.Thread(
            target=self._run_turn, args=(kind, turn, settings, registry, control), daemon=True,
            name=f"nbchat-panel-{self.conversation_name}",
        )
        self._worker.start()

    def _run_turn(
        self, kind: str, turn: Turn, settings: dict[str, Any], registry: Any, control: TurnControl
    ) -> None:
        magics = self._magics
        gate = magics.turn_gate
        gate.acquire(control=control, on_wait=partial(self._note, "Waiting for the running reply..."))
        try:
            conversation = self._conversation  # after the wait: a cell may have changed it
            index = len(conversation) if kind == "send" else len(conversation) - 1
            if index < 0:
                raise ConversationError("the conversation is empty: there is no reply to retry")
            messages = conversation.request_messages(index, turn, default_system=magics.system_prompt)
            request = tool_loop.first_request(messages, settings, registry)
            engine = magics._engine_for(settings["model"], report=self._note)
            view = PanelReplyView(self._broadcast)
            self.last_view = view
            base = {"model": settings["model"], "conversation": conversation.name, "turn": index}
            exchange = magics.run_exchange(
                partial(magics._open_stream, engine), request, view, registry, settings, base,
                how_to_allow=HOW_TO_ALLOW, control=control,
            )
            if exchange is not None:
                conversation.put(fill_turn(turn, exchange, settings["model"]), index)
            speed = view.tokens_per_second((exchange.last.usage or {}) if exchange else {})
            for panel in self._peers():
                panel.status = {**panel.status, "tok_s": speed, "note": ""}
            if view.warnings:
                self._fail(f"Warning: {view.warnings[-1]}")
        except _EXPECTED_ERRORS as error:
            self._fail(one_line(error))
        except Exception as error:  # shown, not lost in a thread: the panel is the user's only view
            self._fail(f"{type(error).__name__}: {one_line(error)}")
        finally:
            gate.release(control)
            for panel in self._peers():
                panel.busy, panel._control = False, None
            self._changed()

    def _fail(self, message: str) -> None:
        self._failure = message
        self._broadcast({"kind": "discard", "id": PENDING_ID})
        for panel in self._peers():
            panel.error = message

    def _wait(self) -> str | None:
        """Wait for the worker (a KeyboardInterrupt stops the reply, then waits for it to end)."""
        worker = self._worker
        if worker is None:
            return None
        try:
            while worker.is_alive():
                worker.join(0.05)
        except KeyboardInterrupt:
            self.stop()
            worker.join()
        if self._failure is not None and not self._failure.startswith("Warning:"):
            raise UsageError(self._failure)
        conversation = self._conversation
        return conversation.turns[-1].reply_text if conversation.turns else None

    def _note(self, text: str) -> None:
        for panel in self._peers():
            panel.status = {**panel.status, "note": text}

    # --- state shown -------------------------------------------------------------------------------

    def _changed(self) -> None:
        for panel in self._peers():
            panel.sync()

    def sync(self) -> None:
        """Bring the panel up to date with its conversation (turns, settings, model and context)."""
        magics, conversation = self._magics, self._conversation
        self.transcript = transcript_entries(conversation.turns)
        effective = self.settings
        own = {**conversation.settings, "system": conversation.system}
        self.settings_state = {
            key: {"value": "" if own.get(key) is None else str(own[key]), "effective": effective[key]}
            for key in PANEL_SETTINGS
        }
        names = [name for name, _, cached, loaded in known_models() if cached or loaded]
        self.model_choices = sorted({*names, effective["model"]})
        engine = loaded_engine(effective["model"], magics.dtype)
        messages = conversation.messages(default_system=magics.system_prompt)
        self.status = {
            **self.status,
            "model": effective["model"],
            "context_length": _context_length(engine),
            "context_tokens": _context_tokens(engine, messages),
        }

    def _apply_settings(self, values: dict[str, Any]) -> None:
        unknown = [key for key in values if key not in PANEL_SETTINGS]
        if unknown:
            raise UsageError(
                f"unknown panel setting {unknown[0]!r}; settings: {', '.join(PANEL_SETTINGS)}"
            )
        updates = {key: _setting_value(key, value) for key, value in values.items()}
        self._magics.apply_settings(self._conversation, updates)
        self.error = ""
        self._changed()


def docked_panel(conversation: str = "default", *, shell: Any = None) -> ChatPanel:
    """The kernel's panel docked in JupyterLab's sidebar (the extension's "Open chat panel"):
    created on first use, then the same one, so "Send cell to chat" reaches the panel on screen."""
    global _DOCKED
    if _DOCKED is None or _DOCKED.conversation_name != conversation or _DOCKED.comm is None:
        _DOCKED = ChatPanel(conversation, shell=shell)
    return _DOCKED


_DOCKED: ChatPanel | None = None


def _setting_value(key: str, value: Any) -> Any:
    """A drawer field's value (text, as ``%chat set`` reads it; "" = the inherited default) or a
    typed value from the Python API."""
    if key == "system":
        return value or None
    return parse_setting(key, value) if isinstance(value, str) else value


def _context_length(engine: Any) -> int | None:
    info = getattr(engine, "model_info", None) if engine is not None else None
    return getattr(info, "context_length", None)


def _context_tokens(engine: Any, messages: list[dict[str, Any]]) -> int | None:
    """Tokens the history takes in the model's context (its templated prompt), once the model is
    loaded; None before (or for a backend that cannot tokenize)."""
    render_prompt = getattr(engine, "render_prompt", None)
    if render_prompt is None or not messages:
        return 0 if render_prompt is not None else None
    try:
        # The history ends with the reply, which the template renders as a message to continue.
        return len(render_prompt(messages, continue_final_message=messages[-1]["role"] == "assistant")[1])
    except NbchatError:
        return None


# --- kernel hooks ---------------------------------------------------------------------------------


def _hook_shell(shell: Any) -> None:
    """Once per shell: resync panels after every cell (a ``%%chat``, ``%chat undo`` ...), and make a
    kernel interrupt stop a panel's reply even while no cell runs."""
    if shell in _HOOKED_SHELLS:
        return
    _HOOKED_SHELLS.add(shell)
    shell.events.register("post_run_cell", _sync_all_panels)
    kernel = getattr(shell, "kernel", None)
    # ipykernel ignores SIGINT between requests and restores `saved_sigint_handler` after each one
    # (this code runs inside one); putting ours there reaches a reply generated while idle.
    if kernel is not None and hasattr(kernel, "saved_sigint_handler"):
        previous = kernel.saved_sigint_handler

        def stop_panel_replies(signum: int, frame: Any) -> None:
            magics = shell.magics_manager.registry.get("ChatMagics")
            if magics is not None and magics.turn_gate.stop_all():
                return
            if callable(previous):
                previous(signum, frame)

        kernel.saved_sigint_handler = stop_panel_replies


def _sync_all_panels(result: Any = None) -> None:
    for panel in list(_PANELS):
        if not panel.busy:
            panel.sync()
