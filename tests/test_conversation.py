"""Conversation: turn storage, re-run replacement, undo, request messages, lossless JSON files."""

from __future__ import annotations

import json

import pytest

from nbchat.conversation import Conversation, ConversationError, Turn


def exchange(question: str, answer: str, **fields) -> Turn:
    return Turn(
        prompt=[{"role": "user", "content": question}],
        reply=[{"role": "assistant", "content": answer}],
        **fields,
    )


def test_messages_put_the_system_prompt_first_then_every_turn_in_order():
    conversation = Conversation(system="Be brief.")
    conversation.put(exchange("hi", "hello"))
    conversation.put(exchange("bye", "ciao"))
    assert conversation.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]


def test_request_messages_use_only_earlier_turns_and_the_turn_system_override():
    conversation = Conversation(system="default system")
    for number in range(3):
        conversation.put(exchange(f"q{number}", f"a{number}"))
    rerun = Turn(prompt=[{"role": "user", "content": "q1 edited"}], system="cell system")
    assert conversation.request_messages(1, rerun) == [
        {"role": "system", "content": "cell system"},
        {"role": "user", "content": "q0"},
        {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "q1 edited"},
    ]


def test_rerun_key_finds_and_replaces_its_turn_in_place():
    conversation = Conversation()
    conversation.put(exchange("one", "1", key="cell-a"))
    conversation.put(exchange("two", "2", key="cell-b"))
    index = conversation.index_of("cell-a")
    assert index == 0
    assert conversation.put(exchange("one again", "uno", key="cell-a"), index) == 0
    assert [turn.reply_text for turn in conversation.turns] == ["uno", "2"]
    assert conversation.index_of("cell-z") is None
    assert conversation.index_of(None) is None


def test_undo_drops_the_last_exchange_and_errors_when_empty():
    conversation = Conversation(name="work")
    conversation.put(exchange("one", "1"))
    conversation.put(exchange("two", "2"))
    assert conversation.undo().reply_text == "2"
    assert len(conversation) == 1
    conversation.undo()
    with pytest.raises(ConversationError, match="conversation 'work' is empty"):
        conversation.undo()


def test_reset_keeps_system_prompt_and_settings():
    conversation = Conversation(system="s", settings={"temperature": 0.2})
    conversation.put(exchange("one", "1"))
    conversation.reset()
    assert (conversation.turns, conversation.system, conversation.settings) == ([], "s", {"temperature": 0.2})


def test_reply_text_is_empty_before_a_reply_and_keeps_partial_interrupted_text():
    assert Turn(prompt=[{"role": "user", "content": "q"}]).reply_text == ""
    partial = exchange("q", "Once upon a", interrupted=True, finish_reason=None)
    assert (partial.reply_text, partial.interrupted) == ("Once upon a", True)


def test_save_and_load_round_trip_losslessly(tmp_path):
    conversation = Conversation(name="demo", system="Sys ✓", settings={"temperature": 0.2, "stop": ["\n\n"]})
    conversation.put(
        Turn(
            prompt=[
                {"role": "user", "content": "cat"},
                {"role": "assistant", "content": "chat"},
                {"role": "user", "content": "dog {not interpolated} 🐕"},
            ],
            reply=[{"role": "assistant", "content": "chien"}],
            key="cell:abc",
            system="per-cell",
            options={"seed": 7, "max_tokens": 16},
            model="smollm2-135m-instruct",
            finish_reason="stop",
            usage={"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
        )
    )
    conversation.put(exchange("more", "partial", interrupted=True, key="exec:4"))
    path = conversation.save(tmp_path / "chat.json")
    loaded = Conversation.load(path)
    assert loaded == conversation
    assert loaded.to_dict() == json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", "format='nbchat.conversation'"),
        ('{"format": "nbchat.conversation", "version": 99}', "unsupported conversation file version 99"),
        ('{"format": "nbchat.conversation", "version": 1, "turns": {}}', "turns must be a list"),
        ('{"format": "nbchat.conversation", "version": 1, "turns": [{"prompt": [{"content": "x"}]}]}',
         "turns[0].prompt[0] must be a message object with a role"),
        ('{"format": "nbchat.conversation", "version": 1, "turns": [{"prompt": [], "colour": 1}]}',
         "turns[0] has an unknown field 'colour'"),
        ("{not json", "is not valid JSON"),
        ('{"format": "nbchat.conversation", "version": 1, "turns": [{"prompt": [], "reply": {}}]}',
         "turns[0].reply must be a list of messages"),
        ('{"format": "nbchat.conversation", "version": 1, "turns": [{"prompt": [], "reply": '
         '[{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]}]}',
         "turns[0].reply[0].tool_calls[0] must be a tool call"),
        ('{"format": "nbchat.conversation", "version": 1, "turns": [{"prompt": [], "reply": '
         '[{"role": "tool", "content": "1"}]}]}',
         "turns[0].reply[0].tool_call_id must be a string"),
    ],
)
def test_loading_a_bad_file_names_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConversationError) as error:
        Conversation.load(path)
    assert message in str(error.value)


def test_loading_a_missing_file_is_a_conversation_error(tmp_path):
    with pytest.raises(ConversationError, match="cannot read"):
        Conversation.load(tmp_path / "nope.json")


def test_system_prompt_precedence_turn_then_conversation_then_default():
    conversation = Conversation()
    turn = Turn(prompt=[{"role": "user", "content": "q"}])
    assert conversation.request_messages(0, turn) == [{"role": "user", "content": "q"}]
    assert conversation.request_messages(0, turn, default_system="d")[0] == {"role": "system", "content": "d"}
    conversation.system = "c"
    assert conversation.request_messages(0, turn, default_system="d")[0]["content"] == "c"
    turn.system = "t"
    assert conversation.request_messages(0, turn, default_system="d")[0]["content"] == "t"


def tool_exchange() -> Turn:
    """A turn where the model called a tool, got its result and answered."""
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}
    return Turn(
        prompt=[{"role": "user", "content": "1 + 2?"}],
        reply=[
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "3"},
            {"role": "assistant", "content": "It is 3."},
        ],
        options={"tools": ["add"], "run_tools": True, "tool_choice": "required"},
        finish_reason="stop",
    )


def test_tool_turns_are_part_of_the_history_and_round_trip_through_files(tmp_path):
    conversation = Conversation()
    conversation.put(tool_exchange())
    conversation.put(exchange("and 2 + 2?", "4"))
    assert [message["role"] for message in conversation.messages()] == [
        "user", "assistant", "tool", "assistant", "user", "assistant"
    ]
    assert conversation.turns[0].reply_text == "It is 3."
    loaded = Conversation.load(conversation.save(tmp_path / "tools.json"))
    assert loaded == conversation and loaded.messages() == conversation.messages()


def test_undo_drops_a_whole_tool_exchange():
    conversation = Conversation()
    conversation.put(exchange("hi", "hello"))
    conversation.put(tool_exchange())
    conversation.undo()
    assert [message["role"] for message in conversation.messages()] == ["user", "assistant"]


def test_an_exchange_stopped_at_a_call_has_no_reply_text():
    stopped = Turn(
        prompt=[{"role": "user", "content": "q"}],
        reply=[
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ]},
            {"role": "tool", "tool_call_id": "c", "content": '{"error": "not run: not allowed"}'},
        ],
    )
    assert stopped.reply_text == ""


def test_tools_stay_in_memory_keep_through_reset_and_are_not_saved(tmp_path):
    conversation = Conversation()

    def add(a: int, b: int) -> int:
        return a + b

    conversation.tools.add(add, allow_run=True)
    conversation.put(exchange("q", "a"))
    conversation.reset()
    assert conversation.tools.names == ["add"] and conversation.tools.can_run("add")
    assert "tools" not in conversation.to_dict()
    loaded = Conversation.load(conversation.save(tmp_path / "c.json"))
    assert len(loaded.tools) == 0
