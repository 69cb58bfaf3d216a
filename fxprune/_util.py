"""Small helpers used across fxprune, each written once: restoring training flags,
SI prefixes for numbers, and reading a TOML/JSON configuration file.

Example:
    >>> format_si(1_820_000_000, "FLOPs")
    '1.82 GFLOPs'
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

try:  # stdlib from Python 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None

_PREFIXES = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with ``model`` in eval mode; every submodule gets its own training
    flag back afterwards, also when the body raises.

    ``model.train(flag)`` after the body would not do: it sets every submodule to the
    root's flag, and a model with a frozen (eval) BatchNorm inside a training model
    would come back with that BatchNorm training.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = net[1].eval()
        >>> with eval_mode(net):
        ...     net.training, net[1].training
        (False, False)
        >>> net.training, net[0].training, net[1].training
        (True, True, False)
    """
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def format_si(value: float, unit: str = "", *, digits: int = 2, space: bool = True) -> str:
    """``value`` with a k/M/G/T prefix (powers of 1000) and ``digits`` decimals.

    Example:
        >>> format_si(1234, "B", digits=3), format_si(2.5e9, space=False), format_si(12, "B")
        ('1.234 kB', '2.50G', '12 B')
    """
    gap = " " if space else ""
    for factor, prefix in _PREFIXES:
        if abs(value) >= factor:
            return f"{value / factor:.{digits}f}{gap}{prefix}{unit}"
    return f"{value:g}{gap if unit else ''}{unit}"


def read_config(path: Path, error: type[Exception], where: str) -> Any:
    """The parsed contents of a ``.json`` file or of any other file as TOML.

    Every failure (no such file, TOML on Python < 3.11, a parse or decode error)
    raises ``error("{where}: ...")`` naming the path.

    Example:
        >>> read_config(Path("pyproject.toml"), ValueError, "budget")["project"]["name"]
        'fxprune'
    """
    if not path.is_file():
        raise error(f"{where}: file not found: {path}")
    is_json = path.suffix.lower() == ".json"
    if not is_json and tomllib is None:
        raise error(f"{where}: cannot load {path}: reading TOML needs Python >= 3.11; use JSON")
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if is_json else tomllib.loads(text)
    except (OSError, ValueError) as failure:  # TOML/JSON/Unicode decode errors are ValueErrors
        raise error(f"{where}: cannot parse {path}: {failure}") from None


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, cut at ``limit`` characters, for error
    messages that must stay short (some export errors are a whole graph dump on one line).

    >>> first_line(ValueError("a\\nb")), first_line(KeyError()), first_line(ValueError("x" * 400))[-5:]
    ('a', 'KeyError', 'x ...')
    """
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit - 4] + " ..."

