"""The exception hierarchy of nbchat: every error a user can cause has a type here.

Errors are part of the interface. Each names the field at fault (``param``) and carries an
OpenAI-style ``code`` so the HTTP server can build OpenAI's error envelope from it unchanged.
"""

from __future__ import annotations


class NbchatError(Exception):
    """Base class of every error nbchat raises on purpose."""


class InvalidRequestError(NbchatError, ValueError):
    """A request field or message structure is wrong; raised before any compute.

    ``param`` names the field (``messages[3].role``, ``top_logprobs``); ``code`` is a short machine
    word (``invalid_value``, ``missing_required_parameter`` ...).
    """

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request_error"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthError(InvalidRequestError):
    """The prompt plus the requested completion does not fit the model's context."""

    def __init__(
        self, prompt_tokens: int, completion_tokens: int, context_length: int, *, param: str = "messages"
    ):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.context_length = context_length
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the messages, "
            f"{completion_tokens} in the completion). Please reduce the length of the messages or "
            f"the completion (max_tokens).",
            param=param,
            code="context_length_exceeded",
        )


class ConversationError(NbchatError, ValueError):
    """An operation a conversation cannot do (undo when empty) or a malformed conversation file."""


class ModelNotFoundError(NbchatError, LookupError):
    """A model name, path or repo id that cannot be resolved or fetched."""


class UnsupportedModelError(NbchatError, ValueError):
    """A checkpoint asks for something the engine does not implement (an architecture, a rope
    scaling type, a tensor type); refusing is better than silently running a different model."""


class EngineBusyError(NbchatError, RuntimeError):
    """A second generation was started on this thread while an earlier stream is still open."""


class EndpointError(NbchatError, RuntimeError):
    """A remote OpenAI-compatible endpoint could not be reached, refused the key, or failed a request
    in a way that is not the request's fault; ``status`` is its HTTP status, when it answered."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status
