"""What the engine can deliver, stated without importing JAX, so the request validation
(``nbchat.protocol``) and the API use the engine's own numbers rather than copies of them."""

from __future__ import annotations

MAX_TOP_LOGPROBS = 20  # alternatives a token event can carry
LOGPROB_FLOOR = -9999.0  # reported instead of -inf for a banned token (OpenAI's logprobs are finite)
