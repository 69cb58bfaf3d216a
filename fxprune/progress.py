"""Progress on long work: one tqdm bar per top-level call, fed from wherever the work is.

``compress(..., progress=True)`` and the ``fxprune`` command open a bar with
``reporting``; the passes that take seconds (each verified prune of a target, each
colour of the latency table, the end-to-end timing of ``scope="latency"``) call
``step``, which does nothing when no bar is open. So the passes take no progress
argument, and the Python API stays silent unless asked.

The bar writes to stderr and only when stderr is a terminal: piped or captured
output, a CI log, a notebook cell's stream, gets no control characters.

Example:
    >>> with reporting("compress", enabled=True):   # silent here: stderr is no terminal
    ...     step("analysing")
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
_bar: ContextVar[tqdm | None] = ContextVar("fxprune_progress_bar", default=None)


def on_terminal() -> bool:
    """Whether stderr is an interactive terminal (where progress bars belong).

    Example:
        >>> isinstance(on_terminal(), bool)
        True
    """
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def reporting(desc: str, enabled: bool) -> Iterator[None]:
    """Open a bar of steps (the total is not known ahead) for the calls inside.

    A nested ``reporting`` (``compress`` inside the CLI) feeds the outer bar. Nothing is
    shown unless ``enabled`` and stderr is a terminal. The bar is cleared on exit, so a
    report or an error printed next starts on a clean line.

    Example:
        >>> with reporting("work", enabled=False):
        ...     step("one")
    """
    if _bar.get() is not None:
        yield
        return
    # mininterval=0: steps are few and slow, each one is shown as it starts
    bar = tqdm(desc=desc, unit="step", file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0,
               disable=not (enabled and on_terminal()),
               bar_format="{desc}: {n} steps [{elapsed}]{postfix}")
    token = _bar.set(bar)
    try:
        yield
    finally:
        _bar.reset(token)
        bar.close()


def step(text: str) -> None:
    """Count one step of the open bar and say what runs now (no-op without a bar).

    Example:
        >>> step("timing group 3")
    """
    bar = _bar.get()
    if bar is not None:
        bar.set_postfix_str(text, refresh=False)
        bar.update(1)


def progress_bar(items: Iterable[T], desc: str, total: int | None = None) -> Iterable[T]:
    """``items`` with a tqdm bar on stderr when it is a terminal (benchmark loops).

    Example:
        >>> list(progress_bar(["resnet18"], "models"))
        ['resnet18']
    """
    return tqdm(items, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True,
                disable=not on_terminal())
