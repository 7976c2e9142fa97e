"""How the chat kernel reads a cell: its text -> the IPython source that runs it through ``%%chat``.

A chat-kernel cell is a chat turn unless it says otherwise:

* a first line ``%%python`` makes the rest of the cell ordinary IPython code (every IPython magic
  works in it; IPython's own ``%%python`` subprocess magic is not used);
* a first line ``%%chat [options]`` makes the cell exactly a ``%%chat`` cell, options included;
* otherwise, lines starting with ``%chat`` are commands (``%chat history``), lines starting with
  ``%python`` run the rest of the line as IPython code (``%python x = 3``, ``%python %timeit f()``),
  and the text between them is a turn (the ``%%chat`` cell grammar: role headers, ``{name}``). Inside
  a fenced code block nothing is a command. Everything runs in the cell's order.

A turn becomes ``get_ipython().run_cell_magic('chat', '', text)`` -- what IPython itself makes of a
``%%chat`` cell -- so the kernel's turns are ``%%chat`` turns, not a copy of them. A cell that is
exactly ``exit`` or ``quit`` ends a console session, as in IPython. Pure text: nothing here runs code,
knows the shell or imports JAX; a malformed directive is a one-line ``UsageError``.
"""

from __future__ import annotations

from IPython.core.error import UsageError

from nbchat.notebook.cells import fence_state

PYTHON_CELL = "%%python"
CHAT_CELL = "%%chat"
PYTHON_LINE = "%python"
CHAT_LINE = "%chat"
# What a line (or a cell's first line) may start with to be more than chat text, for completion.
LINE_DIRECTIVES = (CHAT_LINE, PYTHON_LINE)
CELL_DIRECTIVES = (CHAT_CELL, PYTHON_CELL)
EXIT_WORDS = ("exit", "quit")


def _starts_with_word(line: str, word: str) -> bool:
    """``line`` is ``word`` alone or ``word`` followed by whitespace (so ``%chatter`` is not ``%chat``)."""
    return line == word or (line.startswith(word) and line[len(word)].isspace())


def first_line(cell: str) -> tuple[str, int, int]:
    """``(first line, where it starts, where the rest starts)``; leading blank lines are skipped, as
    IPython skips them. The rest starts at ``len(cell)`` when there is no second line."""
    start = 0
    while True:
        end = cell.find("\n", start)
        line = cell[start:] if end < 0 else cell[start:end]
        if line.strip() or end < 0:
            return line, start, (len(cell) if end < 0 else end + 1)
        start = end + 1


def cell_kind(cell: str) -> str:
    """``"python"`` for a ``%%python`` cell, ``"chat"`` for a ``%%chat`` cell, else ``"lines"``."""
    first = first_line(cell)[0].rstrip()
    if _starts_with_word(first, PYTHON_CELL):
        return "python"
    if _starts_with_word(first, CHAT_CELL):
        return "chat"
    return "lines"


def ipython_source(cell: str) -> str:
    """The IPython source that runs ``cell`` (see the module docstring); '' for an empty cell."""
    if not cell.strip():
        return ""
    kind = cell_kind(cell)
    first, _, rest_start = first_line(cell)
    if kind == "python":
        if first.strip() != PYTHON_CELL:
            raise UsageError(
                f"{PYTHON_CELL} takes no options (got {first.strip()[len(PYTHON_CELL) :].strip()!r}); "
                "write the code on the lines below it"
            )
        return cell[rest_start:]
    if kind == "chat":
        return cell
    if cell.strip() in EXIT_WORDS:
        return cell.strip()
    return "\n".join(_statements(cell)) + "\n"


def _statements(cell: str) -> list[str]:
    """The cell's commands, Python lines and turns, in order, as IPython statements."""
    statements: list[str] = []
    text: list[str] = []
    fence: str | None = None

    def flush_turn() -> None:
        if "\n".join(text).strip():
            statements.append(f"get_ipython().run_cell_magic({CHAT_LINE[1:]!r}, '', {chr(10).join(text)!r})")
        text.clear()

    for line in cell.splitlines():
        is_fence, fence = fence_state(line, fence)
        if fence is None and not is_fence:
            stripped = line.rstrip()
            if _starts_with_word(stripped, CHAT_LINE):
                flush_turn()
                statements.append(stripped)
                continue
            if _starts_with_word(stripped, PYTHON_LINE):
                code = stripped[len(PYTHON_LINE) :].strip()
                if not code:
                    raise UsageError(
                        f"{PYTHON_LINE} needs code on the same line (e.g. {PYTHON_LINE} x = 3); "
                        f"start a cell with {PYTHON_CELL} for several lines"
                    )
                flush_turn()
                statements.append(code)
                continue
        text.append(line)
    flush_turn()
    return statements
