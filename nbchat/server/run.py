"""Running ``nbchat serve``: uvicorn, binding before the model loads, and a clean stop on SIGTERM or
Ctrl-C (open streams end with an error event first). Must not: hold routes or generation.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from nbchat.server.app import WORKER_STOP_TIMEOUT_S, create_app
from nbchat.server.served import ServedModel


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          dtype: str = "float32", access_log: bool = False) -> int:
    """Run the server until SIGTERM or Ctrl-C: bind first, then load the model (``/health`` is 503
    until it is ready). Returns the exit status: 0 after a clean stop, 1 if the model failed to load."""
    import signal

    import uvicorn

    from nbchat.models import resolve

    name = resolve(model).name  # an unknown model fails here, before anything binds
    served = ServedModel(model, name=name, dtype=dtype)
    app = create_app(served, api_key=api_key)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            # Running streams end with an error event now, rather than when the drain times out.
            if hasattr(app.state, "stopping"):
                app.state.loop.call_soon_threadsafe(app.state.stopping.set)
            super().handle_exit(sig, frame)

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("nbchat.server", "uvicorn"):  # their lines, not every library's INFO chatter
        logging.getLogger(name).setLevel(logging.INFO)
    config = uvicorn.Config(app, host=host, port=port, access_log=access_log, log_config=None,
                            timeout_graceful_shutdown=int(WORKER_STOP_TIMEOUT_S), lifespan="on")
    server = Server(config)
    watcher = threading.Thread(target=_stop_on_load_failure, args=(served, server), daemon=True)
    watcher.start()
    # After a graceful stop uvicorn re-raises the signal it caught: by then it has been handled.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if served.load_error is not None else 0


def _stop_on_load_failure(served: ServedModel, server: Any) -> None:
    served.done.wait()
    if served.load_error is not None:
        server.should_exit = True
