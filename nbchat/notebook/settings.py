"""The chat settings, described once: ``ChatSettings``' traits give each setting's type, default and
help; the setting table (``SETTINGS``, ``REQUEST_SETTINGS``, ``SET_KEYS``) and the parsing of
``%chat set KEY=VALUE`` (the trait's ``from_string``) are read off them.

Must not: parse ``%%chat`` options or build requests (``options``), keep state or load models.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from typing import Any

from IPython.core.error import UsageError
from traitlets import Bool, Enum, Float, Int, List, TraitError, TraitType, Unicode
from traitlets.config import Configurable

from nbchat.models import DEFAULT_MODEL
from nbchat.notebook.render import FORMATS


class ChatSettings(Configurable):
    """Every chat setting, described once as a trait: its type (``%chat set`` parses a value with the
    trait's ``from_string``), default and help (``%config ChatMagics`` shows it). A trait tagged
    ``setting`` is a key of ``%chat set`` that a cell option can override, in this order; one tagged
    ``request`` is sent as the chat completion request field of its name."""

    model = Unicode(
        DEFAULT_MODEL,
        help="Model for new chats: a registry name, a .gguf path, a model directory, or an OpenAI-compatible "
        "endpoint's URL (http://host:8000/v1, or NAME@URL for one of its models).",
    ).tag(config=True, setting=True)
    base_url = Unicode(
        None, allow_none=True,
        help="An OpenAI-compatible endpoint (e.g. http://host:8000/v1) that serves every chat whose model is "
        "not itself a URL: the default model means the endpoint's first, NAME means NAME there.",
    ).tag(config=True)
    api_key = Unicode(
        None, allow_none=True,
        help="API key for remote endpoints; None: $NBCHAT_API_KEY, else $OPENAI_API_KEY. Never saved "
        "with a conversation, shown masked.",
    ).tag(config=True)
    dtype = Unicode(
        None, allow_none=True, help="Weight dtype (float32 or bfloat16); None: the engine's default."
    ).tag(config=True)
    system_prompt = Unicode(
        None, allow_none=True, help="System prompt of conversations that set none themselves."
    ).tag(config=True)
    temperature = Float(
        None, allow_none=True, help="Sampling temperature (0 = greedy); None: the engine's default."
    ).tag(config=True, setting=True, request=True)
    top_p = Float(None, allow_none=True, help="Nucleus sampling mass; None: off.").tag(
        config=True, setting=True, request=True
    )
    top_k = Int(None, allow_none=True, help="Sample among the k most likely tokens; None: off.").tag(
        config=True, setting=True, request=True
    )
    max_tokens = Int(
        512, allow_none=True, help="Most tokens in one reply; None: up to the context length."
    ).tag(config=True, setting=True, request=True)
    stop = List(Unicode(), help="Strings that end a reply.").tag(config=True, setting=True, request=True)
    seed = Int(
        None, allow_none=True, help="Sampling seed for reproducible replies; None: fresh randomness."
    ).tag(config=True, setting=True, request=True)
    format = Enum(list(FORMATS), default_value="markdown", help="How replies are shown.").tag(
        config=True, setting=True
    )
    stream = Bool(True, help="Show the reply as it is generated.").tag(config=True, setting=True)
    interpolate = Bool(True, help="Replace {name}, {In[n]}, {Out[n]} in cells with their values.").tag(
        config=True, setting=True
    )
    max_tool_steps = Int(
        5, help="Most rounds of running tool calls and sending their results back in one exchange."
    ).tag(config=True, setting=True)


def _traits_tagged(tag: str) -> tuple[str, ...]:
    """The names of ChatSettings' traits tagged ``tag``, in definition order."""
    traits = vars(ChatSettings).items()
    return tuple(name for name, trait in traits if isinstance(trait, TraitType) and trait.metadata.get(tag))


# Every setting `%chat set` accepts and a cell option can override, in display order.
SETTINGS = _traits_tagged("setting")
# Request fields a setting maps to one-to-one (None = not sent: the engine's default applies).
REQUEST_SETTINGS = _traits_tagged("request")
# What `%chat set` accepts: the settings, and the conversation's system prompt and name.
SET_KEYS = (*SETTINGS, "system", "conversation")


def suggest(name: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to a mistyped ``name``, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def decode_escapes(text: str) -> str:
    """``\\n``, ``\\t`` and ``\\\\`` in an option value, so ``--stop "\\n\\n"`` means two newlines."""
    return text.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")


def _expected(trait: TraitType) -> str:
    if isinstance(trait, Enum):
        return f"one of {', '.join(map(str, trait.values))}"
    if isinstance(trait, List):
        return "a string or a JSON list of strings"
    return {Float: "a number", Int: "an integer", Bool: "true or false"}.get(type(trait), "a string")


def parse_setting(key: str, text: str) -> Any:
    """The value of ``%chat set KEY=TEXT``, parsed by the setting's trait (None = remove)."""
    if text.strip().lower() in ("none", "null", "default", ""):
        return None
    trait = ChatSettings.class_traits()[key]
    try:
        if isinstance(trait, List):  # a JSON list of strings, or one string with escapes decoded
            value = json.loads(text) if text.lstrip().startswith("[") else [decode_escapes(text)]
        else:
            value = trait.from_string(text if isinstance(trait, Unicode) else text.strip())
        probe = ChatSettings()  # the trait validates (and converts) the value as %config would
        setattr(probe, key, value)
        value = getattr(probe, key)
    except (ValueError, TypeError, TraitError):
        raise UsageError(f"{key} must be {_expected(trait)}, not {text!r}") from None
    if key == "max_tool_steps":
        check_tool_steps(value, key)
    return value


def parse_set_words(words: list[str]) -> dict[str, Any]:
    """``%chat set``'s ``KEY=VALUE`` words as ``{key: value}``: settings converted to their types
    (None = remove), ``system`` and ``conversation`` as written."""
    if not words:
        raise UsageError(f"%chat set needs KEY=VALUE pairs; keys: {', '.join(SET_KEYS)}")
    updates: dict[str, Any] = {}
    for word in words:
        key, equals, value = word.partition("=")
        key = key.strip().replace("-", "_")
        if not equals:
            raise UsageError(f"%chat set: expected KEY=VALUE, got {word!r}")
        if key not in SET_KEYS:
            raise UsageError(
                f"unknown setting {key!r}{suggest(key, SET_KEYS)}; settings: {', '.join(SET_KEYS)}"
            )
        updates[key] = value if key in ("system", "conversation") else parse_setting(key, value)
    return updates


def check_tool_steps(steps: int, name: str) -> int:
    if steps < 0:
        raise UsageError(f"{name} must be 0 or more (0: show tool calls, never run them), not {steps}")
    return steps
