"""The shipped notebooks run top to bottom in a real kernel (nbclient) on the default model.

The kernel is this test run's Python (the project's virtual environment), through a kernelspec
written for the test, so the notebooks see the nbchat under test and not some other installation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL_NAME = "nbchat-test-python"


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    kernel_dir = workdir / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbchat tests",
        "language": "python",
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(workdir / "kernels")])
    kernel = KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, km=kernel, timeout=600, resources={"metadata": {"path": str(workdir)}})
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
