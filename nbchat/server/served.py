"""The model ``nbchat serve`` serves: one ``nbchat.Engine``, loaded and compiled in a background thread
while the server already answers (``/health`` 503 until it is ready). Must not: know HTTP routes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import TYPE_CHECKING

from nbchat.server.errors import APIError

if TYPE_CHECKING:
    from nbchat.api import Engine

logger = logging.getLogger("nbchat.server")


class ServedModel:
    """The engine this server serves: loaded (and compiled) in a background thread at start-up."""

    def __init__(self, model: str, *, name: str, dtype: str = "float32"):
        self.model, self.name, self.dtype = model, name, dtype
        self.created = int(time.time())
        self.engine: Engine | None = None
        self.load_error: BaseException | None = None
        self.done = threading.Event()
        self._loaded: asyncio.Event | None = None

    def start_loading(self) -> None:
        """Start :meth:`load` in a background thread; requests awaiting :meth:`wait` resume after it."""
        loop, self._loaded = asyncio.get_running_loop(), asyncio.Event()

        def load_then_wake() -> None:
            self.load()
            try:
                loop.call_soon_threadsafe(self._loaded.set)
            except RuntimeError:  # the server stopped while the model loaded
                pass

        threading.Thread(target=load_then_wake, name="nbchat-load", daemon=True).start()

    def load(self) -> None:
        """Load the model and compile the programs a short chat needs (a two-token reply)."""
        started = time.perf_counter()
        try:
            from nbchat.api import Engine

            engine = Engine(self.model, dtype=self.dtype).load()
            loaded = time.perf_counter()
            warm_up = engine.chat.completions.create(
                messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0.0, stream=True
            )
            with warm_up:
                for _ in warm_up:
                    pass
            self.engine = engine
            logger.info("model %s ready (load %.1f s, compile %.1f s)", self.name, loaded - started,
                        time.perf_counter() - loaded)
        except BaseException as error:  # reported by the server, which then stops
            self.load_error = error
            logger.error("cannot load %s: %s: %s", self.model, type(error).__name__, error)
        finally:
            self.done.set()

    @property
    def ready(self) -> bool:
        return self.engine is not None

    async def wait(self) -> Engine:
        """The engine, once loaded (requests that arrive during the load wait for it)."""
        if not self.done.is_set():
            await self._loaded.wait()
        if self.engine is None:
            raise APIError(503, f"The model failed to load: {self.load_error}", type="server_error",
                           code="model_load_failed")
        return self.engine

    def check_name(self, requested: str | None) -> None:
        if requested is not None and requested not in (self.name, self.model):
            raise APIError(404, f"The model {requested!r} does not exist: this server serves {self.name!r}.",
                           param="model", code="model_not_found")
