"""Shared pieces of input validation: bounded types for plugin parameters, refusing a YAML
boolean where a number is expected, and one-line messages from pydantic errors.

Plugin authors use the bounded types in their ``Params`` (``batch_size: BatchSize = 8``) or
pydantic's own constraints (``Field(8, ge=1, le=4096)``); every ``resp_core.interfaces.Params``
and every recipe section refuses ``true``/``false`` given for a number (pydantic would read
``target: true`` as ``1.0``).
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any

from pydantic import Field, ValidationError

MAX_SEED = 2**32 - 1  # what every RNG RESP touches accepts (NumPy's legacy seeding is the narrowest)
MAX_COUNT = 1_000_000  # prompts, samples, items: far beyond any calibration or evaluation set
MAX_BATCH = 4096
MAX_NEW_TOKENS = 1_048_576

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
NewTokens = Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)]


def _strip_annotated(tp):
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _members(tp) -> list:
    tp = _strip_annotated(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        out = []
        for a in typing.get_args(tp):
            out += _members(a)
        return out
    return [tp]


def _bool_misread(tp, value) -> bool:
    """True when ``value`` holds a bool where ``tp`` expects a number and not a bool."""
    members = _members(tp)
    if any(m is Any for m in members):
        return False
    if isinstance(value, bool):
        if any(m is bool for m in members):
            return False
        return any(m in (int, float) for m in members)
    if isinstance(value, (list, tuple)):
        for m in members:
            origin = typing.get_origin(m)
            args = typing.get_args(m)
            if origin in (list, set, frozenset) and args:
                return any(_bool_misread(args[0], v) for v in value)
            if origin is tuple and args:
                if len(args) == 2 and args[1] is Ellipsis:
                    return any(_bool_misread(args[0], v) for v in value)
                return any(_bool_misread(a, v) for a, v in zip(args, value))
    if isinstance(value, dict):
        for m in members:
            if typing.get_origin(m) is dict and len(typing.get_args(m)) == 2:
                k, v_tp = typing.get_args(m)
                return any(_bool_misread(v_tp, v) or _bool_misread(k, key) for key, v in value.items())
    return False


def refuse_bool_for_number(cls, value, info):
    """A ``field_validator("*", mode="before")`` body: ``true`` is not a number."""
    field = cls.model_fields.get(info.field_name) if info.field_name else None
    if field is not None and _bool_misread(field.annotation, value):
        raise ValueError(f"expected a number, got a boolean ({value!r})" if isinstance(value, bool)
                         else "expected numbers, got a boolean")
    return value


_PREFIXES = ("Value error, ", "Assertion failed, ")


def error_message(err: dict) -> str:
    """One pydantic error dict as a short message (no "Value error, ", unknown keys named)."""
    if err["type"] == "extra_forbidden":
        return "unknown field"
    msg = err["msg"]
    for p in _PREFIXES:
        if msg.startswith(p):
            msg = msg[len(p):]
    if err["type"] in ("missing",):
        return "required field is missing"
    return msg.splitlines()[0] if msg else err["type"]


def first_error(exc: ValidationError, prefix: str = "") -> str:
    """``<prefix><dotted.field.path>: <message>`` for the first error of ``exc``."""
    err = exc.errors()[0]
    parts = []
    for x in err["loc"]:
        if isinstance(x, int):
            parts.append(f"[{x}]")
        else:
            parts.append(("." if parts else "") + str(x))
    loc = "".join(parts)
    msg = error_message(err)
    if loc and prefix:
        return f"{prefix}.{loc}: {msg}" if not loc.startswith("[") else f"{prefix}{loc}: {msg}"
    if loc:
        return f"{loc}: {msg}"
    return f"{prefix}: {msg}" if prefix else msg
