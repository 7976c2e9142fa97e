"""Execute a notebook top to bottom in a real kernel and print its chat exchanges as they complete.

The kernel runs this interpreter (through a kernelspec written for the run), so the notebook sees the
nbchat that is running it rather than whatever a global ``python3`` kernelspec points at. A notebook
written for the chat kernel (kernelspec "nbchat") runs on the chat kernel, any other on IPython. Used by
``nbchat run`` (and so by ``make demo``) and by the tests that execute the shipped notebooks.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

KERNEL_NAME = "nbchat-python"


def kernel_manager(workdir: Path, *, chat_kernel: bool = False):
    """A KernelManager for an IPython kernel (or the chat kernel) running this interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    from nbchat.notebook import kernelspec

    name = kernelspec.KERNEL_NAME if chat_kernel else KERNEL_NAME
    kernel_dir = Path(workdir) / "kernels" / name
    kernel_dir.mkdir(parents=True, exist_ok=True)
    spec = (
        kernelspec.kernel_spec()
        if chat_kernel
        else {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "nbchat (this Python)",
            "language": "python",
        }
    )
    (kernel_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    specs = KernelSpecManager(kernel_dirs=[str(Path(workdir) / "kernels")])
    return KernelManager(kernel_name=name, kernel_spec_manager=specs)


def is_chat_kernel_notebook(notebook) -> bool:
    """Whether the notebook was written for the chat kernel (its kernelspec is "nbchat")."""
    from nbchat.notebook.kernelspec import KERNEL_NAME as CHAT_KERNEL_NAME

    return notebook.metadata.get("kernelspec", {}).get("name") == CHAT_KERNEL_NAME


def execute_notebook(
    path: Path,
    workdir: Path,
    *,
    timeout: int = 600,
    on_cell: Callable[[Any], None] | None = None,
):
    """Run every cell of the notebook at ``path`` with ``workdir`` as the kernel's working directory.

    ``on_cell(cell)`` is called after each cell with its outputs. Returns the executed notebook; the
    kernel's stderr is in ``workdir/kernel.log``.
    """
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(Path(path), as_version=4)
    client = NotebookClient(
        notebook,
        km=kernel_manager(workdir, chat_kernel=is_chat_kernel_notebook(notebook)),
        timeout=timeout,
        resources={"metadata": {"path": str(workdir)}},
    )
    if on_cell is not None:
        client.on_cell_executed = lambda cell, **_: on_cell(cell)
    # The kernel's own stderr (start-up warnings, a crash's traceback) goes to a log, not the console.
    with open(Path(workdir) / "kernel.log", "w") as kernel_log:
        client.execute(stderr=kernel_log)
    return notebook


def print_exchange(cell, out=None) -> None:
    """Print a chat cell as ``user>`` / ``assistant>`` lines, and other outputs' plain text, in order."""
    out = out or sys.stdout
    if cell.cell_type != "code":
        return
    for output in cell.outputs:
        kind = output.get("output_type")
        # A reply's display says which turn it is (a history's says how many turns there are).
        if kind == "display_data" and "turn" in output.get("metadata", {}).get("nbchat", {}):
            body, options = _user_text(cell.source)
            print(f"\nuser> {body}" + (f"   [{options}]" if options else ""), file=out)
            print(f"assistant> {output['data'].get('text/plain', '').strip()}\n", file=out)
        elif kind == "stream":
            print(output["text"].rstrip(), file=out)
        elif kind == "execute_result" and output["data"].get("text/plain", "").startswith("ChatReply("):
            continue  # the ChatReply summary repeats what the exchange above already shows
        elif kind in ("display_data", "execute_result") and output["data"].get("text/plain"):
            print(output["data"]["text/plain"].rstrip(), file=out)
        elif kind == "error":
            print(f"{output['ename']}: {output['evalue']}", file=out)


def _user_text(source: str) -> tuple[str, str]:
    """``(what the user wrote, the %%chat options)`` of a chat cell: a ``%%chat`` cell's body, or a
    chat-kernel cell's text without its ``%chat`` / ``%python`` lines."""
    if source.startswith("%%chat"):
        options, _, body = source.partition("\n")
        return body.strip(), options[len("%%chat") :].strip()
    lines = [line for line in source.splitlines() if not line.startswith(("%chat", "%python"))]
    return "\n".join(lines).strip(), ""


def run(path: Path) -> int:
    """Execute the notebook, printing each exchange; 1 when a cell raised (execution stops there), else 0."""
    from nbclient.exceptions import CellExecutionError

    with tempfile.TemporaryDirectory(prefix="nbchat-run-") as workdir:
        try:
            execute_notebook(Path(path), Path(workdir), on_cell=print_exchange)
        except CellExecutionError:
            return 1  # print_exchange has already shown the error line of the failing cell
        except Exception:
            print((Path(workdir) / "kernel.log").read_text()[-4000:], file=sys.stderr)
            raise
    return 0
