"""OpenAI's chat completion shapes, validated once.

``requests`` holds the request type and its validation (``validate_request``), ``messages`` the
message types and the rules that span several messages, ``formats`` the ``response_format``,
``tools`` and ``tool_choice`` types, ``responses`` the response and stream chunk
types, ``errors`` the one translation of pydantic's errors into ``InvalidRequestError``, ``deltas``
the merge of streamed tool-call fragments (importable without pydantic, for the notebook layer).

This package holds no model, tokenizer or JAX: rules that need the model (vocabulary size, context
length, what the chat template allows) are checked where the model is known (``nbchat.api``).
Importing the package itself imports nothing heavy: it states the constants other layers share.
"""

from __future__ import annotations

# OpenAI's rule for a function's (and a json_schema's) name.
TOOL_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
