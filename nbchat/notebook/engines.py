"""The engines loaded in this kernel (one ``nbchat.api.Engine`` per model and dtype, shared), and the
models it knows.

Loading a model is slow, so every conversation, every re-load of the extension and every surface in
the kernel shares one engine per model and dtype. The first use loads it (the loader shows progress
bars), compiles it with a two-token warm-up reply and prints a one-line summary. Importing this
module imports no JAX: ``nbchat.api`` is imported on the first load. Nothing here knows about
conversations, settings or displays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from IPython.core.error import UsageError

from nbchat.errors import NbchatError
from nbchat.models import REGISTRY, cached_models

if TYPE_CHECKING:
    from nbchat.api import Engine

# Engines loaded in this process, by (model, dtype); a dtype of None is the engine's default.
_ENGINES: dict[tuple[str, str | None], Engine] = {}


def loaded_engine(model: str, dtype: str | None) -> Engine | None:
    """The engine already loaded for ``model`` and ``dtype``, or None (loads nothing)."""
    return _ENGINES.get((model, dtype))


def known_models() -> list[tuple[str, str, bool, bool]]:
    """``(name, description, cached, loaded)`` of every model this kernel knows: the registry's, the
    others in the cache, then the ones loaded from a local path."""
    cached = set(cached_models())
    loaded = {model for model, _ in _ENGINES}
    rows = [(name, entry.description, name in cached, name in loaded) for name, entry in REGISTRY.items()]
    rows += [
        (name, "cached from the Hugging Face Hub", True, name in loaded)
        for name in sorted(cached - set(REGISTRY))
    ]
    rows += [(name, "local path", False, True) for name in sorted(loaded - cached - set(REGISTRY))]
    return rows


_PRINT_NOW = partial(print, flush=True)


def shared_engine(model: str, dtype: str | None, *, report: Callable[[str], None] = _PRINT_NOW) -> Engine:
    """The shared engine for ``model``. On first use: load it, compile it with a two-token warm-up
    reply, and ``report`` each stage in one line (printed; the chat panel shows them in its status
    line). A model that cannot load is a one-line UsageError."""
    key = (model, dtype)
    if key in _ENGINES:
        return _ENGINES[key]
    report(f"Loading {model} (first use in this kernel)...")
    started = time.perf_counter()
    from nbchat.api import Engine

    options = {"dtype": dtype} if dtype else {}
    try:
        engine = Engine(model=model, **options).load()
    except (NbchatError, OSError) as error:
        raise UsageError(f"cannot load model {model!r}: {error}") from None
    _ENGINES[key] = engine
    loaded = time.perf_counter()
    report("Compiling (first use only)...")
    # Through the public API, so the programs a short chat needs are the ones compiled.
    warm_up = engine.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0.0, stream=True
    )
    with warm_up:
        for _ in warm_up:
            pass
    done = time.perf_counter()
    timing = f"in {done - started:.1f} s (weights {loaded - started:.1f} s, compile {done - loaded:.1f} s)"
    report(f"Loaded {engine_summary(engine)} {timing}")
    return engine


def engine_summary(engine: Engine) -> str:
    """One line about a loaded engine: model, dtype, device and context length."""
    info = engine.model_info
    return f"{info.name} · {info.dtype} · {info.device} · context {info.context_length} tokens"
