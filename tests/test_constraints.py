"""Grammar-constrained decoding (nbchat.engine.constraints) on the real SmolLM2 tokenizer: masks admit
exactly the grammar's continuations, random sampling under the mask always yields valid JSON, stop ids
only where the grammar accepts, tool-call grammars per tool_choice, errors name the field."""

from __future__ import annotations

import copy
import json

import jsonschema
import numpy as np
import pytest

from nbchat.engine.constraints import GrammarCompiler, GrammarConstraint
from nbchat.errors import InvalidRequestError

EOS = 2  # <|im_end|>, SmolLM2's end of turn


@pytest.fixture(scope="module")
def backend():
    """SmolLM2's tokenizers.Tokenizer, read from the cached GGUF (no model weights)."""
    from nbchat.models import resolve
    from nbchat.tokenizer import load_tokenizer

    return load_tokenizer(resolve(progress=False).path).backend_tokenizer


@pytest.fixture(scope="module")
def compiler(backend) -> GrammarCompiler:
    return GrammarCompiler.for_tokenizer(backend, vocab_size=backend.get_vocab_size(), stop_ids=[EOS])


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


@pytest.fixture(scope="module")
def structural_ids(backend) -> np.ndarray:
    """Token ids whose text closes or separates JSON (quote, brace, bracket, comma) plus EOS; the
    random sampler favours them half the time so that strings, numbers and arrays end."""
    texts = backend.decode_batch([[i] for i in range(backend.get_vocab_size())])
    ids = [i for i, t in enumerate(texts) if any(c in t for c in '"}],')]
    return np.array(sorted(set(ids) | {EOS}))


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


def test_json_object_mode_accepts_any_object_and_nothing_else(backend, compiler):
    constraint = compiler.json_object()
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
    loose = compiler.json_schema(PERSON, strict=False)
    walk(loose, text_ids)
    strict = compiler.json_schema(PERSON, strict=True)
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


def test_response_format_dispatch(compiler):
    assert compiler.response_format(None) is None
    assert compiler.response_format({"type": "text"}) is None
    assert compiler.response_format({"type": "json_object"}).description == "JSON object"
    spec = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    assert compiler.response_format(spec).description == "JSON schema"
    # OpenAI's json_schema.schema is optional: without one, any JSON object
    assert compiler.response_format({"type": "json_schema", "json_schema": {"name": "x"}}).description == \
        "JSON object"


@pytest.mark.parametrize(
    ("response_format", "param", "message"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}},
         "response_format", "Invalid type: strng"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5,
                                                                         "maximum": 1}}},
         "response_format", "minimum (5) is greater than maximum (1)"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
         "response_format", "/$defs/missing"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
         "response_format", "unclosed group"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": ["not", "a", "schema"]}},
         "response_format", "expected a JSON schema object"),
        ({"type": "json_schema"}, "response_format.json_schema", "required"),
        ({"type": "yaml"}, "response_format", "Invalid response_format.type 'yaml'"),
    ],
)
def test_invalid_response_format_is_an_invalid_request(compiler, response_format, param, message):
    with pytest.raises(InvalidRequestError) as info:
        compiler.response_format(response_format)
    assert info.value.param == param
    assert message in info.value.message


def test_invalid_lark_grammar_is_an_invalid_request(compiler):
    with pytest.raises(InvalidRequestError) as info:
        compiler.lark("start: missing_rule", param="grammar")
    assert info.value.param == "grammar" and "missing_rule" in info.value.message


# -- tool calls -----------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "a } in a description"},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "now"}}  # no parameters: an empty argument object
TOOLS = [WEATHER, CLOCK]

WEATHER_CALL = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
                "\n</tool_call>")
CLOCK_CALL = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'


def accepts(backend, constraint: GrammarConstraint, text: str) -> bool:
    """Whether every token of ``text`` is allowed and the grammar then accepts (stop id allowed)."""
    constraint.reset()
    for token_id in backend.encode(text).ids:
        if not is_allowed(constraint.allowed_bitmask(), token_id):
            return False
        constraint.advance(token_id)
    return constraint.is_accepting and is_allowed(constraint.allowed_bitmask(), EOS)


@pytest.mark.parametrize(
    ("text", "auto", "required", "named_clock", "required_single"),
    [
        ("The weather is nice.", True, False, False, False),
        (WEATHER_CALL, True, True, False, True),
        (CLOCK_CALL, True, True, True, True),
        ("Let me look.\n" + WEATHER_CALL, True, False, False, False),
        (WEATHER_CALL + "\n" + CLOCK_CALL, True, True, False, False),
        (CLOCK_CALL + "\n" + CLOCK_CALL, True, True, False, False),
        (WEATHER_CALL.replace('"celsius"', '"kelvin"'), False, False, False, False),
        (WEATHER_CALL.replace(', "unit": "celsius"', ""), False, False, False, False),
        (CLOCK_CALL.replace("{}", '{"tz": "UTC"}'), False, False, False, False),
        (CLOCK_CALL.replace('"now"', '"sleep"'), False, False, False, False),
        (CLOCK_CALL + " and some text after it", False, False, False, False),
        ("Text that mentions <tool_call> but then rambles", False, False, False, False),
    ],
)
def test_tool_call_grammar_per_tool_choice(backend, compiler, text, auto, required, named_clock,
                                           required_single):
    assert accepts(backend, compiler.tool_calls(TOOLS, "auto"), text) is auto
    assert accepts(backend, compiler.tool_calls(TOOLS, "required"), text) is required
    named = compiler.tool_calls(TOOLS, {"type": "function", "function": {"name": "now"}})
    assert accepts(backend, named, text) is named_clock
    single = compiler.tool_calls(TOOLS, "required", parallel_tool_calls=False)
    assert accepts(backend, single, text) is required_single


def test_auto_tool_choice_with_a_json_response_format(backend, compiler):
    response_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    constraint = compiler.tool_calls(TOOLS, "auto", response_format=response_format)
    assert accepts(backend, constraint, '{"name": "Ada", "age": 36}')
    assert accepts(backend, constraint, CLOCK_CALL + "\n" + WEATHER_CALL)
    assert not accepts(backend, constraint, "The weather is nice.")
    assert not accepts(backend, constraint, '{"name": "Ada"}')
    assert not accepts(backend, constraint, '{"name": "Ada", "age": 36}' + CLOCK_CALL)
    bad_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": 1}}}
    with pytest.raises(InvalidRequestError) as info:
        compiler.tool_calls(TOOLS, "auto", response_format=bad_format)
    assert info.value.param == "response_format"


def test_tool_choice_may_be_a_pydantic_model(backend, compiler):
    from pydantic import BaseModel

    class Function(BaseModel):
        name: str

    class NamedToolChoice(BaseModel):
        type: str
        function: Function

    named = compiler.tool_calls(TOOLS, NamedToolChoice(type="function", function=Function(name="now")))
    assert accepts(backend, named, CLOCK_CALL) and not accepts(backend, named, WEATHER_CALL)


def test_tool_choice_none_builds_no_constraint(compiler):
    assert compiler.tool_calls(TOOLS, "none") is None


def test_forced_tool_call_fast_forwards_to_the_arguments(compiler):
    named = compiler.tool_calls(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named.forced_text() == b'<tool_call>\n{"name": "get_weather", "arguments": {'
    assert compiler.tool_calls(TOOLS, "required").forced_text() == b'<tool_call>\n{"name": "'


def test_sampled_tool_calls_parse_and_match_their_schemas(backend, compiler, structural_ids):
    from nbchat.tools import parse_tool_calls

    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in TOOLS}
    # In auto mode the model writes some text, then opens a call: from there the mask takes over.
    for choice, prefix in [("required", ""), ({"type": "function", "function": {"name": "get_weather"}}, ""),
                           ("auto", "Let me check.\n<tool_call>")]:
        constraint = compiler.tool_calls(TOOLS, choice)
        for seed in range(6):
            constraint.reset()
            walk(constraint, backend.encode(prefix).ids)
            text, stopped = sample_under_mask(backend, constraint, structural_ids, seed)
            assert stopped, text
            content, calls = parse_tool_calls(prefix + text)
            assert content == ("Let me check." if prefix else None)
            assert len(calls) == (prefix + text).count("<tool_call>") >= 1
            for call in calls:
                arguments = json.loads(call["function"]["arguments"])
                jsonschema.validate(arguments, schemas[call["function"]["name"]])


def test_special_token_trigger_is_matched_as_that_token(backend):
    with_tags = copy.copy(backend)
    with_tags.add_special_tokens(["<tool_call>", "</tool_call>"])
    open_id, close_id = with_tags.token_to_id("<tool_call>"), with_tags.token_to_id("</tool_call>")
    compiler = GrammarCompiler(with_tags, vocab_size=with_tags.get_vocab_size(), stop_ids=[EOS])
    required = compiler.tool_calls(TOOLS, "required")
    assert allowed_ids(required.allowed_bitmask()).tolist() == [open_id]
    auto = compiler.tool_calls(TOOLS, "auto")
    ids = with_tags.encode("Sure." + CLOCK_CALL).ids
    assert open_id in ids and close_id in ids
    walk(auto, ids)
    assert auto.is_accepting


@pytest.mark.parametrize(
    ("tools", "tool_choice", "param", "message"),
    [
        ([WEATHER, {"type": "function", "function": {"name": "bad", "parameters": {"type": "strng"}}}],
         "auto", "tools[1].function.parameters", "Invalid type: strng"),
        ([{"type": "function", "function": {"name": "has space"}}], "auto",
         "tools[0].function.name", "must match"),
        ([{"type": "retrieval"}], "auto", "tools[0]", "'type': 'function'"),
        ([], "auto", "tools", "non-empty"),
        (TOOLS, {"type": "function", "function": {"name": "missing"}}, "tool_choice",
         "not among the given tools"),
        (TOOLS, "sometimes", "tool_choice", "Invalid tool_choice"),
    ],
)
def test_invalid_tools_are_invalid_requests(compiler, tools, tool_choice, param, message):
    with pytest.raises(InvalidRequestError) as info:
        compiler.tool_calls(tools, tool_choice)
    assert info.value.param == param
    assert message in info.value.message
