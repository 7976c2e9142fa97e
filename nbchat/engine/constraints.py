"""Grammar-constrained decoding: JSON mode, JSON schemas, Lark/regex grammars and tool-call grammars
compiled with llguidance into per-step token bitmasks.

``GrammarCompiler`` is built once per loaded model (it wraps the model's tokenizer for llguidance,
~0.3 s, and is cached per tokenizer by ``GrammarCompiler.for_tokenizer``); each request gets a fresh
``GrammarConstraint`` from it (~1 ms). A ``GrammarConstraint`` implements the engine's
``TokenConstraint`` protocol: ``allowed_bitmask()`` before each sampling step, ``advance(token_id)``
after it. Stop ids are allowed only where the grammar accepts, and ids past the tokenizer's vocabulary
(padding rows of the embedding) are never allowed.

This module knows nothing of OpenAI's request shapes beyond the two dictionaries it is given
(``response_format`` and ``tools``); the chat API validates requests and decides which constraint to
build. Tool calls use the Hermes/Qwen syntax that ``nbchat.tools`` parses::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
"""

from __future__ import annotations

import copy
import json
import re
import threading
import weakref
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import llguidance
import numpy as np

from nbchat.errors import InvalidRequestError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# Whitespace the JSON grammar allows between JSON tokens, at most this much per gap. Unbounded
# whitespace lets a small model emit newlines until max_tokens; 20 characters still admit
# pretty-printing several levels deep. A schema's own "x-guidance" options override this.
JSON_COMPILE_DEFAULTS: dict[str, Any] = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}

# The keys of a JSON schema whose values are schemas / maps of schemas / lists of schemas; used to
# walk a schema for OpenAI's strict mode.
_SUBSCHEMA_KEYS = ("additionalProperties", "items", "contains", "not", "if", "then", "else",
                   "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems")


class GrammarConstraint:
    """One request's grammar state: the engine's ``TokenConstraint`` over an llguidance matcher.

    Not thread-safe and single-use: build one per generated choice (or call ``reset()``).
    """

    def __init__(self, matcher: llguidance.LLMatcher, *, vocab_size: int, mask_vocab_size: int,
                 description: str):
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._mask_vocab_size = mask_vocab_size
        self.description = description

    def __repr__(self) -> str:
        return f"GrammarConstraint({self.description}, accepting={self.is_accepting})"

    def allowed_bitmask(self) -> np.ndarray:
        """Packed int32 bitmask [ceil(vocab_size / 32)] of the tokens allowed next (bit i of word j
        allows token 32*j+i). Stop ids are set only where the grammar accepts."""
        # The matcher's vocabulary is max(model, tokenizer) vocab, so its mask already has zero bits
        # for embedding rows the tokenizer does not know. A fresh array each step: the engine may
        # hand it to the device without copying.
        words = -(-self._mask_vocab_size // 32)
        mask = np.zeros(words, dtype=np.int32)
        self._matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        if self._matcher.is_error():
            raise RuntimeError(f"grammar-constrained decoding failed: {self._matcher.get_error()}")
        model_words = -(-self.vocab_size // 32)
        if model_words < words:  # the tokenizer knows ids the model cannot produce
            mask = mask[:model_words].copy()
            if self.vocab_size % 32:
                mask[-1] &= np.int32(np.uint32((1 << (self.vocab_size % 32)) - 1).view(np.int32))
        return mask

    def advance(self, token_id: int) -> None:
        """Consume the sampled token; a token the mask did not allow is an engine bug."""
        if not self._matcher.consume_token(int(token_id)):
            raise RuntimeError(f"token {token_id} violates the grammar ({self.description}): "
                               f"{self._matcher.get_error()}")

    @property
    def is_accepting(self) -> bool:
        """True when the text so far is a complete sentence of the grammar (a stop id may follow).
        False after a max_tokens cut means the text is only a valid prefix."""
        return self._matcher.is_accepting()

    @property
    def is_finished(self) -> bool:
        """True when nothing but a stop id may follow (the grammar is complete and closed)."""
        return self._matcher.is_stopped()

    def forced_text(self) -> bytes:
        """Bytes the grammar forces next whatever the model does (for fast-forwarding)."""
        return self._matcher.compute_ff_bytes()

    def reset(self) -> None:
        """Back to the initial state, for the next choice of the same request."""
        self._matcher.reset()


class GrammarCompiler:
    """Compiles grammars against one model's tokenizer; build once per loaded model.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or a transformers fast tokenizer (anything with
    ``backend_tokenizer``); ``vocab_size`` is the model's (embedding rows, which may exceed the
    tokenizer's vocabulary); ``stop_ids`` are the ids that end generation (EOS, ``<|im_end|>``).
    """

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _cache_lock = threading.Lock()

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_ids: Collection[int]):
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not hasattr(backend, "to_str"):
            raise TypeError(f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, "
                            f"got {type(tokenizer).__name__}")
        stop_ids = sorted({int(i) for i in stop_ids})
        if not stop_ids:
            raise ValueError("stop_ids is empty: a constrained generation needs a stop token to end on")
        # Serialise a copy without padding/truncation (they would change what a token id means).
        backend = copy.copy(backend)
        backend.no_padding()
        backend.no_truncation()
        tokenizer_size = backend.get_vocab_size(with_added_tokens=True)
        if stop_ids[-1] >= max(vocab_size, tokenizer_size):
            raise ValueError(f"stop id {stop_ids[-1]} is outside the vocabulary ({vocab_size})")
        self.vocab_size = int(vocab_size)
        self.stop_ids = tuple(stop_ids)
        self._lltokenizer = llguidance.LLTokenizer(
            backend.to_str(), n_vocab=max(self.vocab_size, tokenizer_size), eos_token=list(stop_ids))

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, *, vocab_size: int, stop_ids: Collection[int]) -> GrammarCompiler:
        """The cached compiler of this tokenizer object (built on first use, dropped with it)."""
        key = (int(vocab_size), frozenset(int(i) for i in stop_ids))
        with cls._cache_lock:
            per_tokenizer = cls._cache.setdefault(tokenizer, {})
            compiler = per_tokenizer.get(key)
            if compiler is None:
                compiler = per_tokenizer[key] = cls(tokenizer, vocab_size=vocab_size, stop_ids=stop_ids)
        return compiler

    # -- building blocks -------------------------------------------------------------------------

    def _constraint(self, grammar: str, *, param: str, description: str) -> GrammarConstraint:
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"Invalid {description} for {param}: {matcher.get_error()}",
                                      param=param, code="invalid_value")
        return GrammarConstraint(matcher, vocab_size=self.vocab_size,
                                 mask_vocab_size=self._lltokenizer.vocab_size, description=description)

    def _check_schema(self, schema: Any, *, strict: bool, param: str) -> dict:
        """The schema as llguidance will compile it, or InvalidRequestError naming ``param``."""
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, Mapping):
            raise InvalidRequestError(f"Invalid schema for {param}: expected a JSON schema object, got "
                                      f"{type(schema).__name__}.", param=param, code="invalid_value")
        schema = _strict_schema(schema) if strict else dict(schema)
        options = {**JSON_COMPILE_DEFAULTS, **(schema.get("x-guidance") or {})}
        schema["x-guidance"] = options
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        except ValueError as exc:  # not serialisable as a JSON object
            raise InvalidRequestError(f"Invalid schema for {param}: {exc}", param=param,
                                      code="invalid_value") from exc
        error = llguidance.LLMatcher.validate_grammar(grammar, self._lltokenizer)
        if error:
            raise InvalidRequestError(f"Invalid schema for {param}: {error}", param=param,
                                      code="invalid_value")
        return schema

    # -- constraints ------------------------------------------------------------------------------

    def json_object(self) -> GrammarConstraint:
        """Any JSON object (``response_format={"type": "json_object"}``)."""
        return self.json_schema({"type": "object"}, description="JSON object")

    def json_schema(self, schema: Mapping[str, Any], *, strict: bool = False, param: str = "response_format",
                    description: str = "JSON schema") -> GrammarConstraint:
        """A JSON value valid for ``schema``. ``strict`` is OpenAI's strict mode: objects that do not
        say otherwise get ``additionalProperties: false``. A schema that is invalid or that llguidance
        cannot compile raises InvalidRequestError naming ``param``."""
        checked = self._check_schema(schema, strict=strict, param=param)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(checked)
        return self._constraint(grammar, param=param, description=description)

    def response_format(self, response_format: Mapping[str, Any] | None) -> GrammarConstraint | None:
        """The constraint for OpenAI's ``response_format`` (None for ``text`` or no format). A
        ``json_schema`` format without a schema means any JSON object, as ``json_object`` does."""
        spec = _response_schema(response_format)
        if spec is None:
            return None
        schema, strict, description = spec
        return self.json_schema(schema, strict=strict, param="response_format", description=description)

    def lark(self, grammar: str, *, param: str = "grammar") -> GrammarConstraint:
        """Text matching a Lark grammar (llguidance's dialect, with ``%json`` sub-grammars)."""
        return self._constraint(llguidance.LLMatcher.grammar_from_lark(grammar), param=param,
                                description="Lark grammar")

    def regex(self, pattern: str, *, param: str = "regex") -> GrammarConstraint:
        """Text matching a regular expression (Rust ``regex`` syntax), anchored at both ends."""
        return self._constraint(llguidance.LLMatcher.grammar_from_regex(pattern), param=param,
                                description="regular expression")

    def tool_calls(self, tools: Sequence[Mapping[str, Any]], tool_choice: str | Mapping[str, Any] = "auto",
                   *, parallel_tool_calls: bool = True,
                   response_format: Mapping[str, Any] | None = None) -> GrammarConstraint | None:
        """The constraint for OpenAI ``tools`` + ``tool_choice`` in the Hermes/Qwen syntax.

        - ``"none"``: None (no constraint; the caller does not parse tool calls).
        - ``"auto"``: free text, or text followed by tool calls; once ``<tool_call>`` appears, the
          call must name one of the tools and its arguments must match that tool's schema.
        - ``"required"``: only tool calls (to any of the tools).
        - ``{"type": "function", "function": {"name": N}}``: exactly one call to N.

        ``parallel_tool_calls`` allows several calls in a row (one otherwise; always one for a named
        choice). With ``"auto"``, a JSON ``response_format`` replaces the free text: the reply is
        either that JSON or tool calls. Errors name ``tools[i].function.parameters``,
        ``tool_choice`` or ``response_format``. ``tool_choice`` may be a pydantic model of the dict.
        """
        functions = _tool_functions(tools)
        if hasattr(tool_choice, "model_dump"):  # the protocol's NamedToolChoice
            tool_choice = tool_choice.model_dump()
        if tool_choice == "none":
            return None
        if isinstance(tool_choice, Mapping):
            name = (tool_choice.get("function") or {}).get("name")
            indices = [i for i, fn in enumerate(functions) if fn["name"] == name]
            if not indices:
                raise InvalidRequestError(
                    f"Tool choice {name!r} is not among the given tools: "
                    f"{[fn['name'] for fn in functions]}.", param="tool_choice", code="invalid_value")
            mode, parallel_tool_calls = "named", False
        elif tool_choice in ("auto", "required"):
            indices, mode = list(range(len(functions))), tool_choice
        else:
            raise InvalidRequestError(
                f"Invalid tool_choice {tool_choice!r}: expected 'none', 'auto', 'required' or "
                "{'type': 'function', 'function': {'name': ...}}.", param="tool_choice", code="invalid_value")

        bodies = []
        for i in indices:
            fn = functions[i]
            param = f"tools[{i}].function.parameters"
            schema = self._check_schema(fn["parameters"], strict=fn["strict"], param=param)
            prefix = json.dumps({"name": fn["name"], "arguments": None})[: -len("null}")]
            bodies.append(f"fn_{i}: {json.dumps(prefix)} %json {json.dumps(schema)} \"}}\"")

        open_tag, close_tag = (self._lark_token(TOOL_CALL_OPEN), self._lark_token(TOOL_CALL_CLOSE))
        more_calls = '("\\n" call)*' if parallel_tool_calls else ""
        lines = ["%llguidance {}"]
        content_spec = _response_schema(response_format) if mode == "auto" else None
        if content_spec is not None:
            schema, strict, _ = content_spec
            content_schema = self._check_schema(schema, strict=strict, param="response_format")
            lines += [f"start: content | call {more_calls}", f"content: %json {json.dumps(content_schema)}"]
        elif mode == "auto":
            # A lazy lexeme ends at the first trigger, so free text can never run past "<tool_call>";
            # a special-token trigger cannot occur inside TEXT at all.
            if open_tag.startswith('"'):
                lines += [f"start: TEXT | text_then_open call_rest {more_calls}",
                          f"text_then_open[lazy]: TEXT {open_tag}"]
            else:
                lines += [f"start: TEXT | TEXT {open_tag} call_rest {more_calls}"]
            lines += ["TEXT: /(.|\\n)*/"]
        else:
            lines += [f"start: call {more_calls}"]
        lines += [f"call: {open_tag} call_rest",
                  f'call_rest: "\\n" call_body "\\n" {close_tag}',
                  "call_body: " + " | ".join(f"fn_{i}" for i in indices),
                  *bodies]
        description = {"auto": "tool calls (auto)", "required": "tool calls (required)"}.get(
            mode, f"tool call to {functions[indices[0]]['name']!r}")
        if content_spec is not None:
            description = f"tool calls (auto) or {content_spec[2]}"
        return self._constraint(llguidance.LLMatcher.grammar_from_lark("\n".join(lines)),
                                param="tools", description=description)

    def _lark_token(self, text: str) -> str:
        """``text`` as a Lark item: a special-token reference when the tokenizer has it as one special
        token (it is then never produced as plain text), else a string literal."""
        ids = self._lltokenizer.tokenize_str(text, parse_special=True)
        if len(ids) == 1 and self._lltokenizer.is_special_token(ids[0]):
            return text
        return json.dumps(text)


def _response_schema(response_format: Mapping[str, Any] | None) -> tuple[Any, bool, str] | None:
    """(schema, strict, description) of an OpenAI ``response_format``; None for text."""
    if response_format is None:
        return None
    if hasattr(response_format, "model_dump"):  # the protocol's pydantic model of it
        response_format = response_format.model_dump(by_alias=True)
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}, False, "JSON object"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping):
            raise InvalidRequestError(
                "response_format.json_schema is required when response_format.type is 'json_schema'.",
                param="response_format.json_schema", code="missing_required_parameter")
        if spec.get("schema") is None:
            return {"type": "object"}, False, "JSON object"
        return spec["schema"], bool(spec.get("strict")), "JSON schema"
    raise InvalidRequestError(
        f"Invalid response_format.type {kind!r}: expected 'text', 'json_object' or 'json_schema'.",
        param="response_format", code="invalid_value")


def _tool_functions(tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    """name / parameters / strict of each OpenAI tool, with errors naming the field."""
    if not tools:
        raise InvalidRequestError("tools must be a non-empty list when a tool-call grammar is built.",
                                  param="tools", code="invalid_value")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(fn, Mapping) or tool.get("type", "function") != "function":
            raise InvalidRequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}.",
                                      param=f"tools[{i}]", code="invalid_value")
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME_PATTERN.match(name):
            raise InvalidRequestError(
                f"Invalid tools[{i}].function.name {name!r}: it must match ^[a-zA-Z0-9_-]{{1,64}}$.",
                param=f"tools[{i}].function.name", code="invalid_value")
        # OpenAI: omitting parameters defines a function with an empty parameter list.
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}, "additionalProperties": False}
        functions.append({"name": name, "parameters": parameters, "strict": bool(fn.get("strict"))})
    return functions


def _strict_schema(schema: Mapping[str, Any]) -> dict:
    """A copy of ``schema`` where every object schema without ``additionalProperties`` forbids extra
    properties (OpenAI strict mode)."""
    out = dict(schema)
    types = out.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_KEYS:
        if isinstance(out.get(key), Mapping):
            out[key] = _strict_schema(out[key])
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: _strict_schema(v) if isinstance(v, Mapping) else v for k, v in out[key].items()}
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [_strict_schema(v) if isinstance(v, Mapping) else v for v in out[key]]
    if isinstance(out.get("items"), list):  # draft-04 tuple form
        out["items"] = [_strict_schema(v) if isinstance(v, Mapping) else v for v in out["items"]]
    return out
