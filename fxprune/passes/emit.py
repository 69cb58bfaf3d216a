"""``fxprune.prune``: carry out a plan and emit the result as a graph or as the user's class."""
from __future__ import annotations

from typing import Mapping

import torch

from ..capture import gc_paused
from ..channels.graph import DependencyGraph
from .prune import prune_graph
from .writeback import write_back

EMITS = ("graph", "module")


def prune(graph: DependencyGraph, plan: Mapping[int, object], *, emit: str = "graph",
          verify: str = "values") -> torch.nn.Module:
    """Remove the planned channels; the analysed graph and the user's model are not modified.

    ``plan`` maps group ids to the channel units to remove (see ``Group.slices``).
    ``emit="graph"`` (default) returns a new ``torch.fx.GraphModule``: it owns the graph,
    so it carries every rewritten constant. ``emit="module"`` returns a pruned copy of the
    model ``analyze`` was given, of the same class (Hugging Face models keep
    ``generate()`` and ``save_pretrained()``, with their ``config`` updated), checked
    against the pruned graph; :class:`~fxprune.errors.WriteBackError` says why when the
    class cannot carry the result. ``verify="values"`` (default) checks the result on the
    example inputs against the original with the removed units masked and raises
    :class:`~fxprune.errors.VerificationError` naming the first diverging node on a
    mismatch (``result.meta["fxprune.value_check"]`` on a graph: a dict of what it found);
    ``"shapes"`` only re-propagates shapes.

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> fxprune.prune(graph, {1: [0, 1, 2]}).get_submodule("0").weight.shape
    torch.Size([3, 4])
    >>> fxprune.prune(graph, {1: [0, 1, 2]}, emit="module")[2]
    Linear(in_features=3, out_features=2, bias=True)
    """
    if emit not in EMITS:
        raise ValueError(f"emit must be one of {', '.join(map(repr, EMITS))}, got {emit!r}")
    with gc_paused():
        pruned = prune_graph(graph, plan, verify=verify)
        return pruned if emit == "graph" else write_back(graph, plan, pruned)


__all__ = ["prune", "EMITS"]
