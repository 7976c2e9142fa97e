"""The Hermes/Qwen tool-call format (nbchat.chat_format.hermes): parsing tool calls from whole replies
and from streams, writing calls and results back for templates without tool support, and the
built-in tool prompt."""

from __future__ import annotations

import json
import random
import re

import pytest

from nbchat.chat_format.hermes import (
    ToolCallParser,
    format_tool_call,
    inline_tools,
    parse_tool_calls,
    tool_prompt,
)
from nbchat.protocol.deltas import new_tool_call_id
from nbchat.tools import function_schema


def call(name: str, arguments: str, call_id: str = "call_test") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# -- parsing tool calls -----------------------------------------------------------------------------

WEATHER = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"a": "}"}]}}\n'
           "</tool_call>")

REPLIES = {
    "text": ("Hello there!\n", "Hello there!", []),
    "one call": (WEATHER, None, [("get_weather", '{"city": "Paris", "days": [1, {"a": "}"}]}')]),
    "text then call": ("Let me check.\n\n" + WEATHER, "Let me check.",
                       [("get_weather", '{"city": "Paris", "days": [1, {"a": "}"}]}')]),
    "parallel": ('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n'
                 '<tool_call>\n{"arguments": {"x": 1}, "name": "b"}\n</tool_call>',
                 None, [("a", "{}"), ("b", '{"x": 1}')]),
    "no arguments": ('<tool_call>\n{"name": "now"}\n</tool_call>', None, [("now", "{}")]),
    "string arguments": ('<tool_call>\n{"name": "s", "arguments": "{\\"q\\": 1}"}\n</tool_call>', None,
                         [("s", '{"q": 1}')]),
    "close tag inside an argument": ('<tool_call>\n{"name": "echo", "arguments": {"s": "</tool_call>"}}\n'
                                     "</tool_call>\nDone.", "Done.", [("echo", '{"s": "</tool_call>"}')]),
    "tag as text": ("I like <tool_call> tags", "I like <tool_call> tags", []),
    "unnamed block": ('<tool_call>{"nam": 1}</tool_call> after', '<tool_call>{"nam": 1}</tool_call> after',
                      []),
    "cut by max_tokens": ('x <tool_call>\n{"name": "t", "arguments": {"q": "ab', "x", [("t", '{"q": "ab')]),
    "partial tag at the end": ("a <tool_c", "a <tool_c", []),
    "missing close tag": ('<tool_call>\n{"name": "a", "arguments": {"k": 2}} and more', "and more",
                          [("a", '{"k": 2}')]),
}


@pytest.mark.parametrize("name", list(REPLIES))
def test_parse_tool_calls(name):
    text, content, calls = REPLIES[name]
    parsed_content, parsed_calls = parse_tool_calls(text)
    assert parsed_content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed_calls] == calls
    for parsed in parsed_calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", parsed["id"]) and parsed["type"] == "function"


def collect_stream(text: str, rng: random.Random) -> tuple[list[dict], ToolCallParser]:
    parser = ToolCallParser()
    deltas, i = [], 0
    while i < len(text):
        size = rng.randint(1, 6)
        deltas += parser.feed(text[i:i + size])
        i += size
    deltas += parser.finish()
    return deltas, parser


@pytest.mark.parametrize("name", list(REPLIES))
def test_streamed_deltas_concatenate_to_the_parsed_message(name):
    text, content, calls = REPLIES[name]
    rng = random.Random(name)
    for _ in range(25):
        deltas, parser = collect_stream(text, rng)
        assert "".join(d.get("content", "") for d in deltas) == (content or "")
        arguments, ids = {}, {}
        for delta in deltas:
            assert set(delta) in ({"content"}, {"tool_calls"})
            for piece in delta.get("tool_calls", []):
                if piece["index"] not in ids:  # a call's first delta names it
                    assert set(piece) == {"index", "id", "type", "function"}
                    assert piece["type"] == "function" and piece["function"]["arguments"] == ""
                    assert piece["index"] == len(ids)
                    ids[piece["index"]] = (piece["id"], piece["function"]["name"])
                    arguments[piece["index"]] = ""
                else:
                    assert set(piece) == {"index", "function"} and set(piece["function"]) == {"arguments"}
                    arguments[piece["index"]] += piece["function"]["arguments"]
        assert [(ids[i][1], arguments[i]) for i in sorted(ids)] == calls
        assert parser.content == content
        assert [(c["id"], c["function"]["arguments"]) for c in parser.tool_calls] == \
            [(ids[i][0], arguments[i]) for i in sorted(ids)]


def test_stream_holds_back_a_possible_tag_and_releases_it_when_it_is_not_one():
    parser = ToolCallParser()
    assert parser.feed("Hi <tool_") == [{"content": "Hi"}]
    assert parser.feed("x> y") == [{"content": " <tool_x> y"}]
    assert parser.feed(" <tool_call>\n") == []
    assert parser.feed('{"name": "f", "arg') == [
        {"tool_calls": [{"index": 0, "id": parser.tool_calls[0]["id"], "type": "function",
                         "function": {"name": "f", "arguments": ""}}]}]
    assert parser.feed('uments": {"a"') == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}]
    assert parser.feed(": 1}}\n</tool_call>") == [
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}]
    assert parser.finish() == []
    assert parser.content == "Hi <tool_x> y"
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_tool_call_ids_are_openai_shaped_and_unique():
    ids = {new_tool_call_id() for _ in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"call_[A-Za-z0-9]{24}", i) for i in ids)


# -- the built-in tool prompt ---------------------------------------------------------------------

def test_tool_prompt_lists_tools_and_the_call_syntax():
    def get_weather(city: str):
        """Weather now."""

    schemas = [function_schema(get_weather)]
    prompt = tool_prompt(schemas)
    listed = prompt.split("<tools>\n")[1].split("\n</tools>")[0]
    assert [json.loads(line) for line in listed.splitlines()] == schemas
    syntax = '<tool_call>\n{"name": <function-name>, "arguments": <arguments-as-a-JSON-object>}\n</tool_call>'
    assert syntax in prompt


def test_format_tool_call_round_trips_through_the_parser():
    original = call("get_weather", '{"city": "Paris"}')
    content, calls = parse_tool_calls(format_tool_call(original))
    assert content is None
    assert calls[0]["function"] == original["function"]


def test_inline_tools_rewrites_a_tool_conversation_for_a_plain_template():
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Time and date?"},
        {"role": "assistant", "content": None,
         "tool_calls": [call("now", "{}", "c1"), call("today", "{}", "c2")]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
        {"role": "tool", "tool_call_id": "c2", "content": "Monday"},
    ]
    out = inline_tools(messages, tools)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"] == "Be brief.\n\n" + tool_prompt(tools)
    assert out[2]["content"] == format_tool_call(messages[2]["tool_calls"][0]) + "\n" + \
        format_tool_call(messages[2]["tool_calls"][1])
    assert out[3]["content"] == ("<tool_response>\n12:00\n</tool_response>\n"
                                 "<tool_response>\nMonday\n</tool_response>")
    assert messages[0]["content"] == "Be brief."  # the input is left alone
    without_system = inline_tools(messages[1:2], tools)
    assert without_system[0] == {"role": "system", "content": tool_prompt(tools)}
    assert inline_tools(messages[1:2], None) == messages[1:2]
