"""Select pass: turn per-unit scores into a pruning plan ``{group id: [units]}``.

Two modes, from the Spec:

- **ratio**: remove ``ratio * size`` lowest-scoring units of every group
  (``scope="local"``, or always when ``ratio`` is a dict), or the same total number
  ranked across groups by scores normalised per group (divided by the group's mean;
  ``scope="global"``), or by the latency-weighted shares below (``scope="latency"``).
- **target** (``{"flops"|"params"|"latency": fraction to keep}``): every unit gets a
  cost, the FLOPs (or parameters) it carries, estimated from the tensor entries it owns
  (FLOPs per weight entry of each conv/linear are measured once with forward hooks).
  Units are ranked and taken greedily until the estimate meets the target; the plan is
  then **verified** by pruning and counting on the real model, and the number of units
  taken along the same ranking is corrected (the estimate's error until the target is
  bracketed, then regula falsi alternating with bisection) until the measured fraction
  is within ``TOLERANCE`` of the target. The ranking:

  - ``scope="global"``: normalised score / cost, so the cheapest-per-importance units go
    first, wherever they are. This removes the most FLOPs per unit of importance, but it
    happily thins cheap early layers (high resolution, few channels) down to
    ``max_ratio``, and thin layers run far below their FLOPs on CPUs.
  - ``scope="local"`` (default): every group loses the same fraction (lowest scores first inside
    each group); the target picks the fraction. Uniform widths keep latency close to
    FLOPs (see ``benchmarks/latency.py``).
  - ``scope="latency"``: like local, but each group's fraction is scaled by the square
    of its *measured* latency efficiency (ms saved per FLOP removed, relative to the
    model's; ``fxprune.passes.latency_table``), measured at the local plan, so the
    FLOPs come out where they buy the most time. On resnet50 it thins the 7x7 stage
    more and the 56x56 one less. Last, the weighted plan and the local plan are timed
    end to end as ``compress`` emits them, and the weighted plan is kept only when it
    is at least 2% faster (``fxprune.passes.latency_verify``).

  For local and latency, once landed, fractions that put the kept widths on multiples
  of 16-64 are tried too, and the best aligned plan that still lands within the
  tolerance is kept (``fxprune.passes.align``).

Always: frozen groups and groups whose producer module matches ``spec.ignore`` are
skipped, no group loses more than ``floor(max_ratio * size)`` units, kept counts are
rounded up to a multiple of ``round_to`` where the group allows, and
``fxprune.feasible_plan`` makes sure no layer is emptied.
"""
from __future__ import annotations

import dataclasses
import math
from fnmatch import fnmatch
from typing import Callable

import numpy as np
import torch

from fxprune.channels.feasible import feasible_plan
from fxprune.channels.graph import DependencyGraph, Group
from fxprune.errors import SpecError
from fxprune.measure import count_flops, count_params, measure_latency
from fxprune.passes.align import prefer_aligned
from fxprune.passes.latency_table import efficiency, latency_table
from fxprune.passes.latency_verify import faster_plan
from fxprune.passes.prune import prune
from fxprune.passes.score import unit_entries
from fxprune.progress import step as progress_step
from fxprune.spec import check_ignore

TOLERANCE = 0.01  # relative to the target; the public promise is 2 %
# scope="latency": a group's share scales with efficiency ** EFFICIENCY_POWER. On resnet50
# at 3.9x fewer FLOPs (compiled, 2 CPU threads), with an early table measured from full
# width, power 1 gave a latency/FLOPs quotient of 0.76, power 2 0.84, power 4 0.82,
# uniform shares 0.72 (one run of each).
EFFICIENCY_POWER = 2
MIN_EFFICIENCY = 0.05  # a group measured as saving nothing is still pruned, last
MAX_TRIES = 16    # real prunes spent correcting the estimate (bisection needs log2(units))

Plan = dict[int, list[int]]


def select(graph: DependencyGraph, scores: dict[int, np.ndarray], spec, *,
           notes: list[str] | None = None) -> Plan:
    """A plan meeting ``spec.ratio`` or ``spec.target`` (see the module docstring).

    Example:
        >>> import fxprune
        >>> from fxprune.passes.score import score_groups
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 4, 3))
        >>> x = torch.randn(1, 3, 16, 16)
        >>> graph = fxprune.analyze(net, (x,))
        >>> plan = select(graph, score_groups(graph, "magnitude"), fxprune.Spec(example_inputs=(x,), ratio=0.5))
        >>> fxprune.prune(graph, plan)(x).shape   # conv 0 keeps 16 of its 32 channels
        torch.Size([1, 4, 12, 12])
        >>> {gid: len(units) for gid, units in plan.items()}
        {0: 16}
    """
    return select_and_prune(graph, scores, spec, notes=notes)[0]


def select_and_prune(graph: DependencyGraph, scores: dict[int, np.ndarray], spec, *,
                     notes: list[str] | None = None) -> tuple[Plan, torch.nn.Module | None]:
    """``select``, plus the pruned model when target mode already built it (else None)."""
    notes = [] if notes is None else notes
    check_ignore(spec.ignore, [name for name, _ in graph.gm.named_modules() if name])
    groups = _eligible(graph, scores, spec, notes)
    limit = {g.id: min(g.size - 1, int(math.floor(spec.max_ratio * g.size + 1e-9))) for g in groups}
    if spec.target is not None:
        ((metric, target),) = spec.target.items()
        if metric not in _METRICS:
            raise SpecError(f"spec.target.{metric}: target {metric!r} is not supported yet; "
                            f"use one of {', '.join(_METRICS)}")
        return _by_target(graph, groups, scores, spec, limit, metric, target, notes)
    if spec.scope == "latency" and not isinstance(spec.ratio, dict):
        return _latency_by_ratio(graph, groups, scores, spec, limit, notes)
    return _by_ratio(graph, groups, scores, spec, limit), None


def _module_names(group: Group) -> list[str]:
    # producers read "conv1.weight[0]": the module is everything before the last dot
    return [p.split("[")[0].rsplit(".", 1)[0] for p in group.producers]


def _eligible(graph: DependencyGraph, scores, spec, notes: list[str]) -> list[Group]:
    out = []
    for g in graph.prunable_groups:
        hit = [n for n in _module_names(g) if any(fnmatch(n, p) for p in spec.ignore)]
        if hit:
            notes.append(f"select: group {g.id} skipped, {hit[0]} matches spec.ignore")
        elif g.id in scores:
            out.append(g)
    return out


def _rounded_count(size: int, remove: int, round_to: int, cap: int) -> int:
    """Units to remove so that the kept count is a multiple of ``round_to`` (kept rounds up)."""
    remove = max(0, min(remove, cap))
    if round_to > 1:
        kept = min(size, int(math.ceil((size - remove) / round_to)) * round_to)
        remove = size - kept
    return remove


def _unit_multiples(groups: list[Group], round_to: int) -> dict[int, int]:
    """Per group, the multiple its kept *unit* count must be for its kept *channel* count
    to be a multiple of ``round_to``. A unit of a grouped conv's group is a whole conv
    group (16 channels in regnet_x_400mf), so ``round_to=8`` asks nothing more of it;
    rounding its units to 8 kept 8 of 10 where half was asked."""
    if round_to <= 1:
        return {g.id: 1 for g in groups}
    out = {}
    for g in groups:
        per_unit = next((len(idx) // g.size for _, _, idx, _ in unit_entries(g, ("out",))), 1)
        out[g.id] = round_to // math.gcd(round_to, max(per_unit, 1))
    return out


def _finish(graph: DependencyGraph, ranking: list[tuple[int, int]], k: int, limit: dict[int, int],
            sizes: dict[int, int], multiple: dict[int, int]) -> Plan:
    """Feasible plan from the first ``k`` ranked candidates, with kept counts rounded."""
    chosen = feasible_plan(graph, ranking[:k], limit)
    if all(m <= 1 for m in multiple.values()):
        return chosen
    order = {c: i for i, c in enumerate(ranking[:k])}
    plan = {}
    for gid, units in chosen.items():
        units = sorted(units, key=lambda u: order[(gid, u)])
        n = _rounded_count(sizes[gid], len(units), multiple[gid], limit[gid])
        if n:
            plan[gid] = sorted(units[:n])
    return plan


def _normalised(scores: dict[int, np.ndarray], groups: list[Group]) -> dict[int, np.ndarray]:
    out = {}
    for g in groups:
        s = np.asarray(scores[g.id], dtype=np.float64)
        mean = s.mean()
        out[g.id] = s / mean if mean > 0 else np.ones_like(s)
    return out


def _rank(keys: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """All (group, unit) pairs, lowest key first; ties broken by group then unit (deterministic)."""
    pairs = [(gid, u) for gid in sorted(keys) for u in range(len(keys[gid]))]
    flat = np.concatenate([keys[gid] for gid in sorted(keys)]) if pairs else np.zeros(0)
    return [pairs[i] for i in np.argsort(flat, kind="stable")]


def _group_ratio(spec, group: Group) -> float:
    if not isinstance(spec.ratio, dict):
        return spec.ratio
    names = _module_names(group)
    for key, value in spec.ratio.items():
        if key == str(group.id) or any(fnmatch(n, key) for n in names):
            return value
    return 0.0


def _by_ratio(graph, groups, scores, spec, limit) -> Plan:
    """Local shares (also for a per-group ``ratio`` dict), else the global ranking."""
    if spec.scope == "local" or isinstance(spec.ratio, dict):
        multiple = _unit_multiples(groups, spec.round_to)
        plan = {}
        for g in groups:
            n = _rounded_count(g.size, int(round(_group_ratio(spec, g) * g.size)), multiple[g.id], limit[g.id])
            order = np.argsort(np.asarray(scores[g.id]), kind="stable")[:n]
            plan.update(feasible_plan(graph, [(g.id, int(u)) for u in order], {g.id: n}))
        return plan
    return _take_ranked(graph, groups, _normalised(scores, groups), spec, limit)


def _take_ranked(graph, groups, keys, spec, limit) -> Plan:
    """The plan that really removes ``spec.ratio`` of all units, lowest keys first."""
    sizes = {g.id: g.size for g in groups}
    multiple = _unit_multiples(groups, spec.round_to)
    ranking = _rank(keys)
    total = int(round(spec.ratio * sum(sizes.values())))
    # walk the ranking until ``total`` units are really taken (some are skipped as infeasible)
    lo, hi = total, len(ranking)
    while lo < hi:
        mid = (lo + hi) // 2
        taken = sum(map(len, _finish(graph, ranking, mid, limit, sizes, multiple).values()))
        lo, hi = (mid + 1, hi) if taken < total else (lo, mid)
    return _finish(graph, ranking, lo, limit, sizes, multiple)


# --- target mode -------------------------------------------------------------------------

def _flops_per_entry(graph: DependencyGraph) -> dict[str, float]:
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
        with torch.no_grad():
            training = graph.gm.training
            graph.gm.eval()
            graph.gm(*graph.example_inputs)
            graph.gm.train(training)
    finally:
        for h in handles:
            h.remove()
    return per_entry


def _param_per_entry(graph: DependencyGraph) -> dict[str, float]:
    return {name: 1.0 for name, _ in graph.gm.named_parameters(remove_duplicate=False)}


def _relative_latency(spec, graph: DependencyGraph) -> Callable:
    """Eager latency relative to the original, with the spec's latency settings.

    Each candidate is timed alternately with the original in one call, so drift and
    background load hit both: a baseline timed once and compared with later runs let
    noise pass a barely pruned model as fast enough.
    """
    settings = dataclasses.replace(spec.latency.to_settings(), compile=False)  # eager: what is ranked

    def measure(model, inputs) -> float:
        if model is graph.gm:
            return 1.0
        original_ms, model_ms = measure_latency([graph.gm, model], inputs, settings).eager_ms
        return model_ms / original_ms

    return measure


# metric -> (cost of one weight entry, used to rank units; how to measure a model).
# Latency ranks by FLOPs (a cost model) and corrects by measuring the real thing.
_METRICS: dict[str, tuple[Callable, Callable]] = {
    "flops": (_flops_per_entry, lambda spec, graph: lambda model, inputs: count_flops(model, inputs)),
    "params": (_param_per_entry, lambda spec, graph: lambda model, inputs: count_params(model)),
    "latency": (_flops_per_entry, _relative_latency),
}
_TOLERANCE = {"latency": 0.05}  # timings are noisy: 5 %


def unit_costs(graph: DependencyGraph, groups: list[Group], metric: str) -> dict[int, np.ndarray]:
    """Estimated FLOPs or parameters each unit carries (first order: overlaps counted twice)."""
    weight = _METRICS[metric][0](graph)
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


def _cost_keys(normal: dict[int, np.ndarray], costs: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Normalised score per unit of cost; units that carry no cost are never worth taking."""
    with np.errstate(divide="ignore"):
        return {gid: np.where(costs[gid] > 0, normal[gid] / np.maximum(costs[gid], 1e-30), np.inf)
                for gid in normal}


def _local_keys(scores: dict[int, np.ndarray], groups: list[Group]) -> dict[int, np.ndarray]:
    """The fraction of its group gone once a unit is taken: taking the ``k`` lowest keys
    removes the same share of every group, each group's lowest scores first."""
    keys = {}
    for g in groups:
        rank = np.empty(g.size)
        rank[np.argsort(np.asarray(scores[g.id]), kind="stable")] = np.arange(1, g.size + 1)
        keys[g.id] = rank / g.size
    return keys


def _latency_weights(graph, groups, scores, spec, limit, notes, base=None) -> dict[int, float]:
    """Each group's measured latency efficiency (``latency_table.efficiency``)."""
    settings = spec.latency.to_settings()
    table = latency_table(graph, groups, scores, unit_costs(graph, groups, "flops"), limit, settings,
                          batchnorm=not spec.fuse, compiled=settings.compile, base=base)
    weight = efficiency(table)
    if weight:
        low, high = min(weight, key=weight.get), max(weight, key=weight.get)
        notes.append(f"select: scope=latency: measured {len(table)} groups; latency per FLOP "
                     f"ranges {weight[low]:.2f}x (group {low}) to {weight[high]:.2f}x (group {high}) "
                     f"of the model's")
    return weight


def _weighted_keys(local: dict[int, np.ndarray], weight: dict[int, float], power: float) -> dict[int, np.ndarray]:
    """Local keys divided by ``efficiency ** power``: taking every unit below a threshold
    ``t`` removes ``t * efficiency ** power`` of each group (up to its limit)."""
    return {gid: k / max(weight.get(gid, 1.0), MIN_EFFICIENCY) ** power for gid, k in local.items()}


def _latency_by_ratio(graph, groups, scores, spec, limit, notes) -> tuple[Plan, None]:
    """Ratio mode: efficiencies measured at the local plan for ``spec.ratio``, then the
    weighted plan against that local plan end to end."""
    local = _by_ratio(graph, groups, scores, dataclasses.replace(spec, scope="local"), limit)
    weight = _latency_weights(graph, groups, scores, spec, limit, notes, base=local)
    plan = _take_ranked(graph, groups, _weighted_keys(_local_keys(scores, groups), weight, EFFICIENCY_POWER),
                        spec, limit)
    return faster_plan(graph, (local, None), (plan, None), spec, notes)


def _by_target(graph, groups, scores, spec, limit, metric, target, notes):
    costs = unit_costs(graph, groups, metric)
    if spec.scope != "latency":
        keys = (_local_keys(scores, groups) if spec.scope == "local"
                else _cost_keys(_normalised(scores, groups), costs))
        return _land(graph, groups, spec, limit, metric, target, notes, costs, keys)[:2]
    # Efficiencies are measured at the local landing: a conv's time depends on all its
    # widths, and halving one group of the full model misjudged resnet50's 56x56
    # residual group (compiled quotient 0.75-0.82 measured from full width, 0.87-0.89
    # from the local plan; benchmarks/latency.py).
    local_notes: list[str] = []
    local = _local_keys(scores, groups)
    local_plan, local_model, _ = _land(graph, groups, spec, limit, metric, target, local_notes, costs, local)
    weight = _latency_weights(graph, groups, scores, spec, limit, notes, base=local_plan)
    # Weighted shares saturate the most efficient groups at max_ratio, and what is left to
    # take may come in steps too coarse for the tolerance (resnet18, round_to=8: 8 channels
    # of a 56x56 group are 4.5% of the FLOPs). Then flatter weights are tried, down to local.
    for power in (EFFICIENCY_POWER, EFFICIENCY_POWER / 2):
        attempt: list[str] = []
        plan, model, landed = _land(graph, groups, spec, limit, metric, target, attempt, costs,
                                    _weighted_keys(local, weight, power))
        if landed:
            notes.extend(attempt)
            return faster_plan(graph, (local_plan, local_model), (plan, model), spec, notes)
        notes.append(f"select: scope=latency: shares weighted by efficiency**{power:g} could not land "
                     f"within {200 * _TOLERANCE.get(metric, TOLERANCE):.0f}% of target {metric}={target} "
                     f"(channel granularity); trying flatter weights")
    notes.append("select: scope=latency: fell back to the local plan")
    notes.extend(local_notes)
    return local_plan, local_model


def _land(graph, groups, spec, limit, metric, target, notes, costs, keys) -> tuple[Plan, torch.nn.Module | None, bool]:
    """The plan along ``keys``'s ranking whose measured ``metric`` is closest to ``target``,
    its pruned model, and whether it landed within twice the tolerance."""
    measure = _METRICS[metric][1](spec, graph)
    tolerance = _TOLERANCE.get(metric, TOLERANCE)
    inputs = graph.example_inputs
    base = measure(graph.gm, inputs)
    sizes = {g.id: g.size for g in groups}
    multiple = _unit_multiples(groups, spec.round_to)
    ranking = _rank(keys)
    n = len(ranking)
    plans: dict[int, Plan] = {}

    def plan_at(k: int) -> Plan:
        if k not in plans:
            plans[k] = _finish(graph, ranking, k, limit, sizes, multiple)
        return plans[k]

    def estimate(k: int) -> float:
        removed = sum(costs[gid][units].sum() for gid, units in plan_at(k).items())
        return 1.0 - removed / base

    def k_for(goal: float) -> int:
        lo, hi = 0, n
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if estimate(mid) > goal else (lo, mid)
        return lo

    tried: dict[int, tuple[float, torch.nn.Module | None]] = {0: (1.0, None)}

    def actual(k: int) -> float:
        if k not in tried:
            progress_step(f"target {metric}={target}: verifying candidate {len(tried)}")
            model = prune(graph, plan_at(k)) if plan_at(k) else graph.gm
            tried[k] = (measure(model, inputs) / base, model)
        return tried[k][0]

    def done(k: int) -> bool:
        return abs(actual(k) - target) <= tolerance * target

    goal, k = target, k_for(target)
    for step in range(MAX_TRIES):
        if done(k):
            break
        above = [j for j in tried if tried[j][0] > target]
        below = [j for j in tried if tried[j][0] <= target]
        lo, hi = max(above), (min(below) if below else None)
        if hi is None:
            if lo == n:
                raise SpecError(
                    f"spec.target.{metric}: {target} is impossible: removing every prunable channel "
                    f"allowed (max_ratio={spec.max_ratio}, round_to={spec.round_to}, frozen and ignored "
                    f"groups kept) leaves {actual(n):.3f} of the {metric}; the minimum reachable fraction "
                    f"is {actual(n):.3f}" + ("; layers narrower than 2 * round_to cannot shrink: lower round_to"
                                             if spec.round_to > 1 else ""))
            goal += target - actual(k)      # the estimate's error near k, assumed constant
            nxt = k_for(goal)
            nxt = nxt if lo < nxt <= n else n
        elif hi - lo <= 1 or hi < lo:       # adjacent (channel granularity) or not monotone
            break
        else:
            # regula falsi inside the bracket, alternating with bisection so it always shrinks
            a_lo, a_hi = actual(lo), actual(hi)
            nxt = lo + int(round((a_lo - target) / max(a_lo - a_hi, 1e-12) * (hi - lo)))
            if step % 2 or not lo < nxt < hi:
                nxt = (lo + hi) // 2
        if nxt in tried:
            break
        k = nxt
    best = min(tried, key=lambda j: (abs(tried[j][0] - target), j))
    if spec.scope != "global" and metric != "latency" and done(best):
        best = prefer_aligned(best, groups, costs, keys, plan_at, actual, done, notes, metric)
    frac, model = tried[best]
    if best == 0 and target < 1:
        model = None
    notes.append(f"select: target {metric}={target}: kept {frac:.3f} of the {metric} after "
                 f"{len(tried) - 1} verified prune(s)")
    landed = abs(frac - target) <= 2 * tolerance * target
    if not landed:
        notes.append(f"select: could not land within {200 * tolerance:.0f}% of target {metric}={target} "
                     f"(channel granularity); closest is {frac:.3f}")
    return plan_at(best), model, landed
