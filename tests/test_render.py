"""The streaming reply view: one display handle, throttled redraws, final formats, terminal fallback."""

from __future__ import annotations

import io

import pytest
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

from nbchat.notebook.render import (
    INTERRUPTED_MARKDOWN,
    INTERRUPTED_TEXT,
    ReplyView,
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
    assert final["data"] == {"text/markdown": "tok " * 200, "text/plain": "tok " * 200}
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
    assert published[-1]["data"] == {
        "text/markdown": f"Once upon\n\n{INTERRUPTED_MARKDOWN}",
        "text/plain": f"Once upon {INTERRUPTED_TEXT}",
    }


def test_text_format_publishes_plain_text_only(published):
    view = ReplyView(format="text")
    view.start()
    view.append("**not bold**")
    view.finish()
    assert published[-1]["data"] == {"text/plain": "**not bold**"}


def test_code_format_final_render_is_the_fenced_code_without_prose(published):
    view = ReplyView(format="code")
    view.start()
    view.append("Sure! Here it is:\n```python\nprint('hi')\n```\nEnjoy.")
    view.finish()
    assert published[-1]["data"] == {
        "text/markdown": "```python\nprint('hi')\n```",
        "text/plain": "print('hi')",
    }


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
