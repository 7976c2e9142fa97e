"""Grammar-constrained decoding: grammars (JSON schemas, Lark, regular expressions) compiled with
llguidance into per-step token bitmasks.

``GrammarCompiler`` is built once per loaded model (it wraps the model's tokenizer for llguidance
with ``llguidance.hf.from_tokenizer``, ~0.3 s, and is cached per tokenizer by
``GrammarCompiler.for_tokenizer``); each generation gets a fresh ``GrammarConstraint`` from it
(~1 ms). A ``GrammarConstraint`` implements the engine's ``TokenConstraint`` protocol:
``allowed_bitmask()`` before each sampling step, ``advance(token_id)`` after it. Stop ids are allowed
only where the grammar accepts, and ids past the tokenizer's vocabulary (padding rows of the
embedding) are never allowed.

A grammar llguidance cannot compile is a ``GrammarError`` (a plain ValueError): this module knows no
request fields. Reading OpenAI's ``response_format`` / ``tools`` / ``tool_choice`` and the tool-call
syntax of a model family are the chat API's (``nbchat.plan``, ``nbchat.chat_format``).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Collection, Mapping
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

# Whitespace the JSON grammar allows between JSON tokens, at most this much per gap. Unbounded
# whitespace lets a small model emit newlines until max_tokens; 20 characters still admit
# pretty-printing several levels deep. A schema's own "x-guidance" options override this.
JSON_COMPILE_DEFAULTS: dict[str, Any] = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}
# No whitespace at all (``{"city":"Paris"}``): for JSON nobody reads as it streams (tool arguments).
COMPACT_JSON: dict[str, Any] = {"whitespace_flexible": False, "whitespace_pattern": None}


class GrammarError(ValueError):
    """A grammar (or JSON schema) that llguidance cannot compile; the message says why."""


class GrammarConstraint:
    """One generation's grammar state: the engine's ``TokenConstraint`` over an llguidance matcher.

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
        masks = llguidance.numpy.allocate_token_bitmask(1, self._mask_vocab_size)
        llguidance.numpy.fill_next_token_bitmask(self._matcher, masks, 0)
        if self._matcher.is_error():
            raise RuntimeError(f"grammar-constrained decoding failed: {self._matcher.get_error()}")
        mask = masks[0]
        model_words = -(-self.vocab_size // 32)
        if model_words < len(mask):  # the tokenizer knows ids the model cannot produce
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

    ``tokenizer`` is a transformers fast tokenizer or a ``tokenizers.Tokenizer``; ``vocab_size`` is
    the model's (embedding rows, which may exceed the tokenizer's vocabulary); ``stop_ids`` are the
    ids that end generation (EOS, ``<|im_end|>``).
    """

    _cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _cache_lock = threading.Lock()

    def __init__(self, tokenizer: Any, *, vocab_size: int, stop_ids: Collection[int]):
        from transformers import PreTrainedTokenizerFast

        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            if not hasattr(tokenizer, "to_str"):
                raise TypeError(f"expected a tokenizers.Tokenizer or a transformers fast tokenizer, "
                                f"got {type(tokenizer).__name__}")
            tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
        stop_ids = sorted({int(i) for i in stop_ids})
        if not stop_ids:
            raise ValueError("stop_ids is empty: a constrained generation needs a stop token to end on")
        tokenizer_size = tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=True)
        if stop_ids[-1] >= max(vocab_size, tokenizer_size):
            raise ValueError(f"stop id {stop_ids[-1]} is outside the vocabulary ({vocab_size})")
        self.vocab_size = int(vocab_size)
        self.stop_ids = tuple(stop_ids)
        self._lltokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=max(self.vocab_size, tokenizer_size), eos_token=list(stop_ids))

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

    def is_special_token(self, text: str) -> bool:
        """Whether ``text`` is one special token of the tokenizer (a grammar then names the token
        itself: it is never produced as plain text)."""
        ids = self._lltokenizer.tokenize_str(text, parse_special=True)
        return len(ids) == 1 and self._lltokenizer.is_special_token(ids[0])

    def checked_json_schema(self, schema: Any, options: Mapping[str, Any] | None = None) -> dict:
        """``schema`` with its llguidance compile options (``options`` over JSON_COMPILE_DEFAULTS,
        the schema's own ``x-guidance`` over both), as a Lark ``%json`` item or ``json_schema`` takes
        it; GrammarError when it is no schema llguidance compiles."""
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if not isinstance(schema, Mapping):
            raise GrammarError(f"expected a JSON schema object, got {type(schema).__name__}")
        schema = dict(schema)
        own_options = schema.get("x-guidance") or {}
        schema["x-guidance"] = {**JSON_COMPILE_DEFAULTS, **(options or {}), **own_options}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        except ValueError as exc:  # not serialisable as a JSON object
            raise GrammarError(str(exc)) from exc
        error = llguidance.LLMatcher.validate_grammar(grammar, self._lltokenizer)
        if error:
            raise GrammarError(error)
        return schema

    def json_schema(self, schema: Any, *, options: Mapping[str, Any] | None = None,
                    description: str = "JSON schema") -> GrammarConstraint:
        """A JSON value valid for ``schema`` (``{"type": "object"}``: any JSON object)."""
        checked = self.checked_json_schema(schema, options)
        return self._constraint(llguidance.LLMatcher.grammar_from_json_schema(checked), description)

    def lark(self, grammar: str, *, description: str = "Lark grammar") -> GrammarConstraint:
        """Text matching a Lark grammar (llguidance's dialect, with ``%json`` sub-grammars)."""
        return self._constraint(llguidance.LLMatcher.grammar_from_lark(grammar), description)

    def regex(self, pattern: str, *, description: str = "regular expression") -> GrammarConstraint:
        """Text matching a regular expression (Rust ``regex`` syntax), anchored at both ends."""
        return self._constraint(llguidance.LLMatcher.grammar_from_regex(pattern), description)

    def _constraint(self, grammar: str, description: str) -> GrammarConstraint:
        matcher = llguidance.LLMatcher(self._lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {description}: {matcher.get_error()}")
        return GrammarConstraint(matcher, vocab_size=self.vocab_size,
                                 mask_vocab_size=self._lltokenizer.vocab_size, description=description)
