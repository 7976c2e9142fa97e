"""The turn runner: one turn of a conversation -- stream the reply to a request; while the model calls
tools, run the calls allowed and send their results back, until a text answer, a call that may not
run, or the step limit -- and the stop control that interrupts it from any thread.

Every surface (the ``%%chat`` magic, the chat panel, the chat kernel) runs its turns here and only
shows them: the runner reports to a :class:`TurnObserver` (text deltas, tool calls as they stream,
run or are refused, how the turn ended) and returns an :class:`Exchange` the surface stores as a
``Turn``. A turn ends early on a ``KeyboardInterrupt`` (a kernel interrupt, in the main thread) or on
:meth:`TurnControl.stop` (a Stop button, from another thread), checked after every streamed chunk,
so it stops within one decode step; the partial reply is kept and marked interrupted.

Surfaces that share a conversation take turns through one :class:`TurnGate` per kernel: a cell run
while the panel generates waits for it, and an interrupt while waiting stops the running turn.

Nothing here builds the first request from settings, loads models, keeps conversations, draws
output or imports IPython or JAX: the caller hands over a validated request, a stream opener and
the tools, and stores the :class:`~nbchat.conversation.Turn` :func:`fill_turn` completes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from nbchat.conversation import Turn
from nbchat.errors import NbchatError
from nbchat.protocol.deltas import add_tool_call_delta
from nbchat.tools import ToolRegistry

# How the error result of a call that was not run starts (a history reader tells it from a tool's error).
NOT_RUN_PREFIX = "not run: "

StreamOpener = Callable[[dict[str, Any]], Iterable[Any]]


class CallRecord(Protocol):
    """A tool call as an observer keeps it; the runner sets its state (``calling``, ``running``,
    ``ran``, ``error``, ``not run``), the result sent back to the model, and a note for the user."""

    name: str
    state: str
    result: str | None
    note: str | None


class TurnObserver(Protocol):
    """What a surface shows of a turn, in the order the runner calls it."""

    def start(self, metadata: dict[str, Any] | None = None) -> None: ...

    def append(self, delta: str) -> None: ...

    def tool_call_delta(self, index: int, *, name: str | None = None, arguments: str = "") -> CallRecord: ...

    def end_step(self) -> list[CallRecord]: ...

    def show_call(self, call: CallRecord) -> None: ...

    def warn(self, message: str) -> None: ...

    def discard(self) -> None: ...

    def finish(
        self, *, interrupted: bool = False, truncated: bool = False, metadata: dict[str, Any] | None = None
    ) -> None: ...


class TurnControl:
    """Stops a running turn from another thread: the runner checks :attr:`stopped` after every chunk
    and before every tool call, and closes the stream (which ends the engine's generation)."""

    def __init__(self) -> None:
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()


class TurnGate:
    """One turn at a time among the surfaces of a kernel, and a way to stop the one running.

    :meth:`acquire` waits for the running turn (calling ``on_wait`` once first, so the surface can
    say why it waits); a KeyboardInterrupt while waiting stops the running turn and returns False.
    A turn run off the main thread registers its :class:`TurnControl`, so :meth:`stop_all` (a
    kernel interrupt) reaches it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._controls: set[TurnControl] = set()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    def acquire(
        self, *, on_wait: Callable[[], None] | None = None, control: TurnControl | None = None
    ) -> bool:
        if not self._lock.acquire(blocking=False):
            try:
                if on_wait is not None:
                    on_wait()
                # Short timeouts: a kernel interrupt reaches the main thread between them.
                while not self._lock.acquire(timeout=0.05):
                    pass
            except KeyboardInterrupt:
                self.stop_all()
                return False
        if control is not None:
            self._controls.add(control)
        return True

    def release(self, control: TurnControl | None = None) -> None:
        self._controls.discard(control)  # type: ignore[arg-type]
        self._lock.release()

    def stop_all(self) -> bool:
        """Stop every registered running turn; whether there was one."""
        controls = list(self._controls)
        for control in controls:
            control.stop()
        return bool(controls)


@dataclass
class StreamOutcome:
    """What one streamed request produced: its text, its tool calls (OpenAI dicts, by index), how it
    ended, its token usage, and whether the user interrupted it."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    interrupted: bool = False
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Exchange:
    """What a turn produced: the request's messages, the reply messages (assistant messages, with
    their tool calls, and tool results), the usage of every request added up, the last reply's
    outcome, the tool steps run, and the metadata the observer finished with."""

    messages: list[dict[str, Any]]
    last: StreamOutcome
    reply: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    steps: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        """Every tool call the model made in the exchange, in order."""
        return [call for message in self.reply for call in message.get("tool_calls") or ()]


def fill_turn(turn: Turn, exchange: Exchange, model: str) -> Turn:
    """``turn`` with the reply of ``exchange`` (generated by ``model``) and how it ended."""
    turn.reply = exchange.reply
    turn.interrupted = exchange.last.interrupted
    turn.finish_reason = exchange.last.finish_reason
    turn.usage = exchange.usage
    turn.model = model
    return turn


def add_usage(total: dict[str, Any] | None, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Token usage of a turn of several requests: every count added up."""
    if usage is None:
        return total
    if total is None:
        return dict(usage)
    return {key: total.get(key, 0) + value for key, value in usage.items() if isinstance(value, int)}


def after_first_step(choice: Any) -> Any:
    """The tool_choice of the steps after the first: a forced call (required or named) is asked for
    once, then the model may answer in text (else every step would call a tool until the limit)."""
    return "auto" if choice == "required" or isinstance(choice, dict) else choice


def stream_reply(
    open_stream: StreamOpener,
    request: dict[str, Any],
    observer: TurnObserver,
    control: TurnControl | None = None,
) -> StreamOutcome:
    """Stream ``request`` (through ``open_stream``) into ``observer``: text deltas and tool-call deltas
    (gathered by index). A KeyboardInterrupt or ``control.stop()`` ends it and keeps what arrived; an
    NbchatError propagates; any other error discards the observer's output first."""
    outcome = StreamOutcome()
    stream = None
    try:
        if control is not None and control.stopped:
            outcome.interrupted = True
            return outcome
        stream = open_stream(request)
        for chunk in stream:
            if chunk.usage is not None:
                outcome.usage = chunk.usage.model_dump()
            for choice in chunk.choices:
                if choice.delta.content:
                    outcome.text += choice.delta.content
                    observer.append(choice.delta.content)
                for delta in choice.delta.tool_calls or ():
                    add_tool_call_delta(outcome.tool_calls, delta)
                    function = delta.function
                    observer.tool_call_delta(
                        delta.index,
                        name=function.name if function else None,
                        arguments=(function.arguments or "") if function else "",
                    )
                if choice.finish_reason is not None:
                    outcome.finish_reason = choice.finish_reason
            if control is not None and control.stopped:
                outcome.interrupted = True
                break
    except KeyboardInterrupt:
        outcome.interrupted = True
    except NbchatError:
        raise
    except Exception:
        observer.discard()
        raise
    finally:
        close = getattr(stream, "close", None)  # a stream a test or a tool wraps may be a plain iterable
        if close is not None:
            close()
    return outcome


def run_turn(
    open_stream: StreamOpener,
    request: dict[str, Any],
    observer: TurnObserver,
    registry: ToolRegistry,
    *,
    run_tools: bool = False,
    max_tool_steps: int = 0,
    metadata: dict[str, Any] | None = None,
    control: TurnControl | None = None,
    how_to_allow: str = "allow it to run",
) -> Exchange | None:
    """Run the turn that starts with ``request`` (validated, offering ``registry``'s tools), shown in
    ``observer`` from start to finish with ``metadata`` plus how it ended. Returns None when
    interrupted before the model replied (nothing to keep).

    ``run_tools`` lets every call run (else only the tools allowed to); ``max_tool_steps`` is the
    most rounds of results sent back; ``how_to_allow`` (with ``{name}``) tells the user how to let a
    refused tool run. An error in the first request propagates (the observer discarded); one in a
    later step (a long tool result can overflow the context) ends the turn with a warning, keeping
    what happened.
    """
    messages, tools = request["messages"], request.get("tools")
    metadata = dict(metadata or {})
    if tools:
        metadata["tools"] = registry.names
    observer.start({"nbchat": metadata})
    exchange = Exchange(messages=messages, last=StreamOutcome(), metadata=metadata)
    while True:
        try:
            outcome = stream_reply(open_stream, request, observer, control)
        except NbchatError as error:
            if not exchange.reply:
                observer.discard()
                raise
            observer.warn(f"the exchange stopped after {exchange.steps} tool step(s): {error}")
            break
        exchange.last = outcome
        exchange.usage = add_usage(exchange.usage, outcome.usage)
        if outcome.interrupted and not outcome.text and not outcome.tool_calls and not exchange.reply:
            observer.finish(interrupted=True, metadata={"nbchat": {**metadata, "interrupted": True}})
            return None
        message: dict[str, Any] = {"role": "assistant", "content": outcome.text}
        if outcome.tool_calls:
            message["content"] = outcome.text or None
            message["tool_calls"] = outcome.tool_calls
        exchange.reply.append(message)
        if not outcome.tool_calls:
            break
        results, go_on = run_tool_calls(
            registry,
            outcome,
            observer.end_step(),
            observer,
            allow_all=run_tools,
            steps_left=max_tool_steps - exchange.steps,
            control=control,
            how_to_allow=how_to_allow,
        )
        exchange.reply += results
        if not go_on:
            break
        exchange.steps += 1
        # The first request was validated; a later one differs in its messages and tool_choice only
        # (the engine checks it again, and an error there ends the turn above).
        request = {
            **request,
            "messages": messages + exchange.reply,
            "tool_choice": after_first_step(request.get("tool_choice")),
        }
        if request["tool_choice"] is None:
            del request["tool_choice"]
    last = exchange.last
    metadata.update(finish_reason=last.finish_reason, usage=exchange.usage, interrupted=last.interrupted)
    if tools:
        metadata["tool_steps"] = exchange.steps
    observer.finish(
        interrupted=last.interrupted, truncated=last.finish_reason == "length", metadata={"nbchat": metadata}
    )
    return exchange


def _parsed_arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def run_tool_calls(
    registry: ToolRegistry,
    outcome: StreamOutcome,
    shown_calls: list[CallRecord],
    observer: TurnObserver,
    *,
    allow_all: bool,
    steps_left: int,
    control: TurnControl | None = None,
    how_to_allow: str = "allow it to run",
) -> tuple[list[dict[str, Any]], bool]:
    """Run one step's tool calls where allowed; returns the ``tool`` messages (one per call) and
    whether the model should get them (False: stop here).

    A call runs only when its tool may run (``allow_all`` or the tool's opt-in). A call that does
    not run is shown with the reason and answered with an ``{"error": "not run: ..."}`` message,
    so the stored exchange stays a valid conversation; the turn then stops, except for a call cut
    off by max_tokens after complete ones that ran. An exception in a tool becomes an error result
    the model sees; an interrupt while a tool runs (or a stop before it) stops the turn and marks
    ``outcome`` interrupted.
    """
    stop_reason = None
    if outcome.interrupted:
        stop_reason = "the reply was interrupted while the call was written"
    elif steps_left <= 0:
        stop_reason = "the step limit was reached (raise --max-tool-steps)"
    results: list[dict[str, Any]] = []
    go_on, ran_any = stop_reason is None, False
    for call, shown in zip(outcome.tool_calls, shown_calls, strict=True):
        name = call["function"]["name"]
        why_not = stop_reason
        if why_not is None and control is not None and control.stopped:
            outcome.interrupted = True
            why_not = stop_reason = "the user stopped the reply"
            go_on = False
        arguments = _parsed_arguments(call["function"]["arguments"])
        if why_not is None and outcome.finish_reason == "length" and not isinstance(arguments, dict):
            why_not = "the call was cut off at max_tokens (raise --max-tokens)"
        elif why_not is None and name in registry and not registry.can_run(name, allow_all=allow_all):
            if registry[name].function is None:
                why_not = f"the tool {name!r} has no Python function"
            else:
                why_not = f"the tool {name!r} is not allowed to run"
                shown.note = f"{name} was not run: {how_to_allow.format(name=name)}."
            go_on = False
        if why_not is not None:
            content = json.dumps({"error": f"{NOT_RUN_PREFIX}{why_not}"})
            shown.state, shown.result = "not run", content
            shown.note = shown.note or f"Not run: {why_not}."
            results.append({"role": "tool", "tool_call_id": call["id"], "content": content})
            observer.show_call(shown)
            continue
        shown.state = "running"
        observer.show_call(shown)
        try:
            result = registry.run(call, allow_all=allow_all)
        except KeyboardInterrupt:
            outcome.interrupted = True
            stop_reason, go_on = "the user interrupted the tool", False
            content = json.dumps({"error": "interrupted by the user"})
            shown.state, shown.result = "error", content
            results.append({"role": "tool", "tool_call_id": call["id"], "content": content})
            observer.show_call(shown)
            continue
        shown.state, shown.result = ("ran" if result.ok else "error"), result.content
        results.append(result.message())
        observer.show_call(shown)
        ran_any = True
    return results, go_on and ran_any
