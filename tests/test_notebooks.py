"""The shipped notebooks run top to bottom in a real kernel (nbclient) on the default model.

The kernel is this test run's Python (the project's virtual environment), through a kernelspec
written for the test, so the notebooks see the nbchat under test and not some other installation.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import nbformat
import pytest

from nbchat.notebook.render import INTERRUPTED_TEXT
from nbchat.notebook.run import execute_notebook, kernel_manager, print_exchange
from tests.html_elements import parse

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    return execute_notebook(NOTEBOOKS / name, workdir)


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


@pytest.fixture(scope="module")
def tokens_notebook(tmp_path_factory):
    return execute("tokens-and-probabilities.ipynb", tmp_path_factory.mktemp("tokens"))


@pytest.fixture(scope="module")
def templates_notebook(tmp_path_factory):
    return execute("chat-templates.ipynb", tmp_path_factory.mktemp("templates"))


def html_output(cell: nbformat.NotebookNode, index: int = -1):
    """The parsed HTML of a cell's ``index``-th HTML display, and that display."""
    shown = [out for out in cell.outputs if out.output_type == "display_data" and "text/html" in out.data]
    assert shown, cell.outputs
    return parse(shown[index].data["text/html"]), shown[index]


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    return execute("tools.ipynb", tmp_path_factory.mktemp("tools"))


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
    # The cell's result (a ChatReply, kept in Out) shows nothing: the reply is not shown a second time.
    assert not [out for out in cell.outputs if out.output_type == "execute_result"]


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


def test_quickstart_shows_the_chat_panel_on_the_same_conversation(quickstart):
    panel = cell_by_source(quickstart, "%chat panel")
    assert any("application/vnd.jupyter.widget-view+json" in out.get("data", {}) for out in panel.outputs)
    sent = cell_by_source(quickstart, "import nbchat\n\npanel = nbchat.ChatPanel()")
    reply = next(out.data["text/plain"] for out in sent.outputs if out.output_type == "execute_result")
    assert reply.strip("'\"").strip()
    # The conversation the --out cell started, plus the panel's exchange.
    assert printed(cell_by_source(quickstart, "print(len(panel.messages)")) == "4 messages; 40 max tokens\n"


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


def test_tools_runs_without_errors(tools):
    assert_no_errors(tools)


def test_tools_json_mode_stores_a_parsed_object(tools):
    reply = reply_output(cell_by_source(tools, "%%chat --json --out cat"))
    value = reply.data["application/json"]
    assert isinstance(value, dict) and value
    assert reply.data["text/markdown"] == "```json\n" + json.dumps(value, indent=2) + "\n```"
    assert reply.metadata["nbchat"]["settings"]["response_format"] == {"type": "json_object"}
    assert printed(cell_by_source(tools, "print(type(cat).__name__, cat)")) == f"dict {value}\n"


def test_tools_schema_from_a_pydantic_class_stores_an_instance(tools):
    reply = reply_output(cell_by_source(tools, "%%chat --new --schema City --out paris"))
    assert reply.data["application/json"] == {"name": "Paris", "country": "France", "is_capital": True}
    json_schema = reply.metadata["nbchat"]["settings"]["response_format"]["json_schema"]
    assert json_schema["name"] == "City" and json_schema["strict"] is True
    assert printed(cell_by_source(tools, "print(repr(paris))")).strip() == (
        "City(name='Paris', country='France', is_capital=True)"
    )


def test_tools_a_call_not_allowed_is_shown_with_how_to_allow_it(tools):
    cell = cell_by_source(tools, "%%chat --new -c weather --tools get_weather --tool-choice get_weather\n")
    reply = reply_output(cell)
    assert reply.data["text/plain"] == (
        '[tool] get_weather(city="Paris") ⏸ not run\n'
        "  get_weather was not run: allow it with `%chat tools allow get_weather`, "
        "or re-run the cell with `--run-tools`."
    )
    summary = "<details><summary>🔧 <code>get_weather(city=&quot;Paris&quot;)</code> · ⏸ not run</summary>"
    assert reply.data["text/markdown"].startswith(summary)


def test_tools_an_allowed_call_runs_and_the_model_answers_with_its_result(tools):
    run_tools = reply_output(cell_by_source(tools, "%%chat --new -c weather -s"))
    text = run_tools.data["text/plain"]
    call = '[tool] get_weather(city="Paris") -> {"city":"Paris","temperature_c":21,"sky":"sunny"}'
    assert text.startswith(call + "\n\n")
    answer = text[len(call) :]
    assert "Paris" in answer and "21" in answer
    assert run_tools.metadata["nbchat"]["tool_steps"] == 1
    listing = cell_by_source(tools, "%chat tools allow get_weather -c weather")
    assert "Allowed to run: get_weather (conversation 'weather')." in printed(listing)
    rome = reply_output(cell_by_source(tools, "%%chat -c weather --tool-choice get_weather\nAnd in Rome?"))
    assert rome.data["text/plain"].startswith('[tool] get_weather(city="Rome") -> ')
    decorated = reply_output(cell_by_source(tools, "%%chat -c weather --tools celsius_to_fahrenheit"))
    # The argument is the model's choice (a 135M model's, so not asserted); the result is the function's.
    shown = decorated.data["text/plain"]
    match = re.match(r"\[tool\] celsius_to_fahrenheit\(celsius=(-?[\d.]+)\) -> (-?[\d.]+)\n\n", shown)
    assert match, shown
    assert float(match[2]) == float(match[1]) * 9 / 5 + 32


def test_tools_history_shows_the_calls_inside_their_exchanges(tools):
    history = cell_by_source(tools, "%chat history -c weather")
    transcript = next(out.data["text/plain"] for out in history.outputs if out.output_type == "display_data")
    assert transcript.count("assistant: [tool] get_weather(") == 2
    assert "user: And in Rome?" in transcript


def test_kernel_interrupt_stops_the_reply_keeps_it_marked_and_the_next_chat_works(tmp_path):
    """A real SIGINT (the Stop button) in the middle of a long reply."""
    manager = kernel_manager(tmp_path)
    manager.start_kernel(cwd=str(tmp_path))
    client = manager.client()
    client.start_channels()
    client.wait_for_ready(timeout=120)

    def run(code: str, *, interrupt_after_updates: int | None = None) -> tuple[list[dict], str, float]:
        """Execute ``code``; returns its iopub messages, the reply status and, when it sent an
        interrupt, the seconds from the interrupt to the kernel going idle."""
        msg_id = client.execute(code)
        messages, updates, interrupted_at = [], 0, None
        while True:
            message = client.get_iopub_msg(timeout=300)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            messages.append(message)
            kind, content = message["msg_type"], message["content"]
            if kind == "update_display_data":
                updates += 1
                if updates == interrupt_after_updates:
                    interrupted_at = time.perf_counter()
                    manager.interrupt_kernel()
            if kind == "status" and content["execution_state"] == "idle":
                break
        status = client.get_shell_msg(timeout=60)["content"]["status"]
        return messages, status, (time.perf_counter() - interrupted_at) if interrupted_at else 0.0

    try:
        assert run("%load_ext nbchat\n%config ChatMagics.temperature = 0.0")[1] == "ok"
        assert run("%%chat --max-tokens 4\nHi")[1] == "ok"  # loads and compiles first
        messages, status, stop_seconds = run(
            "%%chat --max-tokens 400\nWrite a very long story about a dragon.", interrupt_after_updates=2
        )
        assert status == "ok"  # the cell ends cleanly: no KeyboardInterrupt traceback
        assert not [m for m in messages if m["msg_type"] == "error"]
        assert stop_seconds < 2.0
        final = [m for m in messages if m["msg_type"] == "update_display_data"][-1]["content"]
        assert final["data"]["text/plain"].endswith(INTERRUPTED_TEXT)
        assert final["metadata"]["nbchat"]["interrupted"] is True
        partial = final["data"]["text/plain"][: -len(INTERRUPTED_TEXT)].rstrip()
        assert partial and len(partial.split()) < 100

        history, status, _ = run("%chat history")
        transcript = next(m for m in history if m["msg_type"] == "display_data")["content"]["data"][
            "text/plain"
        ]
        assert transcript.endswith(f"assistant: {partial} {INTERRUPTED_TEXT}")

        follow_up, status, _ = run("%%chat --max-tokens 8\nThanks")
        assert status == "ok"
        assert not [m for m in follow_up if m["msg_type"] == "execute_result"]
        kept, status, _ = run("print(repr(_))")
        result = "".join(m["content"]["text"] for m in kept if m["msg_type"] == "stream")
        assert result.startswith("ChatReply(conversation='default', turn=2,")
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_nbchat_run_prints_each_exchange_of_the_quickstart(quickstart):
    """What `make demo` prints (`nbchat run` calls print_exchange on every executed cell)."""
    import io

    printed_text = io.StringIO()
    for cell in quickstart.cells:
        print_exchange(cell, printed_text)
    text = printed_text.getvalue()
    assert "user> What is the capital of France? Answer in one short sentence.\nassistant> " in text
    assert "Paris" in text.split("user> And what is the capital of Italy?")[0]
    assert "user> And what is the capital of Italy?\nassistant> " in text
    assert "ChatReply(" not in text  # a chat cell's result summary is not printed again


# --- the teaching views on the default model ------------------------------------------------------


def test_tokens_notebook_runs_without_errors(tokens_notebook):
    assert_no_errors(tokens_notebook)


def assert_reply_tokens(cell: nbformat.NotebookNode) -> list:
    """The --probs contract: one element per token (usage counts the end-of-turn token too), the
    reply's text exactly, probabilities in (0, 1], five alternatives sorted, greedy picks the first."""
    root, output = html_output(cell)
    metadata = output.metadata["nbchat"]
    tokens = root.find_all("nbchat-token")
    assert len(tokens) == metadata["usage"]["completion_tokens"] - (metadata["finish_reason"] == "stop")
    assert "".join(token.text for token in tokens) == output.data["text/plain"]
    for token in tokens:
        assert 0 < math.exp(token.number("data-logprob")) <= 1
        top = json.loads(token.attrs["data-top"])
        assert len(top) == 5 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert top[0][1] == pytest.approx(token.number("data-logprob"))  # temperature 0
    return tokens


def test_tokens_notebook_shows_the_reply_as_tokens(tokens_notebook):
    cell = cell_by_source(tokens_notebook, "%%chat --probs\nWhat is the capital of France?")
    tokens = assert_reply_tokens(cell)
    assert "Paris" in "".join(token.text for token in tokens)


def test_tokens_notebook_prompt_inspector_matches_the_reply_prompt(tokens_notebook):
    reply = reply_output(cell_by_source(tokens_notebook, "%%chat --probs\nWhat is the capital"))
    root, _ = html_output(cell_by_source(tokens_notebook, "%chat prompt --tokens"))
    chips = root.find_all("nbchat-prompt-token")
    assert len(chips) == reply.metadata["nbchat"]["usage"]["prompt_tokens"]
    ids = json.loads(printed(cell_by_source(tokens_notebook, "%chat prompt --ids")))
    assert [int(chip.attrs["data-token-id"]) for chip in chips] == ids
    specials = {chip.text for chip in chips if chip.attrs["data-special"] == "true"}
    assert specials == {"<|im_start|>", "<|im_end|>"}
    question = "".join(chip.text for chip in chips if chip.attrs["data-part"] == "content")
    assert question == "What is the capital of France? Answer in one short sentence."
    assert "You are a helpful AI assistant named SmolLM" in "".join(
        chip.text for chip in chips if chip.attrs["data-part"] == "template"
    )


def test_tokens_notebook_next_token_after_a_reply_start(tokens_notebook):
    root, _ = html_output(cell_by_source(tokens_notebook, "%chat next --top 8 The capital of France is"))
    rows = root.find_all("nbchat-next-token")
    assert len(rows) == 8
    assert '" Paris"' in rows[0].text and rows[0].number("data-sampled-logprob") == 0
    assert all(row.number("data-sampled-logprob") == -math.inf for row in rows[1:])
    raw = [row.number("data-logprob") for row in rows]
    assert raw == sorted(raw, reverse=True) and math.exp(raw[0]) > 0.5


def test_tokens_notebook_groups_an_emoji_split_over_tokens(tokens_notebook):
    cell = cell_by_source(tokens_notebook, "%%chat --new --probs --max-tokens 24")
    tokens = assert_reply_tokens(cell)
    assert not any("\ufffd" in token.text for token in tokens)
    groups = html_output(cell)[0].find_all("nbchat-char")
    if reply_output(cell).metadata["nbchat"]["finish_reason"] == "length" and groups[-1].text == "":
        assert groups[-1].attrs["title"].startswith("an unfinished character")  # cut inside the bytes
        groups = groups[:-1]
    assert groups and all(group.text.strip() == "😊" for group in groups)
    assert all(len(group.find_all("nbchat-token")) >= 2 for group in groups)


def test_tokens_notebook_replay_reproduces_a_sampled_reply(tokens_notebook):
    reply = reply_output(cell_by_source(tokens_notebook, "%%chat --new --temperature 0.9"))
    record = reply.metadata["nbchat"]["reproduce"]
    assert record["seed_drawn"] is True and record["settings"]["temperature"] == 0.9
    assert record["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    replay = cell_by_source(tokens_notebook, "%chat replay")
    shown = next(out for out in replay.outputs if out.output_type == "display_data")
    assert shown.metadata["nbchat"]["replay"]["identical"] is True
    assert shown.metadata["nbchat"]["replay"]["text"] == reply.data["text/plain"]
    line = printed(cell_by_source(tokens_notebook, "%chat save octopus.json"))
    assert f"float32 seed {record['seed']} drawn: True" in line


def test_templates_notebook_renders_one_conversation_three_ways(templates_notebook):
    assert_no_errors(templates_notebook)
    text = printed(cell_by_source(templates_notebook, 'for name in ["chatml", "llama-3", "llama-2"]'))
    counts = {line.split(":")[0][4:]: int(line.split(": ")[1].split()[0]) for line in text.splitlines()
              if line.startswith("--- ")}
    assert set(counts) == {"chatml", "llama-3", "llama-2"}
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in text
    assert "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>" in text
    system = "<<SYS>>\nYou are a concise assistant.\n<</SYS>>\n\n"
    assert f"[INST] {system}What is the capital of France? [/INST]" in text
    own = printed(cell_by_source(templates_notebook, "text, ids = engine.render_prompt(conversation)"))
    assert own.endswith(f"{counts['chatml']} tokens\n")  # SmolLM2's own template is ChatML


def test_templates_notebook_token_chips_show_which_markers_are_special(templates_notebook):
    chatml, _ = html_output(cell_by_source(templates_notebook, "%chat prompt --tokens --template chatml"))
    llama3, _ = html_output(cell_by_source(templates_notebook, "%chat prompt --tokens --template llama-3"))
    chatml_chips = chatml.find_all("nbchat-prompt-token")
    llama3_chips = llama3.find_all("nbchat-prompt-token")
    special = [chip.text for chip in chatml_chips if chip.attrs["data-special"] == "true"]
    assert special.count("<|im_start|>") == 5 and special.count("<|im_end|>") == 4
    # Llama 3's markers are not tokens of this model: they are spelled out in ordinary pieces.
    assert [chip.text for chip in llama3_chips if chip.attrs["data-special"] == "true"] == ["<|im_start|>"]
    assert len(llama3_chips) > 2 * len(chatml_chips)
    replies = printed(cell_by_source(templates_notebook, 'for name in ["chatml", "llama-2"]'))
    assert replies.startswith("chatml: ") and "\nllama-2: " in replies


def test_sampling_notebook_next_token_charts_per_temperature(sampling):
    root, _ = html_output(cell_by_source(sampling, "%chat next --top 8 --temperature 0.3,1,2"))
    charts = root.find_all("nbchat-chart")
    assert [json.loads(chart.attrs["data-settings"])["temperature"] for chart in charts] == [0.3, 1, 2]
    top = [chart.find_all("nbchat-next-token")[0] for chart in charts]
    sampled = [math.exp(row.number("data-sampled-logprob")) for row in top]
    assert sampled[0] > sampled[1] > sampled[2]  # the top token's share falls as the temperature rises
    assert sampled[1] == pytest.approx(math.exp(top[1].number("data-logprob")), rel=1e-4)
    top_p, _ = html_output(cell_by_source(sampling, "%chat set top_p=0.5"))
    rows = top_p.find_all("nbchat-next-token")
    kept = [math.exp(row.number("data-sampled-logprob")) for row in rows]
    assert sum(kept) == pytest.approx(1.0, abs=1e-4) and kept.count(0.0) >= len(kept) - 3


def test_sampling_notebook_compare_columns(sampling):
    greedy = reply_output(cell_by_source(sampling, "%%chat --new --temperature 0 --max-tokens 24")).data
    root, output = html_output(cell_by_source(sampling, '%%chat --new --compare "temperature=0,0.7,1.4"'))
    columns = root.find_all("nbchat-compare-column")
    assert [json.loads(column.attrs["data-settings"]) for column in columns] == [
        {"temperature": 0.0}, {"temperature": 0.7}, {"temperature": 1.4}
    ]
    texts = [column.find_all("nbchat-compare-text")[0].text for column in columns]
    assert texts[0] == greedy["text/plain"]
    assert all(int(column.attrs["data-completion-tokens"]) <= 24 for column in columns)
    means = [column.number("data-mean-logprob") for column in columns]
    assert means[2] < means[0]  # a hot reply is made of tokens the model found unlikely
    seeds, output = html_output(cell_by_source(sampling, '%%chat --new --compare "seed=1,2,3" --keep 2'))
    assert output.metadata["nbchat"]["compare"]["keep"] == 2
    columns = seeds.find_all("nbchat-compare-column")
    assert len({column.find_all("nbchat-compare-text")[0].text for column in columns}) == 3


def test_sampling_notebook_step_mode_and_pick_branch_the_reply(sampling):
    first, _ = html_output(cell_by_source(sampling, "%%chat --new --step --temperature 0"))
    greedy = reply_output(cell_by_source(sampling, "%%chat --new --temperature 0 --max-tokens 24")).data
    three, shown = html_output(cell_by_source(sampling, "%chat step 3"))
    ids = shown.metadata["nbchat"]["step"]["token_ids"]
    assert len(ids) == 3 and int(first.find_all("nbchat-next-token")[0].attrs["data-token-id"]) == ids[0]
    stepped = "".join(token.text for token in three.find_all("nbchat-token"))
    assert greedy["text/plain"].startswith(stepped)  # greedy steps are the greedy reply
    second = int(three.find_all("nbchat-next-token")[1].attrs["data-token-id"])
    picked, shown = html_output(cell_by_source(sampling, "%chat step --pick 2"))
    assert shown.metadata["nbchat"]["step"]["token_ids"] == [*ids, second]
    branched = "".join(token.text for token in picked.find_all("nbchat-token"))
    assert not greedy["text/plain"].startswith(branched)
    final, shown = html_output(cell_by_source(sampling, "%chat step 4"))
    text = "".join(token.text for token in final.find_all("nbchat-token"))
    assert text.startswith(branched) and len(shown.metadata["nbchat"]["step"]["token_ids"]) == 8
    history = cell_by_source(sampling, "%chat history")
    transcript = next(out.data["text/plain"] for out in history.outputs if out.output_type == "display_data")
    assert transcript.endswith(f"assistant: {text}")
