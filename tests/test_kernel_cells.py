"""The chat kernel's cell grammar: which cells are turns, commands and Python, and the IPython source
each becomes (pure text; the real kernel runs these in tests/test_kernel.py)."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError

from nbchat.notebook.kernel_cells import cell_kind, first_line, ipython_source


def turn(text: str) -> str:
    return f"get_ipython().run_cell_magic('chat', '', {text!r})"


def test_a_plain_cell_is_one_chat_turn_through_the_chat_magic():
    assert (
        ipython_source("What is {city}?\nAnswer briefly.") == turn("What is {city}?\nAnswer briefly.") + "\n"
    )


def test_a_few_shot_cell_stays_one_turn_for_the_cell_grammar():
    cell = "system: One word.\nuser: hot\nassistant: cold\nuser: up"
    assert ipython_source(cell) == turn(cell) + "\n"


def test_a_chat_first_line_keeps_the_cell_exactly_a_chat_cell():
    cell = "%%chat --json --max-tokens 20\nDescribe a cat.\n%chat history"
    assert cell_kind(cell) == "chat"
    assert ipython_source(cell) == cell


def test_a_python_cell_is_the_code_below_its_first_line():
    cell = "\n%%python\n%%timeit\nx = 1\n"
    assert cell_kind(cell) == "python"
    assert ipython_source(cell) == "%%timeit\nx = 1\n"


def test_python_cell_takes_no_options():
    with pytest.raises(UsageError, match=r"%%python takes no options \(got '-n'\)"):
        ipython_source("%%python -n\nx = 1")


def test_commands_python_lines_and_turns_run_in_the_cells_order():
    cell = "%chat set temperature=0\nHello {name}\n\n%python name = 'Ada'\n%chat history\nBye"
    assert ipython_source(cell).splitlines() == [
        "%chat set temperature=0",
        turn("Hello {name}\n"),
        "name = 'Ada'",
        "%chat history",
        turn("Bye"),
    ]


def test_nothing_inside_a_fenced_block_is_a_command():
    cell = "Explain this:\n```\n%chat undo\n%python 1/0\n```"
    assert ipython_source(cell) == turn(cell) + "\n"


def test_a_directive_is_a_whole_word():
    assert ipython_source("%chatter is not a command") == turn("%chatter is not a command") + "\n"
    assert ipython_source("%pythonic code?") == turn("%pythonic code?") + "\n"


def test_python_line_needs_code():
    with pytest.raises(UsageError, match=r"%python needs code on the same line"):
        ipython_source("%python   ")


def test_empty_cells_run_nothing_and_exit_ends_a_console():
    assert ipython_source("  \n\n") == ""
    assert ipython_source("exit\n") == "exit"


def test_first_line_skips_blank_lines():
    assert first_line("\n\n%%chat -t 1\nhi") == ("%%chat -t 1", 2, 14)
    assert first_line("one line") == ("one line", 0, 8)
