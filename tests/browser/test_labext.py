"""nbchat's JupyterLab extension in a real JupyterLab, driven through Debian's Chromium.

The replies come from the ``%%chat`` magic in a real kernel running the tiny random-weight model:
a ``--schema`` reply (its grammar forces ``{"answer":42}``, so its code block is known) and a short
Markdown reply; the chat panel docked in the right sidebar chats with the same model and takes
cells and errors sent to it. The extension must be installed in the environment the lab runs in
(``make install`` links it; ``jupyter labextension list`` is checked first).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.browser.conftest import Lab, LabPage

if os.environ.get("NBCHAT_SKIP_LABEXTENSION") == "1":
    pytest.skip("the lab extension was not built (NBCHAT_SKIP_LABEXTENSION=1)", allow_module_level=True)

# The first chat in a kernel loads and compiles the tiny model.
CHAT_TIMEOUT_MS = 180_000
ANSWER_SCHEMA = {
    # No free whitespace: the random model's reply is exactly {"answer":42}.
    "x-guidance": {"whitespace_flexible": False, "whitespace_pattern": ""},
    "type": "object",
    "properties": {"answer": {"const": 42}},
    "required": ["answer"],
    "additionalProperties": False,
}
ANSWER_CODE = '{\n  "answer": 42\n}'  # the reply as the JSON format draws it
BUTTON_LABELS = ["Copy code", "Insert code below", "Replace next cell", "Run code below"]


def _config_dir(lab: Lab) -> Path:
    """The lab's JUPYTER_CONFIG_DIR (the ``lab`` fixture keeps it next to the root directory)."""
    return lab.root_dir.parent / "state" / "config"


def labextension(lab: Lab, *args: str) -> str:
    """``jupyter labextension ARGS`` in the lab's environment; its output without colour codes."""
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(_config_dir(lab))}
    result = subprocess.run(
        [sys.executable, "-m", "jupyterlab.labextensions", *args],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    return re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)


def write_notebook(lab: Lab, name: str, sources: list[str]) -> None:
    cells = [
        {"cell_type": "code", "execution_count": None, "id": f"c{index}", "metadata": {}, "outputs": [],
         "source": source}
        for index, source in enumerate(sources)
    ]
    notebook = {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    (lab.root_dir / name).write_text(json.dumps(notebook))


def setup_source(model_dir: Path) -> str:
    return "\n".join([
        "%load_ext nbchat",
        f"%config ChatMagics.model = {str(model_dir)!r}",
        "%config ChatMagics.temperature = 0.0",
        f"answer = {ANSWER_SCHEMA!r}",
        "n = 42",
    ])


def wait_current_notebook(lab_page: LabPage, path: str) -> None:
    """Wait until notebook ``path`` is the current widget and shows its cells."""
    lab_page.page.wait_for_function(
        """(path) => {
            const widget = window.jupyterapp.shell.currentWidget;
            return widget && widget.context && widget.context.path === path && widget.content.widgets.length;
        }""",
        arg=path,
    )


def load_reset_lab(lab_page: LabPage) -> None:
    """Load the lab with its workspace reset (the session's lab is shared: a tab one test leaves
    open would be restored in the next)."""
    page = lab_page.page
    page.goto(lab_page.lab.lab_url() + "&reset")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started !== undefined")
    page.evaluate("() => window.jupyterapp.started")
    page.wait_for_function("() => window.jupyterapp.restored !== undefined")
    page.evaluate("() => window.jupyterapp.restored")


def close_notebook(lab_page: LabPage, path: str) -> None:
    """Shut down notebook ``path``'s kernel and leave the lab's workspace empty."""
    lab_page.page.evaluate(
        """async (path) => {
            const widget = window.jupyterapp.shell.currentWidget;
            if (widget && widget.context && widget.context.path === path) {
                await widget.sessionContext.shutdown();
                widget.dispose();
            }
        }""",
        path,
    )
    load_reset_lab(lab_page)


def open_notebook(lab_page: LabPage, path: str) -> None:
    """Open notebook ``path`` as the current widget of a lab with a reset workspace."""
    page = lab_page.page
    load_reset_lab(lab_page)
    page.evaluate("(path) => window.jupyterapp.commands.execute('docmanager:open', {path})", path)
    wait_current_notebook(lab_page, path)


@contextmanager
def ran_notebook(lab_page: LabPage, name: str, sources: list[str]) -> Iterator[None]:
    """Write notebook ``name`` with ``sources``, open it, run all its cells; at exit shut its kernel
    down and close it (the session's lab is shared: no kernel or tab is left behind)."""
    write_notebook(lab_page.lab, name, sources)
    open_notebook(lab_page, name)
    page = lab_page.page
    lab_page.wait_kernel_idle(timeout_ms=CHAT_TIMEOUT_MS)
    try:
        page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
        for index in range(len(sources)):
            lab_page.wait_cell_done(index, timeout_ms=CHAT_TIMEOUT_MS)
        yield
    finally:
        close_notebook(lab_page, name)


def current_cell(lab_page: LabPage, index: int):
    """A locator for cell ``index`` of the current notebook (a restored workspace may hold others)."""
    widget_id = lab_page.page.evaluate("() => window.jupyterapp.shell.currentWidget.id")
    return lab_page.page.locator(f"[id='{widget_id}'] .jp-Notebook .jp-Cell").nth(index)


def cell_source(lab_page: LabPage, index: int) -> str:
    return lab_page.page.evaluate(
        "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.getSource()", index
    )


def cell_count(lab_page: LabPage) -> int:
    return lab_page.page.evaluate("() => window.jupyterapp.shell.currentWidget.content.widgets.length")


def test_labextension_list_shows_nbchat_enabled_and_ok(lab):
    listing = labextension(lab, "list")
    assert re.search(r"^\s*nbchat v\S+ enabled OK", listing, re.M), listing


def test_reply_code_block_buttons_insert_and_run_the_code(lab_page, output_dir, tiny_model_dir):
    chat_cell = "%%chat --schema answer --max-tokens 40\nsystem: Reply in JSON.\nuser: What is {n}?"
    with ran_notebook(lab_page, "code-blocks.ipynb", [setup_source(tiny_model_dir), chat_cell]):
        check_code_block_buttons(lab_page, output_dir)


def check_code_block_buttons(lab_page: LabPage, output_dir: Path) -> None:
    page, reply_cell = lab_page.page, current_cell(lab_page, 1)

    toolbar = reply_cell.locator(".jp-OutputArea .jp-nbchat-codeToolbar")
    toolbar.wait_for()
    assert toolbar.count() == 1
    labels = toolbar.locator("button").evaluate_all("(all) => all.map(b => b.getAttribute('aria-label'))")
    assert labels == BUTTON_LABELS
    assert reply_cell.locator(".jp-nbchat-codeBlock pre").inner_text() == ANSWER_CODE
    # Role headers, the {variable} and the options line of the chat cell carry the highlight classes
    # (Python's own highlighting may split one span in several).
    editor = reply_cell.locator(".jp-InputArea .cm-content")
    highlighted = {
        kind: "".join(editor.locator(f".cm-nbchat-{kind}").all_inner_texts())
        for kind in ("magic", "options", "role", "variable")
    }
    assert highlighted == {
        "magic": "%%chat",
        "options": "--schema answer --max-tokens 40",
        "role": "system:user:",
        "variable": "{n}",
    }
    page.screenshot(path=str(output_dir / "reply-with-code-toolbar.png"))

    toolbar.get_by_role("button", name="Insert code below").click()
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.widgets.length === 3")
    assert cell_source(lab_page, 2) == ANSWER_CODE
    assert current_cell(lab_page, 2).locator(".jp-OutputArea-output").count() == 0  # inserted, not run

    toolbar.get_by_role("button", name="Run code below").click()
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.widgets.length === 4")
    assert cell_source(lab_page, 2) == ANSWER_CODE
    lab_page.wait_cell_done(2)
    assert current_cell(lab_page, 2).locator(".jp-OutputArea-output").inner_text().strip() == "{'answer': 42}"
    page.screenshot(path=str(output_dir / "after-insert-and-run.png"))

    # Replace: the next code cell below the chat cell (the one just run) gets the code.
    page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.content.widgets[2].model.sharedModel.setSource('x = 1')"
    )
    toolbar.get_by_role("button", name="Replace next cell").click()
    page.wait_for_function(
        "(code) => window.jupyterapp.shell.currentWidget.content.widgets[2].model.sharedModel.getSource()"
        " === code",
        arg=ANSWER_CODE,
    )
    assert cell_count(lab_page) == 4


def test_reply_renders_the_same_text_without_the_extension(lab_page, output_dir, tiny_model_dir):
    lab = lab_page.lab
    page = lab_page.page
    sources = [setup_source(tiny_model_dir), "%%chat --max-tokens 8\nHello"]
    with ran_notebook(lab_page, "same-text.ipynb", sources):
        reply = current_cell(lab_page, 1).locator(".jp-OutputArea .jp-nbchat-reply")
        reply.wait_for()
        with_extension = reply.locator(".jp-nbchat-replyBody").inner_text()
        badges = reply.locator(".jp-nbchat-badge").all_inner_texts()
        assert badges == ["✂ cut off at max tokens", "8 tokens"]  # 8 = --max-tokens: finish_reason length
        page.screenshot(path=str(output_dir / "with-extension.png"))
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty")

    labextension(lab, "disable", "nbchat", "--level=user")
    try:
        assert re.search(r"^\s*nbchat v\S+ disabled OK", labextension(lab, "list"), re.M)
        open_notebook(lab_page, "same-text.ipynb")  # the saved outputs, drawn by JupyterLab alone (no run)
        markdown = current_cell(lab_page, 1).locator(".jp-OutputArea .jp-RenderedMarkdown")
        markdown.wait_for()
        assert page.locator(".jp-nbchat-reply").count() == 0
        without_extension = markdown.inner_text()
        page.screenshot(path=str(output_dir / "without-extension.png"))
        close_notebook(lab_page, "same-text.ipynb")
    finally:
        labextension(lab, "enable", "nbchat", "--level=user")
    assert without_extension == with_extension
    assert with_extension.strip()


@pytest.fixture(autouse=True)
def _no_console_errors_from_nbchat(page):
    yield
    errors = [text for text in page.console_errors if "nbchat" in text]
    assert not errors, errors


def test_new_chat_cell_from_the_toolbar_button_and_the_shortcut(lab_page, output_dir):
    write_notebook(lab_page.lab, "new-chat.ipynb", [""])
    open_notebook(lab_page, "new-chat.ipynb")
    page = lab_page.page
    try:
        label = page.evaluate("() => window.jupyterapp.commands.label('nbchat:new-chat-cell')")
        assert label == "New chat cell"
        page.locator(".jp-NotebookPanel-toolbar .jp-nbchat-newChatCell button").click()
        page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.widgets.length === 2")
        assert cell_source(lab_page, 1) == "%%chat\n"
        current_cell(lab_page, 1).locator(".cm-nbchat-magic").wait_for()
        page.keyboard.type("system: be brief")  # the new cell's editor has the focus
        assert cell_source(lab_page, 1) == "%%chat\nsystem: be brief"

        page.keyboard.press("Escape")  # command mode, where the shortcut is bound
        page.keyboard.press("Alt+C")
        page.wait_for_function("() => window.jupyterapp.shell.currentWidget.content.widgets.length === 3")
        assert cell_source(lab_page, 2) == "%%chat\n"
        assert page.evaluate("() => window.jupyterapp.shell.currentWidget.content.activeCellIndex") == 2
        page.keyboard.type("user: hi {name}")
        assert current_cell(lab_page, 2).locator(".cm-nbchat-role").inner_text() == "user:"
        page.screenshot(path=str(output_dir / "new-chat-cells.png"))
    finally:
        close_notebook(lab_page, "new-chat.ipynb")


SIDEBAR = "#nbchat-chat-sidebar"


def test_chat_panel_docked_in_the_sidebar_takes_cells_and_errors(lab_page, output_dir, tiny_model_dir):
    page = lab_page.page
    sources = [setup_source(tiny_model_dir) + "\n%config ChatMagics.max_tokens = 6", "print(6 * 7)", "1 / 0"]
    with ran_notebook(lab_page, "sidebar.ipynb", sources):
        label = page.evaluate("() => window.jupyterapp.commands.label('nbchat:open-chat-panel')")
        assert label == "Open chat panel"
        page.evaluate("() => window.jupyterapp.commands.execute('nbchat:open-chat-panel')")
        sidebar = page.locator(SIDEBAR)
        message = sidebar.get_by_label("Message", exact=True)
        message.wait_for(state="visible")
        assert page.evaluate(
            f"() => window.jupyterapp.shell.widgets('right').some(w => w.id === '{SIDEBAR[1:]}')"
        )
        assert current_cell(lab_page, 0).locator(".nbchat-panel").count() == 0  # not in a cell output
        message.press_sequentially("Hello")
        message.press("Enter")
        reply = sidebar.locator("[data-role=assistant]")
        page.wait_for_function(
            f"() => document.querySelector('{SIDEBAR} .nbchat-panel').dataset.busy === 'false'"
            f" && document.querySelectorAll('{SIDEBAR} [data-role=assistant]').length === 1",
            timeout=CHAT_TIMEOUT_MS,
        )
        assert reply.locator(".nbchat-body").inner_text().strip()
        assert sidebar.locator("[data-role=user] .nbchat-body").inner_text().strip() == "Hello"

        # Send cell to chat: the print cell's source and output become chips of the next message.
        page.evaluate("() => { window.jupyterapp.shell.currentWidget.content.activeCellIndex = 1; }")
        page.evaluate("() => window.jupyterapp.commands.execute('nbchat:send-cell-to-chat')")
        chips = sidebar.locator(".nbchat-chip")
        page.wait_for_function(f"() => document.querySelectorAll('{SIDEBAR} .nbchat-chip').length === 2")
        labels = [label.strip() for label in chips.locator("span").all_inner_texts()]
        assert labels == ["In [2]", "In [2] output"]
        assert chips.nth(1).get_attribute("title") == "```text\n42\n```"
        page.screenshot(path=str(output_dir / "sidebar-with-chips.png"))
        for _ in range(2):
            chips.first.get_by_role("button").click()
        page.wait_for_function(f"() => !document.querySelector('{SIDEBAR} .nbchat-chip')")

        # Explain this error: the error cell's code and traceback are sent at once.
        page.evaluate("() => { window.jupyterapp.shell.currentWidget.content.activeCellIndex = 2; }")
        assert page.evaluate("() => window.jupyterapp.commands.isVisible('nbchat:explain-error')")
        page.evaluate("() => window.jupyterapp.commands.execute('nbchat:explain-error')")
        page.wait_for_function(
            f"() => document.querySelectorAll('{SIDEBAR} [data-role=assistant]').length === 2"
            f" && document.querySelector('{SIDEBAR} .nbchat-panel').dataset.busy === 'false'",
            timeout=CHAT_TIMEOUT_MS,
        )
        asked = sidebar.locator("[data-role=user] .nbchat-body").nth(1).inner_text()
        assert asked.startswith("Explain this error.") and "1 / 0" in asked and "ZeroDivisionError" in asked
        assert "\x1b" not in asked and "[0;31m" not in asked
        page.screenshot(path=str(output_dir / "sidebar-explain-error.png"))
