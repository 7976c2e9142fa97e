"""The teaching views driven through a real IPython shell and the real Engine on the tiny model:
--probs, %chat prompt --tokens/--ids, %chat next, --compare, step mode and replay.

Each test reads the view's HTML contract (data-* attributes, text content) from what the shell
published, and checks it against the engine: token counts against usage, ids against the tokenizer,
greedy distributions against greedy replies, replays against the stored text.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from nbchat.notebook import engines as engines_module
from tests.html_elements import parse
from tests.test_magics import Chat, configure, shell  # noqa: F401  (the module's shell fixture)

EMOJI_SCHEMA = {"type": "string", "enum": ["🙂 🚀"]}


@pytest.fixture
def chat(shell, tiny_model_dir):  # noqa: F811
    """Fresh conversations and the module's settings (earlier test modules may have changed traits)."""
    from nbchat.conversation import Conversation

    configure(shell, tiny_model_dir)
    magics = shell.magics_manager.registry["ChatMagics"]
    for name, value in {
        "top_p": None,
        "top_k": None,
        "seed": None,
        "stop": [],
        "system_prompt": None,
    }.items():
        setattr(magics, name, value)
    magics.conversations = {"default": Conversation("default")}
    magics.current = "default"
    magics._steps.clear()
    shell.display_pub.outputs.clear()
    return Chat(shell, magics)


def engine(tiny_model_dir):
    return engines_module.shared_engine(str(tiny_model_dir), None)


def last_html(chat) -> tuple:
    output = chat.outputs[-1]
    return parse(output["data"]["text/html"]), output


def greedy_ids(tiny_model_dir, messages, count: int) -> list[int]:
    """The token ids of a greedy reply, through the chat API (its logprobs' bytes -> ids)."""
    reply = engine(tiny_model_dir).chat.completions.create(
        messages=messages, temperature=0, max_tokens=count, logprobs=True
    )
    return engine(tiny_model_dir).token_ids_of([item.bytes for item in reply.choices[0].logprobs.content])


# --- 1. --probs -----------------------------------------------------------------------------------


def test_probs_reply_has_one_element_per_token_with_its_id_probability_and_sorted_alternatives(
    chat, tiny_model_dir
):
    reply = chat.run("%%chat --probs --max-tokens 10\nHello there", cell_id="probs").result
    root, output = last_html(chat)
    assert output["update"] is True  # the reply's own display, redrawn as its tokens
    assert output["data"]["text/plain"] == reply.text
    tokens = root.find_all("nbchat-token")
    stop_token = reply.finish_reason == "stop"  # usage counts the end-of-turn token, which shows nothing
    assert len(tokens) == reply.usage["completion_tokens"] - stop_token
    ids = [int(token.attrs["data-token-id"]) for token in tokens]
    tokenizer = engine(tiny_model_dir).tokenizer
    assert tokenizer.decode(ids) == reply.text
    assert "".join(token.text for token in tokens) == reply.text
    for token in tokens:
        assert 0 < math.exp(token.number("data-logprob")) <= 1
        top = json.loads(token.attrs["data-top"])
        assert len(top) == 5
        logprobs = [logprob for _, logprob in top]
        assert logprobs == sorted(logprobs, reverse=True)
        assert all(0 < math.exp(logprob) <= 1 for logprob in logprobs)
        assert token.attrs["title"].startswith("p = ")
    # Greedy: each token is its own most likely alternative.
    assert all(json.loads(t.attrs["data-top"])[0][1] == t.number("data-logprob") for t in tokens)
    assert len(root.find_all("nbchat-legend")) == 1


def test_probs_groups_an_emoji_split_over_tokens_into_one_character(chat, tiny_model_dir):
    chat.shell.user_ns["emoji_schema"] = EMOJI_SCHEMA
    reply = chat.run("%%chat --probs --schema emoji_schema --max-tokens 20\nAn emoji please").result
    assert reply.text == '"🙂 🚀"'
    root, _ = last_html(chat)
    tokens = root.find_all("nbchat-token")
    assert len(tokens) == reply.usage["completion_tokens"] - 1  # the grammar ended it with a stop token
    assert "".join(token.text for token in tokens) == reply.text
    assert not any("\ufffd" in token.text or "\\x" in token.text for token in tokens)
    groups = root.find_all("nbchat-char")
    assert [group.text for group in groups] == ["🙂", " 🚀"]
    for group in groups:
        inner = group.find_all("nbchat-token")
        assert len(inner) >= 2 and all(token.text == "" for token in inner[:-1])
        ids = [int(token.attrs["data-token-id"]) for token in inner]
        assert engine(tiny_model_dir).tokenizer.decode(ids) == group.text


# --- 2. the prompt inspector ----------------------------------------------------------------------


def test_prompt_tokens_and_ids_show_the_prompt_the_reply_was_generated_from(chat, tiny_model_dir, capsys):
    reply = chat.run("%%chat --max-tokens 3\nsystem: Be brief.\nuser: Hello 🙂 there").result
    chat.run("%chat prompt --tokens")
    root, output = last_html(chat)
    chips = root.find_all("nbchat-prompt-token")
    assert len(chips) == reply.usage["prompt_tokens"] == output["metadata"]["nbchat"]["prompt_tokens"]
    capsys.readouterr()
    chat.run("%chat prompt --ids")
    ids = json.loads(capsys.readouterr().out)
    assert [int(chip.attrs["data-token-id"]) for chip in chips] == ids
    _, expected = engine(tiny_model_dir).render_prompt(reply.messages[:-1])
    assert ids == expected
    specials = [chip.text for chip in chips if chip.attrs["data-special"] == "true"]
    assert specials == ["<|im_start|>", "<|im_end|>"] * 2 + ["<|im_start|>"]

    def content(message: str) -> str:
        return "".join(
            c.text for c in chips if c.attrs["data-message"] == message and c.attrs["data-part"] == "content"
        )

    assert content("0") == "Be brief."
    assert content("1") == "Hello 🙂 there"  # the emoji's bytes grouped, not mojibake
    generation = "".join(c.text for c in chips if c.attrs["data-message"] == "generation")
    assert generation.endswith("<|im_start|>assistant\n")
    assert (
        "".join(chip.text for chip in chips) == engine(tiny_model_dir).render_prompt(reply.messages[:-1])[0]
    )
    assert f"{len(ids)} tokens of 2048 in the context" in root.text


# --- 3. next-token distributions ------------------------------------------------------------------


def test_next_shows_the_raw_and_sampled_distribution_for_each_temperature(chat, tiny_model_dir):
    chat.run("%%chat --max-tokens 4\nHello there")
    first_greedy = greedy_ids(tiny_model_dir, [{"role": "user", "content": "Hello there"}], 1)[0]
    chat.run("%chat next --top 6 --temperature 0,1,2")
    root, _ = last_html(chat)
    charts = root.find_all("nbchat-chart")
    assert [json.loads(chart.attrs["data-settings"])["temperature"] for chart in charts] == [0, 1, 2]
    rows = [chart.find_all("nbchat-next-token") for chart in charts]
    assert all(len(chart_rows) == 6 for chart_rows in rows)
    raw = [row.number("data-logprob") for row in rows[0]]
    assert raw == sorted(raw, reverse=True) and all(0 < math.exp(lp) <= 1 for lp in raw)
    assert int(rows[0][0].attrs["data-token-id"]) == first_greedy  # the model's favourite is greedy's
    greedy = [row.number("data-sampled-logprob") for row in rows[0]]
    assert greedy[0] == 0 and all(lp == -math.inf for lp in greedy[1:])
    assert int(charts[0].attrs["data-chosen-token-id"]) == first_greedy
    at_one = [row.number("data-sampled-logprob") for row in rows[1]]
    assert at_one == pytest.approx(raw, abs=1e-5)  # temperature 1, nothing filtered: the model's own
    hot = [row.number("data-sampled-logprob") for row in rows[2]]
    assert hot[0] < raw[0] and hot[-1] > raw[-1]  # a high temperature flattens the distribution


def test_next_after_a_partial_reply_and_with_top_k(chat):
    chat.run("%%chat --max-tokens 4\nHello there")
    chat.run("%chat set top_k=2")
    chat.run("%chat next --top 4 Hel")
    root, _ = last_html(chat)
    (chart,) = root.find_all("nbchat-chart")
    assert json.loads(chart.attrs["data-settings"])["top_k"] == 2
    sampled = [math.exp(row.number("data-sampled-logprob")) for row in chart.find_all("nbchat-next-token")]
    assert sampled[2:] == [0.0, 0.0] and sum(sampled) == pytest.approx(1.0, abs=1e-5)
    assert "after 'Hel'" in root.text


def test_next_errors_are_one_line(chat):
    assert "is empty" in chat.error("%chat next")
    chat.run("%%chat --max-tokens 2\nHi")
    assert "--top must be an integer" in chat.error("%chat next --top many")
    assert "temperature" in chat.error("%chat next --temperature hot")


# --- 6. reproducibility ---------------------------------------------------------------------------


def test_every_reply_records_what_reproduces_it_and_replay_reproduces_it_exactly(
    chat, tiny_model_dir, tmp_path
):
    reply = chat.run("%%chat --temperature 1.0 --max-tokens 12\nTell me something").result
    record = chat.outputs[-1]["metadata"]["nbchat"]["reproduce"]
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    assert record["sha256"] == hashlib.sha256(weights).hexdigest()
    assert record["dtype"] == "float32" and record["model"] == tiny_model_dir.name
    assert record["seed_drawn"] is True and isinstance(record["seed"], int)
    assert record["settings"]["seed"] == record["seed"]
    assert record["settings"]["temperature"] == 1.0 and record["settings"]["max_tokens"] == 12
    assert {"top_p", "top_k", "min_p", "repetition_penalty", "stop"} <= set(record["settings"])
    assert chat.conversation().turns[0].reproduce == record

    path = tmp_path / "chat.json"
    chat.run(f"%chat save {path}")
    assert json.loads(path.read_text())["turns"][0]["reproduce"] == record
    chat.magics.conversations.clear()
    chat.run(f"%chat load {path}")
    chat.run("%chat replay 0")
    replay = chat.outputs[-1]["metadata"]["nbchat"]["replay"]
    assert replay["identical"] is True
    assert replay["text"].encode() == reply.text.encode()
    assert chat.outputs[-1]["data"]["text/plain"].startswith("Reply 0 reproduced exactly")


def test_replay_says_when_the_messages_before_it_changed(chat):
    chat.run("%%chat --max-tokens 4\nHi", cell_id="a")
    chat.run("%%chat --max-tokens 4\nAgain", cell_id="b")
    chat.run("%chat system Something else entirely.")
    chat.run("%chat replay 1")
    assert "the messages before it changed since" in chat.outputs[-1]["data"]["text/plain"]
    assert "has replies 0 to 1" in chat.error("%chat replay 5")


# --- 5. compare -----------------------------------------------------------------------------------


def test_compare_at_temperature_zero_twice_gives_identical_columns_and_keeps_the_first(chat):
    reply = chat.run('%%chat --compare "temperature=0,0" --max-tokens 8\nHello there').result
    root, output = last_html(chat)
    columns = root.find_all("nbchat-compare-column")
    assert len(columns) == 2
    texts = [column.find_all("nbchat-compare-text")[0].text for column in columns]
    assert texts[0] == texts[1] == reply.text
    assert columns[0].attrs["data-completion-tokens"] == columns[1].attrs["data-completion-tokens"]
    # The second run reuses the first one's cached prompt, so float rounding differs in the 7th digit.
    assert columns[0].number("data-mean-logprob") == pytest.approx(columns[1].number("data-mean-logprob"))
    shown = [column.text.split(" ", 1)[1].replace(" · kept in the conversation", "") for column in columns]
    assert shown[0] == shown[1]  # what the reader sees (number, settings and kept mark aside) is identical
    assert -math.inf < columns[0].number("data-mean-logprob") <= 0
    assert output["metadata"]["nbchat"]["compare"]["keep"] == 1
    assert chat.conversation().turns[0].reply_text == reply.text


def test_compare_seeds_and_keep_continues_with_the_chosen_reply(chat):
    reply = chat.run('%%chat --compare "seed=1,2,3" --keep 2 --temperature 1.5 --max-tokens 8\nHi').result
    columns = last_html(chat)[0].find_all("nbchat-compare-column")
    assert [json.loads(column.attrs["data-settings"]) for column in columns] == [
        {"seed": 1},
        {"seed": 2},
        {"seed": 3},
    ]
    texts = [column.find_all("nbchat-compare-text")[0].text for column in columns]
    assert len(set(texts)) > 1  # different seeds sample differently
    assert reply.text == texts[1] == chat.conversation().turns[0].reply_text
    assert chat.conversation().turns[0].reproduce["seed"] == 2
    chat.run("%chat replay 0")
    assert chat.outputs[-1]["metadata"]["nbchat"]["replay"]["identical"] is True


def test_compare_models_runs_the_turn_on_each_model(chat, tiny_model_dir, tmp_path):
    from tests.tiny_model import make_tiny_model_dir

    other = make_tiny_model_dir(tmp_path / "other", seed=1)
    spec = f"model={tiny_model_dir},{other}"
    reply = chat.run(f'%%chat --compare "{spec}" --keep 2 --temperature 0 --max-tokens 8\nHello there').result
    root, output = last_html(chat)
    columns = root.find_all("nbchat-compare-column")
    assert [json.loads(column.attrs["data-settings"])["model"] for column in columns] == [
        str(tiny_model_dir),
        str(other),
    ]
    texts = [column.find_all("nbchat-compare-text")[0].text for column in columns]
    assert texts[0] != texts[1]  # other weights, another reply
    turn = chat.conversation().turns[0]
    assert reply.text == texts[1] == turn.reply_text and turn.model == str(other)
    weights = (other / "model.safetensors").read_bytes()
    assert output["metadata"]["nbchat"]["reproduce"]["sha256"] == hashlib.sha256(weights).hexdigest()


def test_compare_errors_are_one_line(chat):
    assert "KEY=V1,V2" in chat.error('%%chat --compare "colour=red,blue"\nHi')
    assert "two or more values" in chat.error('%%chat --compare "temperature=1"\nHi')
    assert "--keep 4" in chat.error('%%chat --compare "temperature=0,1" --keep 4\nHi')
    assert len(chat.conversation()) == 0


# --- 4. step mode ---------------------------------------------------------------------------------


def test_step_mode_follows_the_sampler_and_pick_branches_the_reply(chat, tiny_model_dir):
    chat.run("%%chat --step --temperature 0 --max-tokens 20\nHello there")
    root, output = last_html(chat)
    first = root.find_all("nbchat-next-token")
    assert output["metadata"]["nbchat"]["step"]["token_ids"] == []
    chat.run("%chat step 3")
    greedy = greedy_ids(tiny_model_dir, [{"role": "user", "content": "Hello there"}], 3)
    step = chat.outputs[-1]["metadata"]["nbchat"]["step"]
    assert step["token_ids"] == greedy  # stepping at temperature 0 is the greedy reply
    assert int(first[0].attrs["data-token-id"]) == greedy[0]
    shown = last_html(chat)[0].find_all("nbchat-next-token")
    second_choice = int(shown[1].attrs["data-token-id"])
    chat.run("%chat step --pick 2")
    root, output = last_html(chat)
    ids = output["metadata"]["nbchat"]["step"]["token_ids"]
    assert ids == [*greedy, second_choice]  # branched: the second most likely token, not greedy's
    tokens = root.find_all("nbchat-token")
    assert [int(token.attrs["data-token-id"]) for token in tokens] == ids
    text = engine(tiny_model_dir).tokenizer.decode(ids)
    assert chat.conversation().turns[0].reply_text == text == "".join(token.text for token in tokens)
    # After the branch, the next distribution is that of the branched reply.
    expected = engine(tiny_model_dir).next_token_distribution(
        [{"role": "user", "content": "Hello there"}], reply_ids=ids, settings=[{"temperature": 0}]
    )
    shown = root.find_all("nbchat-next-token")
    assert [int(row.attrs["data-token-id"]) for row in shown] == [choice.token_id for choice in expected.top]
    assert "choose from 1 to 10" in chat.error("%chat step --pick 11")


def test_step_without_a_step_reply_is_a_one_line_error(chat):
    assert "start one with %%chat --step" in chat.error("%chat step")


def test_view_options_that_do_not_go_together_are_one_line_errors(chat):
    assert "keep one of them" in chat.error('%%chat --compare "seed=1,2" --step\nHi')
    assert "--probs shows one reply" in chat.error("%%chat --probs --step\nHi")
    assert "--keep N chooses among" in chat.error("%%chat --keep 2\nHi")
    assert len(chat.conversation()) == 0
