"""What the teaching commands do with the engine: record a reply's token logprobs, draw and record
the seed and settings that reproduce it, run a turn under several settings, step a reply token by
token, and replay a recorded reply.

The magic (``magics.py``) parses the options and stores turns; ``views.py`` draws. Everything that
needs the model goes through public methods of ``nbchat.Engine`` (``token_pieces``,
``token_ids_of``, ``next_token_distribution``, ``reproducible_settings``, ``provenance``), so this
module imports no JAX; a remote endpoint, which has none of them, gets a one-line error saying the
view needs a local model.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from IPython.core.error import UsageError

from nbchat.notebook import views
from nbchat.notebook.render import ReplyView
from nbchat.turns import StreamOutcome, stream_reply

# Alternatives each token of a --probs reply carries.
PROBS_TOP_LOGPROBS = 5
# Settings --compare can vary, and how a value is read.
COMPARE_KEYS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "seed": int,
    "max_tokens": int,
    "model": str,
}
_LOCAL_METHODS = ("token_pieces", "next_token_distribution", "provenance")


def require_local(engine: Any, what: str) -> Any:
    """``engine`` when it is a local ``nbchat.Engine``; a remote endpoint cannot show ``what``."""
    if not all(hasattr(engine, name) for name in _LOCAL_METHODS):
        raise UsageError(
            f"{what} needs a local model (the model's probabilities and tokens): {engine!r} is a remote "
            "endpoint. Use --model with a local model name or path."
        )
    return engine


def draw_seed(seed: int | None) -> tuple[int, bool]:
    """``(seed, drawn)``: the given seed, or a fresh one (31 bits: every OpenAI client accepts it)."""
    if seed is not None:
        return seed, False
    return secrets.randbelow(2**31), True


def messages_digest(messages: Sequence[Mapping[str, Any]]) -> str:
    """A sha256 of the messages a reply answered: replay tells whether they are still the same."""
    text = json.dumps(list(messages), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def reproduce_record(engine: Any, request: Mapping[str, Any], seed: int, drawn: bool) -> dict[str, Any]:
    """Everything that reproduces the reply to ``request`` (which the seed is added to): the model
    (name, file, sha256, dtype), every sampling setting once the engine's defaults apply, the seed
    and whether it was drawn, and the digest of the messages."""
    record: dict[str, Any] = {"seed": seed, "seed_drawn": drawn}
    if hasattr(engine, "provenance"):
        fields = {key: value for key, value in request.items() if key not in ("stream", "stream_options")}
        record.update(engine.provenance())
        record["settings"] = engine.reproducible_settings(**{**fields, "seed": seed})
    record["messages_sha256"] = messages_digest(request["messages"])
    return record


class LogprobRecorder:
    """Wraps a chat completion stream, keeping the token logprobs of its first choice in ``content``
    (OpenAI ``TokenLogprob``s, in order) while the chunks pass through unchanged."""

    def __init__(self, stream: Any):
        self._stream = stream
        self.content: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        for chunk in self._stream:
            for choice in chunk.choices:
                if choice.index == 0 and choice.logprobs is not None and choice.logprobs.content:
                    self.content.extend(choice.logprobs.content)
            yield chunk

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


def reply_token_views(engine: Any, content: Sequence[Any]) -> list[views.ReplyToken]:
    """The ReplyTokens of a reply's logprobs: ids from the tokens' bytes, the text each completes
    from the engine's stream detokenizer (a split character's text sits on its last token)."""
    token_ids = engine.token_ids_of([item.bytes or [] for item in content])
    known = [token_id for token_id in token_ids if token_id is not None]
    pieces = iter(engine.token_pieces(known))
    texts = [
        next(pieces).text if token_id is not None else item.token
        for item, token_id in zip(content, token_ids, strict=True)
    ]
    return views.reply_tokens(content, token_ids, texts)


def probs_bundle(engine: Any, content: Sequence[Any], *, note: str = "") -> dict[str, str]:
    tokens = reply_token_views(engine, content)
    return {"text/html": views.reply_tokens_html(tokens, note=note)}


def mean_logprob(content: Sequence[Any]) -> float | None:
    return sum(item.logprob for item in content) / len(content) if content else None


# --- compare --------------------------------------------------------------------------------------


def parse_compare(spec: str, parse_value: Callable[[str, str], Any]) -> tuple[str, list[Any]]:
    """``"temperature=0,0.7"`` -> ``("temperature", [0.0, 0.7])``, each value read like ``%chat set``."""
    key, equals, values = spec.partition("=")
    key = key.strip().replace("-", "_")
    if not equals or key not in COMPARE_KEYS:
        raise UsageError(
            f"--compare {spec!r}: expected KEY=V1,V2,... with KEY one of {', '.join(COMPARE_KEYS)} "
            '(e.g. --compare "temperature=0,0.7,1.4")'
        )
    parsed = [parse_value(key, value.strip()) for value in values.split(",") if value.strip()]
    if len(parsed) < 2 or any(value is None for value in parsed):
        raise UsageError(f"--compare {spec!r}: give two or more values for {key}, separated by commas")
    return key, parsed


def run_silently(
    open_stream: Callable[[dict[str, Any]], Any], request: dict[str, Any]
) -> tuple[StreamOutcome, list[Any]]:
    """One streamed request read to its end without drawing it: the outcome and its logprobs."""
    recorders: list[LogprobRecorder] = []

    def recording(req: dict[str, Any]) -> LogprobRecorder:
        recorders.append(LogprobRecorder(open_stream(req)))
        return recorders[-1]

    outcome = stream_reply(recording, request, ReplyView(live=False, stream=False, out=io.StringIO()))
    return outcome, recorders[-1].content if recorders else []


# --- step mode ------------------------------------------------------------------------------------


@dataclass
class StepState:
    """A reply being made token by token: where its turn sits, the messages it answers, the ids so
    far (with their views), the settings and seed, and the distribution last shown."""

    conversation: str
    index: int
    messages: list[dict[str, Any]]
    settings: dict[str, Any]
    seed: int
    model: str
    turn: Any  # the conversation's Turn the reply goes into (a re-run cell replaces it)
    reply_ids: list[int] = field(default_factory=list)
    tokens: list[views.ReplyToken] = field(default_factory=list)
    shown: Any = None  # the NextTokenDistribution for the next token (None: not computed yet)
    finished: str | None = None  # why the reply ended ("stop": an end-of-turn token, "length")

    def sampling_row(self) -> dict[str, Any]:
        """The request fields the next draw uses: the knobs, and a seed per position."""
        row = {key: self.settings.get(key) for key in ("temperature", "top_p", "top_k")}
        return {**{k: v for k, v in row.items() if v is not None}, "seed": self.seed + len(self.reply_ids)}

    def distribution(self, engine: Any, top: int = 10) -> Any:
        self.shown = engine.next_token_distribution(
            self.messages, reply_ids=self.reply_ids, settings=[self.sampling_row()], top=top
        )
        return self.shown

    def add(self, engine: Any, choice: Any, ends_reply: bool) -> None:
        """Append ``choice`` (a TokenChoice of the shown distribution) to the reply."""
        shown = self.shown
        raw = next((token.logprob for token in shown.top if token.token_id == choice.token_id), None)
        if raw is None:  # drawn from outside the top shown: its model logprob is its sampled one
            raw = choice.logprob
        if ends_reply:
            self.finished = "stop"
            return
        self.reply_ids.append(choice.token_id)
        top = [(token.text, token.logprob) for token in shown.top[:PROBS_TOP_LOGPROBS]]
        self.tokens.append(views.ReplyToken(choice.token_id, "", raw, top))
        # The text each token completes depends on the ones before (a split character, a space).
        pieces = engine.token_pieces(self.reply_ids)
        self.tokens = [
            views.ReplyToken(token.token_id, piece.text, token.logprob, token.top)
            for token, piece in zip(self.tokens, pieces, strict=True)
        ]
        limit = self.settings.get("max_tokens")
        if limit is not None and len(self.reply_ids) >= limit:
            self.finished = "length"

    @property
    def text(self) -> str:
        return "".join(token.text for token in self.tokens)
