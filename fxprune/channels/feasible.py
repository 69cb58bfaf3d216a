"""Build plans that PyTorch can run: no layer may be left with zero channels.

A group's units can be spread over several layers (a concat feeds one consumer from
several producers; a split gives each piece to another layer). Removing every unit a
single layer holds would leave it zero channels wide, which PyTorch layers do not
support, so a plan must keep at least one unit of every layer. This module picks
units greedily in the caller's order and skips any whose removal would empty a layer.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Mapping

import numpy as np

from .branches import check_branch_units
from .branches import unit as branch_unit
from .experts import ExpertSet
from .graph import DependencyGraph


def feasible_plan(graph: DependencyGraph, candidates: Iterable[tuple[int, int]],
                  limit: Mapping[int, int] | None = None) -> dict[int, list[int]]:
    """Take ``(group id, unit)`` candidates in order while every layer keeps a channel.

    A branch id (``graph.branches``) is taken as ``(branch id, 0)``: removing a branch
    empties no layer that stays. An expert set (``graph.experts``) keeps ``top_k`` experts.

    ``limit[gid]``: at most this many units of group ``gid`` (always at most size-1).

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> fxprune.feasible_plan(graph, [(1, u) for u in range(6)])
    {1: [0, 1, 2, 3, 4]}
    """
    roots = graph.roots
    # Only a layer that holds part of a group can be emptied while the group keeps a
    # channel; layers holding all of it are protected by the size-1 cap. Track those.
    alive: list[int] = []
    holders: dict[int, list[int]] = defaultdict(list)  # class root -> partial layers holding it
    for ids, _ in graph.state.nonempty:
        classes = np.unique(roots[ids[ids >= 0]])
        gids, counts = np.unique(graph._group_of_root[classes], return_counts=True)
        whole = any(gid >= 0 and count == graph.groups[gid].size for gid, count in zip(gids, counts))
        if (gids >= 0).any() and not whole:  # a layer may mix groups (a shuffle, then a split)
            for c in classes.tolist():
                holders[c].append(len(alive))
            alive.append(len(classes))
    plan: dict[int, list[int]] = defaultdict(list)
    taken: dict[int, set[int]] = defaultdict(set)
    caps: dict[int, int] = {}
    n_groups = len(graph.groups)
    for gid, unit in candidates:
        if isinstance(gid, (int, np.integer)) and gid >= n_groups:
            whole = branch_unit(graph, gid)
            if isinstance(whole, ExpertSet):  # an expert: at most size - top_k of a set go
                cap = min(whole.size - whole.top_k, (limit or {}).get(gid, whole.size))
                if len(plan[gid]) < cap and int(unit) not in taken[gid]:
                    plan[gid].append(int(unit))
                    taken[gid].add(int(unit))
                continue
            check_branch_units(whole, [unit])  # a branch (depth unit): one unit
            plan[gid] = [0]
            continue
        cap = caps.get(gid)
        if cap is None:
            group = graph.group(gid)
            cap = caps[gid] = min(group.size - 1, (limit or {}).get(gid, group.size - 1)) if group.prunable else 0
        if len(plan[gid]) >= cap or unit in taken[gid]:
            continue
        if holders:
            layers = holders.get(int(graph.groups[gid].classes[unit]), ())
            if any(alive[i] <= 1 for i in layers):
                continue
            for i in layers:
                alive[i] -= 1
        plan[gid].append(int(unit))
        taken[gid].add(int(unit))
    return {gid: sorted(units) for gid, units in plan.items() if units}
