"""RemoteEngine: any OpenAI-compatible endpoint (``nbchat serve``, vLLM, llama.cpp's server, OpenAI)
behind the interface the notebook layer uses for the local ``nbchat.Engine``.

``engine.chat.completions.create(**request)`` sends the request with the official ``openai`` client
(fields it does not know, such as ``top_k``, go in the body as they are) and returns its objects,
which have the shapes the local engine's have; ``render_prompt`` asks the endpoint's ``/tokenize``
and ``/detokenize`` (``nbchat serve`` and vLLM have them); ``models()`` lists what it serves. Every
error the endpoint or the connection gives becomes an nbchat error (a bad request an
``InvalidRequestError`` with the endpoint's ``param`` and ``code``, anything else an
``EndpointError``) whose message is one line.

The model is written ``URL`` (the endpoint's first model) or ``NAME@URL``. The API key comes from the
caller, else ``NBCHAT_API_KEY``, else ``OPENAI_API_KEY``; it lives in the client only.

Must not: import JAX, the engine or a tokenizer; keep conversations; retry silently.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nbchat.errors import EndpointError, InvalidRequestError

URL_PREFIXES = ("http://", "https://")
KEY_VARIABLES = ("NBCHAT_API_KEY", "OPENAI_API_KEY")
# A keyless server (nbchat serve without --api-key, vLLM, llama.cpp) ignores the key; the openai
# client refuses to start without one.
_NO_KEY = "EMPTY"


def is_endpoint(model: str | None) -> bool:
    """Whether a model setting names a remote endpoint: ``URL`` or ``NAME@URL``."""
    return isinstance(model, str) and split_endpoint(model) is not None


def split_endpoint(model: str) -> tuple[str | None, str] | None:
    """``"NAME@http://h/v1"`` -> ``("NAME", "http://h/v1")``, ``"http://h/v1"`` -> ``(None, URL)``;
    None when ``model`` is not an endpoint (a registry name or a path)."""
    text = model.strip()
    if text.startswith(URL_PREFIXES):
        return None, text.rstrip("/")
    name, at, url = text.rpartition("@")
    if at and name and url.startswith(URL_PREFIXES):
        return name, url.rstrip("/")
    return None


def api_key_and_source(explicit: str | None = None) -> tuple[str | None, str]:
    """The API key to send and where it came from (``"config"``, an environment variable, ``"none"``)."""
    if explicit:
        return explicit, "config"
    for variable in KEY_VARIABLES:
        if os.environ.get(variable):
            return os.environ[variable], variable
    return None, "none"


def mask_key(key: str | None) -> str | None:
    """A key as it may be shown: its first 3 and last 4 characters (all hidden when short)."""
    if not key:
        return None
    return f"{key[:3]}...{key[-4:]}" if len(key) >= 12 else "*" * len(key)


@dataclass(frozen=True)
class RemoteModelInfo:
    """What the notebook shows about a remote model (the local engine's ModelInfo, where known)."""

    name: str
    base_url: str
    dtype: str = "remote"
    device: str = "remote endpoint"


class RemoteEngine:
    """A chat backend at an OpenAI-compatible ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``).

    ``model``: the model to ask for; None = the first one the endpoint lists (asked once).
    """

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0):
        from openai import OpenAI

        self.base_url = base_url.rstrip("/")
        self._model = model
        key, self.key_source = api_key_and_source(api_key)
        self._client = OpenAI(base_url=self.base_url, api_key=key or _NO_KEY, max_retries=0, timeout=timeout)
        self.chat = _Chat(self)

    def __repr__(self) -> str:
        return f"RemoteEngine({self.base_url!r}, model={self._model!r})"

    @property
    def model(self) -> str:
        """The model requests ask for (the endpoint's first when none was named)."""
        if self._model is None:
            served = self.models()
            if not served:
                raise EndpointError(f"{self.base_url} serves no models (its /models list is empty).")
            self._model = served[0]
        return self._model

    @property
    def model_info(self) -> RemoteModelInfo:
        return RemoteModelInfo(name=self.model, base_url=self.base_url)

    def models(self) -> list[str]:
        """The ids of the models the endpoint serves."""
        with self._translated_errors():
            return [model.id for model in self._client.models.list()]

    def render_prompt(self, messages: Sequence[Mapping[str, Any]], *,
                      tools: Sequence[Mapping[str, Any]] | None = None, chat_template: str | None = None,
                      continue_final_message: bool = False) -> tuple[str, list[int]]:
        """The prompt text and ids the endpoint reads ``messages`` as (its /tokenize, /detokenize)."""
        body: dict[str, Any] = {"model": self.model, "messages": list(messages)}
        if tools:
            body["tools"] = list(tools)
        if chat_template:
            body["chat_template"] = chat_template
        if continue_final_message:
            body["continue_final_message"] = True
        ids = self._post_root("/tokenize", body)["tokens"]
        text = self._post_root("/detokenize", {"model": self.model, "tokens": ids})["prompt"]
        return text, ids

    def _post_root(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to a route beside ``/v1`` (vLLM's and nbchat serve's tokenizer routes)."""
        root = self.base_url.removesuffix("/v1")
        with self._translated_errors(what=f"{root}{path} (only nbchat serve and vLLM have it)"):
            return self._client.post(f"{root}{path}", body=body, cast_to=dict)

    def _create(self, request: Mapping[str, Any]) -> Any:
        known = _client_parameters()
        arguments = {key: value for key, value in request.items() if key in known}
        extra = {key: value for key, value in request.items() if key not in known}
        arguments["model"] = request.get("model") or self.model
        if extra:
            arguments["extra_body"] = extra
        with self._translated_errors():
            response = self._client.chat.completions.create(**arguments)
        if arguments.get("stream"):
            return RemoteStream(response, self)
        return response

    def _translated_errors(self, *, what: str | None = None) -> _ErrorTranslation:
        return _ErrorTranslation(self.base_url, what)


class _ErrorTranslation:
    """A context manager turning the openai client's errors into nbchat's (one-line messages)."""

    def __init__(self, base_url: str, what: str | None):
        self._base_url, self._what = base_url, what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        import openai

        if error is None or not isinstance(error, openai.OpenAIError):
            return
        raise translate_error(error, self._base_url, what=self._what) from None


def translate_error(error: Exception, base_url: str, *, what: str | None = None) -> Exception:
    """An openai client error as nbchat's: 400/422 -> InvalidRequestError, else EndpointError."""
    import openai

    if isinstance(error, openai.APIConnectionError):
        cause = error.__cause__ or error.__context__
        reason = f"{type(cause).__name__}: {cause}" if cause else str(error)
        timed_out = isinstance(error, openai.APITimeoutError)
        return EndpointError(f"cannot reach {base_url} ({'timed out' if timed_out else reason}); is the "
                             "server running, and is the URL right (it usually ends in /v1)?")
    if not isinstance(error, openai.APIError):
        return EndpointError(f"{base_url}: {' '.join(str(error).split())}")
    body = error.body if isinstance(error.body, dict) else {}
    message = " ".join(str(body.get("message") or error.message).split())
    status = getattr(error, "status_code", None)
    if status in (400, 422):
        return InvalidRequestError(message, param=error.param, code=error.code or "invalid_request_error")
    where = what or base_url
    if status == 401:
        return EndpointError(f"{where} refused the API key (401): {message} Pass it with %chat model URL "
                             "--api-key KEY, ChatMagics.api_key, NBCHAT_API_KEY or OPENAI_API_KEY.",
                             status=status)
    if status is None:  # an error event in a stream
        return EndpointError(f"{where} stopped the reply: {message}")
    return EndpointError(f"{where} answered {status}: {message}", status=status)


def _client_parameters() -> frozenset[str]:
    """The keyword parameters of the openai client's ``chat.completions.create``."""
    global _CLIENT_PARAMETERS
    if _CLIENT_PARAMETERS is None:
        from openai.resources.chat.completions import Completions

        _CLIENT_PARAMETERS = frozenset(inspect.signature(Completions.create).parameters) - {"self"}
    return _CLIENT_PARAMETERS


_CLIENT_PARAMETERS: frozenset[str] | None = None


class RemoteStream(Iterator[Any]):
    """The chunks of a remote streamed completion; ``close()`` closes the connection (the server then
    stops generating), as closing a local stream stops the engine."""

    def __init__(self, stream: Any, engine: RemoteEngine):
        self._stream = stream
        self._chunks = iter(stream)
        self._engine = engine

    def __iter__(self) -> RemoteStream:
        return self

    def __next__(self) -> Any:
        with self._engine._translated_errors():
            return next(self._chunks)

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> RemoteStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Completions:
    def __init__(self, engine: RemoteEngine):
        self._engine = engine

    def create(self, /, **request: Any) -> Any:
        """OpenAI's ``chat.completions.create`` at the endpoint (``model`` defaults to the engine's)."""
        return self._engine._create(request)


class _Chat:
    def __init__(self, engine: RemoteEngine):
        self.completions = _Completions(engine)
