"""The in-process OpenAI-style chat completion API: ``Engine`` and
``engine.chat.completions.create(**request)``.

A request is validated once (``nbchat.protocol``); the engine then builds one job from it with the
checks that need the model (its name, vocabulary and context), the prompt ids (``nbchat.templates``)
and, for ``response_format`` and ``tools``, a grammar constraint (``nbchat.plan``), all before any
compute. The engine's ``Generator`` yields token events that become stream chunks (detokenized, cut
at stop strings, tool calls parsed out by the chat format, with logprobs); the Generator's own
invariant errors (plain ValueErrors) become InvalidRequestError here. A
non-streaming response is that same stream collected, so the two can never disagree. Every surface
(magics, panel, kernel, server, CLI) calls this module.

Must not: know of notebooks or HTTP; hold model math (``nbchat.engine``) or template text.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbchat.engine.limits import LOGPROB_FLOOR
from nbchat.errors import ContextLengthError, InvalidRequestError
from nbchat.errors import EngineBusyError as EngineBusyError  # re-exported: the Generator raises it
from nbchat.models import DEFAULT_MODEL
from nbchat.plan import GenerationPlan, plan_generation
from nbchat.protocol.deltas import add_tool_call_delta
from nbchat.protocol.requests import ChatCompletionRequest, validate_request
from nbchat.protocol.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionMessage,
    Choice,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    FinishReason,
    ResponseFunctionCall,
    ResponseToolCall,
    TokenLogprob,
    TopLogprob,
    Usage,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from nbchat.engine.detokenize import TokenBytes
    from nbchat.engine.generate import Generator, SamplingParams, TokenEvent
    from nbchat.models import LoadedModel

# Request fields an Engine default may not set: they describe one call, not a session.
_PER_CALL_FIELDS = ("messages", "stream", "stream_options", "continue_final_message")
# How many prompt ids the detokenizer sees before a continued message, so its first token reads right.
_CONTEXT_IDS_FOR_CONTINUATION = 8


@dataclass(frozen=True)
class ModelInfo:
    """What the notebook shows after loading: the model, where it runs and how much it can read."""

    name: str
    dtype: str
    device: str
    context_length: int
    architecture: str
    num_layers: int
    vocab_size: int
    source: str


# --------------------------------------------------------------------------------------------------
# The engine


class Engine:
    """A local chat model behind OpenAI's chat completion interface.

    ``Engine(model="smollm2-135m-instruct", dtype="float32", mesh=None, **defaults)``: ``model`` is a
    registry name, a ``.gguf`` path, a Hugging Face layout directory or repo id; ``mesh`` the devices
    to shard the model over (a ``jax.sharding.Mesh`` or a spec such as ``"model=2"``; None:
    ``$NBCHAT_MESH``, else every device when there are several, see ``nbchat.engine.sharding``);
    ``defaults`` are default request parameters (``temperature=0.7``, ``max_tokens=256``,
    ``chat_template="chatml"``, ...), validated now. The model loads on first use, or with
    ``engine.load()``.

    ``engine.chat.completions.create(messages=[...], stream=False, **params)`` returns a
    ``ChatCompletion``, or with ``stream=True`` a ``ChatCompletionStream`` of chunks.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, dtype: str = "float32", mesh: Any = None,
                 **defaults: Any):
        self.model = model
        self.dtype = dtype
        # A mesh given here is checked now (that imports JAX); $NBCHAT_MESH and the automatic choice
        # are read at load, so an Engine built without one stays JAX-free until then.
        self._mesh_request = mesh
        if mesh is not None:
            from nbchat.engine.sharding import choose_mesh

            choose_mesh(mesh)
        for name in _PER_CALL_FIELDS:
            if name in defaults:
                raise InvalidRequestError(
                    f"'{name}' belongs to a single request, not to the engine's defaults: pass it to "
                    "create() instead.",
                    param=name,
                    code="invalid_value",
                )
        defaults = {key: value for key, value in defaults.items() if value is not None}
        validate_request({"messages": [{"role": "user", "content": "."}], **defaults})
        self.defaults: dict[str, Any] = defaults
        self.chat = _Chat(self)
        self._loaded: LoadedModel | None = None
        self._generator: Generator | None = None
        self._token_bytes: TokenBytes | None = None
        self._load_lock = threading.Lock()
        self._weights_sha256: str | None = None

    def __repr__(self) -> str:
        state = "loaded" if self._loaded is not None else "not loaded"
        if self._generator is not None and self._generator.mesh is not None:
            from nbchat.engine.sharding import describe

            state += f", mesh {describe(self._generator.mesh)}"
        return f"Engine(model={self.model!r}, dtype={self.dtype!r}; {state})"

    # ---- loading

    def load(self) -> Engine:
        """Load the model now (otherwise it loads on first use); returns the engine."""
        self._ensure_loaded()
        return self

    def _ensure_loaded(self) -> LoadedModel:
        if self._loaded is None:
            with self._load_lock:
                if self._loaded is None:
                    from nbchat.engine.detokenize import TokenBytes
                    from nbchat.engine.generate import Generator
                    from nbchat.engine.sharding import choose_mesh
                    from nbchat.models import load

                    mesh = choose_mesh(self._mesh_request)  # before the weights: a bad value fails fast
                    loaded = load(self.model, dtype=self.dtype)
                    self._generator = Generator(loaded.config, loaded.decoder, mesh)
                    self._token_bytes = TokenBytes(loaded.tokenizer.backend_tokenizer)
                    self._loaded = loaded
        return self._loaded

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self._ensure_loaded().tokenizer

    @property
    def mesh(self) -> Any:
        """The ``jax.sharding.Mesh`` the model is sharded over, or None on one device (loads it)."""
        self._ensure_loaded()
        return self._generator.mesh

    @property
    def model_info(self) -> ModelInfo:
        loaded = self._ensure_loaded()
        import jax

        from nbchat.engine.sharding import describe

        device = jax.devices()[0]
        kind = device.platform if device.device_kind.lower() == device.platform else (
            f"{device.platform} ({device.device_kind})"
        )
        mesh = self._generator.mesh
        return ModelInfo(
            name=loaded.name,
            dtype=loaded.dtype,
            device=f"{mesh.size} x {kind}, mesh {describe(mesh)}" if mesh is not None else kind,
            context_length=self._generator.context_length,
            architecture=loaded.config.architecture,
            num_layers=loaded.config.num_layers,
            vocab_size=loaded.config.vocab_size,
            source=str(loaded.source.path),
        )

    # ---- prompts

    def render_prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
    ) -> tuple[str, list[int]]:
        """The prompt text and token ids ``messages`` would be sent to the model as."""
        payload: dict[str, Any] = {"messages": messages, "tools": tools, "chat_template": chat_template,
                                   "continue_final_message": continue_final_message or None}
        request = validate_request(self._with_defaults(payload, only=("chat_template",)))
        return self._prompt(request, self._ensure_loaded(), tools=request.template_tools())

    def _prompt(self, request: ChatCompletionRequest, loaded: LoadedModel,
                *, tools: list[dict[str, Any]] | None) -> tuple[str, list[int]]:
        from nbchat.templates import render_messages, tokenize_prompt

        text = render_messages(
            loaded.tokenizer,
            request.template_messages(),
            chat_template=request.chat_template,
            tools=tools,
            continue_final_message=bool(request.continue_final_message),
        )
        return text, tokenize_prompt(loaded.tokenizer, text)

    def _with_defaults(self, request: Mapping[str, Any], *,
                       only: Sequence[str] | None = None) -> dict[str, Any]:
        """The engine's defaults under the request's own values (a None value counts as not given)."""
        defaults = {key: value for key, value in self.defaults.items() if only is None or key in only}
        return {**defaults, **{key: value for key, value in request.items() if value is not None}}

    # ---- completions

    def _create(self, request_kwargs: Mapping[str, Any]) -> ChatCompletion | ChatCompletionStream:
        request = validate_request(self._with_defaults(request_kwargs))
        job = self._job(request)
        if request.stream:
            return ChatCompletionStream(self._chunks(job, include_usage=request.include_usage))
        return collect_chunks(self._chunks(job, include_usage=True), logprobs=bool(request.logprobs))

    def _job(self, request: ChatCompletionRequest) -> _Job:
        """The one job of a validated request: the checks that need the model (its name, vocabulary
        and context), its generation plan, prompt ids and per-choice sampler settings; no compute."""
        loaded = self._ensure_loaded()
        names = {self.model, loaded.name, str(loaded.source.path), loaded.source.path.name}
        if request.model is not None and request.model not in names:
            raise InvalidRequestError(
                f"The model {request.model!r} is not loaded in this engine, which serves {loaded.name!r}. "
                f"Leave model out, pass model={loaded.name!r}, or create Engine(model={request.model!r}).",
                param="model",
                code="model_not_found",
            )
        vocab_size = loaded.config.vocab_size
        outside = [token_id for token_id in request.logit_bias or {} if token_id >= vocab_size]
        if outside:
            raise InvalidRequestError(
                f"Invalid key in 'logit_bias': token id {outside[0]} is outside this model's vocabulary "
                f"(ids 0 to {vocab_size - 1}).",
                param="logit_bias",
                code="invalid_value",
            )
        plan = plan_generation(request, loaded)
        _, prompt_ids = self._prompt(request, loaded, tools=plan.template_tools)
        if not prompt_ids:
            raise InvalidRequestError("The chat template rendered these messages as an empty prompt.",
                                      param="chat_template", code="invalid_value")
        # max_new_tokens: the request's limit, or (when none) whatever context is left.
        context_length = self._generator.context_length
        limit = request.completion_token_limit
        if len(prompt_ids) + (limit or 1) > context_length:
            raise ContextLengthError(len(prompt_ids), limit or 1, context_length)
        samplings = [self._sampling(request, index) for index in range(request.n or 1)]
        return _Job(request, loaded, plan, prompt_ids, limit or context_length - len(prompt_ids), samplings)

    def _chunks(self, job: _Job, *, include_usage: bool) -> Iterator[ChatCompletionChunk]:
        loaded, prompt_ids = job.loaded, job.prompt_ids
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        fingerprint = _system_fingerprint(loaded)

        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=completion_id, created=created, model=loaded.name, choices=choices,
                                       usage=usage, system_fingerprint=fingerprint)

        # The choices generate at once, each in a slot of the Generator (so a call never waits for
        # another call, nor a choice for another choice); their chunks interleave as OpenAI's do.
        choices = [_ChoiceRun(self, job, index) for index in range(len(job.samplings))]
        running = {choice: choice.deltas() for choice in choices}
        try:
            for choice in choices:
                role = ChoiceDelta(role="assistant", content="")
                yield chunk([ChunkChoice(index=choice.index, delta=role)])
            while running:
                for choice, deltas in list(running.items()):
                    step = next(deltas, None)
                    if step is None:
                        del running[choice]
                        yield chunk([ChunkChoice(index=choice.index, delta=ChoiceDelta(),
                                                 finish_reason=choice.finish_reason,
                                                 logprobs=choice.trailing_logprobs)])
                    else:
                        delta, logprobs = step
                        yield chunk([ChunkChoice(index=choice.index, delta=delta, logprobs=logprobs)])
        finally:
            for deltas in running.values():
                deltas.close()  # stops those choices' generations at once
        completion_tokens = sum(choice.completion_tokens for choice in choices)
        if include_usage:
            usage = Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens,
                          total_tokens=len(prompt_ids) + completion_tokens)
            yield chunk([], usage)

    def _sampling(self, request: ChatCompletionRequest, choice_index: int) -> SamplingParams:
        """The sampler settings of one choice (seed + index); the request's bounds are checked."""
        from nbchat.engine.generate import SamplingParams

        seed = None if request.seed is None else _wrap_int64(request.seed + choice_index)
        params = SamplingParams(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k or 0,
            min_p=request.min_p or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            repetition_penalty=1.0 if request.repetition_penalty is None else request.repetition_penalty,
            logit_bias=dict(request.logit_bias or {}),
            seed=seed,
            top_logprobs=(request.top_logprobs or 0) if request.logprobs else 0,
        )
        return params

    def _token_logprob(self, event: TokenEvent) -> TokenLogprob:
        token_bytes = self._token_bytes
        return TokenLogprob(
            token=token_bytes.text(event.token_id),
            bytes=list(token_bytes.bytes(event.token_id)),
            logprob=_finite_logprob(event.logprob),
            top_logprobs=[
                TopLogprob(token=token_bytes.text(token_id), bytes=list(token_bytes.bytes(token_id)),
                           logprob=_finite_logprob(logprob))
                for token_id, logprob in event.top_logprobs
            ],
        )

    # ---- teaching views (nbchat.notebook.views): the tokens, the prompt, the next-token distribution
    # and what reproduces a reply. Read-only: none of these touches the chat's KV cache.

    def token_pieces(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True,
                     context_ids: Sequence[int] = ()) -> list[TokenPiece]:
        """Each token with the text it completes as the stream detokenizer emits it: ``""`` for a
        token holding only the first bytes of a character (its text comes with the token that
        completes it), so a split emoji never shows as mojibake."""
        from nbchat.engine.detokenize import IncrementalDetokenizer

        loaded = self._ensure_loaded()
        backend = loaded.tokenizer.backend_tokenizer
        detokenizer = IncrementalDetokenizer(backend, context_ids=context_ids,
                                             skip_special_tokens=skip_special_tokens)
        specials = set(loaded.tokenizer.all_special_ids) | {
            token_id for token_id, added in backend.get_added_tokens_decoder().items() if added.special}
        pieces = []
        for token_id in token_ids:
            text = detokenizer.step(int(token_id))
            if not skip_special_tokens and int(token_id) in specials and not text:
                text = self._token_bytes.text(int(token_id))
            pieces.append(TokenPiece(int(token_id), text, int(token_id) in specials))
        return pieces

    def token_ids_of(self, token_bytes: Sequence[Sequence[int] | bytes]) -> list[int | None]:
        """The ids of tokens given by their bytes (a logprob's ``bytes``); None for bytes that are
        not one token of this model."""
        self._ensure_loaded()
        return [self._token_bytes.token_id(bytes(raw)) for raw in token_bytes]

    def prompt_tokens(self, messages: Sequence[Mapping[str, Any]], *,
                      tools: Sequence[Mapping[str, Any]] | None = None,
                      chat_template: str | None = None) -> PromptTokens:
        """The templated prompt of ``messages`` split into its tokens, each with the message it
        came from: ``part`` "content" inside a message's text, "template" for what the template
        wrote before it (role headers, special tokens, a default system prompt), and message
        ``None`` / part "generation" for the assistant header after the last message."""
        text, ids = self.render_prompt(messages, tools=tools, chat_template=chat_template)
        loaded = self._ensure_loaded()
        offsets = loaded.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"]
        spans, searched = [], 0  # each message's content, found in order in the prompt text
        for index, message in enumerate(messages):
            content = message.get("content")
            content = content.strip() if isinstance(content, str) else ""
            found = text.find(content, searched) if content else -1
            if found >= 0:
                spans.append((index, found, found + len(content)))
                searched = found + len(content)
        tokens = []
        for piece, (start, _) in zip(self.token_pieces(ids, skip_special_tokens=False), offsets, strict=True):
            owner = next(((index, begin, end) for index, begin, end in spans if start < end), None)
            if owner is None:
                message_index, part = None, "generation"
            else:
                message_index, part = owner[0], "content" if start >= owner[1] else "template"
            tokens.append(PromptToken(piece.token_id, piece.text, piece.special, message_index, part))
        return PromptTokens(text=text, tokens=tokens, context_length=self._generator.context_length)

    def next_token_distribution(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        reply_text: str | None = None,
        reply_ids: Sequence[int] = (),
        settings: Sequence[Mapping[str, Any]] = ({},),
        top: int = 10,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> NextTokenDistribution:
        """The distribution of the next token of the assistant's reply to ``messages``: the model's
        own (temperature 1, nothing filtered) and, for each of ``settings`` (request fields:
        temperature, top_p, top_k, min_p, penalties, logit_bias, seed), the one the sampler draws
        from, with the token it draws (``seed``; 0 when none). The reply so far is ``reply_text``
        (tokenized with the prompt) or ``reply_ids`` (exact ids, as step mode picks them)."""
        import numpy as np

        from nbchat.engine.distribution import next_token_logprobs

        if reply_text:
            _, prompt_ids = self.render_prompt([*messages, {"role": "assistant", "content": reply_text}],
                                               tools=tools, continue_final_message=True)
        else:
            _, prompt_ids = self.render_prompt(messages, tools=tools)
            prompt_ids = [*prompt_ids, *(int(token) for token in reply_ids)]
        if len(prompt_ids) >= self._generator.context_length:
            raise ContextLengthError(len(prompt_ids), 1, self._generator.context_length)
        if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= 100:
            raise InvalidRequestError(f"top must be an integer from 1 to 100, got {top!r}.",
                                      param="top", code="invalid_value")
        rows = []
        for row in settings:
            request = validate_request({"messages": [{"role": "user", "content": "."}],
                                        **self._with_defaults(dict(row))})
            rows.append(self._sampling(request, 0))
        loaded = self._ensure_loaded()
        result = next_token_logprobs(loaded.decoder, loaded.config, prompt_ids, rows,
                                     generated=len(reply_ids) if not reply_text else 0)
        order = [int(token) for token in result.raw.argsort()[::-1][:top]]

        def choice(token_id: int, logprob: float) -> TokenChoice:
            return TokenChoice(token_id, self._token_bytes.text(token_id), float(logprob),
                               ends_reply=token_id in loaded.stop_ids)

        probabilities = np.exp(result.raw.astype(np.float64))
        sampled = [
            SampledDistribution(
                settings={key: getattr(row, key) for key in ("temperature", "top_p", "top_k", "min_p")},
                logprobs=[float(after[token]) for token in order],
                kept=int(np.isfinite(after).sum()),
                chosen=choice(int(chosen), float(after[int(chosen)])),
            )
            for row, after, chosen in zip(rows, result.sampled, result.chosen, strict=True)
        ]
        return NextTokenDistribution(
            prompt_tokens=len(prompt_ids),
            top=[choice(token, result.raw[token]) for token in order],
            sampled=sampled,
            entropy=float(-(probabilities * np.where(probabilities > 0, result.raw, 0.0)).sum()),
        )

    def reproducible_settings(self, **request: Any) -> dict[str, Any]:
        """Every setting that decides a reply to ``request`` once the engine's defaults apply: the
        sampler's (seed included), max_tokens, stop strings and chat template, as JSON values."""
        validated = validate_request(self._with_defaults(request))
        self._ensure_loaded()
        params = self._sampling(validated, 0)
        return {
            "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "min_p": params.min_p, "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty, "repetition_penalty": params.repetition_penalty,
            "logit_bias": {str(token): bias for token, bias in params.logit_bias.items()},
            "seed": params.seed, "max_tokens": validated.completion_token_limit,
            "stop": list(validated.stop_strings), "chat_template": validated.chat_template,
        }

    def provenance(self) -> dict[str, Any]:
        """What identifies the model a reply came from: its name, file, the file's sha256 (for a
        directory: of its safetensors files in name order), the dtype and nbchat's version."""
        from nbchat import __version__
        from nbchat.models import REGISTRY

        loaded = self._ensure_loaded()
        if self._weights_sha256 is None:
            path = loaded.source.path
            entry = REGISTRY.get(loaded.source.name)
            if entry is not None and path.name == entry.filename:
                self._weights_sha256 = entry.sha256  # checked when the file was fetched
            else:
                import hashlib

                digest = hashlib.sha256()
                for file in [path] if path.is_file() else sorted(path.glob("*.safetensors")):
                    with open(file, "rb") as handle:
                        while chunk := handle.read(1 << 20):
                            digest.update(chunk)
                self._weights_sha256 = digest.hexdigest()
        return {"model": loaded.name, "file": loaded.source.path.name, "sha256": self._weights_sha256,
                "dtype": loaded.dtype, "nbchat": __version__}


@dataclass(frozen=True)
class _Job:
    """A validated request, ready to generate: everything checked, nothing computed yet."""

    request: ChatCompletionRequest
    loaded: LoadedModel
    plan: GenerationPlan
    prompt_ids: list[int]
    max_new_tokens: int
    samplings: list[SamplingParams]  # one per choice


class _ChoiceRun:
    """One choice's generation: token events -> text -> stop strings -> deltas with their logprobs."""

    def __init__(self, engine: Engine, job: _Job, index: int):
        self._engine = engine
        self._job = job
        self.index = index
        self.completion_tokens = 0
        self.finish_reason: FinishReason = "length"
        self.trailing_logprobs: ChoiceLogprobs | None = None

    def deltas(self) -> Iterator[tuple[ChoiceDelta, ChoiceLogprobs | None]]:
        from nbchat.engine.detokenize import IncrementalDetokenizer, StopStringMatcher

        job = self._job
        request, loaded = job.request, job.loaded
        continuing = request.continue_final_message
        context_ids = job.prompt_ids[-_CONTEXT_IDS_FOR_CONTINUATION:] if continuing else ()
        detokenizer = IncrementalDetokenizer(loaded.tokenizer.backend_tokenizer, context_ids=context_ids,
                                             skip_special_tokens=not job.plan.keep_special_tokens)
        stop_strings = StopStringMatcher(request.stop_strings)
        output = job.plan.new_output()
        pending_logprobs: list[TokenLogprob] = []  # of tokens whose text is not shown yet

        def emit(deltas: list[dict[str, Any]]) -> Iterator[tuple[ChoiceDelta, ChoiceLogprobs | None]]:
            for delta in deltas:
                logprobs = None
                if request.logprobs:
                    logprobs = ChoiceLogprobs(content=list(pending_logprobs))
                    pending_logprobs.clear()
                yield ChoiceDelta(**delta), logprobs

        try:
            events = self._engine._generator.generate(
                job.prompt_ids,
                job.samplings[self.index],
                max_new_tokens=job.max_new_tokens,
                stop_ids=loaded.stop_ids,
                constraint=job.plan.new_constraint(),
            )
        except ValueError as exc:  # the engine's invariants, which the job's checks should keep
            raise InvalidRequestError(f"The engine cannot run this request: {exc}",
                                      code="invalid_value") from exc
        try:
            for event in events:
                self.completion_tokens += 1
                if event.token_id in loaded.stop_ids:
                    self.finish_reason = "stop"
                    break
                if request.logprobs:
                    pending_logprobs.append(self._engine._token_logprob(event))
                text = stop_strings.feed(detokenizer.step(event.token_id))
                yield from emit(output.feed(text))
                if stop_strings.stopped or output.ended:
                    self.finish_reason = "stop"
                    break
        finally:
            events.close()  # stops the Generator at once when the caller stops early
        yield from emit(output.feed(stop_strings.flush()))
        yield from emit(output.finish())
        self.finish_reason = output.finish_reason(self.finish_reason)
        # Tokens whose text became no delta (a tool call's closing tag, trailing whitespace) still
        # count: their logprobs ride on the finish chunk.
        self.trailing_logprobs = ChoiceLogprobs(content=pending_logprobs) if pending_logprobs else None


class ChatCompletionStream(Iterator[ChatCompletionChunk]):
    """The chunks of a streamed chat completion. Closing it (``close()``, leaving a ``with`` block,
    or breaking out of the loop and dropping it) stops generation and frees the engine."""

    def __init__(self, chunks: Iterator[ChatCompletionChunk]):
        self._chunks = chunks

    def __iter__(self) -> ChatCompletionStream:
        return self

    def __next__(self) -> ChatCompletionChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> ChatCompletionStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _Completions:
    def __init__(self, engine: Engine):
        self._engine = engine

    def create(self, /, **request: Any) -> ChatCompletion | ChatCompletionStream:
        """OpenAI's ``chat.completions.create``: ``messages=[...]`` plus request parameters; see
        ``nbchat.protocol.requests.ChatCompletionRequest`` for every field. Raises InvalidRequestError (or
        ContextLengthError) before any compute when the request is wrong."""
        return self._engine._create(request)


class _Chat:
    def __init__(self, engine: Engine):
        self.completions = _Completions(engine)


# --------------------------------------------------------------------------------------------------
# Collecting a stream into a response


def collect_chunks(chunks: Iterable[ChatCompletionChunk], *, logprobs: bool) -> ChatCompletion:
    """The non-streaming response: a stream's chunks (its usage chunk included) merged per choice.
    Public so a caller that must be able to stop a generation early (the HTTP server, when its
    client disconnects) can stream and collect the same response itself."""
    first: ChatCompletionChunk | None = None
    usage: Usage | None = None
    choices: dict[int, _CollectedChoice] = {}
    for chunk in chunks:
        first = first or chunk
        usage = chunk.usage or usage
        for part in chunk.choices:
            choices.setdefault(part.index, _CollectedChoice()).add(part)
    assert first is not None and usage is not None  # _chunks always ends with the usage chunk
    return ChatCompletion(
        id=first.id,
        created=first.created,
        model=first.model,
        system_fingerprint=first.system_fingerprint,
        choices=[choices[index].choice(index, logprobs=logprobs) for index in sorted(choices)],
        usage=usage,
    )


class _CollectedChoice:
    def __init__(self) -> None:
        self.content: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: FinishReason = "length"

    def add(self, part: ChunkChoice) -> None:
        if part.delta.content:
            self.content.append(part.delta.content)
        for fragment in part.delta.tool_calls or ():
            add_tool_call_delta(self.tool_calls, fragment)
        if part.logprobs is not None and part.logprobs.content:
            self.logprobs.extend(part.logprobs.content)
        if part.finish_reason is not None:
            self.finish_reason = part.finish_reason

    def choice(self, index: int, *, logprobs: bool) -> Choice:
        tool_calls = [
            ResponseToolCall(id=call["id"], function=ResponseFunctionCall(**call["function"]))
            for call in self.tool_calls
        ]
        content = "".join(self.content)
        message = ChatCompletionMessage(content=content if content or not tool_calls else None,
                                        tool_calls=tool_calls or None)
        return Choice(index=index, message=message, finish_reason=self.finish_reason,
                      logprobs=ChoiceLogprobs(content=self.logprobs) if logprobs else None)


# --------------------------------------------------------------------------------------------------


def _system_fingerprint(loaded: LoadedModel) -> str:
    from nbchat import __version__

    return f"nbchat-{__version__}-{loaded.dtype}"


def _finite_logprob(logprob: float) -> float:
    """OpenAI's logprobs are finite: -inf (and NaN) become the engine's LOGPROB_FLOOR."""
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


def _wrap_int64(value: int) -> int:
    return (value + 2**63) % 2**64 - 2**63


# --------------------------------------------------------------------------------------------------
# What the teaching views read (plain data: the notebook layer draws it without importing JAX)


@dataclass(frozen=True)
class TokenPiece:
    token_id: int
    text: str  # what the token completes ("" while a character's bytes are incomplete)
    special: bool


@dataclass(frozen=True)
class PromptToken:
    token_id: int
    text: str
    special: bool
    message: int | None  # index in the messages; None: the generation prompt after them
    part: str  # "content", "template" (written by the template before the message) or "generation"


@dataclass(frozen=True)
class PromptTokens:
    text: str
    tokens: list[PromptToken]
    context_length: int


@dataclass(frozen=True)
class TokenChoice:
    token_id: int
    text: str  # the token's own text (OpenAI's logprob ``token``: partial UTF-8 bytes escaped)
    logprob: float
    ends_reply: bool = False  # a stop token: drawing it ends the reply


@dataclass(frozen=True)
class SampledDistribution:
    settings: dict[str, Any]  # temperature, top_p, top_k, min_p
    logprobs: list[float]  # of NextTokenDistribution.top's tokens under these settings (-inf: never)
    kept: int  # tokens the sampler may draw
    chosen: TokenChoice  # the token it draws with the row's seed (its logprob under these settings)


@dataclass(frozen=True)
class NextTokenDistribution:
    prompt_tokens: int
    top: list[TokenChoice]  # the most likely next tokens, temperature 1, nothing filtered
    sampled: list[SampledDistribution]  # one per settings row
    entropy: float  # of the raw distribution, in nats
