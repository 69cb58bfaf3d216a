"""Validation helpers shared by the spec, the latency settings and the registries.

Every failure is a ``SpecError`` whose message starts with the field's path
(``spec.latency.repeats: ...``) and says what was expected and what came.

Example:
    >>> check_int("spec.seed", 3, 0)
    3
    >>> check_choice("spec.scope", "globl", ("global", "local"))
    Traceback (most recent call last):
    ...
    fxprune.errors.SpecError: spec.scope: must be one of 'global', 'local'; got str 'globl'; did you mean 'global'?
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping, NoReturn

from fxprune.errors import SpecError


def fail(path: str, message: str) -> NoReturn:
    """Raise ``SpecError("path: message")``."""
    raise SpecError(f"{path}: {message}")


def got(value: Any) -> str:
    """``got TYPE REPR`` for an error message, the repr cut at 60 characters."""
    text = repr(value)
    return f"got {type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def did_you_mean(name: Any, known: Iterable[str]) -> str:
    """``; did you mean 'x'?`` for the closest known name, or ``""``."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_keys(path: str, data: Mapping[Any, Any], known: list[str]) -> None:
    """Every key of ``data`` is in ``known``; an unknown one is named with the closest match."""
    for key in data:
        if key not in known:
            fail(f"{path}.{key}", f"unknown field {key!r}; known fields: "
                 f"{', '.join(known)}{did_you_mean(key, known)}")


def check_int(path: str, value: Any, minimum: int) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(path, f"expected an int >= {minimum}, {got(value)}")
    if value < minimum:
        fail(path, f"must be an int >= {minimum}, got {value}")
    return value


def check_bool(path: str, value: Any) -> bool:
    """A bool (an int 0/1 is not accepted: it is usually a mistake)."""
    if not isinstance(value, bool):
        fail(path, f"expected a bool (true or false), {got(value)}")
    return value


def check_choice(path: str, value: Any, allowed: Iterable[str]) -> str:
    """One of ``allowed``; a near miss gets a "did you mean"."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        hint = did_you_mean(value, allowed) if isinstance(value, str) else ""
        fail(path, f"must be one of {', '.join(map(repr, allowed))}; {got(value)}{hint}")
    return value
