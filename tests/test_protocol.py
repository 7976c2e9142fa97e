"""Request validation (every rule of the chat completion API, table-driven) and the response shapes."""

from __future__ import annotations

import copy

import pytest

from nbchat.errors import InvalidRequestError
from nbchat.protocol.formats import NamedToolChoice
from nbchat.protocol.requests import validate_request
from nbchat.protocol.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChoiceDeltaFunctionCall,
    ChoiceDeltaToolCall,
    ChoiceLogprobs,
    ChunkChoice,
    ResponseFunctionCall,
    ResponseToolCall,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from tests.openai_shapes import assert_exact_openai_shape

USER = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def call(call_id: str = "call_1", name: str = "get_weather") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def asks_tool(*call_ids: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [call(i) for i in call_ids]}


def answer(call_id: str) -> dict:
    return {"role": "tool", "tool_call_id": call_id, "content": "sunny"}


# (id, request, param, a word of the message) — every request must raise InvalidRequestError.
BAD_REQUESTS = [
    # messages: presence, type, emptiness
    ("no-messages", {}, "messages", "missing"),
    ("messages-not-list", {"messages": "Hi"}, "messages", "list"),
    ("messages-dict", {"messages": {"role": "user", "content": "Hi"}}, "messages", "list"),
    ("messages-empty", {"messages": []}, "messages", "empty"),
    ("message-not-object", {"messages": ["Hi"]}, "messages[0]", "object"),
    ("message-none", {"messages": [*USER, None]}, "messages[1]", "object"),
    # roles
    ("role-missing", {"messages": [{"content": "Hi"}]}, "messages[0].role", "role"),
    ("role-unknown", {"messages": [{"role": "bot", "content": "Hi"}]}, "messages[0].role", "bot"),
    ("role-not-string", {"messages": [{"role": 1, "content": "Hi"}]}, "messages[0].role", "supported"),
    ("role-function-legacy", {"messages": [{"role": "function", "name": "f", "content": "1"}]},
     "messages[0].role", "deprecated"),
    # content
    ("content-missing", {"messages": [{"role": "user"}]}, "messages[0].content", "missing"),
    ("content-int", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "string"),
    ("content-dict", {"messages": [{"role": "user", "content": {"text": "Hi"}}]}, "messages[0].content",
     "text parts"),
    ("content-null-user", {"messages": [{"role": "user", "content": None}]}, "messages[0].content", "string"),
    ("part-not-object", {"messages": [{"role": "user", "content": ["Hi"]}]}, "messages[0].content[0]",
     "object"),
    ("part-type-missing", {"messages": [{"role": "user", "content": [{"text": "Hi"}]}]},
     "messages[0].content[0].type", "type"),
    ("part-text-not-string", {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "messages[0].content[0].text", "string"),
    ("part-image-user", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type", "text-only"),
    ("part-image-system", {"messages": [{"role": "system", "content": [{"type": "image_url"}]}, *USER]},
     "messages[0].content[0].type", "only text"),
    ("part-audio-tool", {"messages": [*USER, asks_tool("c"), {"role": "tool", "tool_call_id": "c",
                                                             "content": [{"type": "input_audio"}]}]},
     "messages[2].content[0].type", "only text"),
    ("part-refusal-assistant", {"messages": [*USER, {"role": "assistant", "content": [{"type": "refusal"}]},
                                             *USER]}, "messages[1].content[0].type", "refusal"),
    ("part-extra-field", {"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "x": 1}]}]},
     "messages[0].content[0].x", "unrecognized"),
    ("message-extra-field", {"messages": [{"role": "user", "content": "Hi", "foo": 1}]}, "messages[0].foo",
     "unrecognized"),
    ("name-not-string", {"messages": [{"role": "user", "content": "Hi", "name": 3}]}, "messages[0].name",
     "string"),
    ("assistant-without-content", {"messages": [*USER, {"role": "assistant"}, *USER]}, "messages[1].content",
     "tool_calls"),
    # tool fields on the wrong roles, tool call structure
    ("tool-call-id-on-user", {"messages": [{"role": "user", "content": "Hi", "tool_call_id": "c"}]},
     "messages[0].tool_call_id", "tool messages"),
    ("tool-calls-on-user", {"messages": [{"role": "user", "content": "Hi", "tool_calls": [call()]}]},
     "messages[0].tool_calls", "assistant"),
    ("tool-without-call-id", {"messages": [*USER, asks_tool("c"), {"role": "tool", "content": "x"}]},
     "messages[2].tool_call_id", "missing"),
    ("tool-answers-nothing", {"messages": [*USER, answer("c")]}, "messages[1].tool_call_id", "no earlier"),
    ("tool-answers-wrong-id", {"messages": [*USER, asks_tool("a"), answer("b")]}, "messages[2].tool_call_id",
     "'b'"),
    ("tool-answers-twice", {"messages": [*USER, asks_tool("a", "b"), answer("a"), answer("a")]},
     "messages[3].tool_call_id", "no earlier"),
    ("tool-answer-after-user", {"messages": [*USER, asks_tool("a"), answer("a"), *USER, answer("a")]},
     "messages[4].tool_call_id", "no earlier"),
    ("calls-unanswered-before-user", {"messages": [*USER, asks_tool("a", "b"), answer("a"), *USER]},
     "messages[1].tool_calls", "b"),
    ("calls-unanswered-at-end", {"messages": [*USER, asks_tool("a"), ]}, "messages[1].tool_calls", "a"),
    ("tool-calls-empty",
     {"messages": [*USER, {"role": "assistant", "content": "x", "tool_calls": []}, *USER]},
     "messages[1].tool_calls", "empty"),
    ("tool-call-duplicate-id", {"messages": [*USER, asks_tool("a", "a"), answer("a"), answer("a")]},
     "messages[1].tool_calls[1].id", "duplicate"),
    ("tool-call-bad-type",
     {"messages": [*USER, {"role": "assistant", "tool_calls": [{**call(), "type": "x"}]}]},
     "messages[1].tool_calls[0].type", "function"),
    ("tool-call-arguments-dict", {"messages": [*USER, {"role": "assistant", "tool_calls": [
        {**call(), "function": {"name": "f", "arguments": {}}}]}]},
     "messages[1].tool_calls[0].function.arguments", "string"),
    # conversation ending
    ("ends-in-assistant", {"messages": [*USER, {"role": "assistant", "content": "Hello"}]},
     "messages[1].role", "continue_final_message"),
    ("continue-without-assistant", {"messages": USER, "continue_final_message": True},
     "continue_final_message", "last message"),
    ("continue-tool-call-only", {"messages": [*USER, asks_tool("a"), answer("a"), {"role": "assistant",
                                 "tool_calls": [call("b")]}], "continue_final_message": True},
     "messages[3].tool_calls", "b"),
    ("continue-with-json", {"messages": [*USER, {"role": "assistant", "content": "{"}],
                            "continue_final_message": True, "response_format": {"type": "json_object"}},
     "continue_final_message", "whole reply"),
    ("continue-with-tools", {"messages": [*USER, {"role": "assistant", "content": "Let"}],
                             "continue_final_message": True, "tools": [TOOL]},
     "continue_final_message", "whole reply"),
    # unknown and unsupported fields
    ("unknown-field-typo", {"messages": USER, "temprature": 0.5}, "temprature", "temperature"),
    ("unknown-field", {"messages": USER, "foo": 1}, "foo", "unrecognized"),
    ("unknown-fields-several", {"messages": USER, "foo": 1, "max_token": 5}, "foo", "'max_token'"),
    ("audio", {"messages": USER, "audio": {"voice": "alloy", "format": "mp3"}}, "audio", "not supported"),
    ("modalities-audio", {"messages": USER, "modalities": ["text", "audio"]}, "modalities", "not supported"),
    ("prediction", {"messages": USER, "prediction": {"type": "content", "content": "x"}}, "prediction",
     "not supported"),
    ("web-search", {"messages": USER, "web_search_options": {}}, "web_search_options", "not supported"),
    ("service-tier-flex", {"messages": USER, "service_tier": "flex"}, "service_tier", "not supported"),
    ("store-true", {"messages": USER, "store": True}, "store", "not supported"),
    ("metadata", {"messages": USER, "metadata": {"a": "b"}}, "metadata", "not supported"),
    ("reasoning-effort", {"messages": USER, "reasoning_effort": "low"}, "reasoning_effort", "reasoning"),
    ("parallel-tool-calls-not-bool", {"messages": USER, "parallel_tool_calls": "no"}, "parallel_tool_calls",
     "boolean"),
    ("functions-legacy", {"messages": USER, "functions": [{"name": "f"}]}, "functions", "tools"),
    ("function-call-legacy", {"messages": USER, "function_call": "auto"}, "function_call", "tool_choice"),
    # sampling parameters
    ("model-not-string", {"messages": USER, "model": 3}, "model", "string"),
    ("temperature-high", {"messages": USER, "temperature": 2.5}, "temperature", "2"),
    ("temperature-negative", {"messages": USER, "temperature": -0.1}, "temperature", "0"),
    ("temperature-string", {"messages": USER, "temperature": "0.5"}, "temperature", "number"),
    ("temperature-bool", {"messages": USER, "temperature": True}, "temperature", "number"),
    ("temperature-nan", {"messages": USER, "temperature": float("nan")}, "temperature", "finite"),
    ("top-p-zero", {"messages": USER, "top_p": 0}, "top_p", "greater than 0"),
    ("top-p-high", {"messages": USER, "top_p": 1.5}, "top_p", "1"),
    ("top-k-negative", {"messages": USER, "top_k": -1}, "top_k", "0 = off"),
    ("top-k-float", {"messages": USER, "top_k": 2.0}, "top_k", "integer"),
    ("min-p-high", {"messages": USER, "min_p": 1.5}, "min_p", "1"),
    ("frequency-penalty-high", {"messages": USER, "frequency_penalty": 3}, "frequency_penalty", "-2 to 2"),
    ("presence-penalty-low", {"messages": USER, "presence_penalty": -3}, "presence_penalty", "-2 to 2"),
    ("repetition-penalty-zero", {"messages": USER, "repetition_penalty": 0}, "repetition_penalty", "greater"),
    ("repetition-penalty-high", {"messages": USER, "repetition_penalty": 101}, "repetition_penalty", "100"),
    ("repetition-penalty-inf", {"messages": USER, "repetition_penalty": float("inf")}, "repetition_penalty",
     "finite"),
    ("seed-float", {"messages": USER, "seed": 1.5}, "seed", "integer"),
    ("seed-huge", {"messages": USER, "seed": 2**64}, "seed", "64-bit"),
    ("max-tokens-zero", {"messages": USER, "max_tokens": 0}, "max_tokens", ">= 1"),
    ("max-tokens-string", {"messages": USER, "max_tokens": "10"}, "max_tokens", "integer"),
    ("max-completion-tokens-negative", {"messages": USER, "max_completion_tokens": -5},
     "max_completion_tokens", ">= 1"),
    ("n-zero", {"messages": USER, "n": 0}, "n", "1 to 16"),
    ("n-too-many", {"messages": USER, "n": 17}, "n", "16"),
    ("n-greedy", {"messages": USER, "n": 2, "temperature": 0}, "n", "temperature"),
    # stop
    ("stop-int", {"messages": USER, "stop": 5}, "stop", "string"),
    ("stop-empty-string", {"messages": USER, "stop": ""}, "stop", "empty"),
    ("stop-empty-in-list", {"messages": USER, "stop": ["a", ""]}, "stop[1]", "empty"),
    ("stop-too-many", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ("stop-not-string-in-list", {"messages": USER, "stop": ["a", 1]}, "stop[1]", "string"),
    # logit bias
    ("logit-bias-list", {"messages": USER, "logit_bias": [1, 2]}, "logit_bias", "object"),
    ("logit-bias-key", {"messages": USER, "logit_bias": {"hello": 1}}, "logit_bias", "token id"),
    ("logit-bias-negative-key", {"messages": USER, "logit_bias": {"-1": 1}}, "logit_bias", "token id"),
    ("logit-bias-range", {"messages": USER, "logit_bias": {"5": 101}}, "logit_bias[5]", "-100 to 100"),
    ("logit-bias-value-type", {"messages": USER, "logit_bias": {"5": "x"}}, "logit_bias[5]", "number"),
    # logprobs and streaming
    ("logprobs-int", {"messages": USER, "logprobs": 1}, "logprobs", "boolean"),
    ("top-logprobs-without-logprobs", {"messages": USER, "top_logprobs": 3}, "top_logprobs", "logprobs"),
    ("top-logprobs-high", {"messages": USER, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
    ("top-logprobs-negative", {"messages": USER, "logprobs": True, "top_logprobs": -1}, "top_logprobs", "0"),
    ("stream-string", {"messages": USER, "stream": "yes"}, "stream", "boolean"),
    ("stream-options-without-stream", {"messages": USER, "stream_options": {"include_usage": True}},
     "stream_options", "stream=True"),
    ("stream-options-unknown", {"messages": USER, "stream": True, "stream_options": {"usage": True}},
     "stream_options.usage", "include_usage"),
    # response_format
    ("response-format-string", {"messages": USER, "response_format": "json"}, "response_format", "object"),
    ("response-format-no-type", {"messages": USER, "response_format": {}}, "response_format.type", "missing"),
    ("response-format-bad-type", {"messages": USER, "response_format": {"type": "xml"}},
     "response_format.type", "json_schema"),
    ("json-schema-missing", {"messages": USER, "response_format": {"type": "json_schema"}},
     "response_format.json_schema", "missing"),
    ("json-schema-no-name", {"messages": USER, "response_format": {"type": "json_schema",
                                                                   "json_schema": {"schema": {}}}},
     "response_format.json_schema.name", "missing"),
    ("json-schema-bad-name", {"messages": USER, "response_format": {"type": "json_schema",
                                                                    "json_schema": {"name": "a b"}}},
     "response_format.json_schema.name", "pattern"),
    ("json-schema-not-object",
     {"messages": USER,
      "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
     "response_format.json_schema.schema", "object"),
    # tools and tool_choice (tool_choice errors worded as vLLM words them)
    ("tools-empty", {"messages": USER, "tools": []}, "tools", "empty array"),
    ("tools-not-list", {"messages": USER, "tools": TOOL}, "tools", "list"),
    ("tool-type", {"messages": USER, "tools": [{**TOOL, "type": "custom"}]}, "tools[0].type", "function"),
    ("tool-no-function", {"messages": USER, "tools": [{"type": "function"}]}, "tools[0].function", "missing"),
    ("tool-name-space",
     {"messages": USER, "tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name", "^[a-zA-Z0-9_-]{1,64}$"),
    ("tool-name-long", {"messages": USER, "tools": [{"type": "function", "function": {"name": "x" * 65}}]},
     "tools[0].function.name", "pattern"),
    ("tool-name-empty", {"messages": USER, "tools": [{"type": "function", "function": {"name": ""}}]},
     "tools[0].function.name", "pattern"),
    ("tool-parameters-list", {"messages": USER, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": []}}]}, "tools[0].function.parameters", "object"),
    ("tool-names-duplicate", {"messages": USER, "tools": [TOOL, TOOL]}, "tools[1].function.name",
     "duplicate"),
    ("tool-choice-without-tools", {"messages": USER, "tool_choice": "auto"}, "tool_choice",
     "When using `tool_choice`, `tools` must be set."),
    ("tool-choice-required-without-tools", {"messages": USER, "tool_choice": "required"}, "tool_choice",
     "`tools` must be set"),
    ("tool-choice-named-without-tools", {"messages": USER, "tool_choice": {"type": "function",
                                                                          "function": {"name": "f"}}},
     "tool_choice", "`tools` must be set"),
    ("tool-choice-bad-string", {"messages": USER, "tools": [TOOL], "tool_choice": "always"}, "tool_choice",
     'Only named tools, "none", "auto" or "required" are supported.'),
    ("tool-choice-int", {"messages": USER, "tools": [TOOL], "tool_choice": 1}, "tool_choice",
     "Invalid value for `tool_choice`"),
    ("tool-choice-function-missing", {"messages": USER, "tools": [TOOL], "tool_choice": {"type": "function"}},
     "tool_choice.function", "Correct usage"),
    ("tool-choice-name-missing", {"messages": USER, "tools": [TOOL],
                                  "tool_choice": {"type": "function", "function": {}}},
     "tool_choice.function.name", "Expected field `name`"),
    ("tool-choice-name-empty", {"messages": USER, "tools": [TOOL],
                                "tool_choice": {"type": "function", "function": {"name": ""}}},
     "tool_choice.function.name", "Invalid `name`"),
    ("tool-choice-not-in-tools", {"messages": USER, "tools": [TOOL],
                                  "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "tool_choice.function.name", "does not match any of the specified `tools`"),
    ("tool-choice-type", {"messages": USER, "tools": [TOOL],
                          "tool_choice": {"type": "tool", "function": {"name": "get_weather"}}},
     "tool_choice.type", "Correct usage"),
    # nbchat extensions
    ("chat-template-not-string", {"messages": USER, "chat_template": 1}, "chat_template", "string"),
    ("continue-not-bool", {"messages": USER, "continue_final_message": "yes"}, "continue_final_message",
     "boolean"),
    ("request-not-mapping", ["messages"], None, "dict"),
]


@pytest.mark.parametrize(
    ("request_body", "param", "word"),
    [pytest.param(body, param, word, id=name) for name, body, param, word in BAD_REQUESTS],
)
def test_bad_request_is_rejected_naming_the_field(request_body, param, word):
    snapshot = copy.deepcopy(request_body)
    with pytest.raises(InvalidRequestError) as caught:
        validate_request(request_body)
    error = caught.value
    assert error.param == param
    assert word.lower() in error.message.lower()
    assert error.code and error.code != "invalid_request_error"
    assert "pydantic" not in error.message and "validation error" not in error.message.lower()
    assert error.__cause__ is None and error.__suppress_context__  # no raw pydantic error chained on
    assert request_body == snapshot  # the caller's data is untouched


GOOD_CONVERSATION = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [call("a"), call("b", "get_time")]},
    {"role": "tool", "tool_call_id": "b", "content": "noon"},
    {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "sunny"}]},
    {"role": "assistant", "content": "Sunny at noon.", "name": "bot"},
    {"role": "user", "content": "Thanks", "name": "ann"},
]


def test_good_request_with_every_field_validates_and_resolves():
    body = {
        "messages": GOOD_CONVERSATION,
        "model": "smollm2-135m-instruct",
        "max_tokens": 10,
        "max_completion_tokens": 20,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "seed": -3,
        "stop": "END",
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "repetition_penalty": 1.1,
        "logit_bias": {"42": -100, 7: 2.5},
        "n": 3,
        "logprobs": True,
        "top_logprobs": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {"type": "text"},
        "tools": [TOOL, {"type": "function", "function": {"name": "get_time"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "user": "someone",
        "store": False,
        "modalities": ["text"],
        "service_tier": "auto",
        "parallel_tool_calls": True,
    }
    snapshot = copy.deepcopy(body)
    request = validate_request(body)
    assert body == snapshot
    assert request.completion_token_limit == 20
    assert request.completion_token_limit_param == "max_completion_tokens"
    assert request.stop_strings == ("END",)
    assert request.logit_bias == {42: -100.0, 7: 2.5}
    assert request.include_usage
    assert request.effective_tool_choice == NamedToolChoice(type="function", function={"name": "get_time"})
    messages = request.template_messages()
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "Weather in\nParis?"}
    assert "content" not in messages[2] and messages[2]["tool_calls"][1]["function"]["name"] == "get_time"
    assert messages[4] == {"role": "tool", "content": "sunny", "tool_call_id": "a"}
    assert messages[6] == {"role": "user", "content": "Thanks", "name": "ann"}
    assert request.template_tools()[0] == TOOL
    # template_messages hands out fresh dicts every time
    messages[0]["content"] = "changed"
    assert request.template_messages()[0]["content"] == "Be brief."


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({}, lambda r: r.completion_token_limit is None and r.stop_strings == () and not r.include_usage),
        ({"max_tokens": 7}, lambda r: r.completion_token_limit == 7),
        ({"stop": ["a", "b"]}, lambda r: r.stop_strings == ("a", "b")),
        ({"stop": None, "temperature": None, "seed": None}, lambda r: r.temperature is None),
        ({"tools": [TOOL]}, lambda r: r.effective_tool_choice == "auto"),
        ({"tools": [TOOL], "tool_choice": "none"}, lambda r: r.effective_tool_choice == "none"),
        ({"tool_choice": "none"}, lambda r: r.effective_tool_choice == "none"),
        ({"tools": [TOOL]}, lambda r: r.allows_parallel_tool_calls),
        ({"messages": [*USER, {"role": "assistant", "content": "Hi"}], "continue_final_message": True,
          "tools": [TOOL], "tool_choice": "none", "response_format": {"type": "text"}},
         lambda r: r.continue_final_message),
        ({"tools": [TOOL], "parallel_tool_calls": True}, lambda r: r.allows_parallel_tool_calls),
        ({"tools": [TOOL], "parallel_tool_calls": False}, lambda r: not r.allows_parallel_tool_calls),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}},
         lambda r: r.response_format_spec() == {"type": "json_schema", "json_schema": {
             "name": "x", "schema": {"type": "object"}, "strict": True}}),
        ({"response_format": {"type": "json_object"}},
         lambda r: r.response_format_spec() == {"type": "json_object"}),
        ({}, lambda r: r.response_format_spec() is None),
        ({"temperature": 0, "n": 1}, lambda r: r.temperature == 0.0),
        ({"temperature": 2, "top_p": 1, "top_logprobs": 0}, lambda r: r.temperature == 2.0),
        ({"logprobs": True, "top_logprobs": 20}, lambda r: r.top_logprobs == 20),
        ({"stream": True, "stream_options": {"include_usage": False}}, lambda r: not r.include_usage),
        ({"safety_identifier": "u1", "prompt_cache_key": "k"}, lambda r: r.safety_identifier == "u1"),
    ],
)
def test_good_requests_validate(extra, check):
    assert check(validate_request({"messages": USER, **extra}))


def test_conversation_may_end_in_assistant_when_continuing_it():
    body = {"messages": [*USER, {"role": "assistant", "content": "Once upon"}],
            "continue_final_message": True}
    assert validate_request(body).messages[-1].content == "Once upon"


def test_message_object_of_a_previous_response_is_accepted_as_input():
    reply = ChatCompletionMessage(content="Hello!")
    request = validate_request({"messages": [*USER, reply, *USER]})
    assert request.template_messages()[1] == {"role": "assistant", "content": "Hello!"}


def test_tuple_messages_are_accepted():
    assert validate_request({"messages": tuple(USER)}).messages[0].content == "Hi"


def _completion() -> ChatCompletion:
    logprob = TokenLogprob(token="Hi", bytes=[72, 105], logprob=-0.5,
                           top_logprobs=[TopLogprob(token="Hi", bytes=[72, 105], logprob=-0.5)])
    return ChatCompletion(
        id="chatcmpl-1",
        created=1,
        model="m",
        choices=[
            Choice(index=0, message=ChatCompletionMessage(content="Hi"), finish_reason="stop",
                   logprobs=ChoiceLogprobs(content=[logprob])),
            Choice(index=1, finish_reason="tool_calls", message=ChatCompletionMessage(
                content=None, tool_calls=[ResponseToolCall(id="call_1", function=ResponseFunctionCall(
                    name="f", arguments="{}"))])),
        ],
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5),
        system_fingerprint="fp",
    )


def _chunks() -> list[ChatCompletionChunk]:
    def chunk(choices, usage=None):
        return ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=choices, usage=usage)

    return [
        chunk([ChunkChoice(index=0, delta=ChoiceDelta(role="assistant"))]),
        chunk([ChunkChoice(index=0, delta=ChoiceDelta(content="Hi"), logprobs=ChoiceLogprobs(content=[]))]),
        chunk([ChunkChoice(index=0, delta=ChoiceDelta(tool_calls=[ChoiceDeltaToolCall(
            index=0, id="call_1", type="function",
            function=ChoiceDeltaFunctionCall(name="f", arguments=""))]))]),
        chunk([ChunkChoice(index=0, delta=ChoiceDelta(), finish_reason="length")]),
        chunk([], usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)),
    ]


def test_response_and_chunks_validate_as_openai_types():
    from openai.types.chat import ChatCompletion as OpenAIChatCompletion
    from openai.types.chat import ChatCompletionChunk as OpenAIChatCompletionChunk

    assert_exact_openai_shape(_completion(), OpenAIChatCompletion)
    for chunk in _chunks():
        assert_exact_openai_shape(chunk, OpenAIChatCompletionChunk)
    dumped = _completion().model_dump()
    assert dumped["object"] == "chat.completion" and dumped["choices"][1]["message"]["content"] is None
    assert _chunks()[0].model_dump()["object"] == "chat.completion.chunk"
