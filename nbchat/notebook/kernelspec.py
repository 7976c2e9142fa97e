"""The chat kernel's kernelspec: find the shipped one, and install copies bound to this Python.

The wheel installs ``kernels/nbchat`` (kernel.json + logos) as the "nbchat" kernelspec through
hatch's shared data; :func:`install` writes one with this interpreter's absolute path, for editable
installs and for extra kernels bound to another model (``nbchat install-kernel``). Nothing here
starts a kernel or imports JAX.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from nbchat.errors import NbchatError

KERNEL_NAME = "nbchat"
# The kernelspec files beside the package in a source checkout (an editable install).
SOURCE_SPEC_DIR = Path(__file__).resolve().parents[2] / "kernels" / KERNEL_NAME
LOGOS = ("logo-32x32.png", "logo-64x64.png")


class KernelSpecError(NbchatError):
    """The kernelspec cannot be found or installed; the message names the option to change."""


def shipped_spec_dir() -> Path:
    """The directory holding the shipped kernel.json and logos: the source checkout's, else the
    one the wheel installed (wherever Jupyter finds the "nbchat" kernelspec)."""
    if (SOURCE_SPEC_DIR / "kernel.json").is_file():
        return SOURCE_SPEC_DIR
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        return Path(KernelSpecManager().get_kernel_spec(KERNEL_NAME).resource_dir)
    except NoSuchKernel:
        raise KernelSpecError(
            f"the {KERNEL_NAME!r} kernelspec that comes with nbchat is missing; reinstall the package"
        ) from None


def kernel_spec(model: str | None = None, display_name: str | None = None) -> dict:
    """The shipped kernel.json, run by this interpreter, optionally bound to ``model``."""
    spec = json.loads((shipped_spec_dir() / "kernel.json").read_text(encoding="utf-8"))
    spec["argv"][0] = sys.executable
    if model:
        # Command-line config: it wins over every config file, as a kernel bound to a model should.
        spec["argv"].append(f"--ChatMagics.model={model}")
    spec["display_name"] = display_name or (f"nbchat ({model})" if model else spec["display_name"])
    return spec


def install(
    *,
    name: str = KERNEL_NAME,
    model: str | None = None,
    display_name: str | None = None,
    user: bool = False,
    prefix: str | None = None,
) -> Path:
    """Install the kernelspec ``name`` (replacing one of that name) and return its directory.

    ``user``: into the user's Jupyter data directory; ``prefix``: into ``PREFIX/share/jupyter``
    (``sys.prefix`` for a virtual environment); neither: the system-wide location.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    spec = kernel_spec(model, display_name)
    source = shipped_spec_dir()
    with tempfile.TemporaryDirectory(prefix="nbchat-kernelspec-") as staging:
        staged = Path(staging) / name
        staged.mkdir()
        (staged / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
        for logo in LOGOS:
            (staged / logo).write_bytes((source / logo).read_bytes())
        try:
            target = KernelSpecManager().install_kernel_spec(
                str(staged), kernel_name=name, user=user, prefix=prefix
            )
        except ValueError as error:  # jupyter_client's check of the name
            raise KernelSpecError(f"--name {name!r}: {error}") from None
        except PermissionError as error:
            raise KernelSpecError(
                f"cannot write {error.filename}: add --user (your Jupyter directory) or --sys-prefix "
                "(this environment)"
            ) from None
    return Path(target)
