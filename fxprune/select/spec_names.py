"""Spec fields that name parts of the model (``ignore`` patterns, ``ratio`` keys), checked
against the analysed graph: a typo would otherwise ignore or prune nothing, silently."""
from __future__ import annotations

import difflib
from fnmatch import fnmatch
from typing import Mapping

from fxprune._check import fail


def _closest(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    return (f"closest module names: {', '.join(map(repr, close))}" if close
            else f"module names look like {', '.join(map(repr, names[:3]))}")


def check_ignore(patterns: list[str], names: list[str]) -> None:
    """Raise a SpecError for the first ``spec.ignore`` pattern that matches none of ``names``
    (the model's module names), naming the closest ones: a typo would otherwise ignore nothing.

    Example:
        >>> check_ignore(["layer1.*"], ["conv1", "layer1", "layer1.0"])
        >>> check_ignore(["layr1.*"], ["conv1", "layer1", "layer1.0"])
        Traceback (most recent call last):
        ...
        fxprune.errors.SpecError: spec.ignore: pattern 'layr1.*' matches no module of the model; closest module names: 'layer1.0', 'layer1'; patterns are fnmatch patterns on module names, e.g. 'layer1.*' (list them with `fxprune graph MODEL`)
    """
    for pattern in patterns:
        if not any(fnmatch(name, pattern) for name in names):
            fail("spec.ignore", f"pattern {pattern!r} matches no module of the model; {_closest(pattern, names)}; "
                  "patterns are fnmatch patterns on module names, e.g. 'layer1.*' (list them "
                  "with `fxprune graph MODEL`)")


def check_ratio_keys(ratio: Mapping[str, float], names: list[str], ids: list[int]) -> None:
    """Raise a SpecError for the first key of a ``spec.ratio`` dict that is neither a group
    id in ``ids`` nor an fnmatch pattern matching one of ``names`` (the modules that produce
    the groups' channels), naming the closest: a typo would otherwise prune nothing there.

    Example:
        >>> check_ratio_keys({"layer1.*": 0.5, "2": 0.25}, ["conv1", "layer1.0.conv1"], [0, 1, 2])
        >>> check_ratio_keys({"layr1.*": 0.5}, ["conv1", "layer1.0.conv1"], [0, 1, 2])
        Traceback (most recent call last):
        ...
        fxprune.errors.SpecError: spec.ratio['layr1.*']: matches no group: no module that produces a group's channels matches it; closest module names: 'layer1.0.conv1'; keys are group ids or fnmatch patterns on module names (list them with `fxprune graph MODEL`)
    """
    for key in ratio:
        if (key.isdigit() and int(key) in ids) or any(fnmatch(name, key) for name in names):
            continue
        if key.isdigit():
            hint = (f"group ids run from {min(ids)} to {max(ids)}" if ids else "the model has no groups")
            fail(f"spec.ratio[{key!r}]", f"matches no group: there is no group {key}; {hint} (list them "
                 "with `fxprune graph MODEL`)")
        fail(f"spec.ratio[{key!r}]", f"matches no group: no module that produces a group's channels "
             f"matches it; {_closest(key, names)}; keys are group ids or fnmatch patterns on module names (list them "
             "with `fxprune graph MODEL`)")


__all__ = ["check_ignore", "check_ratio_keys"]
