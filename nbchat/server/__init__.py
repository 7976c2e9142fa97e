"""The OpenAI-compatible HTTP server behind ``nbchat serve``: FastAPI + uvicorn over one ``nbchat.Engine``.

``app`` (routes), ``generation`` (each request's worker thread, disconnects, SSE), ``errors`` (OpenAI's
error envelope), ``served`` (the model, loaded in the background), ``metrics`` (Prometheus and the
request log) and ``run`` (uvicorn, signals). Must not: validate request fields (the engine does),
generate, or import JAX at import time.
"""

from nbchat.server.app import create_app
from nbchat.server.errors import APIError, api_error
from nbchat.server.run import serve
from nbchat.server.served import ServedModel

__all__ = ["APIError", "ServedModel", "api_error", "create_app", "serve"]
