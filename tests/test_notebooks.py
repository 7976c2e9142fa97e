"""The shipped notebooks run top to bottom in a real kernel (nbclient) on the default model.

The kernel is this test run's Python (the project's virtual environment), through a kernelspec
written for the test, so the notebooks see the nbchat under test and not some other installation.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest

from nbchat.notebook.render import INTERRUPTED_TEXT

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "nbchat-test-python"


def kernel_manager(workdir: Path):
    """A KernelManager for an IPython kernel running this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernel_dir = workdir / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbchat tests",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(workdir / "kernels")])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(
        notebook, km=kernel_manager(workdir), timeout=600, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    return notebook


def cell_by_source(notebook: nbformat.NotebookNode, start: str) -> nbformat.NotebookNode:
    matches = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.startswith(start)]
    assert len(matches) == 1, f"expected one code cell starting with {start!r}, found {len(matches)}"
    return matches[0]


def reply_output(cell: nbformat.NotebookNode) -> dict:
    """The chat reply display of a %%chat cell (the output carrying nbchat metadata)."""
    replies = [out for out in cell.outputs if out.output_type == "display_data" and "nbchat" in out.metadata]
    assert len(replies) == 1, cell.outputs
    return replies[0]


def printed(cell: nbformat.NotebookNode) -> str:
    return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def assert_no_errors(notebook: nbformat.NotebookNode) -> None:
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [(cell.source, out) for cell in code_cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, errors


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    return execute("quickstart.ipynb", tmp_path_factory.mktemp("quickstart"))


@pytest.fixture(scope="module")
def sampling(tmp_path_factory):
    return execute("sampling.ipynb", tmp_path_factory.mktemp("sampling"))


def test_quickstart_runs_without_errors(quickstart):
    assert_no_errors(quickstart)


def test_quickstart_first_chat_loads_the_model_and_renders_markdown(quickstart):
    cell = cell_by_source(quickstart, "%%chat\nWhat is the capital of France?")
    assert "Loaded smollm2-135m-instruct · float32 · cpu · context 8192 tokens in" in printed(cell)
    reply = reply_output(cell)
    assert "Paris" in reply.data["text/markdown"]
    metadata = reply.metadata["nbchat"]
    assert metadata["model"] == "smollm2-135m-instruct"
    assert metadata["settings"] == {"temperature": 0.0, "max_tokens": 40}
    assert metadata["interrupted"] is False
    # The cell's result is the summary object, not the reply a second time.
    results = [out for out in cell.outputs if out.output_type == "execute_result"]
    assert len(results) == 1 and results[0].data["text/plain"].startswith("ChatReply(conversation='default'")


def test_quickstart_follow_up_remembers_the_first_exchange(quickstart):
    reply = reply_output(cell_by_source(quickstart, "%%chat\nAnd what is the capital of Italy?"))
    assert "Rome" in reply.data["text/markdown"]
    assert reply.metadata["nbchat"]["turn"] == 1


def test_quickstart_interpolates_a_variable(quickstart):
    reply = reply_output(cell_by_source(quickstart, "%%chat --new\nIn one sentence: which country is {city}"))
    assert "Japan" in reply.data["text/markdown"]
    assert reply.metadata["nbchat"]["turn"] == 0


def test_quickstart_few_shot_cell(quickstart):
    reply = reply_output(cell_by_source(quickstart, "%%chat --new\nsystem: Give the opposite"))
    assert reply.data["text/plain"].strip().lower().startswith("down")


def test_quickstart_settings_and_history(quickstart):
    settings = cell_by_source(quickstart, "%chat set max_tokens=24")
    text = next(out.data["text/plain"] for out in settings.outputs if out.output_type == "display_data")
    assert "max_tokens = 24  (conversation)" in text
    assert "temperature = 0.0  (config)" in text
    history = cell_by_source(quickstart, "%chat history")
    transcript = next(out.data["text/plain"] for out in history.outputs if out.output_type == "display_data")
    assert transcript.startswith("system: Give the opposite of the word. Answer with one word.\n\nuser: hot")


def test_quickstart_reply_as_a_value(quickstart):
    answer = reply_output(cell_by_source(quickstart, "%%chat --new --out answer")).data["text/plain"]
    lines = printed(cell_by_source(quickstart, "reply = _")).splitlines()
    assert lines[0] == repr(answer)
    assert lines[1].endswith("tokens; 2 messages")


def test_sampling_runs_without_errors(sampling):
    assert_no_errors(sampling)


@pytest.mark.parametrize(
    ("check", "expected"),
    [
        ("print(greedy_1 == greedy_2)", "True"),  # greedy decoding repeats itself
        ("print(hot_1 != hot_2)", "True"),  # different seeds sample differently
        ("print(nucleus == greedy_1)", "True"),  # a tiny nucleus leaves only the top token
        ("print(seeded_1 == seeded_2)", "True"),  # the same seed reproduces a sampled run
    ],
)
def test_sampling_notebook_findings(sampling, check, expected):
    assert printed(cell_by_source(sampling, check)).strip() == expected


def test_kernel_interrupt_stops_the_reply_keeps_it_marked_and_the_next_chat_works(tmp_path):
    """A real SIGINT (the Stop button) in the middle of a long reply."""
    manager = kernel_manager(tmp_path)
    manager.start_kernel(cwd=str(tmp_path))
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=120)

    def run(code: str, *, interrupt_after_updates: int | None = None) -> tuple[list[dict], str, float]:
        """Execute ``code``; returns its iopub messages, the reply status and, when it sent an
        interrupt, the seconds from the interrupt to the kernel going idle."""
        msg_id = client.execute(code)
        messages, updates, interrupted_at = [], 0, None
        while True:
            message = client.get_iopub_msg(timeout=300)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            messages.append(message)
            kind, content = message["msg_type"], message["content"]
            if kind == "update_display_data":
                updates += 1
                if updates == interrupt_after_updates:
                    interrupted_at = time.perf_counter()
                    manager.interrupt_kernel()
            if kind == "status" and content["execution_state"] == "idle":
                break
        status = client.get_shell_msg(timeout=60)["content"]["status"]
        return messages, status, (time.perf_counter() - interrupted_at) if interrupted_at else 0.0

    try:
        assert run("%load_ext nbchat\n%config ChatMagics.temperature = 0.0")[1] == "ok"
        assert run("%%chat --max-tokens 4\nHi")[1] == "ok"  # loads and compiles first
        messages, status, stop_seconds = run(
            "%%chat --max-tokens 400\nWrite a very long story about a dragon.", interrupt_after_updates=2
        )
        assert status == "ok"  # the cell ends cleanly: no KeyboardInterrupt traceback
        assert not [m for m in messages if m["msg_type"] == "error"]
        assert stop_seconds < 2.0
        final = [m for m in messages if m["msg_type"] == "update_display_data"][-1]["content"]
        assert final["data"]["text/plain"].endswith(INTERRUPTED_TEXT)
        assert final["metadata"]["nbchat"]["interrupted"] is True
        partial = final["data"]["text/plain"][: -len(INTERRUPTED_TEXT)].rstrip()
        assert partial and len(partial.split()) < 100

        history, status, _ = run("%chat history")
        transcript = next(m for m in history if m["msg_type"] == "display_data")["content"]["data"][
            "text/plain"
        ]
        assert transcript.endswith(f"assistant: {partial} {INTERRUPTED_TEXT}")

        follow_up, status, _ = run("%%chat --max-tokens 8\nThanks")
        assert status == "ok"
        result = next(m for m in follow_up if m["msg_type"] == "execute_result")["content"]["data"][
            "text/plain"
        ]
        assert result.startswith("ChatReply(conversation='default', turn=2,")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
