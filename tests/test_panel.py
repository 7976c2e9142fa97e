"""The chat panel's kernel side driven through the handler its front end calls (``handle_message``)
and its Python API, in a real IPython shell with the real Engine on the tiny model.

Assertions are on what the front end receives (the custom messages: begin, deltas, discard) and the
synced traits (transcript, busy, status, error, settings), and on the conversation the ``%%chat``
magics share with the panel.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import anywidget
import pytest
from IPython.core.error import UsageError

from nbchat.conversation import Conversation
from nbchat.notebook.engines import loaded_engine
from nbchat.notebook.markup import markdown_html
from nbchat.notebook.panel import ChatPanel, docked_panel
from nbchat.notebook.panel_view import PENDING_ID, PanelReplyView
from tests.test_magics import Chat, recording_shell


@pytest.fixture(scope="module")
def shell(tiny_model_dir):
    yield from recording_shell(tiny_model_dir, "ChatMagics.max_tokens = 12")


@pytest.fixture
def chat(shell):
    """Fresh conversations and no recorded output per test; the configured settings restored after."""
    magics = shell.magics_manager.registry["ChatMagics"]
    saved = {name: getattr(magics, name) for name in ("model", "max_tokens", "temperature")}
    magics.conversations = {"default": Conversation("default")}
    magics.current = "default"
    shell.display_pub.outputs.clear()
    yield Chat(shell, magics)
    for name, value in saved.items():
        setattr(magics, name, value)


@pytest.fixture
def sent(monkeypatch):
    """Custom messages the panels send to their front ends, as ``(panel, message)``."""
    messages: list[tuple[ChatPanel, dict]] = []
    def record(self, message, buffers=None):
        messages.append((self, message))

    monkeypatch.setattr(anywidget.AnyWidget, "send", record)
    return messages


def slow_streams(magics, monkeypatch, delay: float = 0.05) -> list[str]:
    """Make each chunk of the next streams take ``delay`` s (a slow model); returns the deltas read."""
    deltas: list[str] = []
    real_open = magics._open_stream

    def slow_open(engine, request):
        stream = real_open(engine, request)

        class Slow:
            def __iter__(self):
                for chunk in stream:
                    time.sleep(delay)
                    deltas.extend(choice.delta.content for choice in chunk.choices if choice.delta.content)
                    yield chunk

            def close(self):
                stream.close()

        return Slow()

    monkeypatch.setattr(magics, "_open_stream", slow_open)
    return deltas


def front_end(panel: ChatPanel, action: str, **content) -> None:
    panel.handle_message(panel, {"action": action, **content}, [])


def wait_idle(panel: ChatPanel, timeout: float = 60) -> None:
    panel._worker.join(timeout)
    assert not panel._worker.is_alive()


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def kinds(sent, panel) -> list[str]:
    return [message["kind"] for owner, message in sent if owner is panel]


# --- send, stream ---------------------------------------------------------------------------------


def test_send_streams_deltas_and_stores_the_turn(chat, sent):
    panel = ChatPanel(shell=chat.shell)
    front_end(panel, "send", text="Hello there")
    assert panel.busy  # generating off the main thread: the handler has returned
    wait_idle(panel)
    assert not panel.busy and panel.error == ""
    turn = chat.conversation().turns[-1]
    assert turn.prompt == [{"role": "user", "content": "Hello there"}]
    reply = turn.reply_text
    assert reply and turn.finish_reason in ("stop", "length")
    messages = [message for owner, message in sent if owner is panel]
    assert messages[0]["kind"] == "begin" and messages[0]["keep"] == 0
    assert [entry["role"] for entry in messages[0]["entries"]] == ["user"]
    deltas = [message for message in messages if message["kind"] == "delta"]
    assert all(message["id"] == PENDING_ID for message in deltas)
    assert "".join(message["append"] for message in deltas) == reply  # deltas, not the transcript
    assert deltas[-1]["html"] == markdown_html(reply)
    assert [entry["role"] for entry in panel.transcript] == ["user", "assistant"]
    assert panel.transcript[1]["text"] == reply and panel.transcript[1]["interrupted"] is False
    assert panel.messages == [
        {"role": "user", "content": "Hello there"}, {"role": "assistant", "content": reply}
    ]
    status = panel.status
    assert status["model"] == chat.magics.model and status["context_length"] == 2048
    # The history as the model reads it: the last prompt and the reply, templated.
    engine = loaded_engine(chat.magics.model, chat.magics.dtype)
    prompt_ids = engine.render_prompt(panel.messages, continue_final_message=True)[1]
    assert status["context_tokens"] == len(prompt_ids)
    assert status["context_tokens"] > turn.usage["prompt_tokens"]
    assert status["tok_s"] > 0


def test_python_send_waits_and_returns_the_reply(chat):
    panel = ChatPanel(shell=chat.shell)
    reply = panel.send("What is two plus two?")
    assert reply == chat.conversation().turns[-1].reply_text
    assert not panel.busy
    assert panel.send("And three?", wait=False) is None
    assert panel.busy
    wait_idle(panel)
    assert len(chat.conversation()) == 2


def test_redraws_are_throttled_to_the_interval():
    clock = [0.0]
    messages: list[dict] = []
    # Powers of two keep the clock exact: 32 tokens in one second, at most 16 redraws a second.
    view = PanelReplyView(messages.append, min_interval=1 / 16, clock=lambda: clock[0])
    view.start()
    for _ in range(32):
        view.append("x")
        clock[0] += 1 / 32
    view.finish()
    assert len(messages) == 16 + 1  # every other token, and the final redraw
    assert "".join(message["append"] for message in messages) == "x" * 32


# --- stop, retry, undo, new chat ------------------------------------------------------------------


def test_stop_mid_reply_keeps_the_partial_text_marked_interrupted(chat, sent, monkeypatch):
    chat.magics.max_tokens = 200
    deltas = slow_streams(chat.magics, monkeypatch)
    panel = ChatPanel(shell=chat.shell)
    front_end(panel, "send", text="Tell me a long story")
    wait_for(lambda: len(deltas) >= 3)
    front_end(panel, "stop")
    stopped_at = len(deltas)
    wait_idle(panel, timeout=5)
    turn = chat.conversation().turns[-1]
    assert turn.interrupted and turn.reply_text == "".join(deltas)
    assert len(deltas) <= stopped_at + 1  # ended within one decode step of the Stop
    assert turn.usage is None or turn.usage["completion_tokens"] < 200
    assert panel.transcript[-1]["interrupted"] is True
    last_delta = [message for owner, message in sent if owner is panel and message["kind"] == "delta"][-1]
    assert last_delta["interrupted"] is True
    # The next turn works and sees the partial reply.
    front_end(panel, "send", text="Go on")
    wait_idle(panel)
    assert len(chat.conversation()) == 2 and not chat.conversation().turns[-1].interrupted


def test_retry_regenerates_the_last_reply(chat, sent):
    panel = ChatPanel(shell=chat.shell)
    panel.send("First")
    panel.send("Second")
    before = chat.conversation().turns[-1]
    sent.clear()
    front_end(panel, "retry")
    wait_idle(panel)
    turns = chat.conversation().turns
    assert len(turns) == 2 and turns[-1] is not before
    assert turns[-1].prompt == before.prompt and turns[-1].reply_text == before.reply_text  # greedy
    begin = next(message for owner, message in sent if owner is panel and message["kind"] == "begin")
    assert begin["keep"] == 2  # the first exchange stays on screen, the second is redrawn


def test_undo_and_new_chat(chat):
    panel = ChatPanel(shell=chat.shell)
    panel.send("One")
    panel.send("Two")
    front_end(panel, "undo")
    assert [turn.prompt[0]["content"] for turn in chat.conversation().turns] == ["One"]
    assert len(panel.transcript) == 2
    chat.conversation().system = "Be brief."
    front_end(panel, "new_chat")
    assert len(chat.conversation()) == 0 and panel.transcript == []
    assert chat.conversation().system == "Be brief."  # like %chat reset
    front_end(panel, "undo")
    assert panel.error == "conversation 'default' is empty: there is no last exchange"


def test_buttons_are_refused_while_generating(chat, monkeypatch):
    chat.magics.max_tokens = 100
    deltas = slow_streams(chat.magics, monkeypatch)
    panel = ChatPanel(shell=chat.shell)
    panel.send("Hello", wait=False)
    wait_for(lambda: deltas)
    front_end(panel, "undo")
    assert panel.error == "a reply is being generated: wait for it or press Stop"
    panel.stop()
    wait_idle(panel)
    assert len(chat.conversation()) == 1  # the partial reply is kept


def test_a_stop_before_the_first_token_leaves_the_conversation_unchanged(chat, monkeypatch):
    slow_streams(chat.magics, monkeypatch, delay=0.5)
    panel = ChatPanel(shell=chat.shell)
    panel.send("Hello", wait=False)
    panel.stop()
    wait_idle(panel)
    assert len(chat.conversation()) == 0 and panel.transcript == [] and panel.error == ""


# --- settings, errors -----------------------------------------------------------------------------


def test_settings_round_trip_like_chat_set(chat):
    panel = ChatPanel(shell=chat.shell)
    values = {"model": "", "system": "Answer in French.", "temperature": "0.5", "top_p": "0.9", "top_k": "",
              "max_tokens": "7", "seed": "3"}
    front_end(panel, "settings", values=values)
    assert panel.error == ""
    conversation = chat.conversation()
    assert conversation.settings == {"temperature": 0.5, "top_p": 0.9, "max_tokens": 7, "seed": 3}
    assert conversation.system == "Answer in French."
    assert panel.settings["temperature"] == 0.5 and panel.settings["system"] == "Answer in French."
    assert panel.settings_state["max_tokens"] == {"value": "7", "effective": 7}
    chat.run("%chat settings")
    assert "temperature = 0.5  (conversation)" in chat.outputs[-1]["data"]["text/plain"]
    chat.run("%chat set top_k=4")  # a cell's change shows in the panel after the cell
    assert panel.settings_state["top_k"] == {"value": "4", "effective": 4}
    panel.settings = {"temperature": None}
    assert "temperature" not in conversation.settings
    reply = panel.send("Bonjour")
    assert chat.conversation().turns[-1].usage["completion_tokens"] <= 7 and reply is not None


def test_a_bad_setting_is_one_line_and_changes_nothing(chat):
    panel = ChatPanel(shell=chat.shell)
    front_end(panel, "settings", values={"temperature": "0.5"})
    front_end(panel, "settings", values={"temperature": "hot"})
    assert panel.error == "temperature must be a number, not 'hot'"
    front_end(panel, "settings", values={"max_tokens": "-3"})
    assert "max_tokens" in panel.error and "\n" not in panel.error
    assert chat.conversation().settings == {"temperature": 0.5}
    with pytest.raises(UsageError, match="unknown panel setting 'colour'"):
        panel.settings = {"colour": "blue"}


def test_a_model_that_cannot_load_is_an_error_line_and_the_conversation_is_unchanged(chat, sent):
    panel = ChatPanel(shell=chat.shell)
    panel.send("Hello")
    front_end(panel, "settings", values={"model": "no-such-model"})
    front_end(panel, "send", text="Are you there?")
    wait_idle(panel)
    assert panel.error.startswith("cannot load model 'no-such-model'") and "\n" not in panel.error
    assert len(chat.conversation()) == 1 and not panel.busy
    assert [entry["role"] for entry in panel.transcript] == ["user", "assistant"]
    assert {"kind": "discard", "id": PENDING_ID} in [message for owner, message in sent if owner is panel]
    with pytest.raises(UsageError, match="cannot load model"):
        panel.send("Still there?")


# --- interpolation, attachments -------------------------------------------------------------------


def test_input_interpolates_and_attachments_are_what_the_model_saw(chat):
    chat.run("answer = 41")
    chat.run("answer + 1")
    number = chat.shell.execution_count - 1
    panel = ChatPanel(shell=chat.shell)
    front_end(panel, "attach", cell=str(number), part="both")
    assert [chip["label"] for chip in panel.attachments] == [f"In [{number}]", f"Out [{number}]"]
    front_end(panel, "attach", cell=None, part="source")  # the cell just run
    assert len(panel.attachments) == 3
    front_end(panel, "detach", id=panel.attachments[-1]["id"])
    panel.send("Is {answer} right? {{braces}} {undefined}")
    content = chat.conversation().turns[-1].prompt[0]["content"]
    assert content == (
        "Is 41 right? {braces} {undefined}\n\n```python\nanswer + 1\n```\n\n```text\n42\n```"
    )
    assert panel.attachments == []
    front_end(panel, "attach", cell="999")
    assert panel.error.startswith("attach: no cell [999] has run")


def test_attach_text_from_the_lab_extension_is_a_chip_of_the_next_message(chat):
    panel = docked_panel(shell=chat.shell)
    assert docked_panel(shell=chat.shell) is panel  # "Send cell to chat" reaches the panel on screen
    front_end(panel, "attach_text", label="Cell 2", text="1 / 0", language="python")
    traceback = "\x1b[0;31mZeroDivisionError\x1b[0m: division by zero"
    front_end(panel, "attach_text", label="Cell 2 error", text=traceback)
    assert [chip["label"] for chip in panel.attachments] == ["Cell 2", "Cell 2 error"]
    panel.send("Explain this error.")
    content = chat.conversation().turns[-1].prompt[0]["content"]
    assert content == (
        "Explain this error.\n\n```python\n1 / 0\n```\n\n```\nZeroDivisionError: division by zero\n```"
    )
    front_end(panel, "attach_text", label=" ", text="x")
    assert panel.error == "attach_text: give the chip a label (e.g. 'Cell 3')"
    panel.close()
    assert docked_panel(shell=chat.shell) is not panel  # a closed panel is replaced


# --- sharing the conversation ---------------------------------------------------------------------


def test_cells_and_panel_share_the_conversation_both_ways(chat, capsys):
    panel = ChatPanel(shell=chat.shell)
    chat.run("%%chat\nHello from a cell")
    assert [entry["text"] for entry in panel.transcript][0] == "Hello from a cell"
    panel.send("Hello from the panel")
    capsys.readouterr()
    chat.run("%chat history")
    history = chat.outputs[-1]["data"]["text/plain"]
    assert "Hello from a cell" in history and "Hello from the panel" in history
    result = chat.run("%%chat\nAnd from a cell again")
    contents = [message["content"] for message in result.result.messages]
    first_reply = chat.conversation().turns[0].reply_text
    assert contents[:3] == ["Hello from a cell", first_reply, "Hello from the panel"]
    assert len(panel.transcript) == 6


def test_two_panels_stay_in_sync(chat, sent):
    first, second = ChatPanel(shell=chat.shell), ChatPanel(shell=chat.shell)
    first.send("Hi both")
    assert first.transcript == second.transcript and len(second.transcript) == 2
    assert kinds(sent, first) == kinds(sent, second) and "delta" in kinds(sent, second)
    front_end(second, "undo")
    assert first.transcript == [] == second.transcript
    other = ChatPanel("other", shell=chat.shell)
    first.send("Only default")
    assert other.transcript == [] and "other" in chat.magics.conversations


def test_a_cell_waits_for_the_panel_reply(chat, monkeypatch, capsys):
    chat.magics.max_tokens = 30
    slow_streams(chat.magics, monkeypatch, delay=0.02)
    panel = ChatPanel(shell=chat.shell)
    panel.send("Panel first", wait=False)
    chat.run("%%chat\nCell second")
    assert "Waiting for the chat panel's reply to finish..." in capsys.readouterr().out
    prompts = [turn.prompt[0]["content"] for turn in chat.conversation().turns]
    assert prompts == ["Panel first", "Cell second"]
    assert not panel.busy


def test_an_interrupt_while_waiting_stops_the_panel_reply(chat, monkeypatch):
    chat.magics.max_tokens = 200
    deltas = slow_streams(chat.magics, monkeypatch)
    panel = ChatPanel(shell=chat.shell)
    panel.send("A long one", wait=False)
    wait_for(lambda: len(deltas) >= 2)

    def interrupt():  # what a kernel interrupt does to a cell waiting in the gate
        raise KeyboardInterrupt

    assert chat.magics.turn_gate.acquire(on_wait=interrupt) is False
    wait_idle(panel, timeout=5)
    assert chat.conversation().turns[-1].interrupted


def test_chat_panel_command_displays_the_widget(chat):
    chat.run("%chat panel")
    data = chat.outputs[-1]["data"]
    assert "application/vnd.jupyter.widget-view+json" in data
    chat.run("%chat panel -c nowhere", ok=False)


def test_panel_threads_do_not_outlive_their_turn(chat):
    panel = ChatPanel(shell=chat.shell)
    panel.send("Hi")
    assert not any(thread.name.startswith("nbchat-panel") for thread in threading.enumerate())


# --- safety, imports ------------------------------------------------------------------------------


def test_model_output_is_text_never_markup():
    rendered = markdown_html(
        "<script>alert(1)</script> <b>x</b> [site](https://example.org) [j](javascript:alert(1))"
    )
    assert "<script>" not in rendered and "&lt;script&gt;" in rendered and "<b>" not in rendered
    assert '<a href="https://example.org" target="_blank" rel="noopener noreferrer">site</a>' in rendered
    assert "javascript:" not in rendered.split("<a ")[-1].split(">")[0]
    code = markdown_html("```python\nx = 1  # <b>\n```")
    assert 'class="nbchat-code" data-language="python"' in code and "&lt;b&gt;" in code


def test_the_panel_imports_no_jax():
    code = (
        "import sys, nbchat; nbchat.ChatPanel; import nbchat.notebook.panel; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax')))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert output.stdout.strip() == "[]"
