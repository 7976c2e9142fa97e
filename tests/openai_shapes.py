"""Checking our responses against the official openai package's types."""

from __future__ import annotations


def assert_exact_openai_shape(ours, openai_type) -> None:
    """Validates with the openai type and carries no field that type does not know."""
    parsed = openai_type.model_validate(ours.model_dump())
    pending = [parsed]
    while pending:
        item = pending.pop()
        if hasattr(item, "model_extra"):
            assert not item.model_extra, f"{type(item).__name__} got unknown fields {item.model_extra}"
            pending.extend(getattr(item, name) for name in type(item).model_fields)
        elif isinstance(item, list):
            pending.extend(item)
