"""Chat templates: the built-in families' exact prompt strings, the model's own template, tokenization
without a second BOS, continuing a final message, and template errors as InvalidRequestError."""

from __future__ import annotations

import copy

import pytest

from nbchat.errors import InvalidRequestError
from nbchat.templates import (
    BUILTIN_TEMPLATES,
    render_messages,
    resolve_chat_template,
    template_allows_late_system,
    tokenize_prompt,
)

CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "How are you?"},
]

# The special tokens each family's tokenizer has, so the strings below are what that model expects.
FAMILY_TOKENS = {
    "chatml": {},
    "llama-2": {"bos_token": "<s>", "eos_token": "</s>"},
    "llama-3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "phi-3": {"bos_token": "<s>", "eos_token": "<|endoftext|>"},
    "zephyr": {"bos_token": "<s>", "eos_token": "</s>"},
    "alpaca": {"bos_token": "<s>", "eos_token": "</s>"},
}

# Written out by hand from each family's documented prompt format.
GOLDEN = {
    "chatml": (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama-2": (
        "<s>[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi [/INST] Hello! </s>"
        "<s>[INST] How are you? [/INST]"
    ),
    "llama-3": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral": "<s>[INST] You are helpful.\n\nHi [/INST]Hello!</s>[INST] How are you? [/INST]",
    "gemma": (
        "<bos><start_of_turn>user\nYou are helpful.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    ),
    "phi-3": (
        "<|system|>\nYou are helpful.<|end|>\n"
        "<|user|>\nHi<|end|>\n"
        "<|assistant|>\nHello!<|end|>\n"
        "<|user|>\nHow are you?<|end|>\n"
        "<|assistant|>\n"
    ),
    "zephyr": (
        "<|system|>\nYou are helpful.</s>\n"
        "<|user|>\nHi</s>\n"
        "<|assistant|>\nHello!</s>\n"
        "<|user|>\nHow are you?</s>\n"
        "<|assistant|>\n"
    ),
    "alpaca": (
        "You are helpful.\n\n"
        "### Instruction:\nHi\n\n"
        "### Response:\nHello!</s>\n\n"
        "### Instruction:\nHow are you?\n\n"
        "### Response:\n"
    ),
}

# Without a system message.
GOLDEN_NO_SYSTEM = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "llama-2": "<s>[INST] Hi [/INST]",
    "llama-3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Hi [/INST]",
    "gemma": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "phi-3": "<|user|>\nHi<|end|>\n<|assistant|>\n",
    "zephyr": "<|user|>\nHi</s>\n<|assistant|>\n",
    "alpaca": "Below is an instruction that describes a task. Write a response that appropriately completes "
              "the request.\n\n### Instruction:\nHi\n\n### Response:\n",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from nbchat.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


# Parametrized over the built-ins themselves: a new built-in without its goldens fails here.
@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_template_renders_the_family_format(tokenizer, name):
    rendered = render_messages(tokenizer, CONVERSATION, chat_template=name, template_vars=FAMILY_TOKENS[name])
    assert rendered == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_template_without_system_message(tokenizer, name):
    messages = [{"role": "user", "content": "Hi"}]
    rendered = render_messages(tokenizer, messages, chat_template=name, template_vars=FAMILY_TOKENS[name])
    assert rendered == GOLDEN_NO_SYSTEM[name]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_continue_final_message_ends_inside_the_assistant_text(tokenizer, name):
    messages = CONVERSATION[:2] + [{"role": "assistant", "content": "Once upon"}]
    rendered = render_messages(tokenizer, messages, chat_template=name, continue_final_message=True,
                               template_vars=FAMILY_TOKENS[name])
    assert rendered.endswith("Once upon")
    full = render_messages(tokenizer, CONVERSATION[:2], chat_template=name, template_vars=FAMILY_TOKENS[name])
    if name not in ("llama-2", "mistral"):  # these two have no separate assistant header to compare
        assert rendered == full + "Once upon"


def test_model_template_is_the_default(tokenizer):
    rendered = render_messages(tokenizer, CONVERSATION[1:2])
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_jinja_string_template_is_used_as_given(tokenizer):
    template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{{ bos_token }}"
    assert render_messages(tokenizer, CONVERSATION[1:2], chat_template=template) == "[user]Hi<|im_start|>"


def test_template_sees_tools_and_helpers(tokenizer):
    template = "{{ tools[0].function.name }}|{{ tools | tojson }}|{{ strftime_now('%Y') | length }}"
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    rendered = render_messages(tokenizer, CONVERSATION[1:2], chat_template=template, tools=tools)
    assert rendered == 'get_weather|[{"type": "function", "function": {"name": "get_weather"}}]|4'


def test_tokenize_does_not_add_a_second_bos(tokenizer):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    bos_id = backend.token_to_id("<|im_start|>")
    backend.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos_id)]
    )
    adds_bos = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    assert adds_bos("x")["input_ids"][0] == bos_id  # this tokenizer adds BOS on its own
    text = render_messages(adds_bos, CONVERSATION[1:2], chat_template="llama-3")
    ids = tokenize_prompt(adds_bos, text)
    assert text.startswith("<|im_start|>")
    assert ids[0] == bos_id and ids[1] != bos_id
    assert ids == adds_bos(text, add_special_tokens=False)["input_ids"]


def test_special_tokens_in_rendered_text_become_single_ids(tokenizer):
    ids = tokenize_prompt(tokenizer, render_messages(tokenizer, CONVERSATION[1:2]))
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(im_start) == 2 and ids.count(im_end) == 1
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_template_raise_exception_is_invalid_request(tokenizer):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequestError, match="alternate") as error:
        render_messages(tokenizer, messages, chat_template="llama-2")
    assert error.value.param == "messages"


def test_template_runtime_error_is_invalid_request(tokenizer):
    with pytest.raises(InvalidRequestError, match="could not render") as error:
        render_messages(tokenizer, CONVERSATION, chat_template="{{ messages[0].content + 1 }}")
    assert error.value.param == "messages"


def test_template_syntax_error_names_chat_template(tokenizer):
    with pytest.raises(InvalidRequestError, match="not valid jinja") as error:
        render_messages(tokenizer, CONVERSATION, chat_template="{% for m in messages %}{{ m }")
    assert error.value.param == "chat_template"


def test_template_cannot_escape_the_sandbox(tokenizer):
    template = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(InvalidRequestError, match="unsafe|could not render"):
        render_messages(tokenizer, CONVERSATION, chat_template=template)


def test_unknown_template_name_lists_the_builtins(tokenizer):
    with pytest.raises(InvalidRequestError, match="chatml, llama-2") as error:
        resolve_chat_template(tokenizer, "vicuna")
    assert error.value.param == "chat_template"


def test_model_without_template_asks_for_one(tokenizer):
    bare = copy.copy(tokenizer)
    bare.chat_template = None
    with pytest.raises(InvalidRequestError, match="no chat template") as error:
        render_messages(bare, CONVERSATION)
    assert error.value.param == "chat_template"
    assert render_messages(bare, CONVERSATION[1:2], chat_template="chatml").startswith("<|im_start|>user")


@pytest.mark.parametrize(
    ("name", "allowed"),
    [("chatml", True), ("llama-3", True), ("phi-3", True), ("zephyr", True),
     ("llama-2", False), ("mistral", False), ("gemma", False), ("alpaca", False)],
)
def test_late_system_message_allowed_only_where_the_template_renders_it(tokenizer, name, allowed):
    assert template_allows_late_system(tokenizer, BUILTIN_TEMPLATES[name]) is allowed
    messages = [*CONVERSATION[1:3], {"role": "system", "content": "Now be terse."}, CONVERSATION[3]]
    if allowed:
        assert "Now be terse." in render_messages(tokenizer, messages, chat_template=name)
    else:
        with pytest.raises(InvalidRequestError, match="system message after") as error:
            render_messages(tokenizer, messages, chat_template=name)
        assert error.value.param == "messages[2].role"


def test_template_that_drops_late_system_messages_does_not_allow_them(tokenizer):
    first_only = (
        "{% for m in messages %}{% if m.role != 'system' or loop.first %}{{ m.content }}{% endif %}"
        "{% endfor %}"
    )
    assert not template_allows_late_system(tokenizer, first_only)
    rendered = render_messages(tokenizer, CONVERSATION, chat_template=first_only)
    assert rendered == "You are helpful.HiHello!How are you?"


def test_rendering_does_not_mutate_the_messages(tokenizer):
    messages = copy.deepcopy(CONVERSATION[:3])
    snapshot = copy.deepcopy(messages)
    for name in BUILTIN_TEMPLATES:
        render_messages(tokenizer, messages, chat_template=name, continue_final_message=True)
    assert messages == snapshot


# ---- tools: the model's own tool support, or the built-in tool prompt

TOOL_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


def test_template_without_tool_support_gets_the_builtin_tool_prompt(tokenizer):
    from nbchat.chat_format.hermes import tool_prompt

    rendered = render_messages(tokenizer, TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert rendered == (
        f"<|im_start|>system\nBe brief.\n\n{tool_prompt([WEATHER_TOOL])}<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # Without tools in the request, the history's calls and results still render as text.
    without_tools = render_messages(tokenizer, TOOL_CONVERSATION)
    assert without_tools.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert without_tools.endswith(rendered[rendered.index("<|im_start|>user\n"):])


def test_template_with_tool_support_gets_tools_and_argument_objects(tokenizer):
    template = (
        "{{ tools | length }} tools;"
        "{% for m in messages %}{% for c in m.tool_calls or [] %}"
        "{{ c.function.name }}({{ c.function.arguments.city }}) {{ c.function.arguments | tojson }};"
        "{% endfor %}{% if m.role == 'tool' %}{{ m.tool_call_id }}={{ m.content }};{% endif %}{% endfor %}"
    )
    messages = copy.deepcopy(TOOL_CONVERSATION)
    rendered = render_messages(tokenizer, messages, chat_template=template, tools=[WEATHER_TOOL])
    assert rendered == '1 tools;get_weather(Paris) {"city": "Paris"};call_1=18C;'
    assert messages == TOOL_CONVERSATION  # the caller's arguments string is left alone


@pytest.mark.parametrize(("source", "supports"), [
    ("{% if tools %}{{ tools | tojson }}{% endif %}", True),
    ("{% for tool in tools %}{{ tool.function.name }}{% endfor %}", True),
    ("{{ messages[0].content }} (no tools here)", False),
    ("{% set tools = [] %}{{ tools }}", False),  # a local variable, not the tools passed in
    ("{% generation %}{{ tools }}{% endgeneration %}", True),  # transformers' own tag
])
def test_template_supports_tools_when_it_reads_the_tools_variable(source, supports):
    from nbchat.templates import template_supports_tools

    assert template_supports_tools(source) is supports
