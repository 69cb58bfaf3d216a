"""Selection with residual branches or whole layers as units (``spec.units`` holds
"branches" or "layers"; both kinds are depth units, scored and costed alike, and called
branches below).

Where both kinds compete, a layer whose removal equals removing its branches (a pre-norm
layer) is left out, and the ratio never picks a unit that a unit it already picked
removes (or that removes it): no depth is counted twice.

- **ratio**: the ``round(ratio * n)`` lowest-scoring of the ``n`` eligible branches go
  (beside the channel plan of the same ratio when channels compete too).
- **target**: one ranking of every unit, lowest key first, landed like channels are
  (``fxprune.select.landing``: pruned and measured until within tolerance). A unit's key
  is its importance per unit of cost, relative to the average of its kind:

  - a channel: its score divided by its group's mean score (the ``scope="global"`` key),
    divided by the cost it carries, then by the mean of that over every channel unit;
  - a branch: its branch score divided by its cost, then by the mean of that over the
    branches.

  Costs are in the target's metric (FLOPs, or parameters; a latency target uses
  FLOPs). The scores of the two kinds measure different things (a weight norm, a
  relative output norm), so neither is converted into the other: each kind's keys are
  made to average 1, which assumes that removing the average channel and the average
  branch cost as much importance per FLOP, and the ranking then takes, from either
  kind, what is cheaper than its kind's average first. Within a kind the order is the
  score per cost.

Branches are coarse: a target may land only within the granularity of the smallest
branch; ``result.notes`` says how close it came. ``spec.max_ratio`` caps the share of
branches removed, as it caps each channel group's.
"""
from __future__ import annotations

import dataclasses
from fnmatch import fnmatch

import numpy as np

from fxprune.channels.layers import covered_by_branches, covers
from fxprune.select.branch_score import branch_costs, score_branches
from fxprune.select.landing import Landing, land


def depth_units(graph, spec) -> list:
    """The branches and layers ``spec.units`` names; with both, a layer whose branches
    remove it (pre-norm) is left to them."""
    kinds = spec.unit_kinds
    branches = graph.branches if "branches" in kinds else []
    layers = graph.layers if "layers" in kinds else []
    return [*branches, *(l for l in layers if not (branches and covered_by_branches(graph, l)))]


def eligible_branches(graph, spec, notes: list[str]) -> list:
    """Depth units (:func:`depth_units`) no ``spec.ignore`` pattern touches."""
    out = []
    for b in depth_units(graph, spec):
        hit = [m for m in b.modules if any(fnmatch(m, p) for p in spec.ignore)]
        if hit:
            notes.append(f"select: {b.kind} {b.id} skipped, {hit[0]} matches spec.ignore")
        else:
            out.append(b)
    return out


def _scores(graph, branches, spec, notes) -> dict[int, float]:
    scores = score_branches(graph, spec.branch_score, calibration=spec.calibration, run=spec.branch_run,
                            loss_fn=spec.loss_fn, units=branches)
    what = f"angular_distance over runs of {spec.branch_run}" if spec.branch_score == "angular_distance" \
        else spec.branch_score
    notes.append(f"select: {_count(branches)} compete, scored by {what}"
                 + (" over the calibration batches" if spec.calibration is not None and
                    spec.branch_score != "group_lasso" else ""))
    return {b.id: scores[b.id] for b in branches}


def branches_by_ratio(graph, spec, notes: list[str]) -> dict[int, list[int]]:
    """``{branch id: [0]}`` for the ``round(spec.ratio * n)`` lowest-scoring branches.

    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         x = x + self.a(x)
    ...         return x + 0.01 * self.b(x)
    >>> graph = fxprune.analyze(Net(), torch.randn(8, 4))
    >>> spec = fxprune.Spec(example_inputs=torch.randn(8, 4), ratio=0.5, units="branches")
    >>> branches_by_ratio(graph, spec, []) == {graph.branches[1].id: [0]}
    True
    """
    branches = eligible_branches(graph, spec, notes)
    scores = _scores(graph, branches, spec, notes)
    n = int(round(spec.ratio * len(branches)))
    chosen: list = []
    for b in sorted(branches, key=lambda b: (scores[b.id], b.id)):
        if len(chosen) < n and not any(covers(c, b) or covers(b, c) for c in chosen):
            chosen.append(b)
    notes.append(f"select: removing {_count(chosen)} of {len(branches)}")
    return {b.id: [0] for b in chosen}


def _count(units: list) -> str:
    """``"3 residual branch(es) and 2 layer(s)"``, naming only the kinds present."""
    kinds = {"branch": 0, "layer": 0}
    for u in units:
        kinds[u.kind] += 1
    words = [f"{kinds['branch']} residual branch(es)" if kinds["branch"] or not kinds["layer"] else "",
             f"{kinds['layer']} layer(s)" if kinds["layer"] else ""]
    return " and ".join(w for w in words if w)


@dataclasses.dataclass
class _DepthLanding(Landing):
    """A landing whose ranking holds branch ids too (one unit each)."""

    branch_ids: tuple = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        for bid in self.branch_ids:
            self.sizes[bid], self.multiple[bid], self.limit[bid] = 1, 1, 1


def land_with_branches(graph, groups, keys: dict[int, np.ndarray], costs: dict[int, np.ndarray], spec,
                       limit: dict[int, int], metric: str, target: float, notes: list[str]):
    """Land ``target`` of ``metric`` over channel units (``keys``/``costs`` of ``groups``,
    empty for branches only) and the eligible branches; returns (plan, pruned model or None)."""
    branches = eligible_branches(graph, spec, notes)
    eligible = len(branches)
    scores = _scores(graph, branches, spec, notes)
    cost = branch_costs(graph, "params" if metric == "params" else "flops", branches)
    keys, costs, limit = _one_scale(keys), dict(costs), dict(limit)
    per_cost = {b.id: scores[b.id] / cost[b.id] if cost[b.id] > 0 else np.inf for b in branches}
    finite = [v for v in per_cost.values() if np.isfinite(v)]
    mean = float(np.mean(finite)) if finite else 1.0
    # spec.max_ratio caps the share of branches too: only the lowest keys are candidates
    cap = int(np.floor(spec.max_ratio * len(branches) + 1e-9))
    branches = sorted(branches, key=lambda b: (per_cost[b.id], b.id))[:cap]
    for b in branches:
        keys[b.id] = np.array([per_cost[b.id] / mean if mean > 0 else per_cost[b.id]])
        costs[b.id] = np.array([cost[b.id]])
    # the kinds' keys are already on one scale: no per-group alignment moves (scope "global")
    problem = _DepthLanding(graph, groups, dataclasses.replace(spec, scope="global"), limit, metric, target,
                            costs, keys, branch_ids=tuple(b.id for b in branches))
    plan, model, _ = land(problem, notes)
    removed = [b for b in branches if b.id in plan]
    notes.append(f"select: the plan removes {_count(removed)} of {eligible}"
                 + (f" and channels of {len(plan) - len(removed)} group(s)" if groups else ""))
    return plan, model


def _one_scale(keys: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Channel keys divided by their mean over every channel unit (costless units, inf,
    left out): the average channel's key becomes 1, as the average branch's is."""
    finite = np.concatenate([k[np.isfinite(k)] for k in keys.values()]) if keys else np.zeros(0)
    mean = float(finite.mean()) if finite.size else 1.0
    return {gid: k / mean if mean > 0 else k for gid, k in keys.items()}


__all__ = ["branches_by_ratio", "land_with_branches", "eligible_branches", "depth_units"]
