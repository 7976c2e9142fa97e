"""Grammar-constrained decoding (nbchat.engine.constraints) on the real SmolLM2 tokenizer: masks admit
exactly the grammar's continuations, random sampling under the mask always yields valid JSON, stop ids
only where the grammar accepts, a grammar llguidance cannot compile is a GrammarError. (What a request
asks for, and the tool-call grammar, are tested where they are built: test_structured, test_hermes.)"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from nbchat.engine.constraints import COMPACT_JSON, GrammarCompiler, GrammarConstraint, GrammarError

EOS = 2  # <|im_end|>, SmolLM2's end of turn


def allowed_ids(mask: np.ndarray) -> np.ndarray:
    return np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))[0]


def is_allowed(mask: np.ndarray, token_id: int) -> bool:
    return bool((int(mask[token_id // 32]) >> (token_id % 32)) & 1)


def walk(constraint: GrammarConstraint, token_ids: list[int]) -> list[np.ndarray]:
    """Advance through ``token_ids`` asserting each is allowed; return the mask seen before each."""
    masks = []
    for token_id in token_ids:
        mask = constraint.allowed_bitmask()
        assert is_allowed(mask, token_id), f"token {token_id} refused after {len(masks)} tokens"
        masks.append(mask)
        constraint.advance(token_id)
    return masks


def sample_under_mask(backend, constraint: GrammarConstraint, structural_ids: np.ndarray, seed: int,
                      max_steps: int = 400) -> tuple[str, bool]:
    """Random logits, masked: returns (text, ended_with_stop_id)."""
    rng = np.random.default_rng(seed)
    vocab = backend.get_vocab_size()
    token_ids = []
    for _ in range(max_steps):
        mask = constraint.allowed_bitmask()
        allowed = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab].astype(bool)
        logits = rng.standard_normal(vocab)
        if rng.random() < 0.5:
            logits[structural_ids] += 12.0
        token_id = int(np.argmax(np.where(allowed, logits, -np.inf)))
        constraint.advance(token_id)
        if token_id == EOS:
            return backend.decode(token_ids), True
        token_ids.append(token_id)
    return backend.decode(token_ids), False


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}

SCHEMAS = {
    "object": {"type": "object"},
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]},
                       "size": {"type": "string", "enum": ["S", "M"]}},
        "required": ["color", "size"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "person": PERSON,
            "address": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20},
                               "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["person", "address"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                     "minItems": 1, "maxItems": 4},
            "people": {"type": "array", "items": PERSON, "maxItems": 3},
            "point": {"type": "array", "prefixItems": [{"type": "number"}, {"type": "number"}],
                      "items": False, "minItems": 2},
        },
        "required": ["tags", "people", "point"],
        "additionalProperties": False,
    },
    "bounded_numbers": {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "delta": {"type": "integer", "minimum": -5, "maximum": 5},
            "count": {"type": "integer", "minimum": 10},
        },
        "required": ["age", "score", "delta", "count"],
        "additionalProperties": False,
    },
    "refs_and_unions": {
        "$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1},
                                                            "label": {"type": ["string", "null"]}},
                           "required": ["id", "label"], "additionalProperties": False}},
        "type": "object",
        "properties": {
            "kind": {"const": "inventory"},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 3},
            "owner": {"anyOf": [{"type": "null"}, PERSON]},
            "ok": {"type": "boolean"},
        },
        "required": ["kind", "items", "owner", "ok"],
        "additionalProperties": False,
    },
}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_random_sampling_under_the_mask_always_gives_valid_json(backend, compiler, structural_ids, name):
    schema = SCHEMAS[name]
    constraint = compiler.json_schema(schema)
    for seed in range(8):
        constraint.reset()
        text, stopped = sample_under_mask(backend, constraint, structural_ids, seed)
        assert stopped, f"no stop id after 400 tokens: {text!r}"
        jsonschema.validate(json.loads(text), schema)


def test_walking_a_valid_json_text_every_token_is_allowed_and_eos_only_at_the_end(backend, compiler):
    text = '{"person": {"name": "Ada Lovelace", "age": 36}, "address": {"city": "London", "zip": "12345"}}'
    token_ids = backend.encode(text).ids
    constraint = compiler.json_schema(SCHEMAS["nested"])
    masks = walk(constraint, token_ids)
    assert not any(is_allowed(mask, EOS) for mask in masks)
    final = constraint.allowed_bitmask()
    assert is_allowed(final, EOS) and constraint.is_accepting and constraint.is_finished
    assert allowed_ids(final).tolist() == [EOS]  # nothing may follow the closed object
    constraint.advance(EOS)


def test_a_token_the_grammar_forbids_is_not_in_the_mask(backend, compiler):
    constraint = compiler.json_schema(SCHEMAS["enum"])
    walk(constraint, backend.encode('{"color": "').ids)
    mask = constraint.allowed_bitmask()
    assert is_allowed(mask, backend.token_to_id("red"))
    for word in ("yellow", "Red", "}"):
        assert not is_allowed(mask, backend.encode(word).ids[0]), word
    # "size" is required: the object cannot close after the color alone.
    constraint.reset()
    walk(constraint, backend.encode('{"color": "red"').ids)
    assert not is_allowed(constraint.allowed_bitmask(), backend.token_to_id("}"))
    with pytest.raises(RuntimeError, match="violates the grammar"):
        constraint.advance(backend.token_to_id("}"))


def test_an_object_schema_accepts_any_object_and_nothing_else(backend, compiler):
    constraint = compiler.json_schema({"type": "object"})
    first = {backend.decode([int(i)]) for i in allowed_ids(constraint.allowed_bitmask())}
    assert first and all(t.startswith("{") for t in first)
    walk(constraint, backend.encode('{"anything": [1, 2.5, {"x": null}], "ok": true}').ids)
    assert constraint.is_accepting


def test_cut_output_is_a_valid_prefix_and_not_accepting(backend, compiler):
    constraint = compiler.json_schema(PERSON)
    walk(constraint, backend.encode('{"name": "Ada", "age": 3').ids)
    assert not constraint.is_accepting
    assert not is_allowed(constraint.allowed_bitmask(), EOS)


def test_strict_mode_forbids_properties_the_schema_does_not_name(backend, compiler):
    text_ids = backend.encode('{"name": "Ada", "age": 36, "extra": 1}').ids
    from nbchat.plan import strict_schema

    loose = compiler.json_schema(PERSON)
    walk(loose, text_ids)
    strict = compiler.json_schema(strict_schema(PERSON))
    walk(strict, backend.encode('{"name": "Ada", "age": 36').ids)
    mask = strict.allowed_bitmask()
    assert is_allowed(mask, backend.token_to_id("}"))
    assert not any(is_allowed(mask, i) for i in backend.encode(", ").ids[:1])


def test_whitespace_between_json_tokens_is_bounded(backend, compiler):
    constraint = compiler.json_schema(PERSON)
    walk(constraint, backend.encode("{" + " " * 20).ids)
    mask = constraint.allowed_bitmask()
    assert not is_allowed(mask, backend.token_to_id("Ġ"))
    assert is_allowed(mask, backend.token_to_id('"'))


def test_mask_is_padded_to_the_model_vocab_and_extra_rows_are_never_allowed(backend):
    vocab = backend.get_vocab_size()
    for model_vocab in (vocab + 40, vocab - 52):
        compiler = GrammarCompiler(backend, vocab_size=model_vocab, stop_ids=[EOS])
        constraint = compiler.lark("start: /(.|\\n)*/")
        mask = constraint.allowed_bitmask()
        assert mask.dtype == np.int32 and mask.shape == (-(-model_vocab // 32),)
        ids = allowed_ids(mask)
        assert ids.max() < min(vocab, model_vocab)
        assert len(ids) > vocab - 2000  # free text: nearly every ordinary token


def test_every_stop_id_is_allowed_where_the_grammar_accepts(backend):
    compiler = GrammarCompiler(backend, vocab_size=backend.get_vocab_size(), stop_ids=[0, EOS])
    constraint = compiler.regex("(yes|no)")
    assert not is_allowed(constraint.allowed_bitmask(), 0)
    walk(constraint, backend.encode("yes").ids)
    assert allowed_ids(constraint.allowed_bitmask()).tolist() == [0, EOS]


def test_compiler_is_cached_per_tokenizer(backend, compiler):
    again = GrammarCompiler.for_tokenizer(backend, vocab_size=backend.get_vocab_size(), stop_ids=[EOS])
    assert again is compiler
    with pytest.raises(ValueError, match="stop_ids is empty"):
        GrammarCompiler(backend, vocab_size=100, stop_ids=[])


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "strng"}, "Invalid type: strng"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
        ({"$ref": "#/$defs/missing"}, "/$defs/missing"),
        ({"type": "string", "pattern": "(("}, "unclosed group"),
        (["not", "a", "schema"], "expected a JSON schema object"),
    ],
)
def test_a_schema_llguidance_cannot_compile_is_a_grammar_error(compiler, schema, message):
    with pytest.raises(GrammarError) as info:
        compiler.json_schema(schema)
    assert message in str(info.value)


def test_invalid_lark_grammar_is_a_grammar_error(compiler):
    with pytest.raises(GrammarError, match="missing_rule"):
        compiler.lark("start: missing_rule")


def test_compact_json_allows_no_whitespace(backend, compiler):
    constraint = compiler.json_schema(PERSON, options=COMPACT_JSON)
    walk(constraint, backend.encode('{"name":"Ada","age":36}').ids)
    assert constraint.is_accepting
    constraint.reset()
    walk(constraint, backend.encode('{"name":').ids)
    assert not is_allowed(constraint.allowed_bitmask(), backend.token_to_id("Ġ"))
