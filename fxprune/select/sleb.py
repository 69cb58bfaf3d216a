"""The ``calibration_loss`` branch score: remove one branch at a time, the cheapest each time (SLEB).

SLEB (Song et al. 2024) removes blocks one by one: at every step it tries each remaining
block, keeps out the one whose removal raises the calibration loss least, and starts the
next step from the model without it, so the order accounts for what is already gone.
Here a branch is removed by running the graph with its join replaced by the shortcut
and its nodes skipped (what :mod:`fxprune.passes.remove_branches` does to the code), so
no copy is pruned; ``n`` branches cost ``n (n + 1) / 2`` passes over the calibration
batches.

The loss is ``spec.loss_fn(output)`` when given, else
:func:`fxprune.select.calibration.default_loss` when the model has a loss of its own
(``output.loss``, next-token cross-entropy for a causal LM); without either, the change of
the output from the full model's, ``sum ||y - y_full||^2 / sum ||y_full||^2`` over the
floating outputs (the logits if any) of every batch.

A branch's score is the loss with it and every branch removed before it gone, minus the
full model's loss, made strictly increasing along the removal order (a running maximum,
nudged up by one ulp where it would tie), so that the lowest-scoring ``k`` branches are
the first ``k`` SLEB removes.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.fx
from torch.utils._pytree import tree_flatten

from fxprune.errors import SpecError
from fxprune.select.calibration import default_loss, graph_batches, is_causal_lm

LABEL_FREE = "0.5 * mean squared output"  # default_loss's fallback: no loss of the model's own


def sleb_order(graph, *, calibration=None, loss_fn=None, units: list | None = None) -> list[tuple[int, float]]:
    """``[(branch id, loss increase with it and the earlier ones removed), ...]`` in SLEB's order.

    Example:
        >>> import torch, fxprune
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         x = x + self.a(x)
        ...         return x + 0.01 * self.b(x)
        >>> graph = fxprune.analyze(Net(), torch.randn(8, 4))
        >>> [bid for bid, _ in sleb_order(graph)] == [graph.branches[1].id, graph.branches[0].id]
        True
    """
    branches = graph.branches if units is None else units  # or whole layers (graph.layers)
    if not branches:
        return []
    gm = graph.gm
    was_training = gm.training
    gm.eval()
    try:
        batches = list(_batches(graph, calibration))
        loss = _Loss(graph, batches, loss_fn)
        base = loss([])
        removed: list = []
        order = []
        while len(removed) < len(branches):
            trials = [(loss(removed + [b]), b.id, b) for b in branches if b not in removed]
            value, _, best = min(trials, key=lambda t: (t[0], t[1]))
            removed.append(best)
            order.append((best.id, value - base))
        return order
    finally:
        gm.train(was_training)


def sleb_scores(graph, *, calibration=None, loss_fn=None, units: list | None = None) -> dict[int, float]:
    """``{branch id: score}``: the loss increase at its SLEB step, strictly increasing along
    the order (lower = removed first).

    Example:
        >>> import torch, fxprune
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a = torch.nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + 0 * self.a(x)
        >>> graph = fxprune.analyze(Net(), torch.randn(8, 4))
        >>> list(sleb_scores(graph).values())   # zero branch: removing it changes nothing
        [0.0]
    """
    scores, floor = {}, -np.inf
    for bid, value in sleb_order(graph, calibration=calibration, loss_fn=loss_fn, units=units):
        floor = max(value, np.nextafter(floor, np.inf)) if np.isfinite(floor) else value
        scores[bid] = float(floor)
    return scores


def _batches(graph, calibration) -> Iterator:
    if calibration is None:
        yield graph.example_inputs
    else:
        yield from graph_batches(graph, calibration)


class _Loss:
    """The calibration loss of ``graph.gm`` with a set of branches removed."""

    def __init__(self, graph, batches: list, loss_fn):
        self.gm, self.batches, self.loss_fn = graph.gm, batches, loss_fn
        self.causal = is_causal_lm(graph.model)
        self.full = [self._run(b, ()) for b in batches]
        self.relative = loss_fn is None and default_loss(self.full[0], batches[0], self.causal)[1] == LABEL_FREE
        if self.relative:
            self.scale = sum(float(y.double().square().sum()) for out in self.full for y in _floats(out))
            self.scale = self.scale if self.scale > 0 else 1.0

    def __call__(self, removed: list) -> float:
        total = 0.0
        for batch, full in zip(self.batches, self.full):
            out = self._run(batch, removed) if removed else full
            if self.relative:
                total += sum(float((y.double() - y0.double()).square().sum())
                             for y, y0 in zip(_floats(out), _floats(full)))
            else:
                value = self.loss_fn(out) if self.loss_fn is not None else default_loss(out, batch, self.causal)[0]
                if not isinstance(value, torch.Tensor) or value.numel() != 1:
                    raise SpecError(f"spec.loss_fn: must return a scalar tensor, got {type(value).__name__}")
                total += float(value)
        return total / self.scale if self.relative else total

    @torch.no_grad()
    def _run(self, batch, removed) -> Any:
        skip = {name for b in removed for name in b.nodes}
        # a layer whose exit is also a branch's join (a pre-norm MLP's add) takes the layer's entry
        joins = {b.join: b.shortcut for b in sorted(removed, key=lambda b: b.kind == "layer")}
        by_name = {n.name: n for n in self.gm.graph.nodes}

        class Without(torch.fx.Interpreter):
            def run_node(self, node):
                if node.name in skip:
                    return None  # inside a removed branch: only its own nodes and its join read it
                if node.name in joins:  # the add becomes its shortcut
                    return self.env[by_name[joins[node.name]]]
                return super().run_node(node)

        # values stay: a removed layer's entry is read at its exit, after its last use inside
        out = Without(self.gm, garbage_collect_values=False).run(*batch.flat(self.gm))
        return self.gm.graph._codegen.process_outputs(out)


def _floats(output) -> list[torch.Tensor]:
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    leaves = [logits] if isinstance(logits, torch.Tensor) else tree_flatten(output)[0]
    floats = [y for y in leaves if isinstance(y, torch.Tensor) and y.is_floating_point()]
    if not floats:
        raise SpecError(f"spec.branch_score: the model's output ({type(output).__name__}) holds no floating "
                        "tensor to compare with the full model's; pass loss_fn (output -> scalar tensor)")
    return floats


__all__ = ["sleb_order", "sleb_scores"]
