"""Helpers for pytest users: keep a model inside its size budget.

Example:
    >>> import torch, torchvision
    >>> from fxprune.testing import assert_within_budget
    >>> model = torchvision.models.resnet18(weights=None)
    >>> result = assert_within_budget(model, torch.randn(1, 3, 224, 224),
    ...                               max_params="12M", max_flops="4G", max_size="50MB")
    >>> result.ok
    True
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from fxprune.budget import Budget, BudgetResult, check_budget
from fxprune.capture.inputs import as_example_inputs
from fxprune.measure import LatencySettings

__all__ = ["ResidualLinear", "assert_within_budget"]


def assert_within_budget(model: torch.nn.Module, example_inputs=None, *, input_shape=None,
                         max_params: Any = None, max_flops: Any = None, max_size: Any = None,
                         max_latency_ms: Any = None, latency: dict | None = None) -> BudgetResult:
    """Raise ``AssertionError`` with the limit/measured table when any limit is exceeded.

    Limits take the units of ``[tool.fxprune.budget]``: ``max_params="5M"``,
    ``max_flops="1.2G"``, ``max_size="20MB"``, ``max_latency_ms=15`` (numbers work too).
    ``example_inputs`` (a tensor or a tuple) or ``input_shape`` is needed for FLOPs and
    latency. ``latency={"device": "cpu", "threads": 2}`` says how latency is measured:
    any fields of ``fxprune.measure.LatencySettings``, the rest at its defaults. Returns the result when every limit holds.

    Example:
        >>> assert_within_budget(torch.nn.Linear(10, 20), torch.randn(1, 10), max_params=220).ok
        True
        >>> assert_within_budget(torch.nn.Linear(10, 20), torch.randn(1, 10), max_params=219)
        Traceback (most recent call last):
        ...
        AssertionError: ...max_params...
    """
    data = {"max_params": max_params, "max_flops": max_flops, "max_size": max_size,
            "max_latency_ms": max_latency_ms}
    data = {k: v for k, v in data.items() if v is not None}
    if max_latency_ms is not None:  # stated in full: the defaults of LatencySettings, then ``latency``
        data["latency"] = {**dataclasses.asdict(LatencySettings()), **(latency or {})}
    budget = Budget.from_dict(data, source="assert_within_budget()")
    if example_inputs is None and input_shape is not None:
        shapes = input_shape if isinstance(input_shape[0], (list, tuple)) else [input_shape]
        example_inputs = tuple(torch.randn(*s) for s in shapes)
    if example_inputs is not None:
        example_inputs = as_example_inputs(example_inputs)
    result = check_budget(model, example_inputs, budget)
    if not result.ok:
        raise AssertionError(f"{type(model).__name__} exceeds its budget:\n{result.table()}")
    return result


class ResidualLinear(torch.nn.Module):
    """``x + fc(x)``, or ``x + fc2(relu(fc1(x)))`` with ``hidden``: the smallest residual
    block (one branch), for examples and tests of depth units.

    Example:
        >>> import fxprune
        >>> graph = fxprune.analyze(torch.nn.Sequential(ResidualLinear(4), ResidualLinear(4, hidden=8)),
        ...                         torch.randn(2, 4))
        >>> len(graph.branches), [l.path for l in graph.layers]
        (2, ['0', '1'])
    """

    def __init__(self, width: int, hidden: int | None = None):
        super().__init__()
        if hidden is None:
            self.fc = torch.nn.Linear(width, width)
        else:
            self.fc1, self.fc2 = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "fc"):
            return x + self.fc(x)
        return x + self.fc2(torch.relu(self.fc1(x)))
