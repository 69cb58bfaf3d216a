"""Argument checks and learning-rate lookup shared by the regularisers."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch

from fxprune.errors import SpecError


def check_lam(lam: float, name: str = "lam") -> float:
    """Return ``lam`` as a float; raise SpecError unless it is finite and >= 0.

    Example:
        >>> check_lam(1e-4)
        0.0001
    """
    try:
        value = float(lam)
    except (TypeError, ValueError):
        raise SpecError(f"{name}: expected a number >= 0, got {lam!r}") from None
    if not math.isfinite(value) or value < 0:
        raise SpecError(f"{name}: expected a finite number >= 0, got {lam!r}")
    return value


def check_positive(value: float, name: str) -> float:
    """Return ``value`` as a float; raise SpecError unless it is finite and > 0.

    Example:
        >>> check_positive(0.5, "p")
        0.5
    """
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise SpecError(f"{name}: expected a number > 0, got {value!r}") from None
    if not math.isfinite(out) or out <= 0:
        raise SpecError(f"{name}: expected a finite number > 0, got {value!r}")
    return out


def check_int(value, name: str, minimum: int) -> int:
    """Return ``value``; raise SpecError unless it is an int (not a bool) >= ``minimum``.

    Example:
        >>> check_int(3, "depth", 2)
        3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def lr_of(params: Iterable[torch.Tensor], lr: float | None,
          optimizer: torch.optim.Optimizer | None) -> list[float]:
    """The learning rate to use for each parameter, in order.

    An explicit ``lr`` wins; otherwise each parameter's lr is read from the
    optimizer's ``param_groups`` (so schedulers are followed step by step).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> lr_of([w], None, torch.optim.SGD([w], lr=0.1))
        [0.1]
    """
    params = list(params)
    if lr is not None:
        return [check_lam(lr, "lr")] * len(params)
    if optimizer is None:
        raise SpecError("lr: no lr given and no optimizer to read it from; "
                        "pass lr=... or optimizer=...")
    by_id = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_id[id(p)] = float(group["lr"])
    missing = [i for i, p in enumerate(params) if id(p) not in by_id]
    if missing:
        raise SpecError(f"lr: {len(missing)} regularised parameter(s) are not in the "
                        "optimizer's param_groups; pass lr=... explicitly")
    return [by_id[id(p)] for p in params]


def warn_on_weight_decay(params: Iterable[torch.Tensor],
                         optimizer: torch.optim.Optimizer | None, who: str) -> None:
    """Warn when the optimizer also applies its own weight decay to ``params``.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> warn_on_weight_decay([w], torch.optim.SGD([w], lr=0.1), "LpDecay")
    """
    if optimizer is None:
        return
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        if group.get("weight_decay", 0) and any(id(p) in ids for p in group["params"]):
            warnings.warn(f"{who}: the optimizer applies weight_decay="
                          f"{group['weight_decay']} to regularised parameters as well; "
                          "set it to 0 for them", stacklevel=3)
            return
