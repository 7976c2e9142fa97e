"""`nbchat serve` over real HTTP: a server subprocess on a loopback port, driven by the official
`openai` client (sync and async) and by raw requests where the wire itself is the subject.

Most tests share one server of the tiny random-weight model (its replies are gibberish, but
deterministic at temperature 0); the few that need a real model's behaviour (tool calls, JSON that
ends, a generation long enough to cut off) use the default model and are marked `integration`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from nbchat.errors import InvalidRequestError
from nbchat.server import api_error
from tests.serving import running_server, stop

HI = [{"role": "user", "content": "Hello! How are you today?"}]
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text."""
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = re.escape(name + (f"{{{selector}}}" if labels else "")) + r" ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no sample {name} {labels} in\n{text}"
    return float(match.group(1))


def streamed_text(stream) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def assert_envelope(body: dict, *, type: str, param: str | None, code: str | None) -> str:
    """Check OpenAI's error envelope field by field; returns the message."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ENVELOPE_FIELDS, error
    assert (error["type"], error["param"], error["code"]) == (type, param, code), error
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    return error["message"]


# --- start-up, models, health ---------------------------------------------------------------------


def test_health_is_503_while_the_model_loads_then_200(tiny_server):
    statuses = tiny_server.startup_statuses
    assert statuses[0] == 503 and statuses[-1] == 200, statuses
    response = httpx.get(f"{tiny_server.url}/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"


def test_models_lists_the_served_model_sync_and_async(tiny_server, tiny_model_dir):
    models = tiny_server.client().models.list()
    assert [model.id for model in models] == [tiny_model_dir.name]
    assert models.data[0].object == "model" and models.data[0].owned_by == "nbchat"

    async def listed():
        async with tiny_server.async_client() as client:
            return [model.id async for model in client.models.list()]

    assert asyncio.run(listed()) == [tiny_model_dir.name]
    assert tiny_server.client().models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name


# --- completions ----------------------------------------------------------------------------------


def test_stream_and_non_stream_agree_at_temperature_0(tiny_server, tiny_model_dir):
    client = tiny_server.client()
    request = dict(model=tiny_model_dir.name, messages=HI, temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**request)
    assert whole.object == "chat.completion" and whole.model == tiny_model_dir.name
    assert whole.usage.completion_tokens == 12 or whole.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**request, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.usage is None for chunk in chunks)  # no usage chunk unless asked for
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_include_usage_sends_a_last_chunk_with_the_usage_only(tiny_server, tiny_model_dir):
    client = tiny_server.client()
    request = dict(model=tiny_model_dir.name, messages=HI, temperature=0, max_tokens=8)
    whole = client.chat.completions.create(**request)
    usage = {"include_usage": True}
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options=usage))
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_raw_stream_is_sse_events_ending_with_done(tiny_server, tiny_model_dir):
    body = {"model": tiny_model_dir.name, "messages": HI, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{tiny_server.base_url}/chat/completions", json=body,
                      headers=tiny_server.headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(event.startswith("data: ") for event in events[:-1])
    assert json.loads(events[0][len("data: "):])["object"] == "chat.completion.chunk"


def test_async_client_streams_the_same_text(tiny_server, tiny_model_dir):
    request = dict(model=tiny_model_dir.name, messages=HI, temperature=0, max_tokens=10)
    expected = tiny_server.client().chat.completions.create(**request).choices[0].message.content

    async def streamed():
        async with tiny_server.async_client() as client:
            stream = await client.chat.completions.create(**request, stream=True)
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])

    assert asyncio.run(streamed()) == expected


def test_sixteen_concurrent_streams_each_get_the_text_they_get_alone(tiny_server, tiny_model_dir):
    prompts = [f"Question {index}: what is {index} plus {index}?" for index in range(16)]

    def request(prompt):
        return dict(model=tiny_model_dir.name, messages=[{"role": "user", "content": prompt}], temperature=0,
                    max_tokens=10)

    client = tiny_server.client()
    alone = [client.chat.completions.create(**request(p)).choices[0].message.content for p in prompts]

    async def together():
        async with tiny_server.async_client() as client:
            async def one(prompt):
                stream = await client.chat.completions.create(**request(prompt), stream=True)
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            return await asyncio.gather(*(one(prompt) for prompt in prompts))

    assert asyncio.run(together()) == alone
    assert len(set(alone)) > 1  # distinct prompts, distinct replies: the streams were not mixed up


def test_every_request_field_goes_through_http(tiny_server, tiny_model_dir):
    """Parameters beyond OpenAI's (top_k), n, logprobs and a seed reach the engine unchanged."""
    reply = tiny_server.client().chat.completions.create(
        model=tiny_model_dir.name, messages=HI, max_tokens=5, n=2, seed=7, temperature=1.0, logprobs=True,
        top_logprobs=2, extra_body={"top_k": 5},
    )
    assert [choice.index for choice in reply.choices] == [0, 1]
    assert all(len(entry.top_logprobs) == 2 for entry in reply.choices[0].logprobs.content)


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "status", "param", "code"),
    [
        ({"model": "no-such-model"}, 404, "model", "model_not_found"),
        ({"max_tokens": 100_000}, 400, "messages", "context_length_exceeded"),
        ({"temperature": 5}, 400, "temperature", "invalid_value"),
        ({"messages": []}, 400, "messages", None),
        ({"no_such_field": 1}, 400, "no_such_field", None),
        ({"stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ],
)
def test_bad_requests_are_the_engine_errors_in_openais_envelope(tiny_server, tiny_model_dir, fields, status,
                                                                param, code):
    body = {"model": tiny_model_dir.name, "messages": HI, **fields}
    response = httpx.post(f"{tiny_server.base_url}/chat/completions", json=body, headers=tiny_server.headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert_envelope(response.json(), type="invalid_request_error", param=param, code=code or error["code"])
    # The same error the engine raises in-process, field for field.
    with pytest.raises(openai.APIStatusError) as raised:
        tiny_server.client().chat.completions.create(**{k: v for k, v in body.items()
                                                       if k in ("model", "messages")},
                                                    extra_body={k: v for k, v in body.items()
                                                                if k not in ("model", "messages")})
    assert raised.value.status_code == status and raised.value.param == param


def test_a_stream_request_that_is_wrong_is_an_http_error_not_a_stream(tiny_server, tiny_model_dir):
    with pytest.raises(openai.BadRequestError) as raised:
        tiny_server.client().chat.completions.create(model=tiny_model_dir.name, messages=HI, stream=True,
                                                     max_tokens=100_000)
    assert raised.value.code == "context_length_exceeded"


@pytest.mark.parametrize(("key", "expected"), [(None, "didn't provide"), ("sk-wrong", "Incorrect API key")])
def test_a_missing_or_wrong_key_is_401(tiny_server, key, expected):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize")):
        response = httpx.request(method, f"{tiny_server.url}{path}", headers=headers, json={"messages": HI})
        assert response.status_code == 401
        assert expected in assert_envelope(response.json(), type="invalid_request_error", param=None,
                                           code="invalid_api_key")
    if key:  # the openai client itself refuses to start without a key
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=tiny_server.base_url, api_key=key, max_retries=0).models.list()
    # /health and /metrics stay open for monitoring.
    assert httpx.get(f"{tiny_server.url}/health").status_code == 200


@pytest.mark.parametrize(
    ("body", "names"),
    [(b'{"messages": [', "not valid JSON"), (b"[1, 2]", "must be a JSON object"), (b"", "empty"),
     (b"\xff\xfe", "not valid JSON")],
)
def test_a_malformed_body_is_400_naming_the_problem(tiny_server, body, names):
    headers = {**tiny_server.headers, "Content-Type": "application/json"}
    for path in ("/v1/chat/completions", "/tokenize", "/detokenize"):
        response = httpx.post(f"{tiny_server.url}{path}", content=body, headers=headers)
        assert response.status_code == 400, (path, response.text)
        message = assert_envelope(response.json(), type="invalid_request_error", param=None,
                                  code="invalid_json")
        if path == "/v1/chat/completions":
            assert names in message


def test_422_never_appears_a_wrong_field_type_is_400(tiny_server):
    url, headers = tiny_server.url, tiny_server.headers
    response = httpx.post(f"{url}/detokenize", json={"tokens": "abc"}, headers=headers)
    assert response.status_code == 400
    assert_envelope(response.json(), type="invalid_request_error", param="tokens", code="invalid_value")
    response = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "x", "bogus": 1},
                          headers=tiny_server.headers)
    assert response.status_code == 400 and response.json()["error"]["param"] == "bogus"


def test_unknown_routes_and_methods_are_in_the_envelope(tiny_server):
    response = httpx.get(f"{tiny_server.url}/v2/nothing")
    assert response.status_code == 404
    assert_envelope(response.json(), type="invalid_request_error", param=None, code="not_found")
    response = httpx.get(f"{tiny_server.base_url}/chat/completions", headers=tiny_server.headers)
    assert response.status_code == 405
    assert_envelope(response.json(), type="invalid_request_error", param=None, code="method_not_allowed")


def test_an_engine_fault_is_a_500_server_error():
    """The mapping the routes use (a real engine fault cannot be provoked through valid HTTP input)."""
    error = api_error(RuntimeError("device lost"))
    assert error.status == 500
    assert error.envelope() == {"error": {"message": "The engine failed: RuntimeError: device lost",
                                          "type": "server_error", "param": None, "code": "internal_error"}}
    bad = api_error(InvalidRequestError("no", param="top_p", code="invalid_value"))
    assert (bad.status, bad.param, bad.code) == (400, "top_p", "invalid_value")


# --- tokenize, metrics, logs ----------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip_the_prompt(tiny_server, tiny_model_dir):
    response = httpx.post(f"{tiny_server.url}/tokenize", json={"messages": HI, "return_token_strs": True},
                          headers=tiny_server.headers)
    assert response.status_code == 200
    tokenized = response.json()
    assert tokenized["count"] == len(tokenized["tokens"]) == len(tokenized["token_strs"])
    assert tokenized["max_model_len"] == 2048
    usage = tiny_server.client().chat.completions.create(model=tiny_model_dir.name, messages=HI,
                                                         max_tokens=1).usage
    assert usage.prompt_tokens == tokenized["count"]
    response = httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": tokenized["tokens"]},
                          headers=tiny_server.headers)
    assert response.json()["prompt"] == (
        "<|im_start|>user\nHello! How are you today?<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = httpx.post(f"{tiny_server.url}/tokenize", json={"prompt": "Hello!"}, headers=tiny_server.headers)
    assert prompt.json()["count"] >= 1


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [("/tokenize", {"prompt": "a", "messages": HI}, "messages"), ("/tokenize", {}, "prompt"),
     ("/tokenize", {"messages": [{"role": "nobody", "content": "x"}]}, "messages[0].role"),
     ("/detokenize", {"tokens": [1, 10**9]}, "tokens[1]"),
     ("/tokenize", {"prompt": "a", "model": "x"}, "model")],
)
def test_tokenize_errors_name_the_field(tiny_server, path, body, param):
    response = httpx.post(f"{tiny_server.url}{path}", json=body, headers=tiny_server.headers)
    assert response.status_code == (404 if param == "model" else 400), response.text
    assert response.json()["error"]["param"] == param


def test_metrics_count_requests_tokens_and_latencies(tiny_server, tiny_model_dir):
    before = httpx.get(f"{tiny_server.url}/metrics").text
    reply = tiny_server.client().chat.completions.create(model=tiny_model_dir.name, messages=HI, max_tokens=6)
    text = httpx.get(f"{tiny_server.url}/metrics").text
    route = {"route": "/v1/chat/completions", "status": "200"}
    assert metric(text, "nbchat_requests_total", **route) >= 1
    assert (metric(text, "nbchat_completion_tokens_total") - metric(before, "nbchat_completion_tokens_total")
            == reply.usage.completion_tokens)
    assert (metric(text, "nbchat_prompt_tokens_total") - metric(before, "nbchat_prompt_tokens_total")
            == reply.usage.prompt_tokens)
    assert metric(text, "nbchat_time_to_first_token_seconds_count") >= 1
    assert metric(text, "nbchat_time_per_output_token_seconds_count") >= 1
    assert metric(text, "nbchat_requests_waiting") == 0 and metric(text, "nbchat_requests_running") == 0


def test_one_log_line_per_request(tiny_server, tiny_model_dir):
    reply = tiny_server.client().chat.completions.create(model=tiny_model_dir.name, messages=HI, max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        tiny_server.client().chat.completions.create(model=tiny_model_dir.name, messages=HI, temperature=9)
    deadline = time.monotonic() + 10
    while reply.id not in tiny_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(line for line in tiny_server.log().splitlines() if reply.id in line)
    assert f"model={tiny_model_dir.name}" in line and "status=200" in line
    usage = reply.usage
    assert f"prompt_tokens={usage.prompt_tokens} completion_tokens={usage.completion_tokens}" in line
    assert re.search(r"ttft=\d+\.\d+s tok/s=\d+\.\d", line)
    assert re.search(r"req-\w+ model=\S+ prompt_tokens=0 completion_tokens=0 .* status=400",
                     tiny_server.log())
    assert "GET /health" not in tiny_server.log()  # uvicorn's access log is off


def test_an_unknown_model_fails_before_binding_and_a_keyless_public_bind_warns():
    result = subprocess.run(
        [sys.executable, "-m", "nbchat.cli", "serve", "--host", "0.0.0.0", "--model", "/no/such/model.gguf"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NBCHAT_API_KEY": ""})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("nbchat serve: warning: binding 0.0.0.0 with no API key")
    assert lines[-1].startswith("nbchat: ModelNotFoundError: Unknown model '/no/such/model.gguf'")


# --- disconnects and shutdown ---------------------------------------------------------------------


def test_sigterm_ends_running_streams_with_an_error_event_and_exits_cleanly(tiny_model_dir):
    with running_server(str(tiny_model_dir)) as server:
        # The tiny model's special tokens (ids 0-2) are banned: the reply cannot end before SIGTERM.
        body = {
            "model": tiny_model_dir.name, "messages": HI, "max_tokens": 2000, "stream": True,
            "logit_bias": {"0": -100, "1": -100, "2": -100},
        }
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            events = [next(line for line in lines if line) for _ in range(3)]
            server.process.send_signal(signal.SIGTERM)
            events += [line for line in lines if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][len("data: "):])
        assert_envelope(error, type="server_error", param=None, code="server_shutdown")
        assert len(events) < 2000
        assert server.process.wait(30) == 0
        assert stop(server) == 0


@pytest.fixture(scope="module")
def server():
    """`nbchat serve` of the default model, without a key."""
    with running_server("smollm2-135m-instruct") as server:
        yield server


@pytest.mark.integration
class TestDefaultModel:
    """Behaviour that needs a real model: tool calls and JSON that completes, a long generation."""

    def test_tool_calls_through_http(self, server):
        parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                      "additionalProperties": False}
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city.", "parameters": parameters}}]
        request = dict(model="smollm2-135m-instruct", tools=tools, tool_choice="required", temperature=0,
                       max_tokens=64, messages=[{"role": "user", "content": "What is the weather in Paris?"}])
        reply = server.client().chat.completions.create(**request)
        call = reply.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert set(json.loads(call.function.arguments)) == {"city"}
        chunks = list(server.client().chat.completions.create(**request, stream=True))
        deltas = [d for chunk in chunks if chunk.choices for d in chunk.choices[0].delta.tool_calls or ()]
        names = [delta.function.name for delta in deltas if delta.function and delta.function.name]
        assert names == [call.function.name for call in reply.choices[0].message.tool_calls]

    def test_json_schema_through_http(self, server):
        schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                  "required": ["name", "age"], "additionalProperties": False}
        reply = server.client().chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "user", "content": "Make up a person, as JSON with name and age."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
            temperature=0, max_tokens=64)
        value = json.loads(reply.choices[0].message.content)
        assert set(value) == {"name", "age"} and isinstance(value["age"], int)

    def test_a_client_that_disconnects_frees_the_engine_for_the_next_request(self, server):
        """After 3 chunks the client goes; the server stops generating (running drops to 0 while the
        abandoned reply would still need hundreds of decode steps) and serves the next at once."""
        client = server.client()
        stream = client.chat.completions.create(
            model="smollm2-135m-instruct", stream=True, max_tokens=1500, temperature=0.8, seed=1,
            messages=[{"role": "user", "content": "Write a very long story about a lighthouse keeper."}])
        for _, _ in zip(range(3), stream, strict=False):
            pass
        stream.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = httpx.get(f"{server.url}/metrics").text
            if metric(text, "nbchat_requests_running") == 0 and metric(text, "nbchat_requests_waiting") == 0:
                break
            time.sleep(0.05)
        assert metric(text, "nbchat_requests_running") == 0
        reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=HI, max_tokens=4)
        assert reply.usage.completion_tokens >= 1
        assert re.search(r"model=smollm2-135m-instruct .* status=disconnected", server.log())
