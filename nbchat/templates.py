"""Messages -> prompt text -> prompt token ids, through a jinja chat template.

The default template is the model's own (``tokenizer.chat_template``). Built-in templates, usable with
any model by name, are the common families' formats written out here: ``chatml``, ``llama-2``,
``llama-3``, ``mistral``, ``gemma``, ``phi-3``, ``zephyr``, ``alpaca``. Rendering is transformers'
``apply_chat_template``, which runs the template in jinja's sandbox with the helpers HF templates
expect (``raise_exception``, ``tojson``, ``strftime_now``, ``bos_token``, ``eos_token``, ``tools``,
``add_generation_prompt``); this module does not render by itself.

Tools: a template that reads the ``tools`` variable is given the tools and renders assistant
``tool_calls`` (their ``arguments`` as objects, as HF templates expect) and ``tool`` messages itself;
any other template gets the conversation rewritten by ``nbchat.chat_format.hermes.inline_tools`` (the
built-in tool prompt in the system message, calls and results as ``<tool_call>`` / ``<tool_response>``
text).

Must not: validate OpenAI request fields (``nbchat.protocol`` does), generate, or import JAX.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from nbchat.errors import InvalidRequestError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ALTERNATION_ERROR = (
    "{{ raise_exception('After an optional system message, this template needs the roles to alternate "
    "user/assistant/user/...: merge consecutive messages of one role, or use a template such as chatml.') }}"
)
_SYSTEM_FIRST_ERROR = (
    "{{ raise_exception('This template takes a system message only as the first message.') }}"
)
# The first message as the system prompt, the rest as the turns (for formats that fold the system
# prompt into the first user turn).
_SPLIT_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- set loop_messages = messages %}{%- endif %}"
)
_CHECK_ALTERNATION = (
    "{%- if message['role'] == 'system' %}" + _SYSTEM_FIRST_ERROR + "{%- endif %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + _ALTERNATION_ERROR + "{%- endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    # ChatML (OpenAI, Qwen, SmolLM, Hermes): <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    # Llama 2 chat (Meta's chat_completion): <s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nuser [/INST] answer </s>
    "llama-2": (
        _SPLIT_SYSTEM + "{%- for message in loop_messages %}" + _CHECK_ALTERNATION +
        "{%- if message['role'] == 'user' %}"
        "{%- set content = message['content'] %}"
        "{%- if loop.first and system_message %}"
        "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + content %}{%- endif %}"
        "{{- bos_token + '[INST] ' + content | trim + ' [/INST]' }}"
        "{%- else %}{{- ' ' + (message['content'] or '') | trim + ' ' + eos_token }}{%- endif %}"
        "{%- endfor %}"
    ),
    # Llama 3 / 3.1: headers, trimmed content, <|eot_id|>; tool results take 3.1's "ipython" role.
    "llama-3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] %}"
        "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + (message['content'] or '') | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    # Mistral instruct: <s>[INST] user [/INST]answer</s>[INST] ... ; the system prompt opens the first
    # user turn, separated by a blank line.
    "mistral": (
        _SPLIT_SYSTEM + "{{- bos_token }}{%- for message in loop_messages %}" + _CHECK_ALTERNATION +
        "{%- if message['role'] == 'user' %}"
        "{%- set content = message['content'] %}"
        "{%- if loop.first and system_message %}{%- set content = system_message + '\\n\\n' + content %}"
        "{%- endif %}"
        "{{- '[INST] ' + content + ' [/INST]' }}"
        "{%- else %}{{- (message['content'] or '') + eos_token }}{%- endif %}"
        "{%- endfor %}"
    ),
    # Gemma: <start_of_turn>user|model\n ... <end_of_turn>\n; no system role, so (as Gemma 3 does) the
    # system prompt opens the first user turn.
    "gemma": (
        _SPLIT_SYSTEM + "{{- bos_token }}{%- for message in loop_messages %}" + _CHECK_ALTERNATION +
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{%- set prefix = system_message + '\\n\\n' if loop.first and system_message else '' %}"
        "{{- '<start_of_turn>' + role + '\\n' + prefix + (message['content'] or '') | trim"
        " + '<end_of_turn>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
    ),
    # Phi-3: <|role|>\ncontent<|end|>\n
    "phi-3": (
        "{%- for message in messages %}"
        "{{- '<|' + message['role'] + '|>\\n' + (message['content'] or '') + '<|end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
    ),
    # Zephyr: <|role|>\ncontent</s>\n
    "zephyr": (
        "{%- for message in messages %}"
        "{{- '<|' + message['role'] + '|>\\n' + (message['content'] or '') + eos_token + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
    ),
    # Alpaca: a preamble, then ### Instruction: / ### Response: blocks.
    "alpaca": (
        _SPLIT_SYSTEM +
        "{{- (system_message or 'Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.') + '\\n\\n' }}"
        "{%- for message in loop_messages %}"
        "{%- if message['role'] == 'user' %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{{- '### Response:\\n' + (message['content'] or '') + eos_token + '\\n\\n' }}"
        "{%- elif message['role'] == 'system' %}" + _SYSTEM_FIRST_ERROR +
        "{%- else %}{{ raise_exception('The alpaca template has no ' + message['role'] + ' role.') }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
    ),
}


def resolve_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None,
                          *, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The jinja source to render with: a built-in name, a jinja string, or (None) the model's own."""
    if chat_template is None:
        if tokenizer.chat_template is None:
            raise InvalidRequestError(
                "This model has no chat template of its own. Pass chat_template= with a built-in name "
                f"({', '.join(BUILTIN_TEMPLATES)}) or a jinja template string.",
                param="chat_template",
                code="invalid_value",
            )
        return tokenizer.get_chat_template(None, tools)
    if chat_template in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[chat_template]
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    raise InvalidRequestError(
        f"Unknown chat template {chat_template!r}. Use a built-in name ({', '.join(BUILTIN_TEMPLATES)}), a "
        "jinja template string, or leave it out for the model's own template.",
        param="chat_template",
        code="invalid_value",
    )


def render_messages(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    *,
    chat_template: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    continue_final_message: bool = False,
    template_vars: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text for ``messages`` (plain dicts, as ``ChatCompletionRequest.template_messages``).

    Ends with the assistant header (generation prompt), or, with ``continue_final_message``, inside
    the final assistant message so the model continues it. ``template_vars`` override the variables
    the template sees (``bos_token``, ``eos_token``, ...). A template error is an InvalidRequestError.
    """
    source = resolve_chat_template(tokenizer, chat_template, tools=tools)
    _check_system_placement(tokenizer, source, messages)
    if template_supports_tools(source):
        messages = [_with_argument_objects(message) for message in messages]
    else:
        from nbchat.chat_format.hermes import inline_tools

        messages, tools = inline_tools(messages, tools), None
    return _render(
        tokenizer, source, messages, tools=tools, continue_final_message=continue_final_message,
        template_vars=template_vars,
    )


@lru_cache(maxsize=64)
def template_supports_tools(source: str) -> bool:
    """Whether a jinja chat template reads the ``tools`` variable (then it renders tools, assistant
    ``tool_calls`` and ``tool`` messages in the model's own format)."""
    import jinja2
    import jinja2.meta
    from jinja2.ext import loopcontrols

    try:
        parsed = jinja2.Environment(extensions=[loopcontrols]).parse(source)
    except jinja2.TemplateSyntaxError:
        # A tag only transformers' environment knows (``{% generation %}``), or a broken template
        # that rendering will report: fall back to looking for the name.
        return re.search(r"\btools\b", source) is not None
    return "tools" in jinja2.meta.find_undeclared_variables(parsed)


def _with_argument_objects(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """An assistant message whose tool calls carry ``arguments`` as objects (HF templates write them
    with ``tojson``; OpenAI sends a JSON string). Arguments that are not a JSON object stay as sent."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                decoded = json.loads(arguments)
            except json.JSONDecodeError:
                decoded = None
            if isinstance(decoded, dict):
                function["arguments"] = decoded
        converted.append({**call, "function": function})
    return {**message, "tool_calls": converted}


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of rendered prompt text. The template already wrote every special token it wants
    (BOS included), so the tokenizer adds none: no double BOS."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def template_allows_late_system(tokenizer: PreTrainedTokenizerBase, source: str) -> bool:
    """Whether the template renders a system message that comes after the conversation started.

    Found by rendering a probe conversation: a template that raises or drops the message does not.
    """
    key = (source, str(tokenizer.bos_token), str(tokenizer.eos_token))
    if key not in _LATE_SYSTEM_CACHE:
        marker = "nbchat-late-system-probe"
        probe = [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "system", "content": marker},
            {"role": "user", "content": "c"},
        ]
        try:
            allowed = marker in _render(tokenizer, source, probe)
        except InvalidRequestError:
            allowed = False
        _LATE_SYSTEM_CACHE[key] = allowed
    return _LATE_SYSTEM_CACHE[key]


_LATE_SYSTEM_CACHE: dict[tuple[str, str, str], bool] = {}


def _check_system_placement(tokenizer: PreTrainedTokenizerBase, source: str,
                            messages: Sequence[Mapping[str, Any]]) -> None:
    started = False
    for index, message in enumerate(messages):
        if message["role"] != "system":
            started = True
        elif started and not template_allows_late_system(tokenizer, source):
            raise InvalidRequestError(
                "A system message after the conversation started is not supported by this chat template. "
                "Move it to the start (before the first user message), merge it into the first system "
                "message, or use a template that allows it (e.g. chat_template='chatml').",
                param=f"messages[{index}].role",
                code="invalid_value",
            )


def _render(tokenizer: PreTrainedTokenizerBase, source: str, messages: Sequence[Mapping[str, Any]], *,
            tools: Sequence[Mapping[str, Any]] | None = None, continue_final_message: bool = False,
            template_vars: Mapping[str, Any] | None = None) -> str:
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            [dict(message) for message in messages],
            tools=[dict(tool) for tool in tools] if tools else None,
            chat_template=source,
            add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
            tokenize=False,
            **dict(template_vars or {}),
        )
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidRequestError(
            f"The chat template is not valid jinja: {exc.message} (line {exc.lineno}). Fix the template, "
            "or use a built-in one by name.",
            param="chat_template",
            code="invalid_value",
        ) from None
    except Exception as exc:  # the template is data: whatever it raises is the request's fault
        reason = exc.message if isinstance(exc, jinja2.TemplateError) and exc.message else str(exc)
        raise InvalidRequestError(
            f"The chat template could not render these messages: {reason}",
            param="messages",
            code="invalid_value",
        ) from exc
