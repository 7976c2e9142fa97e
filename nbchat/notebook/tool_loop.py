"""The tools a ``%%chat`` offers, and one exchange with the model: stream a reply; while it calls tools,
run the calls the user allowed and send their results back, until a text answer, a call that may not
run, or the step limit.

A conversation's tools are the notebook's functions (``%chat tools add F``), and a cell may offer more
(``--tools F,G``). A call runs in this kernel only when its tool may run (``--run-tools``, ``%chat
tools allow``, ``@nbchat.tool(allow_run=True)``); one that may not is shown with how to allow it and
answered with an error result, so the stored exchange stays a valid conversation. A forced
``tool_choice`` (required or a name) applies to the first step only. Nothing here parses options,
loads models or stores turns: the magic hands over the first request, the tools, a stream opener
and the view, and stores what comes back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from IPython.core.error import UsageError

from nbchat.conversation import Conversation
from nbchat.errors import NbchatError
from nbchat.notebook.options import build_request, check_request, tool_from_namespace
from nbchat.notebook.render import NOT_RUN_PREFIX, ReplyView, ToolCallView, parse_json, warn
from nbchat.notebook.reply import Exchange, StreamOutcome, add_usage, stream_reply
from nbchat.notebook.settings import REQUEST_SETTINGS, suggest
from nbchat.tools import Tool, ToolRegistry

# %chat tools ACTION: what it reports having done.
TOOL_ACTIONS = {
    "add": "Added",
    "remove": "Removed",
    "allow": "Allowed to run",
    "deny": "No longer allowed to run",
}

# --- the notebook's tools -------------------------------------------------------------------------


def add_tool(registry: ToolRegistry, tool: Tool) -> None:
    """Add ``tool`` to ``registry``; re-adding a tool the registry allowed to run keeps it allowed."""
    allowed_before = tool.name in registry and registry[tool.name].allow_run
    registry.add(tool, allow_run=tool.allow_run or allowed_before)


def change_tools(
    conversation: Conversation, action: str, names: list[str], namespace: Mapping[str, Any]
) -> list[str]:
    """``%chat tools ACTION NAME ...`` on a conversation's tools: add or remove the notebook's
    functions, allow or deny running them (allow adds a function not there yet). Returns the tool
    names acted on; every name is checked before anything changes."""
    registry, where = conversation.tools, f"%chat tools {action}"
    if action not in TOOL_ACTIONS:
        raise UsageError(
            f"unknown %chat tools action {action!r}{suggest(action, TOOL_ACTIONS)}; "
            f"use %chat tools [{'|'.join(TOOL_ACTIONS)}] NAME ..."
        )
    if not names:
        raise UsageError(f"{where} needs the names of functions from the notebook")
    if action in ("remove", "deny"):
        unknown = [name for name in names if name not in registry]
        if unknown:
            raise UsageError(
                f"{where}: {unknown[0]!r} is not a tool of {conversation.name!r}; "
                f"its tools: {', '.join(registry.names) or 'none'}"
            )
    new_tools = [
        tool_from_namespace(name, where, namespace)
        for name in names
        if action == "add" or (action == "allow" and name not in registry)
    ]
    for tool in new_tools:  # re-adding a function keeps its permission
        add_tool(registry, tool)
    added = [tool.name for tool in new_tools]
    named = [*added, *(name for name in names if name in registry and name not in added)]
    for name in named:
        if action == "remove":
            registry.remove(name)
        elif action in ("allow", "deny"):
            registry.set_allow_run(name, action == "allow")
    return named


def tools_for(conversation: Conversation, names: Iterable[str], namespace: Mapping[str, Any]) -> ToolRegistry:
    """The tools one request offers: the conversation's, then the cell's ``--tools`` (which win on
    a name both have). A copy: allowing a tool for one cell changes nothing else."""
    registry = ToolRegistry(conversation.tools)
    for name in names:
        add_tool(registry, tool_from_namespace(name, "--tools", namespace))
    return registry


# --- the exchange ---------------------------------------------------------------------------------


def _after_first_step(choice: Any) -> Any:
    """The tool_choice of the steps after the first: a forced call (required or named) is asked for
    once, then the model may answer in text (else every step would call a tool until the limit)."""
    return "auto" if choice == "required" or isinstance(choice, dict) else choice


def first_request(
    messages: list[dict[str, Any]], settings: Mapping[str, Any], registry: ToolRegistry
) -> dict[str, Any]:
    """The exchange's first request, offering ``registry``'s tools, checked before the model loads
    (the later steps' tool_choice, auto, is valid whenever the first one is)."""
    tools, tool_choice = registry.schemas() or None, settings.get("tool_choice")
    return check_request(build_request(messages, settings, tools=tools, tool_choice=tool_choice))


def run_exchange(
    open_stream: Callable[[dict[str, Any]], Iterable[Any]],
    request: dict[str, Any],
    view: ReplyView,
    registry: ToolRegistry,
    settings: Mapping[str, Any],
    metadata: dict[str, Any],
) -> Exchange | None:
    """Run the exchange that starts with ``request`` (from :func:`first_request`), drawn in ``view``
    from start to finish with ``metadata`` (model, conversation, turn) plus the request settings and
    how it ended. Returns None when interrupted before the model replied.

    An error in the first request is a UsageError (the view is blanked); one in a later step (a long
    tool result can overflow the context) ends the exchange with a warning, keeping what happened.
    """
    messages, tools = request["messages"], request.get("tools")
    metadata = {
        **metadata,
        "settings": {
            key: value
            for key, value in request.items()
            if key in (*REQUEST_SETTINGS, "response_format", "tool_choice")
        },
    }
    if tools:
        metadata["tools"] = registry.names
    view.start({"nbchat": metadata})
    exchange = Exchange(messages=messages, last=StreamOutcome(), metadata=metadata)
    while True:
        try:
            outcome = stream_reply(open_stream, request, view)
        except NbchatError as error:
            if not exchange.reply:
                view.discard()
                raise UsageError(str(error)) from None
            warn(f"the exchange stopped after {exchange.steps} tool step(s): {error}")
            break
        exchange.last = outcome
        exchange.usage = add_usage(exchange.usage, outcome.usage)
        if outcome.interrupted and not outcome.text and not outcome.tool_calls and not exchange.reply:
            view.finish(interrupted=True, metadata={"nbchat": {**metadata, "interrupted": True}})
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
            view.end_step(),
            view,
            allow_all=bool(settings.get("run_tools")),
            steps_left=settings["max_tool_steps"] - exchange.steps,
        )
        exchange.reply += results
        if not go_on:
            break
        exchange.steps += 1
        request = build_request(
            messages + exchange.reply,
            settings,
            tools=tools,
            tool_choice=_after_first_step(settings.get("tool_choice")),
        )
    last = exchange.last
    metadata.update(finish_reason=last.finish_reason, usage=exchange.usage, interrupted=last.interrupted)
    if tools:
        metadata["tool_steps"] = exchange.steps
    view.finish(
        interrupted=last.interrupted, truncated=last.finish_reason == "length", metadata={"nbchat": metadata}
    )
    return exchange


def run_tool_calls(
    registry: ToolRegistry,
    outcome: StreamOutcome,
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
    error result the model sees; an interrupt while a tool runs stops the exchange (and marks
    ``outcome`` interrupted).
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
        _, arguments = parse_json(call["function"]["arguments"])
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
            content = json.dumps({"error": f"{NOT_RUN_PREFIX}{why_not}"})
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
