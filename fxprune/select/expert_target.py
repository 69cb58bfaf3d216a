"""Experts competing for a target (``spec.units`` holds "experts" and ``spec.target`` is set).

Each expert of each routed layer is one unit with a cost in the target's metric: the
metric's per-entry cost summed over what removing it cuts (its router row and its slice
of every expert weight, or its own modules in a per-expert loop). Its key follows the
one-scale rule of :mod:`fxprune.select.depth`: the expert score per unit of cost, divided
by the mean of that over the experts, so the average expert's key is 1 as the average
channel's and branch's are.

Under a FLOPs (or latency) target an expert routed by grouped products carries no
FLOPs: every token still runs ``top_k`` experts, the kept ones, so removing experts
saves nothing but the router's row (and the per-entry FLOPs, measured on modules, hold
none for the stacked weights). Experts that carry no cost are no candidates (a note
says so); a per-expert loop that runs every expert on every token carries the FLOPs of
its modules and competes. Under a parameter target every expert carries its weights.
"""
from __future__ import annotations

import math

import numpy as np

from fxprune.select.expert_score import removable_sets, score_experts
from fxprune.select.metrics import TARGET_METRICS


def expert_costs(graph, metric: str) -> dict[int, np.ndarray]:
    """``{expert set id: the metric's estimated cost of each expert}``.

    >>> import torch, fxprune
    >>> class TwoExperts(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.router, self.a, self.b = (torch.nn.Linear(4, n) for n in (2, 4, 4))
    ...     def forward(self, x):
    ...         w, idx = self.router(x).softmax(-1).topk(1, dim=-1)
    ...         return x + (w * (idx == 0)) * self.a(x) + (w * (idx == 1)) * self.b(x)
    >>> graph = fxprune.analyze(TwoExperts(), torch.randn(8, 4))
    >>> expert_costs(graph, "params")[graph.experts[0].id].tolist()  # router row 4 + 1, expert 16 + 4
    [25.0, 25.0]
    """
    per_entry = TARGET_METRICS[metric].per_entry(graph)
    shapes = {k: v.shape for k, v in graph.gm.state_dict().items()}
    costs = {}
    for s in graph.experts:
        cost = np.zeros(s.size)
        for e in range(s.size):
            for key, cuts in s.slices([e], "all").items():
                if key in per_entry and key in shapes:
                    for dim, index in cuts:
                        cost[e] += per_entry[key] * math.prod(shapes[key]) / shapes[key][dim] * len(index)
        costs[s.id] = cost
    return costs


def expert_candidates(graph, spec, metric: str, notes: list[str]):
    """``(keys, costs, limits)`` of the experts that compete for ``metric``: per expert set,
    one-scale keys (score per cost over its kind's mean) and costs, and how many experts
    the set may lose (``E - top_k``, and ``spec.max_ratio`` of E)."""
    sets = removable_sets(graph, notes)
    if not sets:
        return {}, {}, {}
    costs = expert_costs(graph, metric)
    costly = [s for s in sets if (costs[s.id] > 0).all()]
    if len(costly) < len(sets):
        notes.append(f"select: {len(sets) - len(costly)} routed layer(s) keep their experts under target "
                     f"{metric}: removing an expert saves none of it (each token still runs top_k experts)")
    if not costly:
        return {}, {}, {}
    scores = score_experts(graph, spec.expert_score, calibration=spec.calibration, loss_fn=spec.loss_fn)
    per_cost = {s.id: np.asarray(scores[s.id], dtype=np.float64) / costs[s.id] for s in costly}
    mean = float(np.concatenate(list(per_cost.values())).mean())
    keys = {sid: k / mean if mean > 0 else k for sid, k in per_cost.items()}
    limits = {s.id: min(s.removable, int(math.floor(spec.max_ratio * s.size + 1e-9))) for s in costly}
    notes.append(f"select: {sum(s.size for s in costly)} experts of {len(costly)} routed layer(s) compete, "
                 f"scored by {spec.expert_score}")
    return keys, {s.id: costs[s.id] for s in costly}, limits


__all__ = ["expert_costs", "expert_candidates"]
