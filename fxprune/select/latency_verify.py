"""The last step of ``scope="latency"``: time the efficiency-weighted plan against the
local plan it started from, end to end, and keep it only when it is clearly faster.

The latency table times each group's kernels alone, and a model's time is more than
the sum of its kernels: on densenet121 compiled, the weighted plan was 1-5% slower than
the local one (which has Torch-Pruning's widths), because the concatenations, the
BatchNorms on them and inductor's fusions are not in the table. Timing the two whole
models, in the form ``compress`` emits them (BatchNorm folded when ``spec.fuse``) and
compiled when ``latency.compile`` is on, makes the latency scope never slower than the
local scope by more than the timing noise.

The weighted plan must win by ``MIN_GAIN``: two models with the same widths timed in
one run differed by 0.3-1.6% here, and a weighted densenet121 plan that this check
timed as faster came out 2% slower in the benchmark's own run. Below that margin the
local plan, with its uniform and predictable widths, is kept.

Where branches compete with channels, the plan of branches alone is timed beside the
joint one: a ranking by importance per millisecond, with each unit timed alone, still
took a channel group or two on resnet50 that made the joint plan slower end to end than
removing whole blocks alone (compiled quotient 0.87 against 1.07, benchmarks/depth.py),
because removing a block also removes launches and fusions that no per-unit time shows.
The channel plan that ``scope="latency"`` would take without branches is timed there too,
so letting branches compete never picks a plan slower than the best channel plan.
"""
from __future__ import annotations

import torch

from fxprune.measure import measure_latency
from fxprune.passes.fuse import fuse
from fxprune.passes.prune import prune_graph
from fxprune.progress import step as progress_step
from fxprune.select.distributed import on_rank_zero

Plan = dict[int, list[int]]
MIN_GAIN = 0.02  # the weighted plan must be this much faster than the local one


def _as_emitted(graph, plan: Plan, model: torch.nn.Module | None, fold: bool) -> torch.nn.Module:
    model = model if model is not None else (prune_graph(graph, plan, verify="shapes") if plan else graph.gm)
    return fuse(model, graph.example_inputs).gm if fold else model


def faster_plan(graph, local: tuple[Plan, torch.nn.Module | None], weighted: tuple[Plan, torch.nn.Module | None],
                spec, notes: list[str], others: dict[str, tuple[Plan, torch.nn.Module | None]] | None = None,
                scale: dict[str, float] | None = None) -> tuple[Plan, torch.nn.Module | None]:
    """The fastest of ``weighted`` and the named ``others`` (e.g. ``{"depth-only": pair}``)
    if it runs at least ``MIN_GAIN`` faster than ``local`` end to end, else ``local``;
    each is ``(plan, pruned model or None)`` and the chosen pair is returned as given.
    ``scale`` multiplies a named candidate's time before the comparison (a plan that
    removes more than the target is compared as if it removed just the target). All are
    timed in one run; a note states every median."""
    candidates = {"weighted": weighted, **(others or {})}
    candidates = {name: pair for name, pair in candidates.items() if pair[0] != local[0]}
    if not candidates:
        return weighted
    progress_step(f"scope=latency: timing the {', '.join(candidates)} and the local plan end to end")
    settings = spec.latency
    pairs = [local, *candidates.values()]
    models = [_as_emitted(graph, plan, model, spec.fuse) for plan, model in pairs]
    times = on_rank_zero(lambda: measure_latency(models, graph.example_inputs, settings))  # one rank times
    kind, ms = ("compiled", times.compiled_ms) if times.compiled_ms else ("eager", times.eager_ms)
    scale = scale or {}
    local_ms, measured = ms[0], dict(zip(candidates, ms[1:]))
    by_name = {n: t * scale.get(n, 1.0) for n, t in measured.items()}
    name = min(by_name, key=by_name.get)
    timed = ", ".join(f"the {n} plan {t:.2f} ms" + (f" ({by_name[n]:.2f} ms scaled to the target)"
                                                    if scale.get(n, 1.0) != 1.0 else "")
                      for n, t in measured.items())
    if by_name[name] <= (1 - MIN_GAIN) * local_ms:
        notes.append(f"select: scope=latency: {timed} {kind}, against {local_ms:.2f} ms for the local plan; "
                     f"kept the {name} plan")
        return candidates[name]
    notes.append(f"select: scope=latency: {timed} {kind}, against the local plan's {local_ms:.2f} ms end to end, "
                 f"none {100 * MIN_GAIN:.0f}% faster; fell back to the local plan")
    return local
