"""One chat completion's generation, from the engine's worker thread to the HTTP response.

:class:`Generation` runs ``engine.chat.completions.create(**request)`` in a worker thread of its own
and hands each chunk to the event loop through an asyncio queue, so the loop never waits on the
engine: with an engine that generates one request at a time the others wait behind it in arrival
order, with one that runs many sequences at once they decode together, and nothing here changes.
:class:`Watch` waits for the next chunk while watching for the client's disconnect and the server's
shutdown; either raises the worker's stop flag, and the worker closes its engine stream at its next
chunk (within one decode step). A non-streamed request streams too (:func:`streamed_request`) and is
collected here (:func:`collect`), so it can be stopped the same way; :func:`sse_events` frames a
stream as SSE events. Must not: validate request fields or know routes.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from nbchat.server.errors import APIError, Disconnected, api_error, shutdown_error
from nbchat.server.metrics import RequestRecord, ServerMetrics

if TYPE_CHECKING:
    from nbchat.api import Engine
    from nbchat.protocol.responses import ChatCompletion, ChatCompletionChunk


class Generation:
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

    def start(self) -> Generation:
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


class Watch:
    """Waits for a generation's next queue item while watching for the client's disconnect and the
    server's shutdown: ``next()`` returns the item, or ``("stopped", None)`` on shutdown, and raises
    ``Disconnected`` when the client has gone."""

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
            raise Disconnected
        return "stopped", None

    def close(self) -> None:
        self._stopping.cancel()
        self._disconnected.cancel()


async def collect(generation: Generation, watch: Watch, record: RequestRecord, *,
                  logprobs: bool) -> ChatCompletion:
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
            raise shutdown_error()


async def sse_events(generation: Generation, watch: Watch, record: RequestRecord, wants_usage: bool,
                     finish: Callable[[BaseException | None], None]) -> AsyncIterator[str]:
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
                error = shutdown_error()
            if error is not None:
                yield f"data: {json.dumps(error.envelope())}\n\n"
            yield "data: [DONE]\n\n"
            return
    except BaseException as exc:  # the client went away (or the task was cancelled with it)
        error = exc
        raise
    finally:
        finish(error)


def finish_request(generation: Generation, generations: set[Generation], record: RequestRecord,
                   watch: Watch, error: BaseException | None) -> None:
    """A request is over (done, failed, disconnected or stopped): stop its worker and log it."""
    generation.stop.set()
    generations.discard(generation)
    watch.close()
    if error is None:
        status = "200"
    elif isinstance(error, APIError):
        status = str(error.status)
    elif isinstance(error, Disconnected | asyncio.CancelledError | GeneratorExit):
        status = "disconnected"
    else:
        status = "500"
    record.finish(status)
