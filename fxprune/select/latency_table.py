"""Measured latency per channel: how many milliseconds removing a group's channels saves.

FLOPs are a poor stand-in for time once channels shrink. On resnet50 at batch 1 on a
2-thread CPU (``benchmarks/latency.py``), halving every group cuts the convolutions'
FLOPs 4x, but their time only 2.4x in the 56x56 stage and 4.0x in the 7x7 stage:
thin convs at high resolution move as many activation bytes per FLOP as they compute.
Ranking by FLOPs cannot see that; a table of measured kernel times can (the idea of
NetAdapt's and HALP's latency lookup tables).

How the table is built, per group, without timing the whole model once per group:

1. Groups are coloured so that no two groups of one colour touch the same module
   (``networkx.greedy_color``).
2. For each colour, every group of that colour loses ``share`` of its lowest-scoring
   channels at once and the model is pruned for real (``fxprune.prune``). With a
   ``base`` plan (the select pass gives the local scope's plan), both models start
   from it, so the saving is measured at the widths the final plan will be near: a
   conv's time depends on all of its widths at once.
3. Every module those groups touch is timed alone, on the input it receives in each
   model, the original and the pruned version alternately (median of ``repeats``).
   With ``compiled=True`` (the spec's ``latency.compile``), CPU convs and their 4-D
   inputs are put in ``channels_last``, the layout ``torch.compile`` runs them in.
4. A group's saving is the sum of its modules' time differences; no module is shared
   within a colour, so each difference belongs to exactly one group. Groups whose
   modules have the same shapes share the mean of their savings (``_pooled``).

``ms_per_flop`` divides a group's saving by the FLOPs the same removal takes away:
the group's *latency efficiency*.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import networkx as nx
import numpy as np
import torch

from fxprune.channels.feasible import feasible_plan
from fxprune.channels.graph import DependencyGraph, Group
from fxprune.measure import LatencySettings, device_timer, module_calls, round_robin
from fxprune.passes.prune import prune_graph
from fxprune.progress import step as progress_step
from fxprune.select.score import unit_entries

SAMPLE_MS = 2.0  # each timing sample repeats a module's calls for about this long
SHARE = 0.5  # fraction of a group removed to measure it: large enough to rise above timer noise


@dataclass(frozen=True)
class GroupLatency:
    """One group's row of the table."""

    group: int
    removed: int          # units (channels, or conv groups) removed to measure it
    saved_ms: float       # time its modules lost (mean over identical groups, at least 0)
    saved_flops: float    # FLOPs the same removal takes away (estimated, 2 per MAC)

    @property
    def ms_per_flop(self) -> float:
        return self.saved_ms / self.saved_flops if self.saved_flops > 0 else 0.0


def modules_of(graph: DependencyGraph, group: Group, *, batchnorm: bool = True) -> set[str]:
    """Names of the leaf modules owning a parameter or buffer the group slices
    (BatchNorms left out with ``batchnorm=False``: the fuse pass folds them away)."""
    owners = set()
    for key, *_ in unit_entries(group, ("out", "in")):
        owners.add(key.rsplit(".", 1)[0])
    leaves = dict(graph.gm.named_modules())
    return {name for name in owners if name in leaves and not list(leaves[name].children())
            and (batchnorm or not isinstance(leaves[name], torch.nn.modules.batchnorm._BatchNorm))}


def latency_table(graph: DependencyGraph, groups: list[Group], scores: dict[int, np.ndarray],
                  costs: dict[int, np.ndarray], limit: dict[int, int],
                  settings: LatencySettings, share: float = SHARE,
                  batchnorm: bool = True, compiled: bool = False,
                  base: dict[int, list[int]] | None = None) -> dict[int, GroupLatency]:
    """Measured saving of removing ``share`` of each group's channels (see the module docstring).

    ``costs`` are the FLOPs per channel (``fxprune.select.metrics.unit_costs``), ``limit`` the most
    channels each group may lose; ``batchnorm=False`` leaves BatchNorms untimed (they
    will be folded into the convs); ``compiled=True`` times CPU convs in channels_last;
    ``base`` (``{group id: units}``) is removed from both models timed, and ``share`` is
    then of the channels it leaves.
    """
    touched = {g.id: modules_of(graph, g, batchnorm=batchnorm) for g in groups}
    conflicts = nx.Graph()
    conflicts.add_nodes_from(touched)
    by_module: dict[str, list[int]] = {}
    for gid, names in touched.items():
        for name in names:
            by_module.setdefault(name, []).append(gid)
    for sharing in by_module.values():
        conflicts.add_edges_from((a, b) for i, a in enumerate(sharing) for b in sharing[i + 1:])
    colour = nx.greedy_color(conflicts, strategy="largest_first")

    base = {gid: list(units) for gid, units in (base or {}).items()}
    base_model = prune_graph(graph, base, verify="shapes") if base else graph.gm
    # what every touched module receives in the base model: recorded once, it gives the
    # groups' signatures and the "before" side of every colour's timings
    base_calls = module_calls(base_model, sorted(set().union(*touched.values())), graph.example_inputs,
                              eval_mode=True)
    table = {}
    for c in sorted(set(colour.values())):
        members = [g for g in groups if colour[g.id] == c]
        candidates = [(gid, u) for gid, units in base.items() for u in units]
        for g in members:
            gone = set(base.get(g.id, ()))
            left = g.size - len(gone)
            n = min(limit[g.id] - len(gone), max(1, int(round(share * left))))
            order = [int(u) for u in np.argsort(np.asarray(scores[g.id]), kind="stable") if int(u) not in gone]
            candidates += [(g.id, u) for u in order[:max(n, 0)]]
        plan = feasible_plan(graph, candidates, limit)
        extra = {g.id: sorted(set(plan.get(g.id, ())) - set(base.get(g.id, ()))) for g in members}
        if not any(extra.values()):
            continue
        names = sorted(set().union(*(touched[gid] for gid, units in extra.items() if units)))
        progress_step(f"scope=latency: timing {len(names)} layer(s) of group(s) {', '.join(str(g.id) for g in members)}")
        before, after = _time_pairs((base_model, base_calls), prune_graph(graph, plan, verify="shapes"), graph.example_inputs,
                                    names, settings, compiled)
        for g in members:
            units = extra[g.id]
            if units:
                saved = sum(before[m] - after[m] for m in touched[g.id])
                table[g.id] = GroupLatency(g.id, len(units), saved, float(costs[g.id][units].sum()))
    return _pooled(table, _signatures(base_model, base_calls, touched))


def _signatures(model: torch.nn.Module, calls: dict[str, list[tuple]],
                touched: dict[int, set[str]]) -> dict[int, tuple]:
    """What a group's kernels look like: type, weight shape and input shapes of each module
    it touches. Groups with equal signatures (resnet50's five identical layer3 blocks)
    run the same kernels, so their true savings are equal too."""
    modules = dict(model.named_modules())

    def kernel(name: str) -> tuple:
        weight = getattr(modules[name], "weight", None)
        shapes = tuple(tuple(a.shape) for args, _ in calls[name] for a in args if isinstance(a, torch.Tensor))
        return (type(modules[name]).__name__, None if weight is None else tuple(weight.shape), shapes)

    return {gid: tuple(sorted(map(kernel, names))) for gid, names in touched.items()}


def _pooled(table: dict[int, GroupLatency], signature: dict[int, tuple]) -> dict[int, GroupLatency]:
    """Each group's saving replaced by the mean over the groups with its signature (timing
    noise on a busy CPU was +-40% per group on resnet50; the mean of n identical groups
    has sqrt(n) less), clamped at 0 (a slower pruned kernel is noise too)."""
    alike: dict[tuple, list[GroupLatency]] = {}
    for row in table.values():
        alike.setdefault((signature[row.group], row.removed), []).append(row)
    out = {}
    for rows in alike.values():
        mean_ms = max(0.0, sum(r.saved_ms for r in rows) / len(rows))
        for r in rows:
            out[r.group] = GroupLatency(r.group, r.removed, mean_ms, r.saved_flops)
    return out


def _time_pairs(original: tuple[torch.nn.Module, dict], pruned: torch.nn.Module, inputs: tuple,
                names: list[str], settings: LatencySettings, compiled: bool
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of each named module in both models, the two versions timed alternately
    (``measure.round_robin``) so that load changes hit both; summed over a module's calls.
    ``original`` comes with its recorded ``module_calls``."""
    device = torch.device(settings.device)
    original, original_calls = original
    calls = [original_calls, module_calls(pruned, names, inputs, eval_mode=True)]
    before, after = {}, {}
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    timer = device_timer(device)
    try:
        with torch.inference_mode():
            for name in names:
                runners = []
                for model, recorded in zip((original, pruned), calls):
                    module, runs = _placed(model.get_submodule(name), recorded[name], device, compiled)
                    runners.append(lambda m=module, r=runs: [m(*a, **k) for a, k in r])
                # a sample of one call of a 0.1 ms kernel is mostly timer and scheduler noise:
                # each sample repeats the calls until it lasts about SAMPLE_MS
                once = timer(runners[0])
                loops = max(1, int(math.ceil(SAMPLE_MS / max(once, 1e-3))))
                looped = [lambda r=r: [r() for _ in range(loops)] for r in runners]
                ms = round_robin(looped, settings, timer)
                before[name], after[name] = ms[0] / loops, ms[1] / loops
    finally:
        torch.set_num_threads(previous)
    return before, after


def _placed(module: torch.nn.Module, runs: list[tuple], device: torch.device, compiled: bool):
    """A copy of the module and its inputs on ``device``; in channels_last for a CPU conv
    (or a module holding convs, a residual branch) that will run compiled (the layout
    inductor gives CPU convs)."""
    module = copy.deepcopy(module).to(device)
    four_d = compiled and device.type == "cpu" and any(isinstance(m, torch.nn.Conv2d) for m in module.modules())
    if four_d:
        module = module.to(memory_format=torch.channels_last)

    def place(x):
        if not isinstance(x, torch.Tensor):
            return x
        x = x.to(device)
        return x.contiguous(memory_format=torch.channels_last) if four_d and x.dim() == 4 else x

    return module, [(tuple(place(a) for a in args), {k: place(v) for k, v in kwargs.items()})
                    for args, kwargs in runs]


def efficiency(table: dict[int, GroupLatency]) -> dict[int, float]:
    """Each group's ms saved per FLOP removed, divided by the same ratio over all groups.

    Above 1: the group's FLOPs buy more time than the model's average FLOP.
    """
    saved_ms = sum(r.saved_ms for r in table.values())
    saved_flops = sum(r.saved_flops for r in table.values())
    if saved_ms <= 0 or saved_flops <= 0:
        return {gid: 1.0 for gid in table}
    mean = saved_ms / saved_flops
    return {gid: r.ms_per_flop / mean for gid, r in table.items()}
