"""Which calls must survive a rewrite: everything whose effect is a mutation.

``Graph.eliminate_dead_code`` drops every node whose result is unused unless torch
calls it impure, and torch does not call ``x.add_(y)`` or a wrapped Python function
that writes into its argument impure. Dropping such a call changes what the model
computes (torchvision's MViT adds its pooled query into the attention output with a
wrapped in-place function whose return value is unused). So a node is kept when

- torch says it is impure (mutable ATen schemas, ``operator.setitem``, asserts, RNG),
- it is an in-place method or function by name (``add_``, ``torch.relu_``), takes an
  ``out=`` tensor or ``inplace=True``, or calls a module built with ``inplace=True``,
- or the shape recorder saw it bump the version counter of a tensor it was given
  (``node.meta["fxprune.mutates"]``): that covers wrapped functions, whatever they do.
"""
from __future__ import annotations

import torch
import torch.fx
from torch.utils._pytree import tree_flatten

MUTATES = "fxprune.mutates"  # node.meta key set by the shape recorder


def input_versions(args, kwargs) -> list[tuple[torch.Tensor, int]]:
    """The tensors a call is about to receive, with their version counters."""
    return [(t, t._version) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]


def note_mutation(node: torch.fx.Node, before: list[tuple[torch.Tensor, int]]) -> None:
    """Mark ``node`` as mutating when a tensor it received changed version during the call."""
    if any(t._version != v for t, v in before):
        node.meta[MUTATES] = True


def _in_place_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__") or name in ("__setitem__", "__iadd__", "__imul__")


def has_effect(node: torch.fx.Node) -> bool:
    """True when removing ``node`` could change what the graph computes, even if its
    result is unused.

    >>> import torch, operator
    >>> g = torch.fx.Graph()
    >>> x = g.placeholder("x")
    >>> has_effect(g.call_method("add_", (x, 1))), has_effect(g.call_method("add", (x, 1)))
    (True, False)
    >>> has_effect(g.call_function(operator.setitem, (x, 0, 1.0)))
    True
    """
    if node.op in ("placeholder", "output") or node.meta.get(MUTATES):
        return True
    if node.op == "call_method":
        return _in_place_name(node.target)
    if node.kwargs.get("inplace") is True or isinstance(node.kwargs.get("out"), (torch.fx.Node, tuple, list)):
        return True
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target) if node.graph.owning_module else None
        return getattr(module, "inplace", False) is True or node.is_impure()
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return _in_place_name(name) or node.is_impure()
    return False


def eliminate_dead_code(gm: torch.fx.GraphModule) -> bool:
    """``gm.graph.eliminate_dead_code`` that keeps every call with an effect (see module doc)."""
    return gm.graph.eliminate_dead_code(is_impure_node=has_effect)


__all__ = ["has_effect", "eliminate_dead_code", "input_versions", "note_mutation", "MUTATES"]
