"""Browser test fixtures: a real JupyterLab on a loopback port and Debian's Chromium driven by Playwright.

``lab`` starts ``jupyter lab`` once for this folder (a free 127.0.0.1 port, a random token, no browser,
a temporary root directory and Jupyter config/runtime/workspace directories, the app exposed as
``window.jupyterapp``) and kills it at teardown. ``browser`` is Chromium from ``shutil.which``
(never a downloaded browser); ``page`` is a fresh page per test logged into the lab, and
``lab_page`` wraps it with the JupyterLab steps tests share (open a notebook, run a cell, read
outputs). ``output_dir`` is ``tests/browser/output/<test name>/`` (gitignored) for screenshots.

Tests here carry the ``browser`` marker (added to every test in this folder). They are skipped only
when Chromium or Playwright is missing from the machine, with the reason.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

OUTPUT_ROOT = Path(__file__).resolve().parent / "output"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"
]
LAB_START_TIMEOUT_S = 90
# JupyterLab's first load in a cold Chromium on a busy 2-core machine takes several seconds.
UI_TIMEOUT_MS = 60_000


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.browser)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Lab:
    """A running JupyterLab: its base URL, token, root directory and server process."""

    url: str
    token: str
    root_dir: Path
    process: subprocess.Popen
    log_path: Path

    def api(self, path: str) -> object:
        """GET a server API path (``/api/status``) with the token; the parsed JSON."""
        headers = {"Authorization": f"token {self.token}"}
        request = urllib.request.Request(f"{self.url}{path}", headers=headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def lab_url(self, path: str = "") -> str:
        """The lab page (``path``: a file under the root to open, e.g. ``tree/x.ipynb``)."""
        return f"{self.url}/lab/{path}?token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait_until_up(lab: Lab) -> None:
    deadline = time.monotonic() + LAB_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {lab.process.returncode}:\n{lab.log()[-3000:]}")
        try:
            lab.api("/api/status")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise RuntimeError(f"jupyter lab did not answer within {LAB_START_TIMEOUT_S} s:\n{lab.log()[-3000:]}")


# Package scope: Playwright's sync API keeps an event loop running in the main thread while it lives,
# so it must stop when this folder's tests end (tests after them call asyncio.run).
@pytest.fixture(scope="package")
def lab(tmp_path_factory) -> Iterator[Lab]:
    """A JupyterLab server for this folder's tests, on a free loopback port, killed at teardown."""
    base = tmp_path_factory.mktemp("jupyterlab")
    root_dir, state = base / "root", base / "state"
    root_dir.mkdir()
    state.mkdir()
    # No "get notified about Jupyter news?" toast over what the tests look at (and no news fetch).
    notification = state / "settings" / "@jupyterlab/apputils-extension/notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    token, port = secrets.token_hex(16), free_port()
    env = {
        **os.environ,
        # The user's own Jupyter settings, workspaces and running servers stay out of the test.
        "JUPYTER_CONFIG_DIR": str(state / "config"),
        "JUPYTER_RUNTIME_DIR": str(state / "runtime"),
        "JUPYTERLAB_WORKSPACES_DIR": str(state / "workspaces"),
        "JUPYTERLAB_SETTINGS_DIR": str(state / "settings"),
    }
    # The root of this checkout first, so kernels import the nbchat under test.
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")]))
    # This checkout's chat kernelspec ("nbchat", run by this Python), whatever is installed.
    from nbchat.notebook.kernelspec import install

    install(prefix=str(state))
    env["JUPYTER_PATH"] = os.pathsep.join(
        filter(None, [str(state / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")])
    )
    command = [
        sys.executable, "-m", "jupyterlab",
        "--no-browser",
        "--allow-root",  # CI containers run as root
        "--LabApp.extension_manager=readonly",  # no PyPI queries: tests stay on loopback
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root_dir}",
        "--LabApp.expose_app_in_browser=True",
        "--LabApp.news_url=",
        "--LabServerApp.announcements_url=",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    log_path = state / "lab.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root_dir
        )
    url = f"http://127.0.0.1:{port}"
    lab = Lab(url=url, token=token, root_dir=root_dir, process=process, log_path=log_path)
    try:
        _wait_until_up(lab)
        yield lab
    finally:
        # The server and the kernels it started share its process group.
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="package")
def browser():
    """Debian's Chromium under Playwright (never a downloaded browser)."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def output_dir(request) -> Path:
    """``tests/browser/output/<test name>/`` (gitignored): screenshots and logs a test leaves."""
    name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    path = OUTPUT_ROOT / name
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def page(browser, lab):
    """A fresh browser page (1400 x 900) for one test; console errors are kept on ``page.console_errors``."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.console_errors = []
    page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
    yield page
    context.close()


# Finds the open notebook at `path` (in the main area; no path: the current notebook) and its
# kernel; null parts while loading.
_NOTEBOOK_JS = """
    const isNotebook = (widget) => !!widget && !!widget.context && !!widget.content
        && !!widget.content.widgets;
    const notebookAt = (path) => path === null
        ? (isNotebook(window.jupyterapp.shell.currentWidget) ? window.jupyterapp.shell.currentWidget : null)
        : [...window.jupyterapp.shell.widgets('main')].find(
            (widget) => isNotebook(widget) && widget.context.path === path);
    const kernelOf = (panel) => panel && panel.sessionContext && panel.sessionContext.session
        && panel.sessionContext.session.kernel;
"""


class LabPage:
    """JupyterLab steps over a Playwright page, through the app object the lab exposes
    (``window.jupyterapp``) where the UI would be flaky to drive by keyboard. Cell steps act on the
    notebook :meth:`new_notebook` opened (found by its path, whichever tab is active), or else on the
    current notebook (one opened from the launcher)."""

    def __init__(self, page, lab: Lab):
        self.page = page
        self.lab = lab
        self.path: str | None = None

    def _evaluate(self, body: str, arg: dict | None = None):
        """Run ``body`` (JavaScript statements ending in ``return``) with ``notebookAt``/``kernelOf``."""
        return self.page.evaluate(f"(arg) => {{ {_NOTEBOOK_JS} {body} }}", {"path": self.path, **(arg or {})})

    def _wait(self, body: str, arg: dict | None = None, *, timeout_ms: int = UI_TIMEOUT_MS) -> None:
        script = f"(arg) => {{ {_NOTEBOOK_JS} {body} }}"
        self.page.wait_for_function(script, arg={"path": self.path, **(arg or {})}, timeout=timeout_ms)

    def open(self, path: str = "") -> None:
        """Load the lab with a fresh workspace (optionally opening ``path``); wait until it started."""
        self.page.goto(self.lab.lab_url(path) + "&reset")
        self.page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started !== undefined")
        self.page.evaluate("() => window.jupyterapp.started")
        self.page.wait_for_selector(".jp-LabShell")

    def new_notebook(self, name: str) -> None:
        """Create ``name`` (a Python 3 notebook) in the root directory, open it, wait for its kernel."""
        (self.lab.root_dir / name).write_text(json.dumps(_empty_notebook()))
        self.path = name
        self.open(f"tree/{name}")
        self._wait("return !!notebookAt(arg.path);")
        self.wait_kernel_idle()

    def wait_kernel_idle(self, timeout_ms: int = UI_TIMEOUT_MS) -> None:
        self._wait("const k = kernelOf(notebookAt(arg.path)); return !!k && k.status === 'idle';",
                   timeout_ms=timeout_ms)

    def run_cell(self, source: str, *, wait: bool = True, timeout_ms: int = UI_TIMEOUT_MS) -> int:
        """Put ``source`` in the notebook's last cell and run it (a new cell is added below); returns
        its index. With ``wait``, returns once the cell has finished."""
        index = self._evaluate(
            """
            const panel = notebookAt(arg.path);
            window.jupyterapp.shell.activateById(panel.id);
            const notebook = panel.content;
            const index = notebook.widgets.length - 1;
            notebook.activeCellIndex = index;
            notebook.activeCell.model.sharedModel.setSource(arg.source);
            return index;
            """,
            {"source": source},
        )
        self.page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-cell-and-insert-below')")
        if wait:
            self.wait_cell_done(index, timeout_ms=timeout_ms)
        return index

    def wait_cell_done(self, index: int, *, timeout_ms: int = UI_TIMEOUT_MS) -> None:
        """Wait until cell ``index`` ran: it has an execution count and the kernel is idle."""
        self._wait(
            """
            const panel = notebookAt(arg.path), kernel = kernelOf(panel);
            const cell = panel && panel.content.widgets[arg.index];
            return !!cell && cell.model.executionCount !== null && !!kernel && kernel.status === 'idle';
            """,
            {"index": index},
            timeout_ms=timeout_ms,
        )

    def cell_output_text(self, index: int) -> str:
        """The text of cell ``index``'s outputs, as the page shows it."""
        return self._evaluate(
            """
            const area = notebookAt(arg.path).content.widgets[arg.index].node.querySelector('.jp-OutputArea');
            return area ? area.innerText : '';
            """,
            {"index": index},
        )

    def cell(self, index: int):
        """A locator for cell ``index`` of the visible notebook."""
        return self.page.locator(".jp-NotebookPanel:visible .jp-Notebook .jp-Cell").nth(index)

    def lab_extensions(self) -> dict[str, object]:
        """The federated extensions the page loaded, by name (from the page's PageConfig)."""
        return self.page.evaluate(
            """() => {
                const script = document.getElementById('jupyter-config-data');
                const config = JSON.parse(script.textContent);
                return Object.fromEntries((config.federated_extensions || []).map(e => [e.name, e]));
            }"""
        )


def _empty_notebook() -> dict:
    return {
        "cells": [{"cell_type": "code", "execution_count": None, "id": "first", "metadata": {},
                   "outputs": [], "source": ""}],
        "metadata": {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


@pytest.fixture
def lab_page(page, lab) -> LabPage:
    return LabPage(page, lab)
