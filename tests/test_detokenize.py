"""Incremental detokenization (UTF-8-safe deltas), stop-string holdback and token bytes for logprobs."""

from __future__ import annotations

import json
import random

import pytest

from nbchat.engine.detokenize import IncrementalDetokenizer, StopStringMatcher, TokenBytes

TEXTS = [
    "Hello! How are you today?",
    "Bonjour, ça va ? 你好，世界。 Emoji: 🙂 🚀 ✨ 👋🏽 family: 👨‍👩‍👧",
    "def add(a, b):\n    return a + b  # {braces}\n\n\tTabs and  double  spaces ",
    "Ünïcödé ß ﬁ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 日本語のテキスト",
]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from nbchat.tokenizer import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from nbchat.models import DEFAULT_MODEL, resolve
    from nbchat.tokenizer import load_tokenizer

    return load_tokenizer(resolve(DEFAULT_MODEL, progress=False).path)


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A SentencePiece-style tokenizer (▁ for spaces, <0xHH> byte fallback), as Llama 2 and Mistral use."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    def configure(tokenizer):
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
        tokenizer.decoder = decoders.Sequence([
            decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
        ])
        return tokenizer

    trained = configure(Tokenizer(models.BPE(unk_token="<unk>")))
    special = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=special, show_progress=False)
    trained.train_from_iterator(["hello world, the world is big and hello again"] * 20, trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    # Byte tokens are ordinary vocabulary entries in SentencePiece models, not added tokens.
    vocab = dict(model["vocab"])
    vocab |= {f"<0x{byte:02X}>": len(vocab) + byte for byte in range(256)}
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer = configure(Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)))
    tokenizer.add_special_tokens(special)
    return tokenizer


def stream_decode(backend, ids, **kwargs) -> list[str]:
    detokenizer = IncrementalDetokenizer(backend, **kwargs)
    return [detokenizer.step(token_id) for token_id in ids]


def test_deltas_join_to_the_full_decode_on_the_tiny_tokenizer(tiny_tokenizer):
    backend = tiny_tokenizer.backend_tokenizer
    for text in TEXTS:
        ids = backend.encode(text, add_special_tokens=False).ids
        deltas = stream_decode(backend, ids)
        assert "".join(deltas) == text == tiny_tokenizer.decode(ids)
        assert all("\ufffd" not in delta for delta in deltas)  # never half a UTF-8 character


@pytest.mark.integration
def test_deltas_join_to_the_full_decode_on_smollm2(smollm2_tokenizer):
    backend = smollm2_tokenizer.backend_tokenizer
    for text in TEXTS:
        ids = backend.encode(text, add_special_tokens=False).ids
        deltas = stream_decode(backend, ids)
        assert "".join(deltas) == text
        assert all("\ufffd" not in delta for delta in deltas)


@pytest.mark.integration
def test_emoji_split_over_tokens_appears_whole_on_smollm2(smollm2_tokenizer):
    backend = smollm2_tokenizer.backend_tokenizer
    ids = backend.encode(" 👋🏽", add_special_tokens=False).ids
    assert len(ids) > 2  # the emoji's bytes are spread over several tokens
    deltas = stream_decode(backend, ids)
    assert [delta for delta in deltas if delta] == [" 👋", "🏽"]
    assert deltas[0] == ""


def test_special_tokens_are_skipped(tiny_tokenizer):
    backend = tiny_tokenizer.backend_tokenizer
    ids = backend.encode("Hello<|im_end|> there", add_special_tokens=False).ids
    im_end = backend.token_to_id("<|im_end|>")
    assert im_end in ids
    assert "".join(stream_decode(backend, ids)) == "Hello there"
    assert "".join(stream_decode(backend, ids, skip_special_tokens=False)) == "Hello<|im_end|> there"


def test_context_ids_give_the_first_token_its_leading_space(sentencepiece_tokenizer):
    ids = sentencepiece_tokenizer.encode("hello world").ids
    assert sentencepiece_tokenizer.id_to_token(ids[-1]).startswith("▁")
    assert stream_decode(sentencepiece_tokenizer, ids[-1:]) == ["world"]  # a reply's first word
    assert stream_decode(sentencepiece_tokenizer, ids[-1:], context_ids=ids[:-1]) == [" world"]  # continued


def test_byte_fallback_tokens_wait_for_the_whole_character(sentencepiece_tokenizer):
    ids = sentencepiece_tokenizer.encode("hello é€").ids
    deltas = stream_decode(sentencepiece_tokenizer, ids)
    assert "".join(deltas) == "hello é€"
    assert "\ufffd" not in "".join(deltas) and deltas.count("") >= 3


# ---- stop strings


def feed_all(stops, pieces) -> tuple[str, list[str], bool]:
    matcher = StopStringMatcher(stops)
    emitted = [matcher.feed(piece) for piece in pieces]
    tail = matcher.flush()
    return "".join(emitted) + tail, emitted, matcher.stopped


@pytest.mark.parametrize(
    ("stops", "pieces", "expected", "stopped"),
    [
        (["STOP"], ["Hello ", "world"], "Hello world", False),
        (["STOP"], ["Hello ST", "OP and more"], "Hello ", True),
        (["STOP"], ["Hello S", "T", "O", "P", "after"], "Hello ", True),
        (["STOP"], ["Hello ST", "ORY"], "Hello STORY", False),
        (["STOP"], ["STOP"], "", True),
        (["STOP"], ["xSTOPySTOP"], "x", True),
        (["\n\n", "User:"], ["line\n", "\nmore"], "line", True),
        (["\n\n", "User:"], ["answer. Us", "er: hi"], "answer. ", True),
        (["abc", "bcd"], ["xab", "cd"], "x", True),  # the earliest stop wins
        (["abcd", "bc"], ["xabc"], "xa", True),
        (["aab"], ["a", "a", "a", "b"], "a", True),  # a held prefix that shifts by one
        (["END"], ["ends with E"], "ends with E", False),  # held text is flushed at the end
        ([], ["no ", "stops"], "no stops", False),
    ],
)
def test_stop_string_cases(stops, pieces, expected, stopped):
    text, _, was_stopped = feed_all(stops, pieces)
    assert text == expected
    assert was_stopped is stopped


def test_no_prefix_of_a_stop_string_is_ever_emitted_before_it_is_decided():
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("The answer is 42<") == "The answer is 42"
    assert matcher.feed("/ans") == ""
    assert matcher.feed("wer> and then") == ""
    assert matcher.stopped
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_random_chunkings_emit_exactly_the_text_before_the_first_stop():
    rng = random.Random(0)
    alphabet = "ab \nSTOP"
    stops = ["STOP", "\n\n", "ba b"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        positions = [text.find(stop) for stop in stops if stop in text]
        expected = text[: min(positions)] if positions else text
        joined, emitted, stopped = feed_all(stops, pieces)
        assert joined == expected, (text, pieces)
        assert stopped == bool(positions)
        shown = ""
        for piece in emitted:  # at no point does the shown text end inside a stop string
            shown += piece
            assert not any(stop in shown for stop in stops)


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="empty"):
        StopStringMatcher(["a", ""])


# ---- token bytes


def test_byte_level_token_bytes_reassemble_the_text(tiny_tokenizer):
    backend = tiny_tokenizer.backend_tokenizer
    token_bytes = TokenBytes(backend)
    for text in TEXTS:
        ids = backend.encode(text, add_special_tokens=False).ids
        assert b"".join(token_bytes.bytes(token_id) for token_id in ids) == text.encode()


def test_byte_level_alphabet_matches_transformers():
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from nbchat.engine.detokenize import _unicode_to_byte

    assert _unicode_to_byte() == {char: byte for byte, char in bytes_to_unicode().items()}


def test_partial_character_tokens_show_escaped_bytes(sentencepiece_tokenizer):
    token_bytes = TokenBytes(sentencepiece_tokenizer)
    ids = sentencepiece_tokenizer.encode("hello €").ids
    pieces = [token_bytes.bytes(token_id) for token_id in ids]
    assert b"".join(pieces) == " hello €".encode()  # SentencePiece spells the leading space too
    euro = [token_bytes.text(token_id) for token_id in ids[-3:]]
    assert euro == ["\\xe2", "\\x82", "\\xac"]


def test_special_token_bytes_are_its_text(tiny_tokenizer):
    backend = tiny_tokenizer.backend_tokenizer
    token_bytes = TokenBytes(backend)
    im_end = backend.token_to_id("<|im_end|>")
    assert token_bytes.bytes(im_end) == b"<|im_end|>" and token_bytes.text(im_end) == "<|im_end|>"


@pytest.mark.integration
def test_smollm2_token_bytes_reassemble_the_text(smollm2_tokenizer):
    backend = smollm2_tokenizer.backend_tokenizer
    token_bytes = TokenBytes(backend)
    for text in TEXTS:
        ids = backend.encode(text, add_special_tokens=False).ids
        assert b"".join(token_bytes.bytes(token_id) for token_id in ids) == text.encode()
