"""The streaming reply view: one display handle, throttled redraws, final formats, terminal fallback."""

from __future__ import annotations

import io

import pytest
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

from nbchat.notebook.render import (
    INTERRUPTED_MARKDOWN,
    INTERRUPTED_TEXT,
    REPLY_MIMETYPE,
    TRUNCATED_MARKDOWN,
    ReplyView,
    ToolCallView,
    extract_code,
    fence,
    supports_live_updates,
    transcript,
)


class RecordingPublisher(DisplayPublisher):
    """Keeps every display / update the shell publishes, as a front end would receive them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outputs: list[dict] = []

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        self.outputs.append(
            {"data": data, "metadata": metadata or {}, "transient": transient or {}, "update": update}
        )


def without_reply_data(data: dict) -> dict:
    """A bundle as a front end without the lab extension shows it: without the reply's data."""
    return {key: value for key, value in data.items() if key != REPLY_MIMETYPE}


@pytest.fixture
def published():
    shell = InteractiveShell.instance()
    saved = shell.display_pub
    shell.display_pub = RecordingPublisher(shell=shell)
    yield shell.display_pub.outputs
    shell.display_pub = saved


class FakeClock:
    """A clock the test advances, so throttling is checked without sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stream_redraws_one_handle_at_most_fifteen_times_a_second(published):
    clock = FakeClock()
    view = ReplyView(clock=clock)
    view.start({"nbchat": {"model": "m"}})
    for _ in range(200):  # 200 tokens over 2 simulated seconds (100 tok/s)
        clock.now += 0.01
        view.append("tok ")
    view.finish(metadata={"nbchat": {"model": "m", "finish_reason": "stop"}})

    display_ids = {output["transient"]["display_id"] for output in published}
    assert len(display_ids) == 1
    assert [output["update"] for output in published][:2] == [False, True]
    partial_updates = len(published) - 2  # minus the first display and the final render
    assert 25 <= partial_updates <= 31  # ~15/s over 2 s
    final = published[-1]
    assert without_reply_data(final["data"]) == {"text/markdown": "tok " * 200, "text/plain": "tok " * 200}
    assert final["metadata"] == {"nbchat": {"model": "m", "finish_reason": "stop"}}


def test_partial_redraw_shows_a_cursor_and_the_text_so_far(published):
    clock = FakeClock()
    view = ReplyView(clock=clock)
    view.start()
    clock.now += 1
    view.append("Hello")
    assert published[0]["data"] == {"text/markdown": "▌", "text/plain": ""}
    assert published[1]["data"] == {"text/markdown": "Hello▌", "text/plain": "Hello"}


def test_no_stream_draws_only_the_placeholder_and_the_final_render(published):
    clock = FakeClock()
    view = ReplyView(stream=False, clock=clock)
    view.start()
    for word in ["a ", "b ", "c"]:
        clock.now += 1
        view.append(word)
    view.finish()
    assert len(published) == 2
    assert published[-1]["data"]["text/markdown"] == "a b c"


def test_interrupted_reply_is_marked_in_both_mimetypes(published):
    view = ReplyView()
    view.start()
    view.append("Once upon")
    view.finish(interrupted=True)
    assert without_reply_data(published[-1]["data"]) == {
        "text/markdown": f"Once upon\n\n{INTERRUPTED_MARKDOWN}",
        "text/plain": f"Once upon {INTERRUPTED_TEXT}",
    }


def test_text_format_publishes_plain_text_only(published):
    view = ReplyView(format="text")
    view.start()
    view.append("**not bold**")
    view.finish()
    assert without_reply_data(published[-1]["data"]) == {"text/plain": "**not bold**"}


def test_code_format_final_render_is_the_fenced_code_without_prose(published):
    view = ReplyView(format="code")
    view.start()
    view.append("Sure! Here it is:\n```python\nprint('hi')\n```\nEnjoy.")
    view.finish()
    assert without_reply_data(published[-1]["data"]) == {
        "text/markdown": "```python\nprint('hi')\n```",
        "text/plain": "print('hi')",
    }


def test_final_render_carries_the_reply_as_data_for_the_lab_extension(published):
    view = ReplyView()
    view.start({"nbchat": {"model": "m"}})
    view.append("Try:\n```python\nprint(1)\n```")
    usage = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    view.finish(metadata={"nbchat": {"model": "m", "finish_reason": "stop", "usage": usage}})
    assert published[-1]["data"][REPLY_MIMETYPE] == {
        "version": 1,
        "text": "Try:\n```python\nprint(1)\n```",
        "format": "markdown",
        "markdown": "Try:\n```python\nprint(1)\n```",
        "finish_reason": "stop",
        "interrupted": False,
        "model": "m",
        "usage": usage,
    }
    assert all(REPLY_MIMETYPE not in output["data"] for output in published[:-1])  # only the final render


def test_reply_data_keeps_the_finish_state_out_of_its_markdown(published):
    view = ReplyView()
    view.start()
    view.append("Once upon")
    view.finish(interrupted=True, metadata={"nbchat": {"finish_reason": None}})
    payload = published[-1]["data"][REPLY_MIMETYPE]
    assert payload["interrupted"] is True and payload["markdown"] == "Once upon"
    assert published[-1]["data"]["text/markdown"].endswith(INTERRUPTED_MARKDOWN)  # the note, for the rest


def test_reply_data_of_a_truncated_json_reply_has_no_prose_and_says_length(published):
    view = ReplyView(format="json")
    view.start()
    view.append('{"a": [1, 2')
    view.finish(truncated=True, metadata={"nbchat": {"finish_reason": "length"}})
    data = published[-1]["data"]
    assert data["text/markdown"].endswith(TRUNCATED_MARKDOWN)
    assert data[REPLY_MIMETYPE]["markdown"] == fence('{"a": [1, 2', "json")
    assert data[REPLY_MIMETYPE]["finish_reason"] == "length"


def test_reply_data_of_a_text_reply_has_no_markdown(published):
    view = ReplyView(format="text")
    view.start()
    view.append("**not bold**")
    view.finish()
    payload = published[-1]["data"][REPLY_MIMETYPE]
    assert payload["format"] == "text" and payload["markdown"] is None and payload["text"] == "**not bold**"


def test_reply_data_carries_logprobs_only_when_given(published):
    view = ReplyView()
    view.start()
    view.append("Hi")
    entries = [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": []}]
    view.finish(logprobs=entries)
    assert published[-1]["data"][REPLY_MIMETYPE]["logprobs"] == entries
    assert "logprobs" not in published[-1]["data"]["text/markdown"]


def test_reply_data_of_a_tool_exchange_joins_the_steps_text_and_draws_the_calls(published):
    view = ReplyView()
    view.start()
    view.append("Let me look.")
    view.tool_call_delta(0, name="lookup", arguments='{"q": "x"}')
    (call,) = view.end_step()
    call.state, call.result = "ran", '"found"'
    view.append("It is found.")
    view.finish()
    payload = published[-1]["data"][REPLY_MIMETYPE]
    assert payload["text"] == "Let me look.\n\nIt is found."
    assert payload["markdown"] == published[-1]["data"]["text/markdown"]
    drawn_call = ToolCallView(name="lookup", arguments='{"q": "x"}', state="ran", result='"found"')
    assert drawn_call.markdown() in payload["markdown"]


def test_terminal_view_writes_plain_deltas_once_and_never_displays(published):
    out = io.StringIO()
    view = ReplyView(live=False, out=out)
    view.start()
    for delta in ["Hel", "lo ", "**world**"]:
        view.append(delta)
    view.finish(interrupted=True)
    assert out.getvalue() == f"Hello **world** {INTERRUPTED_TEXT}\n"
    assert "\x1b" not in out.getvalue()
    assert published == []


def test_terminal_view_without_streaming_writes_the_reply_at_the_end():
    out = io.StringIO()
    view = ReplyView(live=False, stream=False, out=out)
    view.append("a")
    assert out.getvalue() == ""
    view.append("b")
    view.finish()
    assert out.getvalue() == "ab\n"


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown reply format 'html'; choose one of markdown, text, code"):
        ReplyView(format="html")


def test_live_updates_only_where_the_front_end_can_redraw():
    class TerminalInteractiveShell:  # the name is what IPython's terminal shell is recognised by
        pass

    class Subclassed(TerminalInteractiveShell):
        pass

    assert supports_live_updates(InteractiveShell.instance())
    assert not supports_live_updates(Subclassed())
    assert not supports_live_updates(None)


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("x = 1", ("x = 1", "")),
        (
            "Here:\n```python\nimport os\n```\nthen\n```\nos.getcwd()\n```",
            ("import os\n\nos.getcwd()", "python"),
        ),
        ("```sql\nSELECT 1\nFROM t", ("SELECT 1\nFROM t", "sql")),
        ("~~~bash\nls -l\n~~~", ("ls -l", "bash")),
    ],
)
def test_extract_code_strips_fences(reply, expected):
    assert extract_code(reply) == expected


def test_fence_outgrows_backticks_inside_the_code():
    assert fence('s = "```"', "python") == '````python\ns = "```"\n````'


def test_transcript_marks_interrupted_replies():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell a story"},
        {"role": "assistant", "content": "Once"},
    ]
    markdown, text = transcript(messages, interrupted={2})
    assert text == f"system: Be brief.\n\nuser: Tell a story\n\nassistant: Once {INTERRUPTED_TEXT}"
    assert markdown.startswith("**system**\n\nBe brief.\n\n---\n\n**user**")
    assert markdown.endswith(f"Once\n\n{INTERRUPTED_MARKDOWN}")


def test_a_teaching_view_added_to_the_final_render_replaces_the_reply_data(published):
    view = ReplyView()
    view.start()
    view.append("Hi")
    view.finish()
    assert REPLY_MIMETYPE in published[-1]["data"]
    view.add_to_final({"text/html": "<table></table>"})
    # The lab extension's renderer would draw the reply over the view: its data goes.
    expected = {"text/html": "<table></table>", "text/markdown": "Hi", "text/plain": "Hi"}
    assert published[-1]["data"] == expected
