"""Scores of experts (``graph.experts``) over calibration tokens; lower = removed first.

``EXPERT_SCORES``:

- ``frequency`` (default): the share of (token, slot) choices of the router that pick the
  expert (an expert the router never takes changes nothing when it goes).
- ``reap``: the router weight times the norm of the expert's output, averaged over the
  tokens routed to it (REAP, 2025): what the expert adds where it is used.
- ``loss``: the loss with the expert removed (its router logit at ``-inf``, the expert
  oracle) minus the loss of the full model ("Not All Experts are Equal", Lu et al. 2024,
  one expert at a time): ``loss_fn(output)`` when given, else the output's relative
  change. One extra forward pass per expert and batch.

Each runs over the ``calibration`` batches when given, else over the example inputs.

Example:
    >>> import torch, fxprune
    >>> class MoE(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.router = torch.nn.Linear(4, 3)
    ...         self.experts = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    ...     def forward(self, x):
    ...         w, idx = self.router(x).softmax(-1).topk(1, dim=-1)
    ...         out = torch.zeros_like(x)
    ...         for e, expert in enumerate(self.experts):
    ...             out = out + (w * (idx == e)).sum(-1, keepdim=True) * expert(x)
    ...         return out
    >>> graph = fxprune.analyze(MoE(), torch.randn(32, 4))
    >>> shares = score_experts(graph, "frequency")[graph.experts[0].id]
    >>> float(shares.sum())
    1.0
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
import torch.fx

from fxprune.errors import SpecError
from fxprune.select.branch_score import _batches

EXPERT_SCORES = ("frequency", "reap", "loss")


def score_experts(graph, method: str = "frequency", *, calibration=None, loss_fn=None) -> dict[int, np.ndarray]:
    """``{expert set id: one score per expert}`` (see the module docstring)."""
    if method not in EXPERT_SCORES:
        raise SpecError(f"spec.expert_score: unknown expert score {method!r}; use one of {', '.join(EXPERT_SCORES)}")
    sets = [s for s in graph.experts if s.prunable]  # a frozen set's experts are never removed
    if not sets:
        return {}
    if method == "loss":
        return _loss(graph, sets, calibration, loss_fn)
    totals = {s.id: np.zeros(s.size) for s in sets}
    counts = {s.id: np.zeros(s.size) for s in sets}
    for s in sets:
        if method == "reap" and not s.weighted:
            raise SpecError(f"spec.expert_score='reap': expert set {s.id} has no node holding its routing-weighted "
                            "expert outputs; use 'frequency' or 'loss'")
    for values, _ in _runs(graph, calibration, {}):
        for s in sets:
            chosen = values[s.topk][1].reshape(-1).long()
            hits = np.bincount(chosen.cpu().numpy(), minlength=s.size)[: s.size].astype(float)
            if method == "frequency":
                totals[s.id] += hits
                counts[s.id] += 1
            elif len(s.weighted) == s.size:  # a loop: one weighted output per expert, zero where not routed
                for e, name in enumerate(s.weighted):
                    norms = values[name].detach().double().flatten(0, -2).norm(dim=-1)
                    totals[s.id][e] += float(norms.sum())
                    counts[s.id][e] += hits[e]
            else:  # grouped: rows sorted by expert, counts[0] rows each
                rows = values[s.weighted[0]].detach().double().flatten(0, -2).norm(dim=-1)
                sizes = values[s.counts[0]].long().tolist() if s.counts else hits.astype(int).tolist()
                for e, part in enumerate(torch.split(rows, [int(n) for n in sizes])):
                    totals[s.id][e] += float(part.sum())
                    counts[s.id][e] += part.numel()
    if method == "frequency":
        return {sid: t / max(t.sum(), 1e-30) for sid, t in totals.items()}
    return {sid: totals[sid] / np.maximum(counts[sid], 1) for sid in totals}


def _loss(graph, sets, calibration, loss_fn) -> dict[int, np.ndarray]:
    scores = {s.id: np.zeros(s.size) for s in sets}
    for batch in _batches(graph, calibration):
        base = _run(graph.gm, batch, {})[1]
        for s in sets:
            for e in range(s.size):
                out = _run(graph.gm, batch, s.overrides([e], graph.gm))[1]
                scores[s.id][e] += _change(base, out, loss_fn)
    return scores


def _change(base, out, loss_fn) -> float:
    if loss_fn is not None:
        return float(loss_fn(out)) - float(loss_fn(base))
    a = [t for t in torch.utils._pytree.tree_leaves(base) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    b = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    num = sum(float((x - y).double().pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(x.double().pow(2).sum()) for x in a)
    return (num / max(den, 1e-30)) ** 0.5


def _runs(graph, calibration, overrides) -> Iterator[tuple[dict, object]]:
    for batch in _batches(graph, calibration):
        yield _run(graph.gm, batch, overrides)


def _run(gm, batch, overrides: dict) -> tuple[dict, object]:
    """Every node's value and the output, with ``overrides`` added to the named nodes."""
    values: dict = {}

    class Tap(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in overrides:
                value = value + overrides[node.name].to(value.device, value.dtype)
            values[node.name] = value
            return value

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            out = Tap(gm, garbage_collect_values=False).run(*batch.flat(gm))
    finally:
        gm.train(was_training)
    return values, out


def removable_sets(graph, notes: list[str]) -> list:
    """The expert sets whose experts may go; notes say why the others (grouped top-k) stay,
    or that there are none."""
    sets = [s for s in graph.experts if s.prunable]
    if len(sets) < len(graph.experts):
        notes.append(f"select: {len(graph.experts) - len(sets)} routed layer(s) keep their experts: "
                     f"{next(s.reason for s in graph.experts if not s.prunable)}")
    if not sets:
        notes.append("select: units include 'experts' but the graph routes no tokens among removable experts")
    return sets


def experts_by_ratio(graph, spec, notes: list[str]) -> dict[int, list[int]]:
    """``{expert set id: experts}``: in each routed layer the ``round(ratio * E)`` lowest-
    scoring experts, at most ``E - top_k`` (a token must still find ``top_k`` experts)."""
    sets = removable_sets(graph, notes)
    if not sets:
        return {}
    scores = score_experts(graph, spec.expert_score, calibration=spec.calibration, loss_fn=spec.loss_fn)
    plan = {}
    for s in sets:
        n = min(int(round(spec.ratio * s.size)), s.removable)
        order = sorted(range(s.size), key=lambda e: (scores[s.id][e], e))
        if n:
            plan[s.id] = sorted(order[:n])
    notes.append(f"select: {len(sets)} routed layer(s), experts scored by {spec.expert_score}; removing "
                 f"{sum(map(len, plan.values()))} of {sum(s.size for s in sets)} experts")
    return plan


__all__ = ["EXPERT_SCORES", "score_experts", "experts_by_ratio"]
