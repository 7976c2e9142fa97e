"""%%chat and %chat driven through a real IPython shell and the real Engine on the tiny model.

Each test runs cells with ``shell.run_cell`` (as a front end does, with a cell id when it sends one)
and asserts on what a front end would receive: the displays and their updates, the cell's result,
the user namespace, and the conversation the magics keep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from nbchat.conversation import Conversation
from nbchat.notebook import engines as engines_module
from nbchat.notebook.render import INTERRUPTED_MARKDOWN, INTERRUPTED_TEXT
from tests.test_render import RecordingPublisher, without_reply_data
from tests.tiny_model import make_tiny_model_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTING_TRAITS = ("model", "temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "format", "stream")


def configure(shell, model_dir) -> None:
    """The module's settings: the tiny model, greedy decoding, short replies."""
    shell.run_line_magic("config", f"ChatMagics.model = {str(model_dir)!r}")
    shell.run_line_magic("config", "ChatMagics.max_tokens = 6")
    shell.run_line_magic("config", "ChatMagics.temperature = 0.0")


def recording_shell(model_dir, *config_lines: str):
    """The IPython shell with the extension loaded, the tiny model configured (plus ``config_lines``
    for ``%config``) and displays recorded; restores the shell when the generator is closed."""
    shell = InteractiveShell.instance()
    saved_publisher = shell.display_pub
    shell.display_pub = RecordingPublisher(shell=shell)
    shell.run_line_magic("load_ext", "nbchat")
    configure(shell, model_dir)
    for line in config_lines:
        shell.run_line_magic("config", line)
    yield shell
    shell.run_line_magic("unload_ext", "nbchat")
    shell.display_pub = saved_publisher


@pytest.fixture(scope="module")
def shell(tiny_model_dir):
    """One shell for the module: the extension loaded, the tiny model configured, displays recorded."""
    yield from recording_shell(tiny_model_dir)


@pytest.fixture
def chat(shell):
    """A clean slate per test: fresh conversations, settings as configured, no recorded output."""
    magics = shell.magics_manager.registry["ChatMagics"]
    saved = {name: getattr(magics, name) for name in SETTING_TRAITS}
    magics.conversations = {"default": Conversation("default")}
    magics.current = "default"
    shell.display_pub.outputs.clear()
    yield Chat(shell, magics)
    magics = shell.magics_manager.registry["ChatMagics"]  # a test may have reloaded the extension
    for name, value in saved.items():
        setattr(magics, name, value)


class Chat:
    """Runs cells like a front end and exposes what it would see."""

    def __init__(self, shell, magics):
        self.shell = shell
        self.magics = magics

    @property
    def outputs(self) -> list[dict]:
        return self.shell.display_pub.outputs

    def run(self, cell: str, *, cell_id: str | None = None, ok: bool = True):
        result = self.shell.run_cell(cell, store_history=True, cell_id=cell_id)
        if ok:
            assert result.error_in_exec is None, result.error_in_exec
            assert result.error_before_exec is None, result.error_before_exec
        return result

    def error(self, cell: str) -> str:
        """Run a cell that must fail with a one-line UsageError; return its message."""
        result = self.run(cell, ok=False)
        assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
        message = str(result.error_in_exec)
        assert "\n" not in message
        return message

    def conversation(self, name: str = "default") -> Conversation:
        return self.magics.conversations[name]

    def snapshot(self) -> dict:
        return {name: conv.to_dict() for name, conv in self.magics.conversations.items()}


# --- the extension --------------------------------------------------------------------------------


def test_load_ext_registers_magics_without_importing_jax(tiny_model_dir):
    script = textwrap.dedent(
        """
        import sys
        from IPython.core.interactiveshell import InteractiveShell
        from IPython.core.error import UsageError

        shell = InteractiveShell.instance()
        shell.run_line_magic("load_ext", "nbchat")
        assert "chat" in shell.magics_manager.magics["line"] and "chat" in shell.magics_manager.magics["cell"]
        for line in ["help", "history", "settings", "set temperature=0.5", "conversations", "models",
                     "model", "system Be brief."]:
            result = shell.run_cell("%chat " + line)
            assert result.success, (line, result.error_in_exec)
        heavy = sorted(m for m in ("jax", "jaxlib", "transformers", "torch") if m in sys.modules)
        print("heavy modules:", heavy)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert "heavy modules: []" in completed.stdout


def test_config_file_settings_reach_the_magics():
    """ipython_config.py sets shell.config; the magics read it when the extension loads."""
    script = textwrap.dedent(
        """
        from traitlets.config import Config
        from IPython.core.interactiveshell import InteractiveShell

        config = Config()
        config.ChatMagics.temperature = 0.25
        config.ChatMagics.model = "some-model"
        shell = InteractiveShell.instance(config=config)
        shell.run_line_magic("load_ext", "nbchat")
        magics = shell.magics_manager.registry["ChatMagics"]
        print(magics.temperature, magics.model)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "0.25 some-model"


def test_config_magic_sets_traits_and_settings_shows_their_source(chat):
    chat.run("%config ChatMagics.top_k = 7")
    assert chat.magics.top_k == 7
    chat.run("%chat set seed=3")
    chat.outputs.clear()
    chat.run("%chat settings")
    text = chat.outputs[-1]["data"]["text/plain"]
    assert "top_k = 7  (config)" in text
    assert "seed = 3  (conversation)" in text
    assert "top_p = null  (default)" in text


def test_unload_removes_everything_and_reload_restores_it(chat, tiny_model_dir, capsys):
    shell = chat.shell
    chat.run("%%chat\nload the model")
    engines_before = dict(engines_module._ENGINES)
    shell.run_line_magic("unload_ext", "nbchat")
    try:
        assert "chat" not in shell.magics_manager.magics["line"]
        assert "chat" not in shell.magics_manager.magics["cell"]
        assert "ChatMagics" not in shell.magics_manager.registry
        assert not any(type(c).__name__ == "ChatMagics" for c in shell.configurables)
        assert not any("ChatMagics" in repr(cb) for cbs in shell.events.callbacks.values() for cb in cbs)
        assert not shell.run_cell("%chat help").success
    finally:
        shell.run_line_magic("load_ext", "nbchat")
        configure(shell, tiny_model_dir)
    shell.run_line_magic("reload_ext", "nbchat")
    configure(shell, tiny_model_dir)
    assert sum(type(c).__name__ == "ChatMagics" for c in shell.configurables) == 1
    assert len([cb for cb in shell.events.callbacks["pre_run_cell"] if "ChatMagics" in repr(cb)]) == 1
    chat.magics = shell.magics_manager.registry["ChatMagics"]
    capsys.readouterr()
    assert chat.run("%%chat\nstill works").result.turn == 0  # conversations go with the old instance
    assert "Loading" not in capsys.readouterr().out  # the loaded model survives unload and reload
    assert all(engines_module._ENGINES[key] is engine for key, engine in engines_before.items())


# --- chatting -------------------------------------------------------------------------------------


def test_first_chat_loads_the_model_with_a_summary_line(chat, tiny_model_dir, capsys):
    engines_module._ENGINES.pop((str(tiny_model_dir), None), None)
    chat.run("%%chat\nHello")
    printed = capsys.readouterr().out
    assert f"Loading {tiny_model_dir}" in printed
    summary = [line for line in printed.splitlines() if line.startswith("Loaded ")]
    assert len(summary) == 1
    assert "Compiling (first use only)..." in printed
    assert "float32 · cpu · context" in summary[0]
    assert "(weights" in summary[0] and "compile" in summary[0]
    chat.run("%%chat\nAgain")
    assert "Loaded " not in capsys.readouterr().out


def test_reply_streams_through_one_display_and_ends_as_markdown_with_metadata(chat, tiny_model_dir):
    result = chat.run("%%chat --max-tokens 12\nHello there", cell_id="cell-1")
    reply = result.result
    displays = chat.outputs
    assert len({output["transient"]["display_id"] for output in displays}) == 1
    assert displays[0]["update"] is False and all(output["update"] for output in displays[1:])
    final = displays[-1]
    assert without_reply_data(final["data"]) == {"text/markdown": reply.text, "text/plain": reply.text}
    metadata = final["metadata"]["nbchat"]
    assert metadata["model"] == str(tiny_model_dir)
    assert metadata["settings"] == {"temperature": 0.0, "max_tokens": 12}
    assert metadata["finish_reason"] == reply.finish_reason
    assert metadata["usage"] == reply.usage and reply.usage["completion_tokens"] <= 12
    assert metadata["interrupted"] is False


def test_redraws_are_throttled_to_about_fifteen_a_second(chat):
    chat.run("%%chat --max-tokens 40\nCount")  # compiles the shapes this length needs
    chat.outputs.clear()
    started = time.perf_counter()
    reply = chat.run("%%chat --max-tokens 40\nCount").result
    elapsed = time.perf_counter() - started
    partial_redraws = len(chat.outputs) - 2  # minus the placeholder and the final render
    assert partial_redraws <= 15 * elapsed + 1
    if elapsed < 1.0:  # tokens came faster than redraws may: throttling must have skipped some
        assert partial_redraws < reply.usage["completion_tokens"]


def test_result_object_carries_text_messages_usage_and_its_repr_does_not_repeat_the_reply(chat):
    reply = chat.run("%%chat --out answer\nHi").result
    assert chat.shell.user_ns["answer"] == reply.text
    assert chat.shell.user_ns["_"] is reply
    assert reply.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": reply.text}]
    assert set(reply.usage) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    tokens = reply.usage["completion_tokens"]
    summary = (
        f"ChatReply(conversation='default', turn=0, {tokens} tokens, finish_reason={reply.finish_reason!r})"
    )
    assert repr(reply) == summary
    # The cell shows no Out repr under the streamed reply (the display hook finds nothing to show).
    assert chat.shell.display_formatter.format(reply) == ({}, {})
    assert chat.shell.user_ns["Out"][chat.shell.execution_count - 1] is reply


def test_follow_up_cells_continue_the_conversation(chat):
    first = chat.run("%%chat\nMy name is Ada.", cell_id="a").result
    second = chat.run("%%chat\nWhat is my name?", cell_id="b").result
    assert second.messages == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": second.text},
    ]
    assert len(chat.conversation()) == 2


def test_rerunning_a_cell_replaces_its_exchange(chat):
    chat.run("%%chat\nfirst", cell_id="a")
    chat.run("%%chat\nsecond", cell_id="b")
    rerun = chat.run("%%chat\nfirst, edited", cell_id="a").result
    turns = chat.conversation().turns
    assert [turn.prompt[0]["content"] for turn in turns] == ["first, edited", "second"]
    assert rerun.turn == 0
    assert rerun.messages[0] == {"role": "user", "content": "first, edited"}  # later turns are not context


def test_without_cell_ids_each_run_is_a_new_exchange(chat):
    chat.run("%%chat\nsame text")
    chat.run("%%chat\nsame text")
    assert len(chat.conversation()) == 2
    keys = [turn.key for turn in chat.conversation().turns]
    assert all(key.startswith("exec:") for key in keys) and keys[0] != keys[1]


def test_role_headers_send_a_few_shot_message_list_and_the_first_cell_sets_the_system_prompt(chat):
    cell = "%%chat\nsystem: Answer with one word.\nuser: hot\nassistant: cold\n## user\nbig"
    reply = chat.run(cell).result
    assert reply.messages[:4] == [
        {"role": "system", "content": "Answer with one word."},
        {"role": "user", "content": "hot"},
        {"role": "assistant", "content": "cold"},
        {"role": "user", "content": "big"},
    ]
    assert chat.conversation().system == "Answer with one word."
    follow_up = chat.run("%%chat\nsmall").result
    assert follow_up.messages[0] == {"role": "system", "content": "Answer with one word."}


def test_system_option_later_in_a_conversation_applies_to_that_cell_only(chat):
    chat.run("%%chat\none")
    with_system = chat.run('%%chat -s "Be terse."\ntwo').result
    after = chat.run("%%chat\nthree").result
    assert with_system.messages[0] == {"role": "system", "content": "Be terse."}
    assert after.messages[0] == {"role": "user", "content": "one"}
    assert chat.conversation().system is None


def test_interpolation_fills_known_names_and_leaves_code_braces(chat):
    chat.shell.user_ns["lang"] = "Python"
    chat.run("x = 41\nx + 1")
    count = chat.shell.execution_count - 1
    cell = '%%chat\nIn {lang}, explain {{lang}} and {Out[COUNT]}:\ndef f(d): return {"k": d[0]} | {missing}'
    reply = chat.run(cell.replace("COUNT", str(count))).result
    sent = reply.messages[-2]["content"]
    assert sent == 'In Python, explain {lang} and 42:\ndef f(d): return {"k": d[0]} | {missing}'


def test_no_interpolate_sends_the_cell_as_written(chat):
    chat.shell.user_ns["lang"] = "Python"
    reply = chat.run("%%chat --no-interpolate\nKeep {lang} and {{x}}").result
    assert reply.messages[-2]["content"] == "Keep {lang} and {{x}}"


def test_options_change_one_cell_and_chat_set_makes_a_default(chat):
    one = chat.run("%%chat --max-tokens 2 --seed 5 --top-k 3\nHi").result
    assert one.settings == {"temperature": 0.0, "max_tokens": 2, "seed": 5, "top_k": 3}
    assert one.usage["completion_tokens"] <= 2
    two = chat.run("%%chat\nHi").result
    assert two.settings == {"temperature": 0.0, "max_tokens": 6}
    chat.run("%chat set max_tokens=3 top-p=0.5 stop=###")
    three = chat.run("%%chat\nHi").result
    assert three.settings == {"temperature": 0.0, "max_tokens": 3, "top_p": 0.5, "stop": ["###"]}
    chat.run("%chat set max_tokens=none")
    assert chat.run("%%chat\nHi").result.settings["max_tokens"] == 6


def test_named_conversations_are_separate(chat):
    chat.run("%%chat\nin default")
    chat.run("%%chat --new -c work\nin work")
    chat.run("%%chat -c work\nstill work")
    assert len(chat.conversation()) == 1 and len(chat.conversation("work")) == 2
    chat.outputs.clear()
    chat.run("%chat set conversation=work")
    reply = chat.run("%%chat\nnow default is work").result
    assert reply.conversation == "work" and len(chat.conversation("work")) == 3


def test_new_starts_a_fresh_conversation(chat):
    chat.run("%%chat\none")
    reply = chat.run("%%chat --new\ntwo").result
    assert reply.messages[0] == {"role": "user", "content": "two"}
    assert len(chat.conversation()) == 1


def test_reply_data_for_the_lab_extension_says_how_the_reply_ended(chat, tiny_model_dir):
    from nbchat.notebook.render import REPLY_MIMETYPE

    reply = chat.run("%%chat --max-tokens 6\nHello there").result
    payload = chat.outputs[-1]["data"][REPLY_MIMETYPE]
    assert payload["text"] == payload["markdown"] == reply.text
    assert (payload["format"], payload["model"]) == ("markdown", str(tiny_model_dir))
    assert (payload["finish_reason"], payload["interrupted"]) == (reply.finish_reason, False)
    assert payload["usage"] == reply.usage and reply.usage["completion_tokens"] > 0


def test_no_stream_draws_the_reply_once(chat):
    reply = chat.run("%%chat --no-stream --max-tokens 10\nHi").result
    assert len(chat.outputs) == 2  # the placeholder, then the complete reply
    assert chat.outputs[-1]["data"]["text/markdown"] == reply.text


def test_text_format_shows_plain_text(chat):
    reply = chat.run("%%chat --format text\nHi").result
    assert without_reply_data(chat.outputs[-1]["data"]) == {"text/plain": reply.text}


def test_code_format_offers_the_code_as_the_next_cell(chat):
    chat.shell.rl_next_input = None
    reply = chat.run("%%chat --format code --max-tokens 8\nWrite code").result
    from nbchat.notebook.render import extract_code

    code, language = extract_code(reply.text)
    assert chat.outputs[-1]["data"]["text/plain"] == code
    if code.strip():
        assert chat.shell.rl_next_input == code


def test_show_prompt_and_chat_prompt_show_the_templated_prompt_and_token_count(chat, tiny_model_dir):
    chat.run("%%chat\nFirst")
    chat.outputs.clear()
    reply = chat.run("%%chat --show-prompt\nShow me").result
    engine = engines_module._ENGINES[(str(tiny_model_dir), None)]
    text, ids = engine.render_prompt(reply.messages[:-1])
    assert "<|im_start|>user\nShow me<|im_end|>" in text
    assert len(ids) == reply.usage["prompt_tokens"]
    assert chat.outputs[0]["data"]["text/plain"] == f"{text}\n[{len(ids)} tokens]"
    assert chat.outputs[0]["data"]["text/markdown"].startswith("```text\n<|im_start|>")
    chat.outputs.clear()
    chat.run("%chat prompt")  # the prompt of the last reply, without generating
    assert [output["data"]["text/plain"] for output in chat.outputs] == [f"{text}\n[{len(ids)} tokens]"]


# --- %chat commands -------------------------------------------------------------------------------


def test_history_renders_the_transcript(chat):
    chat.run("%chat system Be brief.")
    first = chat.run("%%chat\nHello").result
    chat.outputs.clear()
    chat.run("%chat history")
    data = chat.outputs[-1]["data"]
    assert data["text/plain"] == f"system: Be brief.\n\nuser: Hello\n\nassistant: {first.text}"
    assert data["text/markdown"].startswith("**system**\n\nBe brief.")


def test_undo_drops_the_last_exchange(chat):
    chat.run("%%chat\none")
    chat.run("%%chat\ntwo")
    chat.run("%chat undo")
    assert [turn.prompt[0]["content"] for turn in chat.conversation().turns] == ["one"]


def test_retry_regenerates_the_last_reply_in_place(chat):
    chat.run("%%chat\none")
    chat.run("%%chat --temperature 1.0 --seed 1\ntwo")
    before = chat.conversation().turns[-1]
    retried = chat.run("%chat retry --seed 2").result
    after = chat.conversation().turns[-1]
    assert len(chat.conversation()) == 2
    assert after.prompt == before.prompt and after.key == before.key
    assert after.options == {"temperature": 1.0, "seed": 2}
    assert retried.text == after.reply_text
    same = chat.run("%chat retry --seed 2").result
    assert same.text == retried.text  # same seed, same settings, same reply


def test_reset_forgets_exchanges(chat):
    chat.run("%%chat\none")
    chat.run("%chat reset")
    assert len(chat.conversation()) == 0


def test_save_and_load_round_trip(chat, tmp_path):
    chat.run("%%chat -s 'Sys'\none", cell_id="a")
    chat.run("%%chat --seed 4\n{{two}}", cell_id="b")
    chat.run("%chat set temperature=0.5")
    saved = chat.conversation().to_dict()
    path = tmp_path / "chat file.json"
    chat.run(f'%chat save "{path}"')
    assert json.loads(path.read_text(encoding="utf-8")) == saved
    chat.run("%chat reset")
    chat.run(f"%chat load '{path}' -c restored")
    assert chat.conversation("restored").to_dict() == {**saved, "name": "restored"}
    reply = chat.run("%%chat -c restored\nthree").result
    first_reply = saved["turns"][0]["reply"][0]["content"]
    assert [m["content"] for m in reply.messages[:3]] == ["Sys", "one", first_reply]


def test_conversations_and_models_list(chat, tiny_model_dir, capsys):
    chat.run("%%chat --new -c other\nhi")
    capsys.readouterr()
    chat.run("%chat conversations")
    assert capsys.readouterr().out == "* default: 0 exchanges\n  other: 1 exchange\n"
    chat.run("%chat models")
    text = chat.outputs[-1]["data"]["text/plain"]
    assert "smollm2-135m-instruct" in text
    assert f"{tiny_model_dir} [loaded]: local path" in text


def test_model_command_switches_and_loads(chat, tiny_model_dir, capsys):
    chat.run("%chat model smollm2-135m-instruct-nope", ok=False)
    assert chat.magics.model == str(tiny_model_dir)
    chat.run(f"%chat model '{tiny_model_dir}'")
    capsys.readouterr()
    chat.run("%chat model")
    assert capsys.readouterr().out.startswith(f"Default model: {tiny_model_dir} (")


def test_switching_the_model_frees_the_previous_engine(chat, tiny_model_dir, tmp_path, capsys):
    import weakref

    chat.run("%%chat\nHi")  # the configured model is loaded
    previous = weakref.ref(engines_module.loaded_engine(str(tiny_model_dir), None))
    other = make_tiny_model_dir(tmp_path / "other")
    try:
        chat.run(f"%chat model '{other}'")
        assert f"Freed {tiny_model_dir}" in capsys.readouterr().out
        assert [model for model, _ in engines_module._ENGINES] == [str(other)]
        assert previous() is None  # nothing holds the old engine: its weights and cache are freed
    finally:
        chat.run(f"%chat model '{tiny_model_dir}'")
    assert [model for model, _ in engines_module._ENGINES] == [str(tiny_model_dir)]


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("%%chat --temperature hot\nhi", "argument -t/--temperature: invalid float value: 'hot'"),
        ("%%chat --frobnicate\nhi", "unrecognized arguments: --frobnicate"),
        ("%%chat --format html\nhi", "argument -f/--format: invalid choice: 'html'"),
        ("%%chat -c nowhere\nhi", "no conversation named 'nowhere'"),
        ("%%chat --out 2x\nhi", "--out '2x': not a valid Python variable name"),
        ("%%chat\nuser: hi\nassistant: there", "line 2: the cell must end with a user message"),
        ("%%chat\nuser: hi\nsystem: late", "line 2: a system message may only come first"),
        ("%%chat -s x\nsystem: y\nuser: hi", "both --system and a system: block are given"),
        ("%%chat --temperature 5\nhi", "temperature"),
        ("%%chat --top-p 0\nhi", "top_p"),
        ("%%chat --max-tokens 100000000\nhi", "maximum context length"),
        ("%%chat --model /no/such/model.gguf\nhi", "cannot load model '/no/such/model.gguf'"),
        ("%chat frob", "unknown %chat command 'frob'"),
        ("%chat histroy", "did you mean 'history'?"),
        ("%chat set temperature", "expected KEY=VALUE"),
        ("%chat set temprature=1", "unknown setting 'temprature' (did you mean 'temperature'?)"),
        ("%chat set temperature=warm", "temperature must be a number, not 'warm'"),
        ("%chat set temperature=3", "temperature"),
        ("%chat set conversation=nowhere", "no conversation named 'nowhere'"),
        ("%chat load /no/such/file.json", "cannot read '/no/such/file.json'"),
        ("%chat history extra", "%chat history takes no arguments"),
        ("%chat prompt -c nowhere", "no conversation named 'nowhere'"),
    ],
)
def test_errors_are_one_usage_line_and_leave_conversations_unchanged(chat, cell, expected):
    chat.run("%%chat\nbefore")
    before = chat.snapshot()
    settings_before = dict(chat.conversation().settings)
    message = chat.error(cell)
    assert expected in message
    assert chat.snapshot() == before
    assert chat.conversation().settings == settings_before


@pytest.mark.parametrize("command", ["undo", "retry"])
def test_undo_and_retry_on_an_empty_conversation_are_usage_errors(chat, command):
    assert chat.error(f"%chat {command}") == "conversation 'default' is empty: there is no last exchange"
    assert len(chat.conversation()) == 0


def test_help_shows_options_commands_and_grammar(chat, capsys):
    chat.run("%chat help")
    text = capsys.readouterr().out
    for expected in ("%%chat [-s SYSTEM]", "--max-tokens", "retry [options]", "Role headers", "{{"):
        assert expected in text
    chat.run("%%chat --help\nignored")
    assert capsys.readouterr().out == text
    assert len(chat.conversation()) == 0


def test_every_cmd_method_with_a_docstring_is_a_command_with_its_help_line(chat, capsys):
    from nbchat.notebook.magics import ChatMagics
    from nbchat.notebook.options import commands_of, help_epilog

    methods = {name[len("_cmd_"):] for name in dir(ChatMagics) if name.startswith("_cmd_")}
    assert set(ChatMagics.COMMANDS) == methods
    chat.run("%chat help")
    text = capsys.readouterr().out
    for name, (arguments, description) in commands_of(ChatMagics).items():
        assert f"  {f'{name} {arguments}'.strip():<23} {description}" in text

    class WithPing(ChatMagics):
        def _cmd_ping(self, rest: str) -> None:
            """[N] -- answer pong N times

            Only the first line is the help."""

    assert commands_of(WithPing)["ping"] == ("[N]", "answer pong N times")
    assert "  ping [N]                answer pong N times\n" in help_epilog(commands_of(WithPing))


# --- interrupts -----------------------------------------------------------------------------------


def interrupt_after(magics, monkeypatch, deltas: int) -> list[str]:
    """Make the next stream raise KeyboardInterrupt (as a kernel interrupt does) once ``deltas``
    pieces of text have arrived; returns the pieces seen, for the assertions."""
    seen: list[str] = []
    real_open = magics._open_stream

    def interrupting_stream(engine, request):
        stream = real_open(engine, request)

        def chunks():
            for chunk in stream:
                if len(seen) == deltas:
                    raise KeyboardInterrupt
                for choice in chunk.choices:
                    if choice.delta.content:
                        seen.append(choice.delta.content)
                yield chunk

        class Wrapped:
            def __iter__(self):
                return chunks()

            def close(self):
                stream.close()

        return Wrapped()

    monkeypatch.setattr(magics, "_open_stream", interrupting_stream)
    return seen


def test_interrupt_keeps_the_partial_reply_marked_and_the_next_cell_works(chat, monkeypatch):
    seen = interrupt_after(chat.magics, monkeypatch, deltas=3)
    result = chat.run("%%chat --max-tokens 20\nTell me a long story")
    reply = result.result
    partial = "".join(seen)
    assert reply.interrupted and reply.text == partial and len(seen) == 3
    turn = chat.conversation().turns[-1]
    assert turn.interrupted and turn.reply_text == partial
    final = chat.outputs[-1]
    assert final["data"]["text/markdown"].endswith(INTERRUPTED_MARKDOWN)
    assert final["data"]["text/plain"].endswith(INTERRUPTED_TEXT)
    assert final["metadata"]["nbchat"]["interrupted"] is True

    monkeypatch.undo()
    follow_up = chat.run("%%chat\nGo on").result
    assert not follow_up.interrupted
    assert follow_up.messages[1] == {"role": "assistant", "content": partial}
    chat.outputs.clear()
    chat.run("%chat history")
    assert f"assistant: {partial} {INTERRUPTED_TEXT}" in chat.outputs[-1]["data"]["text/plain"]


def test_interrupt_before_the_first_token_leaves_the_conversation_unchanged(chat, monkeypatch, capsys):
    interrupt_after(chat.magics, monkeypatch, deltas=0)
    result = chat.run("%%chat\nHi")
    assert result.result is None
    assert len(chat.conversation()) == 0
    assert "conversation is unchanged" in capsys.readouterr().out


# --- terminal IPython -----------------------------------------------------------------------------


def test_terminal_ipython_prints_the_reply_once_as_plain_text(tiny_model_dir):
    code = (
        "%load_ext nbchat\n"
        f"%config ChatMagics.model = {str(tiny_model_dir)!r}\n"
        "%config ChatMagics.temperature = 0.0\n"
        "r = get_ipython().run_cell_magic('chat', '--max-tokens 8', 'Hello')\n"
        "print('REPLY=' + repr(r.text))\n"
    )
    env = {**os.environ, "TERM": "dumb"}
    completed = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", "--colors=nocolor", "--simple-prompt", "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr
    out = completed.stdout
    reply = eval(out.split("REPLY=", 1)[1].strip())  # noqa: S307 - our own repr
    assert "\x1b" not in out
    body = out.split("REPLY=", 1)[0]
    assert body.endswith(reply + "\n")
    if reply.strip():
        assert body.count(reply) == 1


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("%chat model --api-key", "--api-key needs the key"),
        ("%chat prompt --template", "--template needs a template name (chatml, llama-3, ...)"),
        ("%chat history -c", "-c needs a conversation name"),
    ],
)
def test_a_command_option_without_its_value_is_one_line_naming_it(chat, command, message):
    assert chat.error(command) == message
