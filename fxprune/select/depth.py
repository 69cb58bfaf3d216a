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
  is its importance per unit of cost, relative to its kind's over the whole kind:

  - a channel: its score divided by its group's mean score (the ``scope="global"`` key),
    divided by the cost it carries, then by ``sum(those scores) / sum(costs)`` over every
    channel unit;
  - a branch: its branch score divided by its cost, then by ``sum(scores) / sum(costs)``
    over the branches.

  Costs are in the target's metric (FLOPs, or parameters; a latency target uses
  FLOPs). The scores of the two kinds measure different things (a weight norm, a
  relative output norm), so neither is converted into the other: each kind's average
  unit of cost is given importance 1, which assumes that the average FLOP of a channel
  and of a branch cost as much importance, and the ranking then takes, from either
  kind, what is cheaper than its kind's average first. Within a kind the order is the
  score per cost.
- **scope="latency"** (``ms_saved``): each key is multiplied by the unit's cost and
  divided by the milliseconds its removal was measured to save, so units rank by
  importance per millisecond (``fxprune.select.plan._branches_by_latency`` measures them).

Branches are coarse: a target may land only within the granularity of the smallest
branch; ``result.notes`` says how close it came. ``spec.max_ratio`` caps the share of
branches removed, as it caps each channel group's.
"""
from __future__ import annotations

import dataclasses
from fnmatch import fnmatch

import numpy as np

from fxprune.channels.layers import covered_by_branches, covers
from fxprune.select.branch_score import DEPTH_KINDS, branch_costs, score_branches
from fxprune.select.expert_target import expert_candidates
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
    """A landing whose ranking holds whole units too: depth units (one unit each) and
    expert sets (``{id: (units, how many may go)}``)."""

    whole: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for uid, (size, cap) in self.whole.items():
            self.sizes[uid], self.multiple[uid], self.limit[uid] = size, 1, cap


def land_with_branches(graph, groups, keys: dict[int, np.ndarray], costs: dict[int, np.ndarray], spec,
                       limit: dict[int, int], metric: str, target: float, notes: list[str],
                       kinds: tuple[str, ...] = ("branches",), ms_saved: dict[int, np.ndarray] | None = None,
                       landed: list[tuple[bool, float]] | None = None):
    """Land ``target`` of ``metric`` over channel units (``keys``/``costs`` of ``groups``,
    empty for none) and the whole units of ``kinds``: the eligible depth units (branches,
    layers), and experts (:mod:`fxprune.select.expert_target`); returns (plan, pruned
    model or None). ``landed``, when given, receives whether the plan came within twice
    the tolerance of the target (whole units may not) and the fraction it kept.

    ``ms_saved`` (``scope="latency"``): the measured milliseconds each unit's removal
    saves, by channel group id (one per channel) and branch id; each key (importance per
    unit of cost) is then multiplied by the unit's cost and divided by its time, so units
    rank by importance per millisecond saved (see the module docstring)."""
    limit = dict(limit)
    keys = _one_scale(keys, costs)
    costs = dict(costs)
    if ms_saved is not None:
        keys = {gid: _per_ms(k, costs[gid], ms_saved[gid]) for gid, k in keys.items()}
    whole, branches, eligible = {}, [], 0
    if set(DEPTH_KINDS) & set(kinds):
        branches = eligible_branches(graph, spec, notes)
        eligible = len(branches)
        scores = _scores(graph, branches, spec, notes)
        cost = branch_costs(graph, "params" if metric == "params" else "flops", branches)
        with np.errstate(divide="ignore"):
            per_cost = {b.id: scores[b.id] / cost[b.id] if cost[b.id] > 0 else np.inf for b in branches}
        branch_keys = _one_scale({b.id: np.array([per_cost[b.id]]) for b in branches},
                                 {b.id: np.array([cost[b.id]]) for b in branches})
        if ms_saved is not None:
            branch_keys = {bid: _per_ms(k, np.array([cost[bid]]), ms_saved[bid]) for bid, k in branch_keys.items()}
        # spec.max_ratio caps the share of branches too: only the lowest keys are candidates
        cap = int(np.floor(spec.max_ratio * len(branches) + 1e-9))
        branches = sorted(branches, key=lambda b: (float(branch_keys[b.id][0]), b.id))[:cap]
        for b in branches:
            keys[b.id] = branch_keys[b.id]
            costs[b.id] = np.array([cost[b.id]])
            whole[b.id] = (1, 1)
    if "experts" in kinds:
        expert_keys, expert_cost, expert_limit = expert_candidates(graph, spec, metric, notes)
        keys.update(expert_keys)
        costs.update(expert_cost)
        whole.update({sid: (len(k), expert_limit[sid]) for sid, k in expert_keys.items()})
    # the kinds' keys are already on one scale: no per-group alignment moves (scope "global")
    problem = _DepthLanding(graph, groups, dataclasses.replace(spec, scope="global"), limit, metric, target,
                            costs, keys, whole=whole)
    plan, model, within = land(problem, notes)
    if landed is not None:
        landed.append((within, problem.kept))
    removed = [b for b in branches if b.id in plan]
    experts = sum(len(plan[s.id]) for s in graph.experts if s.id in plan)
    parts = ([f"{_count(removed)} of {eligible}"] if set(DEPTH_KINDS) & set(kinds) else []) \
        + ([f"{experts} of {sum(s.size for s in graph.experts)} experts"] if "experts" in kinds else []) \
        + ([f"channels of {sum(1 for gid in plan if gid < len(graph.groups))} group(s)"] if groups else [])
    notes.append(f"select: the plan removes {', '.join(parts[:-1])}{' and ' if len(parts) > 1 else ''}{parts[-1]}"
                 + (", ranked by importance per measured ms" if ms_saved is not None else ""))
    return plan, model


def _per_ms(keys: np.ndarray, costs: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """Importance per unit of cost -> importance per millisecond saved (inf where nothing is saved)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ms = np.asarray(ms, dtype=np.float64)
        return np.where(np.isfinite(keys) & (ms > 0), keys * costs / ms, np.inf)


def _one_scale(keys: dict[int, np.ndarray], costs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Keys (importance per unit of cost) divided by their kind's importance per unit of
    cost over all its units together (``sum(importance) / sum(cost)``, the cost-weighted
    mean of the keys; costless units, inf, left out): then the average unit of cost of
    either kind carries importance 1. A plain mean of the keys is no such scale: it is
    dominated by the few cheap units (a channel of a 7x7 layer), so it put resnet50's
    median channel at 0.64 and its median branch at 1.05, and the joint plan never took
    a branch."""
    finite = [(k[np.isfinite(k)], costs[gid][np.isfinite(k)]) for gid, k in keys.items()]
    spent = sum(float(c.sum()) for _, c in finite)
    mean = sum(float((k * c).sum()) for k, c in finite) / spent if spent > 0 else 1.0
    return {gid: k / mean if mean > 0 else k for gid, k in keys.items()}


__all__ = ["branches_by_ratio", "land_with_branches", "eligible_branches", "depth_units"]
