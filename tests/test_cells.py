"""The %%chat cell grammar (role headers, escapes, fences) and {name} interpolation."""

from __future__ import annotations

import pytest

from nbchat.notebook.cells import CellSyntaxError, interpolate, parse_cell


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# --- role headers ---------------------------------------------------------------------------------


def test_cell_without_headers_is_one_user_message_keeping_inner_indentation():
    parsed = parse_cell("\n\nExplain this:\n    for x in y:\n        pass\n\n")
    assert parsed.system is None
    assert parsed.messages == [user("Explain this:\n    for x in y:\n        pass")]


def test_colon_headers_make_a_few_shot_message_list():
    cell = "system: You translate English to French.\nuser: cat\nassistant: chat\nuser:\ndog\n"
    parsed = parse_cell(cell)
    assert parsed.system == "You translate English to French."
    assert parsed.messages == [user("cat"), assistant("chat"), user("dog")]


def test_markdown_headings_are_headers_in_any_case_with_optional_colon():
    cell = "# System\nBe brief.\n\n## user\nhi\n\n### Assistant:\nhello\n\n###### USER\nbye"
    parsed = parse_cell(cell)
    assert parsed.system == "Be brief."
    assert parsed.messages == [user("hi"), assistant("hello"), user("bye")]


def test_text_before_the_first_header_is_a_user_message():
    parsed = parse_cell("What is 2+2?\nassistant: 4\nuser: and 3+3?")
    assert parsed.messages == [user("What is 2+2?"), assistant("4"), user("and 3+3?")]


def test_headers_need_column_zero_and_lower_case():
    cell = "  user: indented\nUser: capitalised\nusers: plural\n## user notes"
    assert parse_cell(cell).messages == [user(cell)]


def test_backslash_escapes_a_literal_header_line():
    parsed = parse_cell("Continue this log:\n\\user: hi\n\\## assistant\n\\\\user: two")
    assert parsed.messages == [user("Continue this log:\nuser: hi\n## assistant\n\\user: two")]


def test_backslash_lines_that_are_not_headers_are_untouched():
    cell = "Fix this LaTeX:\n\\begin{align}\n\\frac{1}{2}\n\\end{align}"
    assert parse_cell(cell).messages == [user(cell)]


def test_header_lines_inside_code_fences_are_text():
    cell = "Parse this YAML:\n```yaml\nuser: bob\nassistant: false\n```\n~~~\nsystem: x\n~~~"
    assert parse_cell(cell).messages == [user(cell)]


def test_fence_closes_only_with_the_same_marker():
    cell = "````\n```\nuser: inside\n````\nassistant: ok\nuser: next"
    parsed = parse_cell(cell)
    assert parsed.messages == [user("````\n```\nuser: inside\n````"), assistant("ok"), user("next")]


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("", "the cell is empty"),
        ("  \n\n", "the cell is empty"),
        ("user: hi\nsystem: late", "line 2: a system message may only come first"),
        ("user:\n\nassistant: x\nuser: y", "line 1: the user message is empty"),
        ("user: hi\nassistant: hello", "line 2: the cell must end with a user message"),
        ("system: only a system prompt", "line 1: the cell must end with a user message"),
    ],
)
def test_bad_role_headers_are_one_line_errors_naming_the_line(cell, message):
    with pytest.raises(CellSyntaxError) as error:
        parse_cell(cell)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


# --- interpolation --------------------------------------------------------------------------------


def test_interpolates_names_and_history_entries():
    namespace = {"name": "Ada", "n": 3, "In": ["", "x = 1", "print(x)"], "Out": {2: [1, 2]}, "_": "last"}
    text = "Hi {name}, n={n}; code: {In[1]}; out: {Out[2]}; last: {_}"
    assert interpolate(text, namespace) == "Hi Ada, n=3; code: x = 1; out: [1, 2]; last: last"


def test_double_braces_are_literal_braces():
    assert interpolate("{{name}} and {{ }} {name}", {"name": "Ada"}) == "{name} and { } Ada"


def test_code_with_braces_is_left_alone():
    code = 'def f(d):\n    return {"a": d[0]} | {k: v for k, v in d}\nprint(f"{x!r:>10}")\nset_ = {1, 2}'
    assert interpolate(code, {"d": 5, "k": 1}) == code


def test_unknown_names_and_missing_history_entries_stay_as_written():
    namespace = {"In": ["", "a"], "Out": {}}
    text = "{missing} {In[7]} {Out[1]} {In[x]}"
    assert interpolate(text, namespace) == text


def test_interpolation_does_not_run_format_specs_or_attribute_access():
    class Secret:
        @property
        def value(self):
            raise AssertionError("attribute access must not happen")

    namespace = {"obj": Secret(), "n": 3.14159}
    assert interpolate("{obj.value} {n:.2f} {n!r}", namespace) == "{obj.value} {n:.2f} {n!r}"
