"""The OpenAI-compatible HTTP server behind ``nbchat serve``: FastAPI routes over one ``nbchat.Engine``.

Routes: ``POST /v1/chat/completions`` (JSON, or SSE ``data: {chunk}`` events ending with ``data:
[DONE]``), ``GET /v1/models``, ``GET /health``, ``POST /tokenize`` / ``POST /detokenize`` (vLLM's
shapes) and ``GET /metrics`` (Prometheus text). Every error is OpenAI's envelope ``{"error":
{"message", "type", "param", "code"}}``; an error after a stream started is its last event.

Each request's generation runs in a worker thread of its own, iterating the engine's stream into an
asyncio queue the route reads (:class:`_Generation`), so the event loop never waits on the engine:
with an engine that generates one request at a time the others wait behind it in arrival order, with
one that runs many sequences at once they decode together, and this module is the same. A client
that disconnects, and a shutdown (SIGTERM, Ctrl-C), raise the worker's stop flag: it closes its
engine stream at the next chunk, within one decode step. A non-streamed request streams too, and is
collected here, so it can be stopped the same way.

Must not: validate request fields (the engine does; its InvalidRequestError becomes a 400, or a 404
for an unknown model), generate, template or know a tokenizer's rules; import JAX at import time (the
model loads in a background thread while ``/health`` answers 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nbchat.errors import InvalidRequestError
from nbchat.server_metrics import ServerMetrics

if TYPE_CHECKING:
    from nbchat.api import Engine
    from nbchat.protocol import ChatCompletionChunk

logger = logging.getLogger("nbchat.server")

SHUTDOWN_MESSAGE = "The server is shutting down; this reply was cut off. Send the request again later."
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The longest a worker may take to stop after its stop flag is raised before shutdown gives up on it.
_WORKER_STOP_TIMEOUT_S = 5.0


class APIError(Exception):
    """An error response: HTTP status plus the fields of OpenAI's error envelope."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def envelope(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.envelope(), status_code=self.status)


def api_error(error: BaseException) -> APIError:
    """The error response for an exception from the engine: a bad request is a 400 (a 404 for a model
    this server does not serve), anything else an engine fault, a 500 (logged with its traceback)."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, InvalidRequestError):
        status = 404 if error.code == "model_not_found" else 400
        return APIError(status, error.message, param=error.param, code=error.code)
    logger.error("engine fault", exc_info=error)
    return APIError(500, f"The engine failed: {type(error).__name__}: {error}", type="server_error",
                    code="internal_error")


# --------------------------------------------------------------------------------------------------
# The served model


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


# --------------------------------------------------------------------------------------------------
# One request's generation, in its worker thread


class _Generation:
    """Runs ``engine.chat.completions.create(**request)`` in a worker thread and delivers, through an
    asyncio queue: ``("accepted", None)`` once the engine has validated the request (or ``("error",
    exc)``), then ``("chunk", chunk)`` per chunk and ``("end", None)`` or ``("error", exc)``."""

    def __init__(self, engine: Engine, request: Mapping[str, Any], metrics: ServerMetrics):
        self._metrics = metrics
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.stop = threading.Event()
        self._loop = asyncio.get_running_loop()
        self._engine = engine
        self._request = request
        self._thread = threading.Thread(target=self._run, name="nbchat-generation", daemon=True)

    def start(self) -> _Generation:
        self._thread.start()
        return self

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _put(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server has stopped, nobody reads
            self.stop.set()

    def _run(self) -> None:
        try:
            stream = self._engine.chat.completions.create(**self._request)
        except BaseException as error:
            self._put("error", error)
            return
        self._put("accepted", None)
        state = self._metrics.waiting  # until the engine's first chunk, then running
        state.inc()
        try:
            with stream:  # closing it stops the engine's generation at once
                for chunk in stream:
                    if state is self._metrics.waiting:
                        state.dec()
                        state = self._metrics.running
                        state.inc()
                    if self.stop.is_set():
                        return
                    self._put("chunk", chunk)
        except BaseException as error:
            self._put("error", error)
            return
        finally:
            state.dec()
        self._put("end", None)


def streamed_request(body: dict[str, Any]) -> tuple[dict[str, Any], bool, bool]:
    """``(request the engine streams, whether the client asked to stream, whether it asked for the
    usage chunk)``. The engine always streams with usage (the server needs the token counts, and can
    stop a stream); a value this does not recognise is passed on unchanged for the engine to reject."""
    stream, options = body.get("stream"), body.get("stream_options")
    if stream in (None, False) and options is None:
        return {**body, "stream": True, "stream_options": {"include_usage": True}}, False, True
    if stream is True and options is None:
        return {**body, "stream_options": {"include_usage": True}}, True, False
    if stream is True and isinstance(options, dict) and options.get("include_usage") in (None, False, True):
        wants_usage = options.get("include_usage") is True
        return {**body, "stream_options": {**options, "include_usage": True}}, True, wants_usage
    return body, stream is True, True


# --------------------------------------------------------------------------------------------------
# The app


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a ``prompt`` (text) or ``messages`` (rendered with the chat template)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    chat_template: str | None = None
    continue_final_message: bool = False
    add_special_tokens: bool = Field(True, description="Tokenizer special tokens around a prompt.")
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    """vLLM's /detokenize: token ids in, their text out."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int]


def create_app(served: ServedModel, *, api_key: str | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app serving ``served`` (its ``load()`` is started by the app's lifespan). ``app.state``
    holds ``served``, ``metrics`` and ``stopping`` (set by :func:`serve` on SIGTERM / Ctrl-C)."""
    metrics = metrics or ServerMetrics()
    generations: set[_Generation] = set()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop, app.state.stopping = asyncio.get_running_loop(), asyncio.Event()
        served.start_loading()
        yield
        for generation in list(generations):
            generation.stop.set()
        deadline = time.monotonic() + _WORKER_STOP_TIMEOUT_S
        for generation in list(generations):
            await asyncio.to_thread(generation.join, max(0.0, deadline - time.monotonic()))

    app = FastAPI(title="nbchat", version=_version(), lifespan=lifespan)
    app.state.served, app.state.metrics = served, metrics
    app.add_middleware(_CountResponses, metrics=metrics)
    _install_error_handlers(app)
    _install_openapi(app)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise APIError(401, "You didn't provide an API key. Send it in an 'Authorization: Bearer KEY' "
                           "header (the key nbchat serve was started with).", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    authorized = [Depends(check_key)]

    @app.get("/health")
    async def health() -> Response:
        if served.ready:
            return JSONResponse({"status": "ok", "model": served.name})
        if served.load_error is not None:
            return APIError(503, f"The model failed to load: {served.load_error}", type="server_error",
                            code="model_load_failed").response()
        return APIError(503, f"The model {served.name} is loading.", type="server_error",
                        code="model_loading").response()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model:path}", dependencies=authorized)
    async def retrieve_model(model: str) -> dict[str, Any]:
        served.check_name(model)
        return _model_card(served)

    @app.post("/v1/chat/completions", dependencies=authorized,
              openapi_extra=_json_body_schema("ChatCompletionRequest"))
    async def chat_completions(request: Request) -> Response:
        body = _json_object(await request.body())
        engine = await served.wait()
        record = metrics.start_request(served.name)
        engine_request, streams, wants_usage = streamed_request(body)
        generation = _Generation(engine, engine_request, metrics).start()
        generations.add(generation)
        watch = _Watch(request, app.state.stopping)
        try:
            kind, value = await watch.next(generation.queue)
            if kind == "error":
                raise api_error(value)
        except BaseException as error:
            _finish(generation, generations, record, watch, error)
            raise
        if kind == "stopped":
            _finish(generation, generations, record, watch, None)
            raise APIError(503, SHUTDOWN_MESSAGE, type="server_error", code="server_shutdown")
        if streams:
            events = _sse_events(generation, watch, record, wants_usage,
                                 lambda error: _finish(generation, generations, record, watch, error))
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        try:
            completion = await _collect(generation, watch, record, logprobs=bool(body.get("logprobs")))
        except BaseException as error:
            _finish(generation, generations, record, watch, error)
            raise
        _finish(generation, generations, record, watch, None)
        return JSONResponse(completion.model_dump(mode="json"))

    @app.post("/tokenize", dependencies=authorized)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        served.check_name(body.model)
        engine = await served.wait()
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "Send either 'prompt' (text) or 'messages' (a chat), not both or neither.",
                           param="prompt" if body.prompt is None else "messages", code="invalid_value")
        if body.messages is not None:
            _, ids = await asyncio.to_thread(
                engine.render_prompt, body.messages, tools=body.tools, chat_template=body.chat_template,
                continue_final_message=body.continue_final_message)
        else:
            if body.tools or body.chat_template or body.continue_final_message:
                raise APIError(400, "'tools', 'chat_template' and 'continue_final_message' apply to "
                               "'messages'; a 'prompt' is tokenized as it is.", param="tools",
                               code="invalid_value")
            ids = engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"]
        strings = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.model_info.context_length, "tokens": ids,
                "token_strs": strings}

    @app.post("/detokenize", dependencies=authorized)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        served.check_name(body.model)
        engine = await served.wait()
        vocab_size = engine.model_info.vocab_size
        for index, token_id in enumerate(body.tokens):
            if not 0 <= token_id < vocab_size:
                raise APIError(400, f"Invalid value for 'tokens[{index}]': token id {token_id} is outside "
                               f"this model's vocabulary (ids 0 to {vocab_size - 1}).",
                               param=f"tokens[{index}]", code="invalid_value")
        return {"prompt": engine.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return app


class _CountResponses:
    """ASGI middleware counting responses by route and status (pure ASGI, so a streaming response's
    disconnect reaches the route as it is)."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _model_card(served: ServedModel) -> dict[str, Any]:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "nbchat"}


def _json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; a 400 naming the problem otherwise."""
    if not raw.strip():
        raise APIError(400, "The request body is empty: send a JSON object with at least 'messages'.",
                       code="invalid_json")
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise APIError(400, "The request body is not UTF-8 text: send a JSON object.",
                       code="invalid_json") from None
    except json.JSONDecodeError as error:
        raise APIError(400, f"The request body is not valid JSON: {error.msg} at line {error.lineno} "
                       f"column {error.colno} (char {error.pos}).", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"The request body must be a JSON object, not a JSON {type(body).__name__}.",
                       code="invalid_json")
    return body


class _Watch:
    """Waits for a generation's next queue item while watching for the client's disconnect and the
    server's shutdown: ``next()`` returns the item, or ``("stopped", None)`` on shutdown, and raises
    ``_Disconnected`` when the client has gone."""

    def __init__(self, request: Request, stopping: asyncio.Event):
        self._stopping = asyncio.ensure_future(stopping.wait())
        self._disconnected = asyncio.ensure_future(self._wait_disconnect(request))

    @staticmethod
    async def _wait_disconnect(request: Request) -> None:
        # The body has been read, so the next ASGI message is the disconnect (the way Starlette's
        # StreamingResponse listens for it).
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def next(self, queue: asyncio.Queue[tuple[str, Any]]) -> tuple[str, Any]:
        if not queue.empty():
            return queue.get_nowait()
        getter = asyncio.ensure_future(queue.get())
        try:
            await asyncio.wait({getter, self._stopping, self._disconnected},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        if self._disconnected.done():
            raise _Disconnected
        return "stopped", None

    def close(self) -> None:
        self._stopping.cancel()
        self._disconnected.cancel()


class _Disconnected(Exception):
    """The client closed the connection before its reply was complete."""


async def _collect(generation: _Generation, watch: _Watch, record: Any, *, logprobs: bool):
    from nbchat.api import collect_chunks

    chunks: list[ChatCompletionChunk] = []
    while True:
        kind, value = await watch.next(generation.queue)
        if kind == "chunk":
            record.chunk(value)
            chunks.append(value)
        elif kind == "end":
            return collect_chunks(chunks, logprobs=logprobs)
        elif kind == "error":
            raise api_error(value)
        else:
            raise APIError(503, SHUTDOWN_MESSAGE, type="server_error", code="server_shutdown")


async def _sse_events(generation: _Generation, watch: _Watch, record: Any, wants_usage: bool,
                      finish: Any) -> AsyncIterator[str]:
    """The SSE events of a streamed completion: one per chunk, an error event if it fails or the
    server stops, then ``[DONE]``."""
    error: BaseException | None = None
    try:
        while True:
            kind, value = await watch.next(generation.queue)
            if kind == "chunk":
                record.chunk(value)
                if value.usage is not None and not wants_usage:
                    continue
                yield f"data: {value.model_dump_json()}\n\n"
                continue
            if kind == "error":
                error = api_error(value)
            elif kind == "stopped":
                error = APIError(503, SHUTDOWN_MESSAGE, type="server_error", code="server_shutdown")
            if error is not None:
                yield f"data: {json.dumps(error.envelope())}\n\n"
            yield "data: [DONE]\n\n"
            return
    except BaseException as exc:  # the client went away (or the task was cancelled with it)
        error = exc
        raise
    finally:
        finish(error)


def _finish(generation: _Generation, generations: set[_Generation], record: Any, watch: _Watch,
            error: BaseException | None) -> None:
    """A request is over (done, failed, disconnected or stopped): stop its worker and log it."""
    generation.stop.set()
    generations.discard(generation)
    watch.close()
    if error is None:
        status = "200"
    elif isinstance(error, APIError):
        status = str(error.status)
    elif isinstance(error, _Disconnected | asyncio.CancelledError | GeneratorExit):
        status = "disconnected"
    else:
        status = "500"
    record.finish(status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(InvalidRequestError)
    async def on_invalid_request(request: Request, error: InvalidRequestError) -> JSONResponse:
        return api_error(error).response()

    @app.exception_handler(_Disconnected)
    async def on_disconnect(request: Request, error: _Disconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's code for "client closed request"

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = {404: f"There is no route {request.url.path!r}: this server has /v1/chat/completions, "
                        "/v1/models, /health, /tokenize, /detokenize and /metrics.",
                   405: f"{request.method} is not allowed on {request.url.path}."}.get(
            error.status_code, str(error.detail))
        return APIError(error.status_code, message, type=kind, code=code).response()

    @app.exception_handler(Exception)
    async def on_fault(request: Request, error: Exception) -> JSONResponse:
        return api_error(error).response()


def _validation_error(error: RequestValidationError) -> APIError:
    """FastAPI's request validation (of /tokenize and /detokenize bodies) as a 400, never a 422."""
    first = error.errors()[0]
    location = [part for part in first.get("loc", ()) if part != "body"]
    param = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in location).lstrip(".")
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"The request body is not valid JSON: {detail}.", code="invalid_json")
    if not param:
        return APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return APIError(400, f"Invalid value for '{param}': {first.get('msg')}.", param=param,
                    code="missing_required_parameter" if first.get("type") == "missing" else "invalid_value")


def _json_body_schema(name: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document, with the chat request's JSON schema (the protocol's pydantic model)
    although the route reads the body itself (so the engine, not FastAPI, validates it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from nbchat.protocol import ChatCompletionRequest

            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(schema.pop("$defs", {}))
            schemas["ChatCompletionRequest"] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi


def _version() -> str:
    from nbchat import __version__

    return __version__


# --------------------------------------------------------------------------------------------------
# Running it


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
                            timeout_graceful_shutdown=int(_WORKER_STOP_TIMEOUT_S), lifespan="on")
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
