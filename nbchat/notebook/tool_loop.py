"""The tools a ``%%chat`` offers and the first request of its turn (the turn itself -- streaming, running
allowed calls, sending results back -- is ``nbchat.turns``; this module only prepares it).

A conversation's tools are the notebook's functions (``%chat tools add F``), and a cell may offer more
(``--tools F,G``). A call runs in this kernel only when its tool may run (``--run-tools``, ``%chat
tools allow``, ``@nbchat.tool(allow_run=True)``); one that may not is shown with how to allow it and
answered with an error result, so the stored exchange stays a valid conversation. A forced
``tool_choice`` (required or a name) applies to the first step only. Nothing here parses options,
loads models, streams or stores turns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from IPython.core.error import UsageError

from nbchat.conversation import Conversation
from nbchat.notebook.options import build_request, check_request, tool_from_namespace
from nbchat.notebook.settings import REQUEST_SETTINGS, suggest
from nbchat.tools import Tool, ToolRegistry

# How a refused call tells the user to let it run (``{name}``: the tool).
HOW_TO_ALLOW = "allow it with `%chat tools allow {name}`, or re-run the cell with `--run-tools`"

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


def first_request(
    messages: list[dict[str, Any]], settings: Mapping[str, Any], registry: ToolRegistry
) -> dict[str, Any]:
    """The exchange's first request, offering ``registry``'s tools, checked before the model loads
    (the later steps' tool_choice, auto, is valid whenever the first one is)."""
    tools, tool_choice = registry.schemas() or None, settings.get("tool_choice")
    return check_request(build_request(messages, settings, tools=tools, tool_choice=tool_choice))


def turn_metadata(request: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """The output metadata a turn starts with: ``base`` (model, conversation, turn) and the request's
    settings."""
    keys = (*REQUEST_SETTINGS, "response_format", "tool_choice")
    return {**base, "settings": {key: value for key, value in request.items() if key in keys}}
