"""pydantic's validation errors -> ``InvalidRequestError``: the one translator.

A validator raises ``RequestFieldError`` (a message, and where below the validated value the fault
is); pydantic's own errors (types, ranges, literals, unknown fields) are worded here with a hint per
field. The ``param`` of the result is a path such as ``messages[3].role``. Must not: know the request
types (the caller passes the field names and hints).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from nbchat.errors import InvalidRequestError


class RequestFieldError(ValueError):
    """Raised inside validators: a message for the user and where, relative to the validated value,
    the fault is (``"[1].type"`` under ``messages[0].content``). Turned into InvalidRequestError."""

    def __init__(self, message: str, *, field: str = "", code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code


_EXPECTED_BY_ERROR_TYPE = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean (True or False)",
    "dict_type": "an object (dict)",
    "model_type": "an object (dict)",
    "model_attributes_type": "an object (dict)",
    "list_type": "a list",
    "tuple_type": "a list",
    "finite_number": "a finite number",
    "none_required": "null (None)",
}
_RANGE_WORDS = {
    "greater_than": "greater than {gt}",
    "greater_than_equal": ">= {ge}",
    "less_than": "less than {lt}",
    "less_than_equal": "<= {le}",
}


def invalid_request(exc: ValidationError, *, hints: Mapping[str, str],
                    known_fields: Sequence[str]) -> InvalidRequestError:
    """The InvalidRequestError for pydantic's first error: ``hints`` say how to fix a top-level field;
    ``known_fields`` are the names an unknown field's spelling is compared with."""
    error = exc.errors(include_url=False)[0]
    path = _loc_to_path(error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    value = error.get("input")
    cause = ctx.get("error")
    if isinstance(cause, RequestFieldError):
        param = _join_path(path, cause.field) or None
        return InvalidRequestError(cause.message, param=param, code=cause.code)
    hint = hints.get(path.split("[")[0].split(".")[0], "")
    if kind == "missing":
        return InvalidRequestError(
            f"Missing required parameter: '{path}'.", param=path, code="missing_required_parameter"
        )
    if kind == "extra_forbidden":
        unknown = [_loc_to_path(other["loc"]) for other in exc.errors(include_url=False)
                   if other["type"] == "extra_forbidden"]
        fixes = []
        for unknown_path in unknown:
            field = unknown_path.rsplit(".", 1)[-1]
            suggestion = difflib.get_close_matches(field, known_fields, n=1, cutoff=0.75) or [
                name for name in known_fields if len(field) >= 4 and field in name
            ]
            if suggestion:
                fixes.append(f"did you mean '{suggestion[0]}' for '{field}'?")
        where = "request argument" if "." not in path else "field"
        names = ", ".join(f"'{name}'" for name in unknown)
        fix = f" Remove {'it' if len(unknown) == 1 else 'them'}"
        fix += f", or fix the spelling: {' '.join(fixes)}" if fixes else "."
        return InvalidRequestError(
            f"Unrecognized {where}{'s' if len(unknown) > 1 else ''} supplied: {names}.{fix}",
            param=path,
            code="unknown_parameter",
        )
    if kind in _EXPECTED_BY_ERROR_TYPE:
        return InvalidRequestError(
            f"Invalid type for '{path}': expected {_EXPECTED_BY_ERROR_TYPE[kind]}, but got "
            f"{describe(value)} instead. {hint}".rstrip(),
            param=path,
            code="invalid_type",
        )
    if kind in _RANGE_WORDS:
        bound = _RANGE_WORDS[kind].format(**{k: _number(v) for k, v in ctx.items()})
        return InvalidRequestError(
            f"Invalid value for '{path}': expected a value {bound}, "
            f"but got {_number(value)}. {hint}".rstrip(),
            param=path,
            code="invalid_value",
        )
    if kind == "literal_error":
        return InvalidRequestError(
            f"Invalid value for '{path}': {value!r}. Supported values are: {ctx.get('expected')}.",
            param=path,
            code="invalid_value",
        )
    if kind == "string_pattern_mismatch":
        return InvalidRequestError(
            f"Invalid '{path}': string does not match pattern. Expected a string that matches the pattern "
            f"'{ctx.get('pattern')}', but got {value!r}.",
            param=path,
            code="invalid_value",
        )
    if kind == "string_too_short":
        return InvalidRequestError(f"Invalid '{path}': it must not be empty.", param=path,
                                   code="invalid_value")
    return InvalidRequestError(
        f"Invalid value for '{path}': {error['msg']}.", param=path, code="invalid_value"
    )


def _loc_to_path(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.startswith("@"):
            continue  # a union tag, not a field
        elif part == "[key]":
            continue
        else:
            path += f".{part}" if path else part
    return path


def _join_path(path: str, field: str) -> str:
    if not field:
        return path
    if field.startswith("[") or not path:
        return path + field
    return f"{path}.{field}"


def describe(value: Any) -> str:
    """A short phrase for what the user passed: ``a string ('0.5')``."""
    names = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", dict: "an object",
             list: "a list", tuple: "a tuple", type(None): "None"}
    kind = names.get(type(value), f"a {type(value).__name__}")
    if value is None or isinstance(value, dict | list | tuple):
        return kind
    shown = repr(value)
    return f"{kind} ({shown if len(shown) <= 40 else shown[:37] + '...'})"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else repr(value)


def quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)
