"""Errors of ``nbchat serve`` as OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``.

The engine's InvalidRequestError is a 400 (a 404 for a model this server does not serve), anything
else from the engine a 500; FastAPI's own request validation, unknown routes and methods and a body
that is not a JSON object are 400/404/405 in the same envelope, so a 422 never appears. Must not:
validate request fields itself (the engine does).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from nbchat.errors import InvalidRequestError

logger = logging.getLogger("nbchat.server")

SHUTDOWN_MESSAGE = "The server is shutting down; this reply was cut off. Send the request again later."


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


def shutdown_error() -> APIError:
    return APIError(503, SHUTDOWN_MESSAGE, type="server_error", code="server_shutdown")


class Disconnected(Exception):
    """The client closed the connection before its reply was complete."""


def json_object(raw: bytes) -> dict[str, Any]:
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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(InvalidRequestError)
    async def on_invalid_request(request: Request, error: InvalidRequestError) -> JSONResponse:
        return api_error(error).response()

    @app.exception_handler(Disconnected)
    async def on_disconnect(request: Request, error: Disconnected) -> Response:
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
