"""A notebook whose ``%%chat`` cells talk to a real `nbchat serve` by URL, executed by nbclient in a
real kernel: replies stream into the cell, the conversation carries over, errors are one line, the
key never shows or lands in a saved conversation, and that kernel never imports JAX.
"""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from nbchat.notebook.run import kernel_manager


class RecordingClient(NotebookClient):
    """nbclient's client, also keeping each cell's IOPub message types in arrival order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.messages: dict[int, list[str]] = {}

    def process_message(self, msg, cell, cell_index):
        self.messages.setdefault(cell_index, []).append(msg["msg_type"])
        return super().process_message(msg, cell, cell_index)


@pytest.fixture(scope="module")
def executed(tiny_server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("remote-notebook")
    cells = [
        "%load_ext nbchat",
        f"%chat model {tiny_server.base_url} --api-key {tiny_server.api_key}",
        # A prompt the tiny model answers at length (1000 tokens take a few throttled redraws).
        "%%chat --temperature 0 --max-tokens 1000\nJSON looks like",
        "%%chat --temperature 0 --max-tokens 6\nAnd now?",
        "print(json.dumps({'messages': len(_.messages), 'prompt_tokens': _.usage['prompt_tokens']}))",
        "%%chat --max-tokens 100000\nThis asks for too much.",
        "%%chat --model no-such-model@" + tiny_server.base_url + "\nHello",
        "%chat settings",
        "%chat models",
        "%chat save conversation.json\nprint(open('conversation.json').read().count(KEY))",
        "import sys\nprint('jax' in sys.modules, 'nbchat.api' in sys.modules)",
    ]
    cells[4] = "import json\n" + cells[4]
    cells[9] = cells[9].replace("KEY", repr(tiny_server.api_key))
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in cells])
    client = RecordingClient(notebook, km=kernel_manager(workdir), timeout=300, allow_errors=True,
                             resources={"metadata": {"path": str(workdir)}})
    with open(workdir / "kernel.log", "w") as kernel_log:
        client.execute(stderr=kernel_log)
    return notebook, client.messages


def stdout(cell) -> str:
    return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def reply_text(cell) -> str:
    replies = [out for out in cell.outputs if out.output_type == "display_data" and "nbchat" in out.metadata]
    assert len(replies) == 1, cell.outputs
    return replies[0].data["text/plain"]


def test_the_model_command_connects_to_the_endpoint(executed, tiny_server, tiny_model_dir):
    notebook, _ = executed
    expected = f"Chatting with {tiny_model_dir.name} at {tiny_server.base_url}"
    assert stdout(notebook.cells[1]).startswith(expected)


def test_replies_stream_into_the_cell(executed):
    notebook, messages = executed
    cell = notebook.cells[2]
    assert [out.output_type for out in cell.outputs if out.output_type == "error"] == []
    assert reply_text(cell)
    # The reply's display is created once, then updated as chunks arrive, then finished.
    assert messages[2].count("display_data") == 1
    assert messages[2].count("update_display_data") >= 2, messages[2]


def test_the_conversation_carries_over_to_the_next_cell(executed):
    notebook, _ = executed
    assert reply_text(notebook.cells[3]) is not None
    summary = json.loads(stdout(notebook.cells[4]))
    assert summary["messages"] == 4  # both questions and both replies went to the server
    assert summary["prompt_tokens"] > 20


@pytest.mark.parametrize(("index", "words"), [(5, "maximum context length"), (6, "no-such-model")])
def test_errors_from_the_server_are_one_line(executed, index, words):
    notebook, _ = executed
    cell = notebook.cells[index]
    # IPython shows a UsageError as its one line on stderr, with no traceback; the reply's display,
    # started before the server answered, is blanked.
    streams = [out for out in cell.outputs if out.output_type == "stream"]
    assert len(streams) == 1 and streams[0].name == "stderr"
    assert all(out.data == {"text/plain": ""} for out in cell.outputs if out.output_type == "display_data")
    shown = streams[0].text
    assert shown.startswith("UsageError: ")
    assert words in shown and shown.rstrip("\n").count("\n") == 0


def test_settings_show_the_endpoint_and_the_key_masked(executed, tiny_server):
    notebook, _ = executed
    shown = "".join(out.get("data", {}).get("text/plain", "") for out in notebook.cells[7].outputs)
    assert f'model = "{tiny_server.base_url}"' in shown
    assert f'api_key = "{tiny_server.api_key[:3]}...{tiny_server.api_key[-4:]}"  (config)' in shown
    assert tiny_server.api_key not in json.dumps(notebook.cells[7].outputs)


def test_models_lists_the_endpoints_models(executed, tiny_server, tiny_model_dir):
    notebook, _ = executed
    shown = "".join(out.get("data", {}).get("text/plain", "") for out in notebook.cells[8].outputs)
    assert f"{tiny_model_dir.name}@{tiny_server.base_url} [loaded]: served at {tiny_server.base_url}" in shown
    assert "smollm2-135m-instruct" in shown  # next to the local ones


def test_a_saved_conversation_holds_no_key(executed):
    notebook, _ = executed
    assert stdout(notebook.cells[9]).strip().splitlines()[-1] == "0"


def test_chatting_remotely_imports_no_jax_and_no_local_engine(executed):
    notebook, _ = executed
    assert stdout(notebook.cells[10]).strip() == "False False"
