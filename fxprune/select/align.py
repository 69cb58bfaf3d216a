"""Aligned widths: among plans that land a target equally well, prefer kept channel
counts on the multiples kernels block by (used by the select pass's local and latency
scopes)."""
from __future__ import annotations

import numpy as np

ALIGN = (64, 32, 16)  # channel multiples that CPU and GPU kernels block by
MAX_ALIGN_TRIES = 6   # extra verified prunes spent looking for aligned widths


def _alignment(width: int) -> int:
    """The largest power of two dividing ``width``, capped at ``ALIGN[0]`` (an empty group counts as aligned)."""
    return ALIGN[0] if width == 0 else min(width & -width, ALIGN[0])


def prefer_aligned(problem, best: int, notes: list[str]) -> int:
    """Among plans that also land within tolerance, the one whose widths kernels like best.

    ``problem`` is a ``fxprune.select.landing.Landing`` (its groups, costs, keys,
    ``plan_at``, ``actual`` and ``done``); ``best`` the ``k`` it landed at.

    Local selection removes the same share ``s`` of every group (latency selection a
    fixed multiple of it), so the target only fixes ``s`` up to the tolerance, and any
    ``s`` in that window is as good for FLOPs. Kernels are not indifferent: on
    convnext_tiny, widths 776/392 (``s`` = 0.495) had a compiled
    latency/FLOPs quotient of 0.64-0.69 where 768/384 (``s`` = 0.5, 0.3% fewer FLOPs) had
    0.71 (``benchmarks/latency.py``). So the kept widths of the three groups that lose
    the most alignment (cost times how far from a multiple of 64) are snapped to
    multiples of 64, 32 and 16, each snap is verified like any other candidate, and the
    plan with the best cost-weighted alignment wins (ties: the landed plan).
    """
    groups, costs, keys, plan_at = problem.groups, problem.costs, problem.keys, problem.plan_at
    sizes = {g.id: g.size for g in groups}
    weight = {g.id: float(costs[g.id].sum()) for g in groups}
    flat = np.sort(np.concatenate([keys[g.id] for g in groups]))

    def kept(k: int) -> dict[int, int]:
        plan = plan_at(k)
        return {gid: sizes[gid] - len(plan.get(gid, ())) for gid in sizes}

    def score(k: int) -> float:
        widths = kept(k)
        return sum(weight[gid] * _alignment(widths[gid]) for gid in sizes)

    # The key tier the landing stopped inside: local keys tie across groups (every group's
    # half-way unit has key 0.5), and stopping part-way through a tier leaves the groups
    # ranked first at one share and the rest at another. On densenet121 (round_to=8) that
    # kept 24 of 32 channels in seven growth groups where the whole tier gave 16, the
    # uniform plan, 0.5% off in FLOPs. Completing or dropping the tier comes first.
    candidates = []
    if best > 0:
        candidates += [int(np.searchsorted(flat, flat[best - 1], side=side)) for side in ("right", "left")]
    landed = kept(best)
    misaligned = [g for g in sizes if _alignment(landed[g]) < ALIGN[0]]
    for gid in sorted(misaligned, key=lambda g: -weight[g] * (ALIGN[0] - _alignment(landed[g])))[:3]:
        for align in ALIGN:
            width = int(round(landed[gid] / align)) * align
            if 0 < width < sizes[gid] and width != landed[gid]:
                # the key threshold at which this group has lost ``size - width`` units
                threshold = np.sort(keys[gid])[sizes[gid] - width - 1]
                candidates.append(int(np.searchsorted(flat, threshold * (1 + 1e-9), side="right")))
    chosen = best
    for k in list(dict.fromkeys(candidates))[:MAX_ALIGN_TRIES]:
        if score(k) > score(chosen) and problem.done(k):  # done() prunes and counts: only if it would win
            chosen = k
    if chosen != best:
        total = sum(weight.values())
        notes.append(f"select: kept widths moved onto kernel blocks (cost-weighted alignment "
                     f"{score(best) / total:.0f} -> {score(chosen) / total:.0f} of 64) at "
                     f"{problem.actual(chosen):.3f} of the {problem.metric}")
    return chosen
