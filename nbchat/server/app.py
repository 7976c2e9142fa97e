"""The FastAPI app of ``nbchat serve``: thin routes over the served engine.

``POST /v1/chat/completions`` (JSON, or SSE ``data: {chunk}`` events ending with ``data: [DONE]``),
``GET /v1/models``, ``GET /health``, ``POST /tokenize`` / ``POST /detokenize`` (vLLM's shapes),
``GET /metrics`` (Prometheus text), and an API key check when a key is set. The OpenAPI document
carries the chat request's JSON schema (the protocol's pydantic model) although the route reads the
body itself, so that the engine, not FastAPI, validates it. Must not: validate chat request fields,
generate, template or know a tokenizer's rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from nbchat.server.errors import APIError, api_error, install_error_handlers, json_object, shutdown_error
from nbchat.server.generation import Generation, Watch, collect, finish_request, sse_events, streamed_request
from nbchat.server.metrics import ServerMetrics
from nbchat.server.served import ServedModel

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# The longest shutdown waits for the worker threads to stop once their stop flags are raised.
WORKER_STOP_TIMEOUT_S = 5.0


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
    generations: set[Generation] = set()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.loop, app.state.stopping = asyncio.get_running_loop(), asyncio.Event()
        served.start_loading()
        yield
        for generation in list(generations):
            generation.stop.set()
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for generation in list(generations):
            await asyncio.to_thread(generation.join, max(0.0, deadline - time.monotonic()))

    app = FastAPI(title="nbchat", version=_version(), lifespan=lifespan)
    app.state.served, app.state.metrics = served, metrics
    app.add_middleware(_CountResponses, metrics=metrics)
    install_error_handlers(app)
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
        body = json_object(await request.body())
        engine = await served.wait()
        record = metrics.start_request(served.name)
        engine_request, streams, wants_usage = streamed_request(body)
        generation = Generation(engine, engine_request, metrics).start()
        generations.add(generation)
        watch = Watch(request, app.state.stopping)
        try:
            kind, value = await watch.next(generation.queue)
            if kind == "error":
                raise api_error(value)
        except BaseException as error:
            finish_request(generation, generations, record, watch, error)
            raise
        if kind == "stopped":
            finish_request(generation, generations, record, watch, None)
            raise shutdown_error()
        if streams:
            events = sse_events(generation, watch, record, wants_usage,
                                 lambda error: finish_request(generation, generations, record, watch, error))
            return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
        try:
            completion = await collect(generation, watch, record, logprobs=bool(body.get("logprobs")))
        except BaseException as error:
            finish_request(generation, generations, record, watch, error)
            raise
        finish_request(generation, generations, record, watch, None)
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


def _json_body_schema(name: str) -> dict[str, Any]:
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _install_openapi(app: FastAPI) -> None:
    """The OpenAPI document, with the chat request's JSON schema (the protocol's pydantic model)
    although the route reads the body itself (so the engine, not FastAPI, validates it)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from nbchat.protocol.requests import ChatCompletionRequest

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
