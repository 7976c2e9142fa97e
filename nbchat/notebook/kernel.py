"""The chat kernel: a Jupyter kernel (an ipykernel ``IPythonKernel``) where every cell is a chat turn.

The kernel is IPython with the ``%%chat`` magics loaded: its shell reads each cell it is asked to run
with the chat-kernel grammar (``kernel_cells``) and runs the IPython source that comes out, so a
plain cell is a ``%%chat`` turn through the magic's own code -- same conversations, renderer, MIME
bundle, re-run replacement, interrupt and one-line errors -- and ``%%python`` cells are ordinary
IPython. On top of that the kernel answers what a front end asks of it: ``kernel_info`` (Markdown
cells), ``is_complete`` (always: Enter in a console sends the turn), completion of directives,
``%chat`` commands, ``%%chat`` options and ``{name}`` placeholders, and inspection (Shift+Tab) of
``%chat`` commands. A silent request (a front end's own code, not a turn the user typed) is plain
IPython. A reply streams as display updates when the request comes from a notebook
and as text on stdout for a terminal console, which cannot redraw (``ChatKernel.live_replies``).

Settings are traitlets config: ``ChatMagics.*`` (model -- a registry name, a GGUF path, an HF repo
id or an endpoint URL --, system prompt, sampling) and ``ChatKernel.*``, from ``ipython_config.py``,
``ipython_kernel_config.py``, ``jupyter_nbchat_config.py`` in the Jupyter config directories, and
the kernelspec's command line (``--ChatMagics.model=...``). Nothing here imports JAX, knows how a
turn is generated or draws output; installing the kernelspec is ``kernelspec.py``.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from ipykernel.kernelapp import IPKernelApp
from ipykernel.zmqshell import ZMQInteractiveShell
from IPython.utils.tokenutil import line_at_cursor
from traitlets import Enum, Type
from traitlets.config import Application
from traitlets.config.loader import ConfigFileNotFound

from nbchat import __version__
from nbchat.notebook import kernel_cells
from nbchat.notebook.magics import COMMANDS_HELP, ChatMagics
from nbchat.notebook.settings import SET_KEYS

CONFIG_FILE = "jupyter_nbchat_config"
LANGUAGE_INFO = {
    "name": "markdown",
    "mimetype": "text/markdown",
    "file_extension": ".md",
    "pygments_lexer": "markdown",
}
DIRECTIVE_HELP = {
    kernel_cells.PYTHON_CELL: "%%python (first line): the rest of the cell runs as IPython code in the "
    "kernel's namespace; every IPython magic works in it.",
    kernel_cells.PYTHON_LINE: "%python CODE: run one line of IPython code in the kernel's namespace "
    "(e.g. %python x = 3, %python %timeit f()).",
}

# A `{` that opens a placeholder (not the literal `{{`), and the name typed after it so far.
_PLACEHOLDER_BEFORE = re.compile(r"(?:^|[^{])\{([A-Za-z_][A-Za-z_0-9]*)?$")
_NAME_AFTER = re.compile(r"^[A-Za-z_0-9]*")


class ChatShell(ZMQInteractiveShell):
    """The kernel's IPython shell: the cell the kernel runs is read with the chat-kernel grammar.

    Only that cell: code IPython transforms while running it (a ``%%timeit`` body, a ``%run``
    script) is IPython code as usual. ``live_updates`` tells the reply view whether the front end
    of the current request can redraw a display.
    """

    kernel_cell: str | None = None
    live_updates: bool | None = None

    def transform_cell(self, raw_cell: str) -> str:
        if self.kernel_cell is not None and raw_cell == self.kernel_cell:
            raw_cell = kernel_cells.ipython_source(raw_cell)
        return super().transform_cell(raw_cell)


class ChatKernel(IPythonKernel):
    """Every cell a chat turn, Python one directive away (see the module docstring)."""

    implementation = "nbchat"
    implementation_version = __version__
    language_info = LANGUAGE_INFO
    shell_class = Type(ChatShell)

    live_replies = Enum(
        ("auto", "always", "never"),
        default_value="auto",
        help="Redraw a streaming reply in place (always), print it as text (never), or decide per "
        "request (auto): redraw for a notebook (the request has a cell id, or reads no input), "
        "print for an interactive console (it reads input, sends no cell id, cannot redraw).",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Through the extension manager, so a later `%load_ext nbchat` keeps these magics.
        self.shell.extension_manager.load_extension("nbchat")

    @property
    def magics(self) -> ChatMagics:
        return self.shell.magics_manager.registry["ChatMagics"]

    @property
    def banner(self) -> str:  # type: ignore[override]
        return (
            f"nbchat {__version__} chat kernel, model {self.magics.model}\n"
            "Every cell is a chat turn; %%python cells and %python lines run Python; "
            "%chat help lists the commands."
        )

    @property
    def kernel_info(self) -> dict[str, Any]:
        info = dict(super().kernel_info)
        # Cells are chat text, not Python source a debugger could step through.
        info["supported_features"] = [f for f in info["supported_features"] if f != "debugger"]
        return info

    async def do_execute(  # type: ignore[override]
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        shell = self.shell
        # A silent request is a front end's own code (never a turn the user typed): plain IPython.
        shell.kernel_cell = None if silent else code
        # A notebook sends its cell's id (JupyterLab) or reads no input (nbclient); an interactive
        # console reads input and sends no id, and ignores display updates.
        from_notebook = cell_id is not None or not allow_stdin
        shell.live_updates = {"always": True, "never": False}.get(self.live_replies, from_notebook)
        try:
            return await super().do_execute(
                code,
                silent,
                store_history,
                user_expressions,
                allow_stdin,
                cell_meta=cell_meta,
                cell_id=cell_id,
            )
        finally:
            shell.kernel_cell = None
            shell.live_updates = None

    def do_is_complete(self, code: str) -> dict[str, str]:
        return {"status": "complete"}

    # --- completion and inspection ----------------------------------------------------------------

    def _python_part(self, code: str, cursor_pos: int) -> tuple[str, int] | None:
        """``(IPython code, its offset in the cell)`` when the cursor is in Python: the body of a
        ``%%python`` cell or the code of a ``%python`` line; else None."""
        kind = kernel_cells.cell_kind(code)
        if kind == "python":
            offset = kernel_cells.first_line(code)[2]
            return (code[offset:], offset) if cursor_pos >= offset else None
        if kind == "chat":
            return None
        line, line_start = line_at_cursor(code, cursor_pos)
        prefix = kernel_cells.PYTHON_LINE + " "
        if line.startswith(prefix) and cursor_pos >= line_start + len(prefix):
            return line.rstrip("\n")[len(prefix) :], line_start + len(prefix)
        return None

    def do_complete(self, code: str, cursor_pos: int | None) -> dict[str, Any]:
        cursor_pos = len(code) if cursor_pos is None else cursor_pos
        python = self._python_part(code, cursor_pos)
        if python is not None:
            source, offset = python
            reply = super().do_complete(source, cursor_pos - offset)
            reply["cursor_start"] += offset
            reply["cursor_end"] += offset
            for item in reply.get("metadata", {}).get("_jupyter_types_experimental", []):
                item["start"] += offset
                item["end"] += offset
            return reply
        line, line_start = line_at_cursor(code, cursor_pos)
        before = line[: cursor_pos - line_start]
        on_first_line = line_start <= kernel_cells.first_line(code)[1]
        prefix, matches = self._chat_matches(code, before, on_first_line=on_first_line)
        return {
            "matches": matches,
            "cursor_start": cursor_pos - len(prefix),
            "cursor_end": cursor_pos,
            "metadata": {},
            "status": "ok",
        }

    def _chat_matches(self, code: str, before: str, *, on_first_line: bool) -> tuple[str, list[str]]:
        """``(the word being completed, its completions)`` outside Python code."""
        kind = kernel_cells.cell_kind(code)
        placeholder = _PLACEHOLDER_BEFORE.search(before)
        if placeholder and not (on_first_line and kind == "chat"):
            name = placeholder.group(1) or ""
            return name, self._namespace_names(name)
        if kind == "lines":
            command = re.fullmatch(r"%chat\s+(\S*)", before)
            if command:
                word = command.group(1)
                return word, [name for name in self.magics.COMMANDS if name.startswith(word)]
            setting = re.fullmatch(r"%chat\s+set\s+(?:\S+\s+)*([^\s=]*)", before)
            if setting:
                word = setting.group(1)
                return word, [f"{key}=" for key in SET_KEYS if key.startswith(word)]
        if kind == "chat" and on_first_line:
            option = re.fullmatch(r"%%chat\s+(?:.*\s)?(-\S*)", before)
            if option:
                word = option.group(1)
                return word, [name for name in self._cell_options() if name.startswith(word)]
        directive = re.fullmatch(r"%{1,2}\w*", before)
        if directive and (kind == "lines" or on_first_line):
            word = directive.group(0)
            choices = (*kernel_cells.CELL_DIRECTIVES, *kernel_cells.LINE_DIRECTIVES)
            if not on_first_line:
                choices = kernel_cells.LINE_DIRECTIVES
            return word, [name for name in choices if name.startswith(word)]
        return "", []

    def _namespace_names(self, prefix: str) -> list[str]:
        """The notebook's variables a ``{name}`` can interpolate, and ``In[`` / ``Out[``."""
        shell = self.shell
        names = sorted(
            name
            for name in shell.user_ns
            if name.startswith(prefix) and not name.startswith("_") and name not in shell.user_ns_hidden
        )
        return names + [name for name in ("In[", "Out[") if name.startswith(prefix)]

    def _cell_options(self) -> list[str]:
        parser = self.magics.chat.parser  # type: ignore[attr-defined]
        # argparse lists its options only in its (stable, long-standing) _actions.
        strings = [option for action in parser._actions for option in action.option_strings]
        return sorted(strings, key=lambda option: (not option.startswith("--"), option))

    def do_inspect(
        self, code: str, cursor_pos: int, detail_level: int = 0, omit_sections: Any = ()
    ) -> dict[str, Any]:
        python = self._python_part(code, cursor_pos)
        if python is not None:
            source, offset = python
            return super().do_inspect(source, cursor_pos - offset, detail_level, omit_sections)
        line, line_start = line_at_cursor(code, cursor_pos)
        placeholder = self._placeholder_at(line, cursor_pos - line_start)
        if placeholder:
            return super().do_inspect(placeholder, len(placeholder), detail_level, omit_sections)
        text = self._chat_help(code, line.rstrip("\n"), line_start)
        if text is None:
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}
        return {"status": "ok", "found": True, "data": {"text/plain": text}, "metadata": {}}

    @staticmethod
    def _placeholder_at(line: str, column: int) -> str | None:
        """The name of the ``{name}`` placeholder the cursor is on, or None."""
        opening = _PLACEHOLDER_BEFORE.search(line[:column])
        if opening is None:
            return None
        name = (opening.group(1) or "") + _NAME_AFTER.match(line[column:]).group(0)  # type: ignore[union-attr]
        return name or None

    def _chat_help(self, code: str, line: str, line_start: int) -> str | None:
        """The help for the directive or ``%chat`` command on ``line``, or None (plain chat text)."""
        kind = kernel_cells.cell_kind(code)
        on_first_line = line_start <= kernel_cells.first_line(code)[1]
        if on_first_line and kind == "chat":
            return self.magics.chat.__doc__
        if on_first_line and kind == "python":
            return DIRECTIVE_HELP[kernel_cells.PYTHON_CELL]
        if kind != "lines":
            return None
        if line.startswith(kernel_cells.PYTHON_LINE):
            return DIRECTIVE_HELP[kernel_cells.PYTHON_LINE]
        command = re.fullmatch(r"%chat(?:\s+(\S+).*)?", line)
        if command is None:
            return None
        name = command.group(1)
        if name is None:
            return f"{COMMANDS_HELP}\n\nkeys of %chat set KEY=VALUE: {', '.join(SET_KEYS)}"
        return command_help(self.magics, name)


def command_help(magics: ChatMagics, name: str) -> str | None:
    """The help of ``%chat NAME``: its lines of the commands' help and its method's docstring;
    None for an unknown command."""
    if name not in magics.COMMANDS:
        return None
    lines = [
        line.strip()
        for line in COMMANDS_HELP.splitlines()
        if line.startswith("  ") and re.search(rf"(?:^|/ ){re.escape(name)}\b", line[:26].strip())
    ]
    # The docstring's first line is the help line above; what follows it says more.
    more = inspect.cleandoc(getattr(magics, f"_cmd_{name}").__doc__ or "").partition("\n")[2].strip()
    if more:
        lines.append(more)
    return "\n".join([f"%chat {name}", *lines])


class ChatKernelApp(IPKernelApp):
    """The kernel's application: IPython's, with the chat kernel and ``jupyter_nbchat_config.py``."""

    kernel_class = Type(ChatKernel, klass="ipykernel.kernelbase.Kernel")
    classes = [*IPKernelApp.classes, ChatKernel, ChatShell, ChatMagics]

    def load_config_file(self, *args: Any, **kwargs: Any) -> None:
        super().load_config_file(*args, **kwargs)
        from jupyter_core.paths import jupyter_config_path

        try:
            # After IPython's files, so the nbchat file wins; the command line still wins over both.
            Application.load_config_file(self, CONFIG_FILE, path=jupyter_config_path())
        except ConfigFileNotFound:
            pass


def main() -> None:
    """Start the chat kernel (the kernelspec runs ``python -m nbchat.notebook.kernel -f FILE``)."""
    ChatKernelApp.launch_instance()


if __name__ == "__main__":
    # Run the package's module, not this __main__ copy, so config names one set of classes.
    from nbchat.notebook.kernel import main as package_main

    package_main()
