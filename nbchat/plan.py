"""How a validated request generates: the grammar its ``response_format`` and ``tools`` /
``tool_choice`` ask for, and how each choice's text becomes OpenAI deltas.

The one place that reads those request fields for generation: OpenAI's strict mode, the JSON schema
of a ``response_format``, the tool-call grammar of the model's chat format (``nbchat.chat_format``),
compiled by ``nbchat.engine.constraints`` before any compute, so a schema llguidance cannot compile
is an ``InvalidRequestError`` naming its field. Must not: validate request fields (``nbchat.protocol``
did), render prompts or run the generator (``nbchat.api``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nbchat.chat_format import hermes
from nbchat.errors import InvalidRequestError
from nbchat.protocol.formats import JsonObjectResponseFormat, JsonSchemaResponseFormat, NamedToolChoice
from nbchat.protocol.requests import ChatCompletionRequest
from nbchat.protocol.responses import FinishReason

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from nbchat.engine.constraints import GrammarCompiler, GrammarConstraint
    from nbchat.engine.generate import TokenConstraint
    from nbchat.models import LoadedModel

# OpenAI: a function without parameters takes none.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
ANY_OBJECT = {"type": "object"}

# The keys of a JSON schema whose values are schemas / maps of schemas / lists of schemas; used to
# walk a schema for OpenAI's strict mode.
_SUBSCHEMA_KEYS = ("additionalProperties", "items", "contains", "not", "if", "then", "else",
                   "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_SCHEMA_MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LIST_KEYS = ("anyOf", "oneOf", "allOf", "prefixItems")


class ChoiceOutput(Protocol):
    """Turns a choice's visible text into OpenAI delta dicts (``{"content": ...}`` or
    ``{"tool_calls": [...]}``, as the chat format's parser produces them)."""

    def feed(self, text: str) -> list[dict[str, Any]]: ...

    def finish(self) -> list[dict[str, Any]]: ...

    @property
    def ended(self) -> bool:
        """True when the text so far completes the reply (generation stops here)."""
        ...

    def finish_reason(self, ended_by: FinishReason) -> FinishReason:
        """The choice's finish_reason, given why generation ended ("stop" or "length")."""
        ...


class TextOutput:
    """Plain text: every piece of text is a content delta."""

    ended = False  # plain text never ends the reply by itself

    def feed(self, text: str) -> list[dict[str, Any]]:
        return [{"content": text}] if text else []

    def finish(self) -> list[dict[str, Any]]:
        return []

    def finish_reason(self, ended_by: FinishReason) -> FinishReason:
        return ended_by


class ToolCallOutput:
    """A reply that may call tools: content and tool calls in the chat format's syntax. A reply that
    ended by itself after calling tools finishes with "tool_calls"; a call forced by a named
    tool_choice finishes with "stop", as OpenAI's does.

    A call identical to an earlier one of the same reply (a small model under ``tool_choice=
    "required"`` loops on its first call) ends the reply instead: its deltas are held back while it
    could still be a repeat, dropped once it is one, and ``ended`` tells the generation to stop.
    """

    def __init__(self, *, named_choice: bool):
        self._parser = hermes.ToolCallParser()
        self._named_choice = named_choice
        self._made: list[tuple[str, str]] = []  # (name, arguments) of the calls so far
        self._current: list[str] | None = None  # [name, arguments so far] of the call being read
        self._held: list[dict[str, Any]] | None = None  # its deltas, while it may be a repeat
        self.ended = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        return [] if self.ended else self._without_repeats(self._parser.feed(text), finished=False)

    def finish(self) -> list[dict[str, Any]]:
        return [] if self.ended else self._without_repeats(self._parser.finish(), finished=True)

    def _without_repeats(self, deltas: list[dict[str, Any]], *, finished: bool) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for delta in deltas:
            for piece in delta.get("tool_calls", ()):
                if "id" in piece:  # a new call: the previous one is complete
                    self._close_call(out)
                    self._current = [piece["function"]["name"], ""]
                    self._held = [] if self._could_repeat() else None
                else:
                    self._current[1] += piece["function"]["arguments"]
                    if self._held is not None and not self._could_repeat():
                        out += self._held
                        self._held = None
            (out if self._held is None or "tool_calls" not in delta else self._held).append(delta)
        if not self._parser.in_call or finished:
            self._close_call(out, finished=finished)
        return out

    def _could_repeat(self) -> bool:
        name, arguments = self._current
        return any(name == made and earlier.startswith(arguments) for made, earlier in self._made)

    def _close_call(self, out: list[dict[str, Any]], *, finished: bool = False) -> None:
        if self._current is None:
            return
        call, self._current = tuple(self._current), None
        if self._held is not None and not finished and call in self._made:
            self.ended = True  # a repeat: drop it and end the reply here
        elif self._held is not None:
            out += self._held
        self._held = None
        self._made.append(call)

    def finish_reason(self, ended_by: FinishReason) -> FinishReason:
        if ended_by == "stop" and self._parser.tool_calls and not self._named_choice:
            return "tool_calls"
        return ended_by


@dataclass(frozen=True)
class GenerationPlan:
    """Per-request generation choices: the token constraint of each choice (None = unconstrained),
    how its text becomes deltas, the tools the chat template is given, and whether special tokens
    stay in the text (when the tool-call tags are special tokens, the parser must see them)."""

    new_constraint: Callable[[], TokenConstraint | None]
    new_output: Callable[[], ChoiceOutput]
    template_tools: list[dict[str, Any]] | None = None
    keep_special_tokens: bool = False


def plan_generation(request: ChatCompletionRequest, loaded: LoadedModel) -> GenerationPlan:
    """Decide how ``request`` generates: ``response_format`` and ``tools``/``tool_choice`` become a
    grammar constraint (compiled once here, so its errors come before any compute) and tool calls are
    parsed out of the text.

    ``tool_choice="none"`` generates plain text (or the response_format) and does not show the tools
    to the model, so that it does not write calls the reply could not make.
    """
    calls_tools = bool(request.tools) and request.effective_tool_choice != "none"
    if not calls_tools and response_schema(request) is None:
        return GenerationPlan(new_constraint=lambda: None, new_output=TextOutput)

    from nbchat.engine.constraints import GrammarCompiler

    compiler = GrammarCompiler.for_tokenizer(loaded.tokenizer, vocab_size=loaded.config.vocab_size,
                                             stop_ids=loaded.stop_ids)
    new_constraint = _first_then_fresh(lambda: build_constraint(request, compiler))
    if not calls_tools:
        return GenerationPlan(new_constraint=new_constraint, new_output=TextOutput)
    named_choice = isinstance(request.effective_tool_choice, NamedToolChoice)
    return GenerationPlan(
        new_constraint=new_constraint,
        new_output=lambda: ToolCallOutput(named_choice=named_choice),
        template_tools=request.template_tools(),
        keep_special_tokens=_is_special_token(loaded.tokenizer, hermes.TOOL_CALL_OPEN),
    )


def build_constraint(request: ChatCompletionRequest, compiler: GrammarCompiler) -> GrammarConstraint | None:
    """The grammar constraint ``request`` generates under (None: free text), compiled now; a schema
    llguidance cannot compile is an InvalidRequestError naming its field."""
    content = response_schema(request)
    if request.tools and request.effective_tool_choice != "none":
        grammar, description = _tool_call_grammar(request, compiler, content)
        return compiler.lark(grammar, description=description)
    if content is None:
        return None
    schema, description = content
    return compiler.json_schema(_checked(compiler, schema, "response_format"), description=description)


def response_schema(request: ChatCompletionRequest) -> tuple[dict[str, Any], str] | None:
    """(JSON schema, description) a ``response_format`` asks for (strict mode applied), or None for
    text. A ``json_schema`` format without a schema means any JSON object, as ``json_object`` does."""
    response_format = request.response_format
    if isinstance(response_format, JsonObjectResponseFormat):
        return ANY_OBJECT, "JSON object"
    if isinstance(response_format, JsonSchemaResponseFormat):
        spec = response_format.json_schema
        if spec.schema_ is None:
            return ANY_OBJECT, "JSON object"
        return (strict_schema(spec.schema_) if spec.strict else spec.schema_), "JSON schema"
    return None


def _tool_call_grammar(request: ChatCompletionRequest, compiler: GrammarCompiler,
                       content: tuple[dict[str, Any], str] | None) -> tuple[str, str]:
    """The tool-call grammar of ``request`` in the model's format, and its description."""
    from nbchat.engine.constraints import COMPACT_JSON

    tool_choice = request.effective_tool_choice
    tools = list(enumerate(request.tools or ()))
    if isinstance(tool_choice, NamedToolChoice):
        tools = [(index, tool) for index, tool in tools if tool.function.name == tool_choice.function.name]
        mode, description = "named", f"tool call to {tool_choice.function.name!r}"
    else:
        mode, description = tool_choice, f"tool calls ({tool_choice})"
    functions = []
    for index, tool in tools:
        parameters = NO_PARAMETERS if tool.function.parameters is None else tool.function.parameters
        # Arguments the schema does not name are refused even without strict (as llama.cpp's grammars
        # do): a small model otherwise invents nested arguments until max_tokens.
        parameters = strict_schema(parameters)
        # Compact arguments: whitespace in them is tokens nobody reads.
        param = f"tools[{index}].function.parameters"
        functions.append((tool.function.name, _checked(compiler, parameters, param, COMPACT_JSON)))
    content_schema = None
    if mode == "auto" and content is not None:
        content_schema = _checked(compiler, content[0], "response_format")
        description = f"tool calls (auto) or {content[1]}"
    tags = (hermes.TOOL_CALL_OPEN, hermes.TOOL_CALL_CLOSE)
    special = {tag for tag in tags if compiler.is_special_token(tag)}
    grammar = hermes.tool_call_grammar(functions, mode, parallel=request.allows_parallel_tool_calls,
                                       content_schema=content_schema, special_tags=special)
    return grammar, description


def _checked(compiler: GrammarCompiler, schema: Any, param: str,
             options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from nbchat.engine.constraints import GrammarError

    try:
        return compiler.checked_json_schema(schema, options)
    except GrammarError as exc:
        raise InvalidRequestError(f"Invalid schema for {param}: {exc}", param=param,
                                  code="invalid_value") from None


def _first_then_fresh(build: Callable[[], TokenConstraint | None]) -> Callable[[], TokenConstraint | None]:
    """A constraint factory whose first constraint is built now (its errors come before compute);
    each later choice gets a fresh one."""
    first = [build()]
    return lambda: first.pop() if first else build()


def _is_special_token(tokenizer: PreTrainedTokenizerFast, text: str) -> bool:
    """Whether ``text`` is one special token (decoding would drop it unless told to keep specials)."""
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder().values()
    return any(token.content == text and token.special for token in added)


def strict_schema(schema: Mapping[str, Any]) -> dict:
    """A copy of ``schema`` where every object schema without ``additionalProperties`` forbids extra
    properties (OpenAI's strict mode)."""
    out = dict(schema)
    types = out.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SUBSCHEMA_KEYS:
        if isinstance(out.get(key), Mapping):
            out[key] = strict_schema(out[key])
    for key in _SCHEMA_MAP_KEYS:
        if isinstance(out.get(key), Mapping):
            out[key] = {k: strict_schema(v) if isinstance(v, Mapping) else v for k, v in out[key].items()}
    for key in _SCHEMA_LIST_KEYS:
        if isinstance(out.get(key), list):
            out[key] = [strict_schema(v) if isinstance(v, Mapping) else v for v in out[key]]
    if isinstance(out.get("items"), list):  # draft-04 tuple form
        out["items"] = [strict_schema(v) if isinstance(v, Mapping) else v for v in out["items"]]
    return out
