"""The wheel's build step for the JupyterLab extension, called by hatch-jupyter-builder.

It runs hatch-jupyter-builder's npm builder (``jlpm install`` then the build script; nothing when
the build is newer than ``labextension/src``) unless the extension is to be skipped:
``NBCHAT_SKIP_LABEXTENSION=1``, or an editable install on a machine without Node.js. A skipped build
says so and leaves a Python-only package. Only the build imports this file; it is not part of the
installed package.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

SKIP_VARIABLE = "NBCHAT_SKIP_LABEXTENSION"
# What a built extension must hold (the build scripts also copy labextension/install.json there, which
# tells `jupyter labextension list` that pip installed it).
BUILT_MARKER = Path("nbchat") / "labextension" / "package.json"


def _say_skipped(why: str) -> None:
    print(
        f"nbchat: the JupyterLab extension was skipped ({why}); %%chat replies show as Markdown. "
        "Install Node.js >= 20 and reinstall to get it.",
        file=sys.stderr,
        flush=True,
    )


def build(target_name: str, version: str, **npm_builder_kwargs: Any) -> None:
    """Build the extension into ``nbchat/labextension`` (``version``: "standard" or "editable")."""
    from hatch_jupyter_builder import npm_builder

    if os.environ.get(SKIP_VARIABLE) == "1":
        _say_skipped(f"{SKIP_VARIABLE}=1")
        return
    if version == "editable" and shutil.which("node") is None:
        _say_skipped("no Node.js on this machine")
        return
    npm_builder(target_name, version, **npm_builder_kwargs)
    if not BUILT_MARKER.exists():
        raise RuntimeError(f"the JupyterLab extension build wrote no {BUILT_MARKER}; see the build log above")
