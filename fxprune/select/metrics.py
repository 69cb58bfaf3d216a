"""The target metrics registry: what ``target={"METRIC": fraction}`` can ask for.

A metric says how to *rank* channels (the cost one weight entry carries, which gives
each unit's cost) and how to *measure* a model (the truth the landing search corrects
the ranking's estimate with). ``Spec`` validates ``target`` against this registry, the
select pass reads it, and ``register_metric`` adds one.

Built in:

- ``flops``: FLOPs per weight entry of each conv/linear from one hooked forward pass;
  measured by ``fxprune.measure.count_flops``.
- ``params``: one per parameter entry; measured by ``count_params``.
- ``latency``: ranked by FLOPs (a cost model) and measured for real: eager latency
  relative to the original with the spec's latency settings, within 5%.

Example:
    >>> sorted(TARGET_METRICS)
    ['flops', 'latency', 'params']
    >>> TARGET_METRICS["params"].noun
    'parameters'
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fxprune._util import eval_mode
from fxprune.channels.graph import DependencyGraph, Group
from fxprune.measure import count_flops, count_params, measure_latency
from fxprune.select.distributed import on_rank_zero
from fxprune.select.score import unit_entries

TOLERANCE = 0.01  # relative to the target; the public promise is 2 %

# measure(spec, graph) -> fn(model, inputs) -> value; the landing divides by the original's
Measure = Callable[[object, DependencyGraph], Callable[[torch.nn.Module, tuple], float]]


@dataclass(frozen=True)
class TargetMetric:
    """One target metric.

    Fields:
        noun: what is kept, in messages ("the fraction of the original FLOPs to keep").
        per_entry: ``fn(graph) -> {state_dict key: cost of one entry}``, used to rank.
        measure: ``fn(spec, graph) -> fn(model, inputs) -> value``, the real thing.
        tolerance: relative error the landing search accepts (the promise is twice it).
    """

    noun: str
    per_entry: Callable[[DependencyGraph], dict[str, float]]
    measure: Measure
    tolerance: float = TOLERANCE


TARGET_METRICS: dict[str, TargetMetric] = {}


def register_metric(name: str, metric: TargetMetric) -> TargetMetric:
    """Make ``target={name: fraction}`` available to ``Spec`` and ``compress``.

    Example:
        >>> register_metric("weights", TargetMetric("weights", TARGET_METRICS["params"].per_entry,
        ...                                        TARGET_METRICS["params"].measure))
        TargetMetric(noun='weights', ...)
        >>> del TARGET_METRICS["weights"]
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_metric needs a non-empty name, got {name!r}")
    TARGET_METRICS[name] = metric
    return metric


def flops_per_entry(graph: DependencyGraph) -> dict[str, float]:
    """FLOPs carried by one entry of each conv/linear weight, from one hooked forward pass."""
    per_entry: dict[str, float] = {}
    handles = []

    def hook(name):
        def fn(module, args, output):
            w = module.weight
            ref = args[0] if isinstance(module, torch.nn.modules.conv._ConvTransposeNd) else output
            per_entry[f"{name}.weight"] = per_entry.get(f"{name}.weight", 0.0) + 2.0 * ref.numel() / w.shape[0]
        return fn

    for name, m in graph.gm.named_modules():
        if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear)):
            handles.append(m.register_forward_hook(hook(name)))
    try:
        with torch.no_grad(), eval_mode(graph.gm):
            graph.example_inputs.call(graph.gm)
    finally:
        for h in handles:
            h.remove()
    return per_entry


def param_per_entry(graph: DependencyGraph) -> dict[str, float]:
    """One per entry of every parameter."""
    return {name: 1.0 for name, _ in graph.gm.named_parameters(remove_duplicate=False)}


def relative_latency(spec, graph: DependencyGraph) -> Callable[[torch.nn.Module, tuple], float]:
    """Eager latency relative to the original, with the spec's latency settings.

    Each candidate is timed alternately with the original in one call, so drift and
    background load hit both: a baseline timed once and compared with later runs let
    noise pass a barely pruned model as fast enough.
    """
    settings = dataclasses.replace(spec.latency, compile=False)  # eager: what is ranked

    def measure(model, inputs) -> float:
        if model is graph.gm:
            return 1.0
        # timed on rank 0 alone under torch.distributed: every rank lands on the same plan
        original_ms, model_ms = on_rank_zero(lambda: measure_latency([graph.gm, model], inputs, settings).eager_ms)
        return model_ms / original_ms

    return measure


register_metric("flops", TargetMetric("FLOPs", flops_per_entry,
                                      lambda spec, graph: lambda model, inputs: count_flops(model, inputs)))
register_metric("params", TargetMetric("parameters", param_per_entry,
                                       lambda spec, graph: lambda model, inputs: count_params(model)))
register_metric("latency", TargetMetric("latency", flops_per_entry, relative_latency,
                                        tolerance=0.05))  # timings are noisy: 5 %


def unit_costs(graph: DependencyGraph, groups: list[Group], metric: str) -> dict[int, np.ndarray]:
    """Estimated cost (``metric``'s per-entry cost summed) each unit carries
    (first order: overlaps counted twice)."""
    weight = TARGET_METRICS[metric].per_entry(graph)
    shapes = {k: v.shape for k, v in graph.gm.state_dict().items()}
    costs = {}
    for g in groups:
        c = np.zeros(g.size)
        for key, dim, idx, units in unit_entries(g, ("out", "in")):
            if key in weight:
                shape = shapes[key]
                np.add.at(c, units, weight[key] * math.prod(shape) / shape[dim])
        costs[g.id] = c
    return costs
