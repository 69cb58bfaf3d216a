"""Landing a target: how many ranked units to take so that the *measured* metric is
the target fraction of the original's.

The ranking's cost estimate says where to start (``Landing.k_for``); each candidate is
then pruned for real and measured (``Landing.actual``), and the number of units taken
along the same ranking is corrected: by the estimate's error until the target is
bracketed, then by regula falsi alternating with bisection, until the measured fraction
is within the metric's tolerance (``fxprune.select.metrics``) or ``MAX_TRIES`` prunes
are spent. For local and latency-weighted rankings the landed plan may then move to
kernel-friendly widths (``fxprune.select.align``).

Example:
    >>> import torch, fxprune
    >>> from fxprune.select.metrics import unit_costs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3))
    >>> graph = fxprune.analyze(net, torch.randn(1, 3, 16, 16))
    >>> groups = graph.prunable_groups
    >>> spec = fxprune.Spec(input_shape=[1, 3, 16, 16], target={"flops": 0.5}, scope="local")
    >>> keys = {g.id: np.arange(g.size, dtype=float) for g in groups}   # lowest index first
    >>> problem = Landing(graph, groups, spec, {g.id: g.size - 1 for g in groups}, "flops", 0.5,
    ...                   unit_costs(graph, groups, "flops"), keys)
    >>> plan, model, landed = land(problem, notes=[])
    >>> landed, plan
    (True, {0: [0, 1, 2, 3, 4, 5, 6, 7]})
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from fxprune.channels.graph import DependencyGraph, Group
from fxprune.errors import SpecError
from fxprune.passes.prune import prune_graph
from fxprune.progress import step as progress_step
from fxprune.select.align import prefer_aligned
from fxprune.select.metrics import TARGET_METRICS
from fxprune.select.ranking import Plan, rank, take_first, unit_multiples

MAX_TRIES = 16  # real prunes spent correcting the estimate (bisection needs log2(units))


@dataclass
class Landing:
    """One landing problem and what has been learnt about it so far.

    Given: the graph, the eligible ``groups`` with their removal ``limit``, the ``spec``
    (``round_to``, ``scope``, ``max_ratio``, latency settings), the ``metric`` and
    ``target`` fraction, each unit's estimated ``costs`` and the ``keys`` that rank units
    (lowest first). Learnt: the plan at each ``k`` (``plans``) and, for each ``k`` pruned
    and measured, the measured fraction and the pruned model (``tried``).
    """

    graph: DependencyGraph
    groups: list[Group]
    spec: object
    limit: dict[int, int]
    metric: str
    target: float
    costs: dict[int, np.ndarray]
    keys: dict[int, np.ndarray]
    plans: dict[int, Plan] = field(default_factory=dict)
    tried: dict[int, tuple[float, torch.nn.Module | None]] = field(default_factory=lambda: {0: (1.0, None)})

    def __post_init__(self) -> None:
        metric = TARGET_METRICS[self.metric]
        self.tolerance = metric.tolerance
        self.measure = metric.measure(self.spec, self.graph)
        self.base = self.measure(self.graph.gm, self.graph.example_inputs)
        self.sizes = {g.id: g.size for g in self.groups}
        self.multiple = unit_multiples(self.groups, self.spec.round_to)
        self.ranking = rank(self.keys)

    @property
    def n(self) -> int:
        """Number of ranked units: ``k`` runs over ``0..n``."""
        return len(self.ranking)

    def plan_at(self, k: int) -> Plan:
        """The feasible, rounded plan from the first ``k`` ranked units."""
        if k not in self.plans:
            self.plans[k] = take_first(self.graph, self.ranking, k, self.limit, self.sizes, self.multiple)
        return self.plans[k]

    def estimate(self, k: int) -> float:
        """The fraction of the metric left at ``k`` by the cost estimate."""
        removed = sum(self.costs[gid][units].sum() for gid, units in self.plan_at(k).items())
        return 1.0 - removed / self.base

    def k_for(self, goal: float) -> int:
        """The smallest ``k`` whose estimate is at most ``goal`` (bisection; the estimate falls with k)."""
        lo, hi = 0, self.n
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (mid + 1, hi) if self.estimate(mid) > goal else (lo, mid)
        return lo

    def actual(self, k: int) -> float:
        """The measured fraction at ``k``: the plan is pruned for real (once per ``k``)."""
        if k not in self.tried:
            progress_step(f"target {self.metric}={self.target}: verifying candidate {len(self.tried)}")
            plan = self.plan_at(k)
            model = prune_graph(self.graph, plan, verify="shapes") if plan else self.graph.gm  # compress checks the final values
            self.tried[k] = (self.measure(model, self.graph.example_inputs) / self.base, model)
        return self.tried[k][0]

    def done(self, k: int) -> bool:
        """Whether ``k`` measures within the tolerance of the target."""
        return abs(self.actual(k) - self.target) <= self.tolerance * self.target


def land(problem: Landing, notes: list[str]) -> tuple[Plan, torch.nn.Module | None, bool]:
    """The plan along the problem's ranking whose measured metric is closest to the target,
    its pruned model (None when nothing is pruned), and whether it landed within twice the
    tolerance. Notes say how many prunes it took and why it missed, if it did."""
    _search(problem)
    tried, metric, target = problem.tried, problem.metric, problem.target
    best = min(tried, key=lambda j: (abs(tried[j][0] - target), j))
    if problem.spec.scope != "global" and metric != "latency" and problem.done(best):
        best = prefer_aligned(problem, best, notes)
    frac, model = tried[best]
    if best == 0 and target < 1:
        model = None
    notes.append(f"select: target {metric}={target}: kept {frac:.3f} of the {metric} after "
                 f"{len(tried) - 1} verified prune(s)")
    landed = abs(frac - target) <= 2 * problem.tolerance * target
    if not landed:
        notes.append(f"select: could not land within {200 * problem.tolerance:.0f}% of target "
                     f"{metric}={target} (channel granularity); closest is {frac:.3f}")
    problem.kept = frac  # the landed fraction, for callers that accept a near miss (select.plan._depth_only)
    return problem.plan_at(best), model, landed


def _search(problem: Landing) -> None:
    """Prune and measure candidates until one is done, the bracket is one unit wide, a
    candidate repeats, or ``MAX_TRIES`` are spent; they are all left in ``problem.tried``."""
    target, n = problem.target, problem.n
    goal, k = target, problem.k_for(target)
    for step in range(MAX_TRIES):
        if problem.done(k):
            return
        lo, hi = _bracket(problem)
        if hi is None:
            if lo == n:
                _impossible(problem)
            goal += target - problem.actual(k)  # the estimate's error near k, assumed constant
            nxt = problem.k_for(goal)
            nxt = nxt if lo < nxt <= n else n
        elif hi - lo <= 1 or hi < lo:  # adjacent (channel granularity) or not monotone
            return
        else:
            nxt = _regula_falsi(problem, lo, hi)
            if step % 2 or not lo < nxt < hi:  # alternate with bisection so the bracket always shrinks
                nxt = (lo + hi) // 2
        if nxt in problem.tried:
            return
        k = nxt


def _bracket(problem: Landing) -> tuple[int, int | None]:
    """The largest ``k`` measured above the target and the smallest at or below it (None: none yet)."""
    above = [j for j, (frac, _) in problem.tried.items() if frac > problem.target]
    below = [j for j, (frac, _) in problem.tried.items() if frac <= problem.target]
    return max(above), (min(below) if below else None)


def _regula_falsi(problem: Landing, lo: int, hi: int) -> int:
    """Where the straight line between the measurements at ``lo`` and ``hi`` meets the target."""
    a_lo, a_hi = problem.actual(lo), problem.actual(hi)
    return lo + int(round((a_lo - problem.target) / max(a_lo - a_hi, 1e-12) * (hi - lo)))


def _impossible(problem: Landing) -> None:
    metric, target, least = problem.metric, problem.target, problem.actual(problem.n)
    raise SpecError(
        f"spec.target.{metric}: {target} is impossible: removing every prunable unit allowed "
        f"(units={'+'.join(problem.spec.unit_kinds)}, max_ratio={problem.spec.max_ratio}, "
        f"round_to={problem.spec.round_to}, frozen and ignored groups kept) leaves {least:.3f} of the {metric}; "
        f"the minimum reachable fraction is {least:.3f}"
        + ("; layers narrower than 2 * round_to cannot shrink: lower round_to"
           if problem.spec.round_to > 1 and problem.groups else "")
        + ("" if "channels" in problem.spec.unit_kinds else "; let channels compete too: units=['channels', ...]"))
