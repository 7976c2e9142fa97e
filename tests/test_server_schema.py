"""Fuzz `nbchat serve` with schemathesis from the server's own OpenAPI document (tiny model).

A bounded run: a few dozen generated requests per operation, valid and invalid, against the real
server. Every answer must come within the timeout (no hangs), none may be a 5xx, and every 4xx must
be OpenAI's error envelope. A generated ``max_tokens`` above 8 or ``n`` above 2 is lowered before
sending, so every case stays a short generation (what is fuzzed is the handling, not the decoding).
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.test_server import ENVELOPE_FIELDS

REQUEST_TIMEOUT_S = 60
EXAMPLES = {"POST /v1/chat/completions": 30}
DEFAULT_EXAMPLES = 10


def bounded(body):
    """The generated body with its generation kept short."""
    if not isinstance(body, dict):
        return body
    limits = {"max_tokens": 8, "max_completion_tokens": 8, "n": 2, "top_logprobs": 2}
    return {key: min(value, limits[key]) if key in limits and type(value) is int else value
            for key, value in body.items()}


def check_answer(case, response) -> None:
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ENVELOPE_FIELDS, response.text
        assert body["error"]["message"], response.text
    if "".join(response.headers.get("content-type", [])).startswith("text/event-stream"):
        events = [event for event in response.text.split("\n\n") if event]
        assert events[-1] == "data: [DONE]", response.text
        for event in events[:-1]:
            json.loads(event.removeprefix("data: "))


@pytest.fixture(scope="module")
def api_schema(tiny_server):
    document = httpx.get(f"{tiny_server.url}/openapi.json").json()
    return schemathesis.openapi.from_dict(document)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzzed_requests_get_no_5xx_no_hang_and_every_4xx_in_the_envelope(tiny_server, api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/chat/completions", "GET /v1/models", "POST /tokenize", "POST /detokenize", "GET /health"}
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        if mode == GenerationMode.NEGATIVE and operation.method != "post" and "{" not in operation.path:
            continue  # nothing in the request to get wrong

        @settings(max_examples=EXAMPLES.get(label, DEFAULT_EXAMPLES), deadline=None, database=None,
                  phases=[Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            case.body = bounded(case.body)
            response = case.call(base_url=tiny_server.url, headers=tiny_server.headers,
                                 timeout=REQUEST_TIMEOUT_S)
            check_answer(case, response)

        try:
            run()
        except Unsatisfiable:
            # Hypothesis found no way to break this operation's schema (a free-form path string).
            assert mode == GenerationMode.NEGATIVE and "{" in operation.path, label
