"""nbchat: notebook-native chat with a local LLM.

``%load_ext nbchat`` registers the ``%%chat`` / ``%chat`` magics without importing JAX or loading a
model; ``nbchat.Engine`` is the OpenAI-style chat completion API. Heavy names are imported lazily.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import TYPE_CHECKING, Any

from nbchat.errors import (
    ContextLengthError,
    InvalidRequestError,
    ModelNotFoundError,
    NbchatError,
    UnsupportedModelError,
)

__version__ = "0.1.0"


def _not_the_torch_advisory(record: logging.LogRecord) -> bool:
    """nbchat uses transformers for tokenizers only, so its "PyTorch was not found" advisory (a red
    stderr block under the first chat in JupyterLab) tells the user nothing."""
    return "PyTorch was not found" not in record.getMessage()


# Set before transformers is first imported (it logs the advisory at import) on the logger it uses.
logging.getLogger("transformers").addFilter(_not_the_torch_advisory)

# Public name -> module that defines it; imported on first attribute access (PEP 562).
_LAZY = {
    "ChatPanel": "nbchat.notebook.panel",
    "Engine": "nbchat.api",
    "Tool": "nbchat.tools",
    "ToolRegistry": "nbchat.tools",
    "tool": "nbchat.tools",
}

__all__ = [
    "ChatPanel",
    "ContextLengthError",
    "Engine",
    "InvalidRequestError",
    "ModelNotFoundError",
    "NbchatError",
    "Tool",
    "ToolRegistry",
    "UnsupportedModelError",
    "load_ipython_extension",
    "tool",
    "unload_ipython_extension",
]

if TYPE_CHECKING:
    from nbchat.api import Engine
    from nbchat.notebook.panel import ChatPanel
    from nbchat.tools import Tool, ToolRegistry, tool


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nbchat' has no attribute {name!r}")


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where the built JupyterLab extension lies in the package (``jupyter labextension develop``)."""
    return [{"src": "labextension", "dest": "nbchat"}]


def load_ipython_extension(ipython) -> None:
    """``%load_ext nbchat``: register the chat magics (no model is loaded until the first chat)."""
    from nbchat.notebook.magics import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext nbchat``: remove the chat magics."""
    from nbchat.notebook.magics import unload_ipython_extension as unload

    unload(ipython)
