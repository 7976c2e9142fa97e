"""Generated token ids -> text, one token at a time: UTF-8-safe deltas and stop-string holdback.

Holds ``IncrementalDetokenizer`` (tokenizers' ``DecodeStream``: returns text only once a UTF-8
character is complete, special tokens skipped), ``StopStringMatcher`` (holds back any text that could
be the start of a stop string, cuts the text at the first stop) and ``TokenBytes`` (the raw bytes and
the display text of one token, for logprobs). Must not: know OpenAI's shapes, the model or JAX.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas; concatenated, they equal decoding all the ids.

    ``context_ids`` are token ids already before the generated ones (the end of the prompt): they are
    not emitted, but they decide how the first generated token reads, e.g. whether a SentencePiece
    ``▁word`` token starts with a space when continuing a message.
    """

    def __init__(
        self, tokenizer: Tokenizer, *, context_ids: Sequence[int] = (), skip_special_tokens: bool = True
    ):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer
        self._stream = DecodeStream(ids=list(context_ids) or None, skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        """The text this token completes: ``""`` while a UTF-8 character is still incomplete."""
        return self._stream.step(self._tokenizer, token_id) or ""


class StopStringMatcher:
    """Cuts generated text at the first stop string, never emitting any part of a stop string.

    ``feed`` returns the text that is safe to show: text that could still turn out to be the start of
    a stop string is held back until the next piece decides it. After a stop, ``stopped`` is True and
    everything later is dropped. ``flush`` returns the held-back text when generation ends otherwise.
    """

    def __init__(self, stop_strings: Sequence[str] = ()):
        if any(not stop for stop in stop_strings):
            raise ValueError("stop strings must not be empty")
        self._stops = tuple(stop_strings)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        # Any stop string ending in the new text starts inside ``buffer``: the held text is the
        # longest suffix of what came before that could begin a stop string.
        found = [index for index in (buffer.find(stop) for stop in self._stops) if index >= 0]
        if found:
            self.stopped = True
            self._held = ""
            return buffer[: min(found)]
        hold = self._longest_stop_prefix_suffix(buffer)
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold]

    def flush(self) -> str:
        """The held-back text, once no more text will come (it was not a stop string after all)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        longest = min(len(text), max(len(stop) for stop in self._stops) - 1)
        for length in range(longest, 0, -1):
            suffix = text[len(text) - length :]
            if any(stop.startswith(suffix) for stop in self._stops):
                return length
        return 0


class TokenBytes:
    """The raw bytes of single tokens (OpenAI's logprob ``bytes``) and their display text.

    A byte-level BPE token's string is bytes spelled with GPT-2's printable alphabet; a SentencePiece
    token spells a space as ``▁`` and a raw byte as ``<0xHH>``; an added token is its own text. A token
    that holds part of a UTF-8 character shows its bytes escaped (``\\xe2\\x80``), as OpenAI does.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._added = {
            token_id: added.content for token_id, added in tokenizer.get_added_tokens_decoder().items()
        }
        decoder_types = _decoder_types(tokenizer)
        self._byte_level = "ByteLevel" in decoder_types
        self._metaspace = bool({"Metaspace", "Replace"} & decoder_types)
        self._byte_fallback = "ByteFallback" in decoder_types
        self.bytes = lru_cache(maxsize=65536)(self._bytes)
        self._ids_by_bytes: dict[bytes, int] | None = None

    def token_id(self, raw: bytes) -> int | None:
        """The id of the token whose bytes are ``raw``: the inverse of ``bytes`` (the lowest id when
        an added token spells the same text as a vocabulary token), None for no single token."""
        if self._ids_by_bytes is None:
            size = self._tokenizer.get_vocab_size(with_added_tokens=True)
            self._ids_by_bytes = {self._bytes(token_id): token_id for token_id in reversed(range(size))}
        return self._ids_by_bytes.get(bytes(raw))

    def text(self, token_id: int) -> str:
        return self.bytes(token_id).decode("utf-8", errors="backslashreplace")

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = _unicode_to_byte()
            if all(char in table for char in piece):
                return bytes(table[char] for char in piece)
        if self._byte_fallback and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        if self._metaspace:
            piece = piece.replace("\u2581", " ")
        return piece.encode("utf-8")


def _decoder_types(tokenizer: Tokenizer) -> set[str]:
    """The types of the tokenizer's decoder and of the decoders inside a Sequence decoder."""
    spec = json.loads(tokenizer.to_str()).get("decoder") or {}
    types, pending = set(), [spec]
    while pending:
        decoder = pending.pop()
        types.add(decoder.get("type"))
        pending.extend(decoder.get("decoders") or [])
    return types


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the other bytes
    are shifted to code points from 256 up (so every byte has a visible character)."""
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)
    ]
    table = {chr(byte): byte for byte in printable}
    shifted = 256
    for byte in range(256):
        if byte not in printable:
            table[chr(shifted)] = byte
            shifted += 1
    return table
