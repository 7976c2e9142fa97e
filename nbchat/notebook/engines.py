"""The engines loaded in this kernel (one ``nbchat.api.Engine`` per model and dtype, shared; one
``nbchat.remote.RemoteEngine`` per endpoint URL), and the models it knows.

Loading a model is slow, so every conversation, every re-load of the extension and every surface in
the kernel shares one engine per model and dtype; switching the default model (``%chat model``)
frees the others. The first use loads it (the loader shows progress
bars), compiles it with a two-token warm-up reply and prints a one-line summary. Importing this
module imports no JAX: ``nbchat.api`` is imported on the first load, and a model written as a URL
(``http://host:8000/v1``, ``NAME@URL``) is a remote endpoint, which loads nothing. Nothing here knows
about conversations, settings or displays.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from IPython.core.error import UsageError

from nbchat.errors import NbchatError
from nbchat.models import DEFAULT_MODEL, REGISTRY, cached_models
from nbchat.remote import RemoteEngine, split_endpoint

if TYPE_CHECKING:
    from nbchat.api import Engine

# Engines loaded in this process, by (model, dtype); a dtype of None is the engine's default.
_ENGINES: dict[tuple[str, str | None], Engine] = {}
# Remote endpoints used in this process, by (model as written, API key given): clients, nothing loaded.
_REMOTE: dict[tuple[str, str | None], RemoteEngine] = {}


def backend_model(model: str, base_url: str | None) -> str:
    """The model a chat uses, given ``ChatMagics.base_url``: a URL stays as it is; with a base URL set,
    the default model means the endpoint's first model and any other NAME means ``NAME@base_url``."""
    if not base_url or split_endpoint(model) is not None:
        return model
    return base_url if model == DEFAULT_MODEL else f"{model}@{base_url}"


def remote_engine(model: str, api_key: str | None = None) -> RemoteEngine:
    """The client of the endpoint ``model`` names (``URL`` or ``NAME@URL``); contacts nothing yet."""
    key = (model, api_key)
    if key not in _REMOTE:
        name, url = split_endpoint(model)
        _REMOTE[key] = RemoteEngine(url, model=name, api_key=api_key)
    return _REMOTE[key]


def remote_models(models: list[str], api_key: str | None = None) -> list[tuple[str, str, bool, bool]]:
    """``known_models()`` rows for the endpoints among ``models`` and those used in this kernel: each
    model an endpoint serves as ``NAME@URL``, or one row saying why the endpoint did not answer."""
    endpoints = {split_endpoint(model)[1]: model for model in models if split_endpoint(model) is not None}
    endpoints.update({engine.base_url: model for (model, _), engine in _REMOTE.items()})
    rows = []
    for url, model in endpoints.items():
        engine = remote_engine(model, api_key)
        try:
            served = engine.models()
        except NbchatError as error:
            rows.append((url, f"not reachable: {error}", False, False))
            continue
        rows += [(f"{name}@{url}", f"served at {url}", False, True) for name in served]
    return rows


def loaded_engine(model: str, dtype: str | None) -> Engine | None:
    """The engine already loaded for ``model`` and ``dtype``, or None (loads nothing)."""
    return _ENGINES.get((model, dtype))


def release_other_engines(model: str, dtype: str | None) -> list[str]:
    """Free every loaded engine but the one for ``model`` and ``dtype`` (switching the default model
    must not keep the previous one's weights and cache in memory); returns the models freed."""
    released = [key for key in _ENGINES if key != (model, dtype)]
    for key in released:
        del _ENGINES[key]
    if released:
        gc.collect()  # an Engine and its chat namespace refer to each other: free the arrays now
    return [name for name, _ in released]


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


def shared_engine(
    model: str, dtype: str | None, *, api_key: str | None = None, report: Callable[[str], None] = _PRINT_NOW
) -> Engine | RemoteEngine:
    """The shared engine for ``model``. On first use: load it, compile it with a two-token warm-up
    reply, and ``report`` each stage in one line (printed; the chat panel shows them in its status
    line). A model that cannot load is a one-line UsageError. A model written as a URL is the
    endpoint's client (``api_key`` is for it): nothing loads."""
    if split_endpoint(model) is not None:
        return remote_engine(model, api_key)
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


def engine_summary(engine: Engine | RemoteEngine) -> str:
    """One line about a loaded engine: model, dtype, device and context length (model and URL for an
    endpoint)."""
    if isinstance(engine, RemoteEngine):
        try:
            return f"{engine.model} at {engine.base_url} (remote endpoint)"
        except NbchatError as error:
            raise UsageError(str(error)) from None
    info = engine.model_info
    return f"{info.name} · {info.dtype} · {info.device} · context {info.context_length} tokens"
