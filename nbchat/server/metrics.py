"""What ``nbchat serve`` measures: Prometheus metrics (``GET /metrics``) and one log line per request.

:class:`ServerMetrics` holds the metrics in a registry of its own: requests by route and status,
prompt and completion tokens, time to first token and time per output token, and the generations
waiting for the engine and generating (kept by the worker threads, so a generation counts until it
has really stopped). :class:`RequestRecord` follows one chat completion from arrival
to its end, from the chunks the engine streams, and logs ``id model prompt/completion tokens TTFT
tok/s status``. Must not: know HTTP, the engine or the routes.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

logger = logging.getLogger("nbchat.server")

_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
_PER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServerMetrics:
    """The server's Prometheus metrics, in their own registry (two servers in one process never mix)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter("nbchat_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=registry)
        self.prompt_tokens = Counter("nbchat_prompt_tokens", "Prompt tokens of chat completions.",
                                     registry=registry)
        self.completion_tokens = Counter("nbchat_completion_tokens", "Tokens generated.", registry=registry)
        self.time_to_first_token = Histogram(
            "nbchat_time_to_first_token_seconds", "From a chat completion's arrival to its first token.",
            buckets=_TTFT_BUCKETS, registry=registry)
        self.time_per_output_token = Histogram(
            "nbchat_time_per_output_token_seconds", "Between a completion's tokens, after the first.",
            buckets=_PER_TOKEN_BUCKETS, registry=registry)
        self.waiting = Gauge("nbchat_requests_waiting", "Chat completions accepted, waiting for the engine.",
                             registry=registry)
        self.running = Gauge("nbchat_requests_running", "Chat completions generating.", registry=registry)

    def start_request(self, model: str) -> RequestRecord:
        return RequestRecord(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestRecord:
    """One chat completion's timings and token counts, fed its chunks; ``finish(status)`` once."""

    def __init__(self, metrics: ServerMetrics, model: str):
        self._metrics = metrics
        self.id = f"req-{uuid.uuid4().hex[:12]}"
        self.model = model
        self.started = time.perf_counter()
        self.first_chunk_at: float | None = None
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def chunk(self, chunk: Any) -> None:
        now = time.perf_counter()
        if self.first_chunk_at is None:
            self.first_chunk_at = now
            self.id = chunk.id or self.id
        if self.first_token_at is None and any(
            part.delta.content or part.delta.tool_calls or part.finish_reason for part in chunk.choices
        ):
            self.first_token_at = now
            self._metrics.time_to_first_token.observe(now - self.started)
        if chunk.usage is not None:
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens

    def finish(self, status: str) -> None:
        ended = time.perf_counter()
        metrics = self._metrics
        metrics.prompt_tokens.inc(self.prompt_tokens)
        metrics.completion_tokens.inc(self.completion_tokens)
        tokens_per_s = 0.0
        ttft = "-"
        if self.first_token_at is not None:
            ttft = f"{self.first_token_at - self.started:.3f}s"
            if self.completion_tokens > 1 and ended > self.first_token_at:
                per_token = (ended - self.first_token_at) / (self.completion_tokens - 1)
                metrics.time_per_output_token.observe(per_token)
                tokens_per_s = 1.0 / per_token
        logger.info("%s model=%s prompt_tokens=%d completion_tokens=%d ttft=%s tok/s=%.1f status=%s",
                    self.id, self.model, self.prompt_tokens, self.completion_tokens, ttft, tokens_per_s,
                    status)
