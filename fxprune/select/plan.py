"""Select pass: turn per-unit scores into a pruning plan ``{group id: [units]}``.

Two modes, from the Spec:

- **ratio**: remove ``ratio * size`` lowest-scoring units of every group
  (``scope="local"``, or always when ``ratio`` is a dict), or the same total number
  ranked across groups by scores normalised per group (divided by the group's mean;
  ``scope="global"``), or by the latency-weighted shares below (``scope="latency"``).
- **target** (``{metric: fraction to keep}``, a metric of ``fxprune.select.metrics``:
  flops, params, latency or a registered one): every unit gets a cost, the FLOPs (or
  parameters) it carries, estimated from the tensor entries it owns (FLOPs per weight
  entry of each conv/linear are measured once with forward hooks). Units are ranked and
  taken greedily until the estimate meets the target; the plan is then **verified** by
  pruning and counting on the real model, and the number of units taken along the same
  ranking is corrected until the measured fraction is within the metric's tolerance
  of the target (``fxprune.select.landing``). The ranking:

  - ``scope="global"``: normalised score / cost, so the cheapest-per-importance units go
    first, wherever they are. This removes the most FLOPs per unit of importance, but it
    happily thins cheap early layers (high resolution, few channels) down to
    ``max_ratio``, and thin layers run far below their FLOPs on CPUs.
  - ``scope="local"`` (default): every group loses the same fraction (lowest scores first inside
    each group); the target picks the fraction. Uniform widths keep latency close to
    FLOPs (see ``benchmarks/latency.py``).
  - ``scope="latency"``: like local, but each group's fraction is scaled by the square
    of its *measured* latency efficiency (ms saved per FLOP removed, relative to the
    model's; ``fxprune.select.latency_table``), measured at the local plan, so the
    FLOPs come out where they buy the most time. On resnet50 it thins the 7x7 stage
    more and the 56x56 one less. Last, the weighted plan and the local plan are timed
    end to end as ``compress`` emits them, and the weighted plan is kept only when it
    is at least 2% faster (``fxprune.select.latency_verify``).

  For local and latency, once landed, fractions that put the kept widths on multiples
  of 16-64 are tried too, and the best aligned plan that still lands within the
  tolerance is kept (``fxprune.select.align``).

Always: frozen groups and groups whose producer module matches ``spec.ignore`` are
skipped, no group loses more than ``floor(max_ratio * size)`` units, kept counts are
rounded up to a multiple of ``round_to`` where the group allows, and
``fxprune.feasible_plan`` makes sure no layer is emptied.
"""
from __future__ import annotations

import dataclasses
import math
from fnmatch import fnmatch

import numpy as np
import torch

from fxprune.channels.feasible import feasible_plan
from fxprune.channels.graph import DependencyGraph, Group
from fxprune.errors import SpecError
from fxprune.select.branch_latency import branch_times
from fxprune.select.branch_score import DEPTH_KINDS, branch_costs
from fxprune.select.depth import branches_by_ratio, eligible_branches, land_with_branches
from fxprune.select.expert_score import experts_by_ratio
from fxprune.select.landing import Landing, land
from fxprune.select.distributed import on_rank_zero
from fxprune.select.latency_table import efficiency, latency_table
from fxprune.select.latency_verify import faster_plan
from fxprune.select.metrics import TARGET_METRICS, unit_costs
from fxprune.select.ranking import Plan, rank, rounded_count, take_first, unit_multiples
from fxprune.select.spec_names import check_ignore, check_ratio_keys
# scope="latency": a group's share scales with efficiency ** EFFICIENCY_POWER. On resnet50
# at 3.9x fewer FLOPs (compiled, 2 CPU threads), with an early table measured from full
# width, power 1 gave a latency/FLOPs quotient of 0.76, power 2 0.84, power 4 0.82,
# uniform shares 0.72 (one run of each).
EFFICIENCY_POWER = 2
MIN_EFFICIENCY = 0.05  # a group measured as saving nothing is still pruned, last
# scope="latency" with branches: branches alone may keep this much less than a FLOPs target
# and still be timed as a candidate (whole blocks come in steps of a few % of the FLOPs)
DEPTH_UNDERSHOOT = 0.1


def select(graph: DependencyGraph, scores: dict[int, np.ndarray], spec, *,
           notes: list[str] | None = None) -> Plan:
    """A plan meeting ``spec.ratio`` or ``spec.target`` (see the module docstring).

    Example:
        >>> import fxprune
        >>> from fxprune.select.score import score_groups
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
    if isinstance(spec.ratio, dict):
        check_ratio_keys(spec.ratio, sorted({n for g in graph.groups for n in _module_names(g)}),
                         [g.id for g in graph.groups])
    groups = _eligible(graph, scores, spec, notes)
    limit = {g.id: min(g.size - 1, int(math.floor(spec.max_ratio * g.size + 1e-9))) for g in groups}
    if "experts" in spec.unit_kinds and spec.target is None:  # experts go by their own ratio; the
        experts = experts_by_ratio(graph, spec, notes)          # other kinds as the spec says
        rest = [k for k in spec.unit_kinds if k != "experts"]
        if not rest:
            return experts, None
        plan, model = select_and_prune(graph, scores, dataclasses.replace(spec, units=rest[0] if len(rest) == 1
                                                                           else rest), notes=notes)
        return {**plan, **experts}, None
    whole = tuple(k for k in (*DEPTH_KINDS, "experts") if k in spec.unit_kinds)
    if whole:  # depth or experts compete (fxprune.select.depth, fxprune.select.expert_target)
        groups = groups if "channels" in spec.unit_kinds else []
        if spec.target is None:
            return {**_by_ratio(graph, groups, scores, spec, limit), **branches_by_ratio(graph, spec, notes)}, None
        ((metric, target),) = spec.target.items()
        costs = unit_costs(graph, groups, metric)
        keys = _cost_keys(_normalised(scores, groups), costs)
        if spec.scope == "latency":  # Spec allows it for channels and branches only
            return _branches_by_latency(graph, groups, scores, keys, costs, spec, limit, metric, target, notes)
        return land_with_branches(graph, groups, keys, costs, spec, limit, metric, target, notes, kinds=whole)
    if spec.target is not None:
        ((metric, target),) = spec.target.items()  # Spec checked it against TARGET_METRICS
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


def _normalised(scores: dict[int, np.ndarray], groups: list[Group]) -> dict[int, np.ndarray]:
    out = {}
    for g in groups:
        s = np.asarray(scores[g.id], dtype=np.float64)
        mean = s.mean()
        out[g.id] = s / mean if mean > 0 else np.ones_like(s)
    return out


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
        multiple = unit_multiples(groups, spec.round_to)
        plan = {}
        for g in groups:
            n = rounded_count(g.size, int(round(_group_ratio(spec, g) * g.size)), multiple[g.id], limit[g.id])
            order = np.argsort(np.asarray(scores[g.id]), kind="stable")[:n]
            plan.update(feasible_plan(graph, [(g.id, int(u)) for u in order], {g.id: n}))
        return plan
    return _take_ranked(graph, groups, _normalised(scores, groups), spec, limit)


def _take_ranked(graph, groups, keys, spec, limit) -> Plan:
    """The plan that really removes ``spec.ratio`` of all units, lowest keys first."""
    sizes = {g.id: g.size for g in groups}
    multiple = unit_multiples(groups, spec.round_to)
    ranking = rank(keys)
    total = int(round(spec.ratio * sum(sizes.values())))
    # walk the ranking until ``total`` units are really taken (some are skipped as infeasible)
    lo, hi = total, len(ranking)
    while lo < hi:
        mid = (lo + hi) // 2
        taken = sum(map(len, take_first(graph, ranking, mid, limit, sizes, multiple).values()))
        lo, hi = (mid + 1, hi) if taken < total else (lo, mid)
    return take_first(graph, ranking, lo, limit, sizes, multiple)


# --- target mode -------------------------------------------------------------------------

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
    settings = spec.latency
    # timed on rank 0 alone under torch.distributed and broadcast: every rank takes one plan
    table = on_rank_zero(lambda: latency_table(graph, groups, scores, unit_costs(graph, groups, "flops"), limit,
                                               settings, batchnorm=not spec.fuse, compiled=settings.compile,
                                               base=base))
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


def _branches_by_latency(graph, groups, scores, keys, costs, spec, limit, metric, target, notes):
    """Branches (and channels) ranked by importance per measured millisecond saved
    (``land_with_branches`` with ``ms_saved``): each branch is timed alone
    (``branch_latency``), each channel group by the latency table measured at the local
    plan for the target, as the channel scope does. With channels competing, the joint
    plan, branches alone and the channel plan of ``scope="latency"`` are then timed end to
    end against that local plan in one run; the fastest is kept when clearly faster."""
    local_plan, local_model, width = {}, None, None
    ms: dict[int, np.ndarray] = {}
    flops = unit_costs(graph, groups, "flops")
    if groups:
        local_plan, local_model, _ = land(Landing(graph, groups, spec, limit, metric, target, costs,
                                                  _local_keys(scores, groups)), [])
        table = on_rank_zero(lambda: latency_table(graph, groups, scores, flops, limit, spec.latency,
                                                   batchnorm=not spec.fuse, compiled=spec.latency.compile,
                                                   base=local_plan))  # one rank times, all use it
        ms = {gid: np.full(len(costs[gid]), row.saved_ms / row.removed) for gid, row in table.items()}
        width = _weighted_channel_plan(graph, groups, spec, limit, metric, target, costs, _local_keys(scores, groups),
                                       efficiency(table), [])
    branches = eligible_branches(graph, spec, [])
    times = on_rank_zero(lambda: branch_times(graph, branches, spec.latency, compiled=spec.latency.compile,
                                              fold=spec.fuse))
    ms.update({bid: np.array([t]) for bid, t in times.items()})
    flops.update({bid: np.array([c]) for bid, c in branch_costs(graph, "flops").items() if bid in ms})
    # a unit measured as saving nothing (noise) still goes, last: at least MIN_EFFICIENCY of the mean ms per FLOP
    mean = sum(float(t.sum()) for t in ms.values()) / max(sum(float(flops[u].sum()) for u in ms), 1e-30)
    saved = {u: np.maximum(ms.get(u, mean * flops[u]), MIN_EFFICIENCY * mean * flops[u]) for u in flops}
    notes.append(f"select: scope=latency: timed {len(table) if groups else 0} channel group(s) and "
                 f"{len(branches)} branch(es); branches save {_ms_per_gflop(saved, flops, branches, True):.3f} ms "
                 f"per GFLOP, channels {_ms_per_gflop(saved, flops, branches, False):.3f}")
    plan, model = land_with_branches(graph, groups, keys, costs, spec, limit, metric, target, notes, ms_saved=saved)
    if not groups:
        return plan, model
    # the channel plan of scope="latency" and branches alone are candidates too (latency_verify)
    others, scale = _depth_only(graph, spec, limit, metric, target, saved, notes)
    if width is not None:
        others["width-latency"] = width
    return faster_plan(graph, (local_plan, local_model), (plan, model), spec, notes, others=others, scale=scale)


def _depth_only(graph, spec, limit, metric, target, saved, notes) -> tuple[dict[str, tuple], dict[str, float]]:
    """Branches alone, as a candidate timed beside the joint plan (``faster_plan``):
    ranked by importance per measured ms, and by importance per FLOP (the ranking of
    ``units="branches"``). Whole branches come in coarse steps (resnet50: 0.482 of the
    FLOPs with 9 of 16 blocks, no set lands within 2%), so under a FLOPs target a plan
    that keeps up to ``DEPTH_UNDERSHOOT`` less than the target is a candidate too; its
    time is then scaled by target / kept for the comparison, as if latency followed
    FLOPs down to the target, so removing more does not buy it the race. Returns the
    candidate by name and that scale; the closest landing wins; none (and a note) when
    neither comes near."""
    found = []
    for ms_saved, how in ((saved, "per measured ms"), (None, "per FLOP")):
        landed: list[tuple[bool, float]] = []
        try:
            plan, model = land_with_branches(graph, [], {}, {}, spec, limit, metric, target, [], ms_saved=ms_saved,
                                             landed=landed)
        except SpecError:  # every branch gone still keeps more than the target (mobilenet_v2: 0.521)
            continue
        ((within, kept),) = landed
        near = metric == "flops" and (1 - DEPTH_UNDERSHOOT) * target <= kept <= target
        if plan and (within or near):
            found.append((abs(kept - target), how, kept, (plan, model)))
    if not found:
        notes.append("select: scope=latency: branches alone cannot land near the target; not timed on their own")
        return {}, {}
    _, how, kept, pair = min(found, key=lambda f: f[0])
    notes.append(f"select: scope=latency: branches alone, ranked by importance {how} (keeping {kept:.3f} of the "
                 f"{metric}), timed as a candidate")
    return {"depth-only": pair}, {"depth-only": max(target / kept, 1.0)}


def _ms_per_gflop(saved, flops, branches, of_branches: bool) -> float:
    ids = {b.id for b in branches}
    units = [u for u in saved if (u in ids) == of_branches]
    total = sum(float(flops[u].sum()) for u in units)
    return sum(float(saved[u].sum()) for u in units) / total * 1e9 if total > 0 else 0.0


def _weighted_channel_plan(graph, groups, spec, limit, metric, target, costs, local, weight, notes):
    """The channel plan whose shares are weighted by measured efficiency (``(plan, model)``),
    or None where no weighting lands the target."""
    # Weighted shares saturate the most efficient groups at max_ratio, and what is left to
    # take may come in steps too coarse for the tolerance (resnet18, round_to=8: 8 channels
    # of a 56x56 group are 4.5% of the FLOPs). Then flatter weights are tried, down to local.
    for power in (EFFICIENCY_POWER, EFFICIENCY_POWER / 2):
        attempt: list[str] = []
        weighted = Landing(graph, groups, spec, limit, metric, target, costs, _weighted_keys(local, weight, power))
        plan, model, landed = land(weighted, attempt)
        if landed:
            notes.extend(attempt)
            return plan, model
        notes.append(f"select: scope=latency: shares weighted by efficiency**{power:g} could not land "
                     f"within {200 * TARGET_METRICS[metric].tolerance:.0f}% of target {metric}={target} "
                     f"(channel granularity); trying flatter weights")
    return None


def _by_target(graph, groups, scores, spec, limit, metric, target, notes):
    costs = unit_costs(graph, groups, metric)
    if spec.scope != "latency":
        keys = (_local_keys(scores, groups) if spec.scope == "local"
                else _cost_keys(_normalised(scores, groups), costs))
        return land(Landing(graph, groups, spec, limit, metric, target, costs, keys), notes)[:2]
    # Efficiencies are measured at the local landing: a conv's time depends on all its
    # widths, and halving one group of the full model misjudged resnet50's 56x56
    # residual group (compiled quotient 0.75-0.82 measured from full width, 0.87-0.89
    # from the local plan; benchmarks/latency.py).
    local_notes: list[str] = []
    local = _local_keys(scores, groups)
    local_plan, local_model, _ = land(Landing(graph, groups, spec, limit, metric, target, costs, local), local_notes)
    weight = _latency_weights(graph, groups, scores, spec, limit, notes, base=local_plan)
    weighted = _weighted_channel_plan(graph, groups, spec, limit, metric, target, costs, local, weight, notes)
    if weighted is not None:
        return faster_plan(graph, (local_plan, local_model), weighted, spec, notes)
    notes.append("select: scope=latency: fell back to the local plan")
    notes.extend(local_notes)
    return local_plan, local_model
