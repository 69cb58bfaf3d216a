"""Ranked candidates -> plans: the bookkeeping shared by ratio and target selection.

A ranking is every ``(group id, unit)`` pair, lowest key first. Taking its first ``k``
pairs, made feasible (``fxprune.feasible_plan``) and with kept counts rounded to the
multiples ``round_to`` asks for, gives the plan at ``k``.

Example:
    >>> rank({0: np.array([0.5, 0.1]), 1: np.array([0.3])})
    [(0, 1), (1, 0), (0, 0)]
"""
from __future__ import annotations

import math

import numpy as np

from fxprune.channels.feasible import feasible_plan
from fxprune.channels.graph import DependencyGraph, Group
from fxprune.select.score import unit_entries

Plan = dict[int, list[int]]


def rounded_count(size: int, remove: int, round_to: int, cap: int) -> int:
    """Units to remove so that the kept count is a multiple of ``round_to`` (kept rounds up)."""
    remove = max(0, min(remove, cap))
    if round_to > 1:
        kept = min(size, int(math.ceil((size - remove) / round_to)) * round_to)
        remove = size - kept
    return remove


def unit_multiples(groups: list[Group], round_to: int) -> dict[int, int]:
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


def take_first(graph: DependencyGraph, ranking: list[tuple[int, int]], k: int, limit: dict[int, int],
            sizes: dict[int, int], multiple: dict[int, int]) -> Plan:
    """Feasible plan from the first ``k`` ranked candidates, with kept counts rounded."""
    chosen = feasible_plan(graph, ranking[:k], limit)
    if all(m <= 1 for m in multiple.values()):
        return chosen
    order = {c: i for i, c in enumerate(ranking[:k])}
    plan = {}
    for gid, units in chosen.items():
        units = sorted(units, key=lambda u: order[(gid, u)])
        n = rounded_count(sizes[gid], len(units), multiple[gid], limit[gid])
        if n:
            plan[gid] = sorted(units[:n])
    return plan


def rank(keys: dict[int, np.ndarray]) -> list[tuple[int, int]]:
    """All (group, unit) pairs, lowest key first; ties broken by group then unit (deterministic)."""
    pairs = [(gid, u) for gid in sorted(keys) for u in range(len(keys[gid]))]
    flat = np.concatenate([keys[gid] for gid in sorted(keys)]) if pairs else np.zeros(0)
    return [pairs[i] for i in np.argsort(flat, kind="stable")]
