"""%%chat structured output (--json, --schema) and Python functions as tools, on a real shell.

The tiny random-weight model cannot choose well, but the grammar forces what it may write: a schema
with bounded values always completes, and ``--tool-choice required`` / a tool's name always makes a
well-formed call. So these tests drive the real engine and assert on the plumbing: the request the
magic sends, what runs in the kernel and what does not, what the model gets back, what the display
shows, and what the conversation keeps.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
from IPython.core.interactiveshell import InteractiveShell

from nbchat.conversation import Conversation
from nbchat.notebook import render
from nbchat.notebook.render import (
    INTERRUPTED_MARKDOWN,
    TRUNCATED_MARKDOWN,
    TRUNCATED_TEXT,
    ReplyView,
    ToolCallView,
    fence,
    pretty_json,
    transcript,
)
from tests import test_magics
from tests.test_magics import SETTING_TRAITS, Chat
from tests.test_render import RecordingPublisher, without_reply_data

# Every value bounded: whatever the random model picks, the reply completes within a few tokens
# plus the grammar's whitespace allowance.
BOUNDED_SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "s": {"enum": ["a", "b"]},
    },
    "required": ["n", "s"],
    "additionalProperties": False,
}
SCHEMA_TOKENS = 300  # more than the grammar's worst case for BOUNDED_SCHEMA (20 spaces per gap)
TOOL_TOKENS = 120  # a call to a tool with small arguments, and a short text step after it

TOOLS_CODE = '''
from typing import Annotated, Literal
from pydantic import BaseModel, Field, field_validator
from nbchat.tools import tool

calls = []

def explode() -> str:
    """Always fails."""
    calls.append("explode")
    raise ValueError("boom")

def add_digits(a: Annotated[int, Field(ge=0, le=9)], b: Annotated[int, Field(ge=0, le=9)]) -> int:
    """Add two digits."""
    calls.append(("add_digits", a, b))
    return a + b

@tool(allow_run=True)
def ping() -> str:
    """Answer pong."""
    calls.append("ping")
    return "pong"

def stop_button() -> str:
    """Stands for a tool the user stops with the Stop button while it runs."""
    calls.append("stop_button")
    raise KeyboardInterrupt

class Pick(BaseModel):
    n: Annotated[int, Field(ge=0, le=9)]
    s: Literal["a", "b"]

class NeverValid(BaseModel):
    n: Annotated[int, Field(ge=0, le=9)]
    s: Literal["a", "b"]

    @field_validator("n")
    @classmethod
    def refuse(cls, value):
        raise ValueError("n is never good enough")

class NotAModel:
    pass

number = 7
'''


# The same module-scoped shell as test_magics: the extension loaded, the tiny model, displays recorded.
shell = test_magics.shell


@pytest.fixture
def chat(shell):
    """Fresh conversations, the test functions (with an empty call log) in the namespace."""
    magics = shell.magics_manager.registry["ChatMagics"]
    saved = {name: getattr(magics, name) for name in (*SETTING_TRAITS, "max_tool_steps")}
    magics.conversations = {"default": Conversation("default")}
    magics.current = "default"
    result = shell.run_cell(TOOLS_CODE)
    assert result.success, result.error_in_exec
    shell.display_pub.outputs.clear()
    yield Chat(shell, magics)
    for name, value in saved.items():
        setattr(magics, name, value)


def final(chat: Chat) -> dict:
    """The last display or update the front end got (a reply's final render)."""
    return chat.outputs[-1]


def roles(messages: list[dict]) -> list[str]:
    return [message["role"] for message in messages]


def record_requests(magics, monkeypatch, *, force_tool_choice=None) -> list[dict]:
    """Record each request the magic sends. ``force_tool_choice`` overrides every request's
    tool_choice: a model that calls tools at every step, which the random model would not do."""
    requests: list[dict] = []
    real_open = magics._open_stream

    def recording_open(engine, request):
        if force_tool_choice is not None:
            request = {**request, "tool_choice": force_tool_choice}
        requests.append(request)
        return real_open(engine, request)

    monkeypatch.setattr(magics, "_open_stream", recording_open)
    return requests


# --- structured output ----------------------------------------------------------------------------


def test_json_asks_for_a_json_object_and_a_cut_off_reply_is_marked_and_stored_as_text(chat, capsys):
    reply = chat.run("%%chat --json --max-tokens 8 --out data\nhi").result
    assert reply.settings["response_format"] == {"type": "json_object"}
    assert reply.finish_reason == "length" and reply.text.startswith("{")
    assert chat.shell.user_ns["data"] == reply.text == reply.value
    data = final(chat)["data"]
    assert without_reply_data(data) == {
        "text/markdown": f"{fence(reply.text, 'json')}\n\n{TRUNCATED_MARKDOWN}",
        "text/plain": f"{reply.text} {TRUNCATED_TEXT}",
    }
    warning = capsys.readouterr().err
    assert "cut off at max_tokens=8, so it is not complete JSON; its value (and --out) is the text" in warning
    assert chat.conversation().turns[-1].reply == [{"role": "assistant", "content": reply.text}]


@pytest.mark.parametrize("as_string", [False, True], ids=["dict", "json-string"])
def test_schema_from_a_dict_or_a_string_gives_parsed_valid_json_shown_formatted(chat, as_string):
    chat.shell.user_ns["pick"] = json.dumps(BOUNDED_SCHEMA) if as_string else BOUNDED_SCHEMA
    reply = chat.run(f"%%chat --schema pick --max-tokens {SCHEMA_TOKENS} --out picked\nhi").result
    assert reply.settings["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "pick", "schema": BOUNDED_SCHEMA, "strict": True},
    }
    assert reply.finish_reason == "stop"
    value = json.loads(reply.text)
    jsonschema.validate(value, BOUNDED_SCHEMA)
    assert reply.value == value and chat.shell.user_ns["picked"] == value
    assert without_reply_data(final(chat)["data"]) == {
        "application/json": value,
        "text/markdown": fence(pretty_json(value), "json"),
        "text/plain": pretty_json(value),
    }


def test_schema_from_a_pydantic_class_stores_a_validated_instance(chat):
    reply = chat.run(f"%%chat --schema Pick --max-tokens {SCHEMA_TOKENS} --out picked\nhi").result
    pick_class = chat.shell.user_ns["Pick"]
    schema_format = reply.settings["response_format"]["json_schema"]
    assert schema_format == {"name": "Pick", "schema": pick_class.model_json_schema(), "strict": True}
    picked = chat.shell.user_ns["picked"]
    assert isinstance(picked, pick_class) and picked is reply.value
    assert picked == pick_class.model_validate_json(reply.text)


def test_json_the_pydantic_class_refuses_is_stored_parsed_with_a_warning(chat, capsys):
    reply = chat.run(f"%%chat --schema NeverValid --max-tokens {SCHEMA_TOKENS} --out picked\nhi").result
    assert chat.shell.user_ns["picked"] == json.loads(reply.text)
    warning = capsys.readouterr().err
    assert "does not validate as NeverValid" in warning and "n is never good enough" in warning


def test_a_json_format_is_kept_when_the_cell_asks_for_another_format(chat):
    chat.shell.user_ns["pick"] = BOUNDED_SCHEMA
    reply = chat.run(f"%%chat --schema pick --format text --max-tokens {SCHEMA_TOKENS}\nhi").result
    assert without_reply_data(final(chat)["data"]) == {"text/plain": reply.text}


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("%%chat --schema nothing_here\nhi", "--schema 'nothing_here': no variable named 'nothing_here'"),
        (
            "%%chat --schema number\nhi",
            "--schema 'number': expected a dict, a JSON-schema string or a pydantic model class, "
            "not a value of type int",
        ),
        ("%%chat --schema NotAModel\nhi", "not the class NotAModel"),
        ("%%chat --schema not_json\nhi", "--schema 'not_json': the string is not JSON"),
        ("%%chat --schema a_list\nhi", "--schema 'a_list': a JSON schema is an object"),
        ("%%chat --schema not_data\nhi", "--schema 'not_data': the schema is not JSON data"),
        ("%%chat --schema bad_type\nhi", "response_format"),
        ("%%chat --json --schema Pick\nhi", "--json and --schema both ask for JSON; keep one"),
        ("%%chat --tools nothing\nhi", "--tools: no function named 'nothing' in the notebook"),
        ("%%chat --tools explod\nhi", "did you mean 'explode'?"),
        ("%%chat --tools number\nhi", "--tools: 'number' is a value of type int, not a function"),
        ("%%chat --tools Pick\nhi", "--tools: 'Pick' is the class Pick, not a function"),
        ("%%chat --tool-choice required\nhi", "When using `tool_choice`, `tools` must be set."),
        ("%%chat --tools explode --tool-choice ping\nhi", "does not match any of the specified `tools`"),
        ("%%chat --tools explode --max-tool-steps -1\nhi", "--max-tool-steps must be 0 or more"),
        ("%chat set max_tool_steps=-2", "max_tool_steps must be 0 or more"),
        ("%chat tools frob explode", "unknown %chat tools action 'frob'"),
        ("%chat tools add", "%chat tools add needs the names of functions from the notebook"),
        ("%chat tools remove explode", "'explode' is not a tool of 'default'; its tools: none"),
        ("%chat tools allow nothing", "%chat tools allow: no function named 'nothing'"),
    ],
)
def test_bad_structured_and_tool_options_are_one_usage_line_and_change_nothing(chat, cell, expected):
    namespace = chat.shell.user_ns
    namespace.update(not_json="{type: object}", a_list="[1, 2]", not_data={"default": {1, 2}})
    namespace["bad_type"] = {"type": "objekt"}
    chat.run("%%chat\nbefore")
    before = chat.snapshot()
    message = chat.error(cell)
    assert expected in message
    assert chat.snapshot() == before
    assert len(chat.conversation().tools) == 0
    assert namespace["calls"] == []


# --- tools ----------------------------------------------------------------------------------------


def test_a_tool_that_raises_is_shown_and_its_error_goes_back_to_the_model(chat, monkeypatch):
    requests = record_requests(chat.magics, monkeypatch)
    cell = f"%%chat --tools explode --tool-choice required --run-tools --max-tokens {TOOL_TOKENS}\nhi"
    reply = chat.run(cell).result  # the cell itself does not fail
    assert chat.shell.user_ns["calls"] == ["explode"]
    assert roles(reply.messages) == ["user", "assistant", "tool", "assistant"]
    call = reply.messages[1]["tool_calls"][0]
    assert call["function"] == {"name": "explode", "arguments": call["function"]["arguments"]}
    assert json.loads(call["function"]["arguments"]) == {}
    error = {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"error": "ValueError: boom"})}
    assert reply.messages[2] == error
    # The model got the error: a second request carried the call and its result.
    assert len(requests) == 2 and requests[1]["messages"][-2:] == [reply.messages[1], error]
    # A forced choice is asked for once; then the model may answer in text.
    assert [request["tool_choice"] for request in requests] == ["required", "auto"]
    tools = requests[0]["tools"]
    assert [spec["function"]["name"] for spec in tools] == ["explode"]
    assert tools[0]["function"]["strict"] is True
    data = final(chat)["data"]
    assert "<details open><summary>🔧 <code>explode()</code> · ✗ error</summary>" in data["text/markdown"]
    assert fence(pretty_json({"error": "ValueError: boom"}), "json") in data["text/markdown"]
    assert data["text/plain"].startswith("[tool] explode() -> error: ValueError: boom\n\n")
    metadata = final(chat)["metadata"]["nbchat"]
    assert metadata["tools"] == ["explode"] and metadata["tool_steps"] == 1
    assert reply.tool_calls == [call]
    assert repr(reply).startswith("ChatReply(conversation='default', turn=0, ")
    assert ", 1 tool call, " in repr(reply)
    assert reply.usage["completion_tokens"] > TOOL_TOKENS // 4  # both requests are counted


def test_a_tool_not_allowed_to_run_is_shown_with_how_to_allow_it_and_never_called(chat, monkeypatch):
    requests = record_requests(chat.magics, monkeypatch)
    reply = chat.run(f"%%chat --tools explode --tool-choice explode --max-tokens {TOOL_TOKENS}\nhi").result
    assert chat.shell.user_ns["calls"] == []
    assert len(requests) == 1  # nothing went back to the model
    assert roles(reply.messages) == ["user", "assistant", "tool"]
    not_run = json.loads(reply.messages[2]["content"])
    assert not_run == {"error": "not run: the tool 'explode' is not allowed to run"}
    hint = (
        "explode was not run: allow it with `%chat tools allow explode`, "
        "or re-run the cell with `--run-tools`."
    )
    data = final(chat)["data"]
    assert data["text/plain"] == f"[tool] explode() ⏸ not run\n  {hint}"
    assert data["text/markdown"].endswith(f"</details>\n\n*{hint}*")
    assert reply.finish_reason == "stop"  # a named tool_choice finishes with stop, as OpenAI's does
    # The stored exchange is a valid conversation: the next cell sends it without complaint.
    follow_up = chat.run("%%chat --max-tokens 3\nok").result
    assert follow_up.messages[:3] == reply.messages


def test_per_tool_opt_in_lasts_for_the_conversation(chat, capsys):
    chat.run("%chat tools add add_digits")
    chat.outputs.clear()
    chat.run("%chat tools")
    listing = final(chat)["data"]["text/plain"]
    assert listing == "Tools of 'default'\n  add_digits(a, b)  runs: no  -- Add two digits."
    chat.run("%chat tools allow add_digits")
    assert "Allowed to run: add_digits (conversation 'default')." in capsys.readouterr().out
    reply = chat.run(f"%%chat --tool-choice add_digits --max-tokens {TOOL_TOKENS}\nadd").result
    arguments = json.loads(reply.messages[1]["tool_calls"][0]["function"]["arguments"])
    assert chat.shell.user_ns["calls"] == [("add_digits", arguments["a"], arguments["b"])]
    assert reply.messages[2]["content"] == str(arguments["a"] + arguments["b"])
    chat.run("%chat tools deny add_digits")
    chat.run(f"%%chat --tool-choice add_digits --max-tokens {TOOL_TOKENS}\nadd again")
    assert len(chat.shell.user_ns["calls"]) == 1
    chat.run("%chat tools remove add_digits")
    capsys.readouterr()
    chat.run("%chat tools")
    assert "Conversation 'default' has no tools." in capsys.readouterr().out
    assert len(chat.conversation()) == 2  # reset would keep tools; the turns are unaffected by them


def test_allow_adds_a_function_and_a_decorated_tool_runs_without_run_tools(chat):
    chat.run("%chat tools allow explode")
    assert chat.conversation().tools.can_run("explode")
    chat.run(f"%%chat --tools ping --tool-choice ping --max-tokens {TOOL_TOKENS}\nhi")
    assert chat.shell.user_ns["calls"] == ["ping"]
    reply = chat.conversation().turns[-1]
    assert reply.reply[1]["content"] == "pong"


def test_the_step_limit_ends_the_exchange_with_the_last_calls_shown_not_run(chat, monkeypatch):
    requests = record_requests(chat.magics, monkeypatch, force_tool_choice="required")
    reply = chat.run(f"%%chat --tools ping --max-tool-steps 2 --max-tokens {TOOL_TOKENS}\nhi").result
    assert chat.shell.user_ns["calls"] == ["ping", "ping"]
    assert len(requests) == 3
    assert roles(reply.messages) == ["user", "assistant", "tool", "assistant", "tool", "assistant", "tool"]
    assert json.loads(reply.messages[-1]["content"]) == {
        "error": "not run: the step limit was reached (raise --max-tool-steps)"
    }
    assert final(chat)["data"]["text/plain"].endswith(
        "[tool] ping() ⏸ not run\n  Not run: the step limit was reached (raise --max-tool-steps)."
    )
    assert final(chat)["metadata"]["nbchat"]["tool_steps"] == 2


def test_max_tool_steps_zero_shows_calls_and_runs_none(chat):
    chat.run("%chat set max_tool_steps=0")
    reply = chat.run(f"%%chat --tools ping --tool-choice ping --max-tokens {TOOL_TOKENS}\nhi").result
    assert chat.shell.user_ns["calls"] == []
    assert "step limit" in reply.messages[-1]["content"]


def test_an_interrupt_while_a_tool_runs_keeps_the_exchange_marked_and_the_next_cell_works(chat):
    cell = f"%%chat --tools stop_button --tool-choice required --run-tools --max-tokens {TOOL_TOKENS}\nhi"
    reply = chat.run(cell).result
    assert chat.shell.user_ns["calls"] == ["stop_button"]
    assert reply.interrupted and chat.conversation().turns[-1].interrupted
    assert json.loads(reply.messages[-1]["content"]) == {"error": "interrupted by the user"}
    assert final(chat)["data"]["text/markdown"].endswith(INTERRUPTED_MARKDOWN)
    assert chat.run("%%chat --max-tokens 3\ngo on").result.messages[:3] == reply.messages


def test_tool_turns_in_history_save_load_rerun_and_undo(chat, tmp_path):
    cell = f"%%chat --tools explode --tool-choice required --run-tools --max-tokens {TOOL_TOKENS}\nhi"
    first = chat.run(cell, cell_id="tools").result
    chat.outputs.clear()
    chat.run("%chat history")
    history = final(chat)["data"]
    assert "assistant: [tool] explode() -> error: ValueError: boom\n\nassistant: " in history["text/plain"]
    assert "<details open><summary>🔧 <code>explode()</code> · ✗ error</summary>" in history["text/markdown"]
    assert "**tool**" not in history["text/markdown"]  # the result sits inside its call

    path = tmp_path / "tools.json"
    chat.run(f"%chat save {path}")
    saved = chat.conversation().to_dict()
    assert json.loads(path.read_text(encoding="utf-8")) == saved
    chat.run(f"%chat load {path} -c restored")
    assert chat.conversation("restored").to_dict() == {**saved, "name": "restored"}
    follow_up = chat.run("%%chat -c restored --max-tokens 3\nthanks").result
    assert follow_up.messages[:4] == first.messages  # the tool turns go back to the model

    rerun = chat.run("%%chat --max-tokens 3\nhi again", cell_id="tools").result
    assert len(chat.conversation()) == 1 and rerun.messages[0]["content"] == "hi again"
    assert all(message["role"] != "tool" for message in chat.conversation().messages())
    chat.run(cell, cell_id="other")
    chat.run("%chat undo")
    assert len(chat.conversation()) == 1
    assert all(message["role"] != "tool" for message in chat.conversation().messages())


def test_retry_repeats_a_tool_exchange_with_its_tools_and_permission(chat):
    cell = f"%%chat --tools explode --tool-choice required --run-tools --max-tokens {TOOL_TOKENS}\nhi"
    first = chat.run(cell).result
    retried = chat.run("%chat retry").result
    assert chat.shell.user_ns["calls"] == ["explode", "explode"]
    assert len(chat.conversation()) == 1
    assert roles(retried.messages) == roles(first.messages) == ["user", "assistant", "tool", "assistant"]
    assert retried.messages[1]["tool_calls"][0]["id"] != first.messages[1]["tool_calls"][0]["id"]


def test_show_prompt_includes_the_tools(chat, capsys):
    chat.run(f"%%chat --tools ping --tool-choice ping --show-prompt --max-tokens {TOOL_TOKENS}\nhi")
    shown = chat.outputs[0]["data"]["text/plain"]
    assert '"name": "ping"' in shown and "<tool_call>" in shown
    chat.outputs.clear()
    chat.run("%chat prompt")  # the last request: after the call and its result
    assert "<tool_response>\npong\n</tool_response>" in final(chat)["data"]["text/plain"]


def test_help_documents_structured_output_and_tools(chat, capsys):
    chat.run("%chat help")
    text = capsys.readouterr().out
    for expected in (
        "--json",
        "--schema VAR",
        "--tools NAMES",
        "--run-tools",
        "--tool-choice MODE",
        "--max-tool-steps N",
        "tools allow|deny F",
        "Structured output: --json",
        "@nbchat.tool(allow_run=True)",
    ):
        assert expected in text


# --- the views, without a model -------------------------------------------------------------------


def test_a_tool_call_view_says_its_state_in_markdown_and_text():
    call = ToolCallView(name="get_weather", arguments='{"city": "Paris"}', state="ran", result='{"t": 21}')
    assert call.signature() == 'get_weather(city="Paris")'
    assert call.text() == '[tool] get_weather(city="Paris") -> {"t": 21}'
    assert call.markdown() == (
        '<details><summary>🔧 <code>get_weather(city=&quot;Paris&quot;)</code> · ✓ ran</summary>\n\n'
        f'arguments\n\n{fence(pretty_json({"city": "Paris"}), "json")}\n\n'
        f'result\n\n{fence(pretty_json({"t": 21}), "json")}\n\n</details>'
    )
    long = ToolCallView(name="f", arguments=json.dumps({"text": "x" * 200}))
    assert len(long.signature()) == len("f()") + 80 and long.signature().endswith("…)")


def test_a_streamed_reply_with_tool_calls_keeps_each_step_in_one_display(monkeypatch):
    shell = InteractiveShell.instance()
    saved = shell.display_pub
    shell.display_pub = RecordingPublisher(shell=shell)
    try:
        view = ReplyView(min_interval=0.0)
        view.start()
        view.append("Let me check.")
        view.tool_call_delta(0, name="ping", arguments="{")
        streaming = shell.display_pub.outputs[-1]["data"]["text/plain"]
        assert streaming == "Let me check.\n\n[tool] ping({) ⋯ calling"
        view.tool_call_delta(0, arguments="}")
        (call,) = view.end_step()
        call.state, call.result = "ran", "pong"
        view.show_call(call)
        view.append("It said pong.")
        view.finish()
        outputs = shell.display_pub.outputs
        assert len({output["transient"]["display_id"] for output in outputs}) == 1
        assert outputs[-1]["data"]["text/plain"] == "Let me check.\n\n[tool] ping() -> pong\n\nIt said pong."
        assert outputs[-1]["data"]["text/markdown"].startswith("Let me check.\n\n<details><summary>")
    finally:
        shell.display_pub = saved


def test_terminal_view_prints_each_settled_call_on_its_own_line(capsys):
    import io

    out = io.StringIO()
    view = ReplyView(live=False, out=out)
    view.start()
    view.tool_call_delta(0, name="ping", arguments="{}")
    (call,) = view.end_step()
    call.state = "running"
    view.show_call(call)
    call.state, call.result = "ran", "pong"
    view.show_call(call)
    view.append("done")
    view.finish()
    assert out.getvalue() == "[tool] ping() -> pong\ndone\n"


def test_transcript_shows_unanswered_calls_as_not_run_and_stray_tool_messages_alone():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ]},
        {"role": "tool", "tool_call_id": "zzz", "content": "orphan"},
    ]
    _, text = transcript(messages)
    assert text == "user: hi\n\nassistant: [tool] f() ⏸ not run\n\ntool: orphan"


def test_json_format_renders_partial_and_final_json():
    formats = render.FORMATS["json"]
    assert formats.partial('{"a"') == {"text/markdown": '```json\n{"a"▌\n```', "text/plain": '{"a"'}
    assert formats.final("[1, 2]", False, False)["application/json"] == [1, 2]
    assert "application/json" not in formats.final("3", False, False)  # JSON viewers want containers
    interrupted = formats.final('{"a": 1}', True, False)
    assert interrupted["text/markdown"] == f'```json\n{{"a": 1}}\n```\n\n{INTERRUPTED_MARKDOWN}'


# --- the default model ----------------------------------------------------------------------------


@pytest.mark.integration
def test_default_model_calls_a_python_function_readably_and_answers_with_its_result(chat):
    chat.run("%config ChatMagics.model = 'smollm2-135m-instruct'")
    chat.run(
        'def get_weather(city: str) -> dict:\n'
        '    """Get the current weather in a city.\n\n    Args:\n        city: The city name.\n    """\n'
        '    calls.append(("get_weather", city))\n'
        '    return {"city": city, "temperature_c": 21, "sky": "sunny"}\n'
    )
    cell = (
        '%%chat --new -s "You are a helpful assistant. Use the tool results to answer the user in one '
        'sentence." --tools get_weather --tool-choice get_weather --run-tools --max-tokens 48\n'
        "What is the weather like in Paris today?"
    )
    reply = chat.run(cell).result
    assert chat.shell.user_ns["calls"] == [("get_weather", "Paris")]
    call = reply.tool_calls[0]["function"]
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert roles(reply.messages)[-3:] == ["assistant", "tool", "assistant"]
    assert "21" in reply.text and "Paris" in reply.text
    assert '[tool] get_weather(city="Paris") -> {"city":"Paris","temperature_c":21,"sky":"sunny"}' in (
        final(chat)["data"]["text/plain"]
    )


@pytest.mark.integration
def test_default_model_json_mode_parses_into_a_dict(chat):
    chat.run("%config ChatMagics.model = 'smollm2-135m-instruct'")
    cell = (
        "%%chat --new --json --max-tokens 48 --out cat\n"
        "Describe a cat as a JSON object with keys name and color."
    )
    reply = chat.run(cell).result
    assert reply.finish_reason == "stop"
    assert isinstance(chat.shell.user_ns["cat"], dict) and chat.shell.user_ns["cat"] == json.loads(reply.text)
    assert final(chat)["data"]["application/json"] == chat.shell.user_ns["cat"]
