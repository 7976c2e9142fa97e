"""The chat kernel, started by jupyter_client from an installed kernelspec and driven over ZeroMQ.

The kernelspecs are installed into a temporary Jupyter path (``nbchat install-kernel --prefix``),
with a temporary config directory holding a ``jupyter_nbchat_config.py`` and a fresh IPython
directory, so the tests run the worktree's kernelspec and installer and never read or change the
user's Jupyter set-up. Chat tests use the tiny random-weight model (its replies are gibberish: the
tests assert what a front end receives, not what the model says); the teaching notebook runs on
the default model (marker ``integration``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from nbchat import __version__
from nbchat.cli import main as nbchat_main
from nbchat.notebook.render import INTERRUPTED_TEXT, REPLY_MIMETYPE
from nbchat.notebook.run import execute_notebook, print_exchange

REPO = Path(__file__).resolve().parents[1]
TINY_KERNEL = "nbchat-tiny"
CONFIG = "c.ChatMagics.max_tokens = 8\nc.ChatMagics.temperature = 0.0\n"
LANGUAGE_INFO = {
    "name": "markdown",
    "mimetype": "text/markdown",
    "file_extension": ".md",
    "pygments_lexer": "markdown",
}


@dataclass
class JupyterDirs:
    """A temporary Jupyter installation: its kernelspecs, and the environment a kernel runs with."""

    root: Path
    env: dict[str, str]

    @property
    def kernels(self) -> Path:
        return self.root / "share" / "jupyter" / "kernels"

    def manager(self, name: str) -> KernelManager:
        return KernelManager(
            kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(self.kernels)])
        )


@pytest.fixture(scope="module")
def jupyter(tmp_path_factory, tiny_model_dir) -> JupyterDirs:
    root = tmp_path_factory.mktemp("jupyter")
    assert nbchat_main(["install-kernel", "--prefix", str(root)]) == 0
    tiny = ["install-kernel", "--prefix", str(root), "--name", TINY_KERNEL, "--model", str(tiny_model_dir)]
    assert nbchat_main(tiny) == 0
    config = root / "config"
    config.mkdir()
    (config / "jupyter_nbchat_config.py").write_text(CONFIG, encoding="utf-8")
    env = {
        **os.environ,
        "JUPYTER_PATH": str(root / "share" / "jupyter"),
        "JUPYTER_CONFIG_DIR": str(config),
        "IPYTHONDIR": str(root / "ipython"),
    }
    return JupyterDirs(root, env)


@dataclass
class Execution:
    messages: list[dict]
    reply: dict

    def of_type(self, *kinds: str) -> list[dict]:
        return [message["content"] for message in self.messages if message["msg_type"] in kinds]

    def stdout(self) -> str:
        return "".join(c["text"] for c in self.of_type("stream") if c["name"] == "stdout")

    def stderr(self) -> str:
        return "".join(c["text"] for c in self.of_type("stream") if c["name"] == "stderr")

    def reply_bundle(self) -> dict:
        """The last state of the chat reply's display (its nbchat metadata marks it)."""
        shown = [c for c in self.of_type("display_data", "update_display_data") if "nbchat" in c["metadata"]]
        assert shown, self.messages
        return shown[-1]


class Kernel:
    """A started kernel and a client that sends requests as a notebook or a console does."""

    def __init__(self, manager: KernelManager):
        self.manager = manager
        self.client = manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=120)

    def execute(
        self,
        code: str,
        *,
        cell_id: str | None = None,
        allow_stdin: bool = False,
        silent: bool = False,
        interrupt_after: int = 0,
    ) -> Execution:
        """Run ``code`` as JupyterLab does (with ``cell_id``) or as a console does (``allow_stdin``
        and no id); ``interrupt_after``: interrupt the kernel after that many display updates."""
        content = {
            "code": code,
            "silent": silent,
            "store_history": True,
            "user_expressions": {},
            "allow_stdin": allow_stdin,
            "stop_on_error": False,
        }
        request = self.client.session.msg(
            "execute_request", content, metadata={"cellId": cell_id} if cell_id else {}
        )
        self.client.shell_channel.send(request)
        msg_id = request["header"]["msg_id"]
        messages, updates = [], 0
        while True:
            message = self.client.get_iopub_msg(timeout=300)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            if message["msg_type"] == "status":
                if message["content"]["execution_state"] == "idle":
                    break
                continue
            messages.append(message)
            if message["msg_type"] == "update_display_data":
                updates += 1
                if updates == interrupt_after:
                    self.manager.interrupt_kernel()
        while True:
            reply = self.client.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                return Execution(messages, reply["content"])

    def request(self, kind: str, **content) -> dict:
        """A shell request (complete, inspect, is_complete, kernel_info) and its reply's content."""
        msg_id = getattr(self.client, kind)(**content)
        while True:
            reply = self.client.get_shell_msg(timeout=60)
            if reply["parent_header"].get("msg_id") == msg_id:
                return reply["content"]

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernel(jupyter, tmp_path_factory):
    """The tiny-model kernel, one for the module; its first chat loads and compiles the model."""
    manager = jupyter.manager(TINY_KERNEL)
    manager.start_kernel(env=jupyter.env, cwd=str(tmp_path_factory.mktemp("kernel-cwd")))
    started = Kernel(manager)
    assert started.execute("Hi", cell_id="warm-up").reply["status"] == "ok"
    started.execute("%chat reset")
    yield started
    started.close()


@pytest.fixture
def fresh(kernel):
    """The module's kernel with an empty default conversation."""
    assert kernel.execute("%chat reset").reply["status"] == "ok"
    return kernel


# --- install ----------------------------------------------------------------------------------------


def test_install_kernel_writes_a_kernelspec_bound_to_this_python_and_the_model(jupyter, tiny_model_dir):
    spec = json.loads((jupyter.kernels / TINY_KERNEL / "kernel.json").read_text())
    assert spec["argv"] == [
        sys.executable,
        "-m",
        "nbchat.notebook.kernel",
        "-f",
        "{connection_file}",
        f"--ChatMagics.model={tiny_model_dir}",
    ]
    assert spec["display_name"] == f"nbchat ({tiny_model_dir})"
    assert spec["language"] == "markdown"
    shipped = REPO / "kernels" / "nbchat"
    for logo in ("logo-32x32.png", "logo-64x64.png"):
        installed = (jupyter.kernels / TINY_KERNEL / logo).read_bytes()
        assert installed == (shipped / logo).read_bytes() and installed.startswith(b"\x89PNG")
    default = json.loads((jupyter.kernels / "nbchat" / "kernel.json").read_text())
    assert default["display_name"] == "nbchat" and default["argv"][0] == sys.executable


def test_install_kernel_rejects_a_bad_name_in_one_line(tmp_path, capsys):
    assert nbchat_main(["install-kernel", "--prefix", str(tmp_path), "--name", "my kernel"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("nbchat: KernelSpecError: --name 'my kernel': Invalid kernel name")
    assert error.count("\n") == 1
    assert not (tmp_path / "share").exists()


def test_the_shipped_kernelspec_starts_the_chat_kernel_and_reports_kernel_info(jupyter, tmp_path):
    """kernels/nbchat as the wheel installs it (argv "python": jupyter_client runs this interpreter)."""
    manager = KernelManager(
        kernel_name="nbchat", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(REPO / "kernels")])
    )
    assert manager.kernel_spec.argv[:3] == ["python", "-m", "nbchat.notebook.kernel"]
    manager.start_kernel(env=jupyter.env, cwd=str(tmp_path))
    started = Kernel(manager)
    try:
        info = started.request("kernel_info")
    finally:
        started.close()
    assert info["implementation"] == "nbchat"
    assert info["implementation_version"] == __version__
    assert info["language_info"] == LANGUAGE_INFO
    assert info["banner"].startswith(f"nbchat {__version__} chat kernel, model smollm2-135m-instruct\n")
    assert "debugger" not in info["supported_features"]


def test_the_kernelspecs_model_and_the_config_file_reach_the_kernel(kernel, tiny_model_dir):
    """--ChatMagics.model from the kernelspec's argv; max_tokens and temperature from
    jupyter_nbchat_config.py in the Jupyter config directory."""
    assert kernel.request("kernel_info")["banner"].startswith(
        f"nbchat {__version__} chat kernel, model {tiny_model_dir}\n"
    )
    settings = kernel.execute("%chat settings").of_type("display_data")[0]["data"]["text/plain"]
    assert f"model = {json.dumps(str(tiny_model_dir))}  (config)" in settings
    assert "max_tokens = 8  (config)" in settings and "temperature = 0.0  (config)" in settings


# --- chat turns -------------------------------------------------------------------------------------


def test_a_plain_cell_is_a_turn_shown_with_the_chat_reply_bundle(fresh):
    run = fresh.execute("Hello there", cell_id="plain")
    assert run.reply["status"] == "ok"
    bundle = run.reply_bundle()
    assert set(bundle["data"]) == {REPLY_MIMETYPE, "text/markdown", "text/plain"}  # the lab extension's data
    assert bundle["metadata"]["nbchat"]["turn"] == 0
    assert bundle["metadata"]["nbchat"]["settings"] == {
        "temperature": 0.0,
        "max_tokens": 8,
    }  # the config file
    assert not run.of_type("execute_result")  # the turn's ChatReply is kept in Out, not shown again


def test_rerunning_a_cell_replaces_its_turn(fresh):
    fresh.execute("first question", cell_id="a")
    fresh.execute("second question", cell_id="b")
    rerun = fresh.execute("first question, edited", cell_id="a")
    assert rerun.reply_bundle()["metadata"]["nbchat"]["turn"] == 0
    transcript = fresh.execute("%chat history").of_type("display_data")[0]["data"]["text/plain"]
    assert transcript.startswith("user: first question, edited\n\nassistant: ")
    assert transcript.count("user: ") == 2 and "user: second question" in transcript


def test_python_runs_in_the_kernel_namespace_and_turns_interpolate_it(fresh):
    defined = fresh.execute("%%python\n%%capture shown\ncity = 'Kyoto'\nprint('hidden')")
    assert defined.reply["status"] == "ok" and defined.stdout() == ""  # IPython's %%capture ran
    assert fresh.execute("%python print(shown.stdout, len(city))").stdout() == "hidden\n 5\n"
    fresh.execute("Tell me about {city}.", cell_id="city")
    # The raw history (what %history and a front end's history show) holds the cell as written.
    raw = fresh.execute("%python print(get_ipython().history_manager.input_hist_raw[-2])").stdout()
    assert raw == "Tell me about {city}.\n"
    transcript = fresh.execute("%chat history").of_type("display_data")[0]["data"]["text/plain"]
    assert transcript.startswith("user: Tell me about Kyoto.\n\nassistant: ")


def test_commands_and_a_turn_in_one_cell_run_in_order(fresh):
    run = fresh.execute("%chat set max_tokens=3\nCount to three.\n%chat settings", cell_id="mixed")
    assert run.stdout().startswith("Set max_tokens=3 (conversation 'default').\n")
    assert run.reply_bundle()["metadata"]["nbchat"]["settings"]["max_tokens"] == 3
    settings = [c for c in run.of_type("display_data") if "nbchat" not in c["metadata"]][-1]
    assert "max_tokens = 3  (conversation)" in settings["data"]["text/plain"]
    fresh.execute("%chat set max_tokens=none")


def test_a_bad_command_is_one_line_and_keeps_the_conversation(fresh):
    fresh.execute("keep me", cell_id="kept")
    run = fresh.execute("%chat histroy")
    assert run.reply["status"] == "error" and run.reply["ename"] == "UsageError"
    assert run.stderr() == (
        "UsageError: unknown %chat command 'histroy' (did you mean 'history'?); "
        f"commands: {run.reply['evalue'].split('commands: ')[1]}\n"
    )
    assert not run.of_type("error")  # no traceback anywhere
    assert "user: keep me" in fresh.execute("%chat history").of_type("display_data")[0]["data"]["text/plain"]


# The tiny model's special tokens, banned from the story so that it cannot end before the interrupt.
NO_END = (
    "%%python\n"
    "magics = get_ipython().magics_manager.registry['ChatMagics']\n"
    "def open_endless(engine, request, open_stream=magics._open_stream):\n"
    "    return open_stream(engine, {**request, 'logit_bias': {'0': -100, '1': -100, '2': -100}})\n"
    "magics._open_stream = open_endless"
)


def test_kernel_interrupt_stops_the_reply_and_keeps_it_marked(fresh):
    """A real SIGINT from the kernel manager (the Stop button) in the middle of a long reply."""
    assert fresh.execute(NO_END).reply["status"] == "ok"
    try:
        run = fresh.execute(
            "%%chat --max-tokens 1000\nWrite a very long story.", cell_id="story", interrupt_after=2
        )
    finally:
        fresh.execute("%python del magics._open_stream")
    assert run.reply["status"] == "ok" and not run.of_type("error")  # no KeyboardInterrupt traceback
    final = run.reply_bundle()
    assert final["metadata"]["nbchat"]["interrupted"] is True
    assert final["data"]["text/plain"].endswith(INTERRUPTED_TEXT)
    partial = final["data"]["text/plain"][: -len(INTERRUPTED_TEXT)].rstrip()
    assert partial
    assert not run.of_type("execute_result")  # the ChatReply (marked interrupted) is kept in Out, not shown
    transcript = fresh.execute("%chat history").of_type("display_data")[0]["data"]["text/plain"]
    assert transcript.endswith(f"assistant: {partial} {INTERRUPTED_TEXT}")
    follow_up = fresh.execute("Thanks", cell_id="thanks")
    assert follow_up.reply_bundle()["metadata"]["nbchat"]["turn"] == 1


def test_a_silent_request_is_python_not_a_turn(fresh):
    """Front ends send their own code silently; it must never become a chat turn."""
    run = fresh.execute("probe = 6 * 7", silent=True)
    assert run.reply["status"] == "ok" and not run.messages
    assert fresh.execute("%python print(probe)").stdout() == "42\n"
    assert fresh.execute("%chat history").stdout() == "Conversation 'default' is empty.\n"


def test_a_console_request_gets_the_reply_as_streamed_text(fresh):
    """A console reads input and sends no cell id: it cannot redraw a display, so text streams."""
    run = fresh.execute("Hello console", allow_stdin=True)
    assert run.reply["status"] == "ok"
    assert not [c for c in run.of_type("display_data", "update_display_data") if "nbchat" in c["metadata"]]
    streamed = [c["text"] for c in run.of_type("stream") if c["name"] == "stdout"]
    assert len(streamed) >= 2 and streamed[-1].endswith("\n")  # delta by delta, then the line ends
    transcript = fresh.execute("%chat history", allow_stdin=True).of_type("display_data")[0]["data"][
        "text/plain"
    ]
    assert transcript == f"user: Hello console\n\nassistant: {''.join(streamed).rstrip(chr(10))}"


def test_live_replies_config_prints_replies_as_text_even_for_a_notebook(jupyter, tmp_path):
    """ChatKernel.live_replies=never (here from the command line): no display updates at all."""
    manager = jupyter.manager(TINY_KERNEL)
    manager.start_kernel(
        env=jupyter.env, cwd=str(tmp_path), extra_arguments=["--ChatKernel.live_replies=never"]
    )
    started = Kernel(manager)
    try:
        run = started.execute("Hello", cell_id="notebook-cell")
    finally:
        started.close()
    assert run.reply["status"] == "ok"
    assert not [c for c in run.of_type("display_data", "update_display_data") if "nbchat" in c["metadata"]]
    assert not run.of_type("execute_result")  # the turn's ChatReply is kept in Out, not shown again
    assert run.stdout().endswith("\n") and "Loaded " in run.stdout()


# --- what front ends ask ----------------------------------------------------------------------------


def test_every_cell_is_complete(kernel):
    for code in ("Hello", "%%python\nfor i in range(3):", "user: hi\nassistant:"):
        assert kernel.request("is_complete", code=code)["status"] == "complete"


@pytest.mark.parametrize(
    ("code", "expected", "replaced"),
    [
        ("%chat hi", ["history"], "hi"),
        ("%chat set max_t", ["max_tokens=", "max_tool_steps="], "max_t"),
        ("%%chat --tem", ["--temperature"], "--tem"),
        ("%", ["%%chat", "%%python", "%chat", "%python"], "%"),
        ("Hello\n%p", ["%python"], "%p"),
        ("Tell me about {ci", ["city"], "ci"),
        ("%%chat -t 0\nAbout {ci", ["city"], "ci"),
        ("Literal {{ci", [], ""),
        ("Plain text wor", [], ""),
    ],
)
def test_completion_offers_directives_commands_options_and_names(kernel, code, expected, replaced):
    kernel.execute("%python city = 'Kyoto'")
    reply = kernel.request("complete", code=code, cursor_pos=len(code))
    assert reply["status"] == "ok"
    assert reply["matches"] == expected
    assert reply["cursor_start"] == len(code) - len(replaced) and reply["cursor_end"] == len(code)


def test_completion_of_every_command_after_chat(kernel):
    commands = kernel.execute("%python print(get_ipython().magics_manager.registry['ChatMagics'].COMMANDS)")
    reply = kernel.request("complete", code="%chat ", cursor_pos=6)
    assert str(tuple(reply["matches"])) == commands.stdout().strip()


def test_completion_in_python_is_ipythons(kernel):
    kernel.execute("%python city = 'Kyoto'")
    code = "%%python\nx = ci"
    reply = kernel.request("complete", code=code, cursor_pos=len(code))
    assert "city" in reply["matches"] and reply["cursor_start"] == len(code) - 2
    line = "Hi\n%python city.up"
    reply = kernel.request("complete", code=line, cursor_pos=len(line))
    assert reply["matches"] == ["upper"]
    assert line[reply["cursor_start"] : reply["cursor_end"]] == "up"
    # IPython's typed completions carry offsets too: in the cell's coordinates, not the line's.
    [typed] = reply["metadata"]["_jupyter_types_experimental"]
    assert (typed["start"], typed["end"], typed["type"]) == (
        reply["cursor_start"],
        reply["cursor_end"],
        "function",
    )


def test_inspection_shows_a_commands_help(kernel):
    reply = kernel.request("inspect", code="%chat undo", cursor_pos=8)
    assert reply["found"] is True
    assert reply["data"]["text/plain"] == "%chat undo\nundo                    drop the last exchange"
    listing = kernel.request("inspect", code="%chat", cursor_pos=3)["data"]["text/plain"]
    assert listing.startswith("%chat commands") and "history" in listing
    options = kernel.request("inspect", code="%%chat --json\nhi", cursor_pos=3)["data"]["text/plain"]
    assert "--temperature" in options and "Role headers" in options


def test_inspection_of_text_python_and_placeholders(kernel):
    kernel.execute("%python city = 'Kyoto'")
    assert kernel.request("inspect", code="Just words", cursor_pos=4)["found"] is False
    assert kernel.request("inspect", code="%chat nosuch", cursor_pos=9)["found"] is False
    placeholder = kernel.request("inspect", code="About {city} today", cursor_pos=9)
    assert placeholder["found"] is True and "Kyoto" in placeholder["data"]["text/plain"]
    python = kernel.request("inspect", code="%%python\nlen(city)", cursor_pos=11)
    assert python["found"] is True and "Return the number of items" in python["data"]["text/plain"]


# --- notebooks and consoles ---------------------------------------------------------------------


def code_cell(source: str, *tags: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_code_cell(source, metadata={"tags": list(tags)} if tags else {})


def test_a_notebook_runs_on_the_chat_kernel(jupyter, tmp_path):
    """nbclient, as `jupyter execute` / papermill / `nbchat run` would; kernel "nbchat-tiny"."""
    notebook = nbformat.v4.new_notebook(
        cells=[
            code_cell("%%python\nfruit = 'mango'"),
            code_cell("What colour is a ripe {fruit}?"),
            code_cell("system: Answer with one word.\nuser: hot\nassistant: cold\nuser: up"),
            code_cell("%chat history"),
            code_cell("%chat undo"),
            code_cell("%chat save talk.json"),
            code_cell("%chat reset\n%chat load talk.json\n%chat history"),
            code_cell("%chat nope", "raises-exception"),
            code_cell("%%chat --json --max-tokens 12\nDescribe a cat as a JSON object."),
            code_cell("%python print(type(_).__name__, _.settings['response_format'])"),
        ],
        metadata={
            "kernelspec": {"name": TINY_KERNEL, "display_name": "nbchat (tiny)", "language": "markdown"}
        },
    )
    client = NotebookClient(notebook, km=jupyter.manager(TINY_KERNEL), timeout=300)
    client.execute(env=jupyter.env, cwd=str(tmp_path))
    cells = notebook.cells

    def reply(cell) -> dict:
        [shown] = [
            out for out in cell.outputs if out.output_type == "display_data" and "nbchat" in out.metadata
        ]
        return shown

    assert notebook.metadata["language_info"]["name"] == "markdown"
    assert [reply(cells[i]).metadata["nbchat"]["turn"] for i in (1, 2)] == [0, 1]
    assert set(reply(cells[1]).data) == {REPLY_MIMETYPE, "text/markdown", "text/plain"}
    transcript = cells[3].outputs[0].data["text/plain"]
    assert transcript.startswith("user: What colour is a ripe mango?\n\nassistant: ")
    assert "\n\nuser: hot\n\nassistant: cold\n\nuser: up\n\nassistant: " in transcript
    assert cells[4].outputs[0].text == "Removed the last exchange of 'default' ('up'); 1 left.\n"
    restored = cells[6].outputs
    assert restored[0].text == (
        "Conversation 'default' reset (1 exchanges forgotten).\n"
        "Loaded 1 exchanges into 'default' from talk.json.\n"
    )
    assert restored[1].data["text/plain"] == transcript.split("\n\nuser: hot")[0]
    [error] = cells[7].outputs
    assert error.output_type == "stream" and error.name == "stderr"
    assert error.text.startswith("UsageError: unknown %chat command 'nope'") and error.text.count("\n") == 1
    json_reply = reply(cells[8])
    assert json_reply.metadata["nbchat"]["settings"]["response_format"] == {"type": "json_object"}
    assert json_reply.data["text/markdown"].startswith("```json\n")
    assert cells[9].outputs[0].text == "ChatReply {'type': 'json_object'}\n"


def test_jupyter_console_chats_in_the_terminal(jupyter, tmp_path):
    """`jupyter console --kernel nbchat-tiny` with the turns typed on its standard input."""
    typed = "Hello console\n%chat history\n%python print(6 * 7)\n"
    console = subprocess.run(
        [sys.executable, "-m", "jupyter_console", "--kernel", TINY_KERNEL, "--simple-prompt"],
        input=typed,
        capture_output=True,
        text=True,
        env=jupyter.env,
        cwd=tmp_path,
        timeout=240,
    )
    out = console.stdout
    assert f"nbchat {__version__} chat kernel, model " in out
    assert "Out[1]:" not in out  # the turn's ChatReply is kept in Out, not printed under the reply
    assert "In [2]: user: Hello console\n\nassistant: " in out
    assert "In [3]: 42\n" in out


@pytest.mark.integration
def test_the_chat_kernel_notebook_runs_on_the_default_model(jupyter, tmp_path, monkeypatch):
    """As `nbchat run notebooks/chat-kernel.ipynb` runs it: its kernelspec picks the chat kernel."""
    for name in ("JUPYTER_CONFIG_DIR", "IPYTHONDIR"):  # no user config reaches the kernel
        monkeypatch.setenv(name, jupyter.env[name])
    notebook = execute_notebook(REPO / "notebooks" / "chat-kernel.ipynb", tmp_path)
    assert notebook.metadata["kernelspec"]["name"] == "nbchat"
    assert notebook.metadata["language_info"]["name"] == "markdown"  # the chat kernel ran it
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]

    def cell(start: str):
        [match] = [c for c in code if c.source.startswith(start)]
        return match

    def reply_text(start: str) -> str:
        [shown] = [
            o for o in cell(start).outputs if o.output_type == "display_data" and "nbchat" in o.metadata
        ]
        return shown.data["text/plain"]

    assert "Paris" in reply_text("What is the capital of France?")
    assert "Rome" in reply_text("And what is the capital of Italy?")
    history = cell("%chat history").outputs[0].data["text/plain"]
    assert history.startswith(
        "user: What is the capital of France? Answer in one short sentence.\n\nassistant: "
    )
    assert "Japan" in reply_text("%%chat --new\nIn one sentence: which country is {city} in?")
    assert reply_text("%%chat --new\nsystem: Give the opposite").strip().lower().startswith("down")
    value = [o for o in cell("%python print(type(cat)").outputs if o.output_type == "stream"][0].text
    assert value.startswith("dict {")
    assert (tmp_path / "conversation.json").is_file()
    printed = io.StringIO()
    for executed in code:
        print_exchange(executed, printed)
    lines = printed.getvalue()
    assert "user> What is the capital of France? Answer in one short sentence.\nassistant> " in lines
    assert "user> In one sentence: which country is {city} in?   [--new]\nassistant> " in lines
    assert "ChatReply(" not in lines
