"""Inline the grad-mode regions torch.export wraps into submodules.

A forward that runs part of its work under ``torch.no_grad()`` or ``torch.enable_grad()``
(Hugging Face's HRM keeps its recurrent steps out of autograd, PhiMoE its router jitter)
is exported as ``torch.ops.higher_order.wrap_with_set_grad_enabled(flag, submod, *xs)``:
one opaque call to a nested graph. No channel rule can see through it, so every channel
that crosses the region froze. Here each region's nodes move into the parent graph
between two ``torch._C._set_grad_enabled`` calls (the flag, then the mode that was on
before), so the rules see the ops and the grad-mode switch stays in the graph: torch
counts ``_set_grad_enabled`` as a side effect (:func:`.effects.has_effect` keeps it
through dead-code elimination) and the pruned graph switches modes where the model did.
"""
from __future__ import annotations

import operator

import torch
import torch.fx

WRAP = torch.ops.higher_order.wrap_with_set_grad_enabled


def inline_grad_regions(gm: torch.fx.GraphModule) -> int:
    """Inline every ``wrap_with_set_grad_enabled`` region of ``gm`` (nested ones too);
    return how many were inlined. A region whose result is used other than through
    ``getitem`` is left as it is (the analysis then freezes what crosses it, and says so).

    >>> class Net(torch.nn.Module):
    ...     def forward(self, x):
    ...         with torch.no_grad():
    ...             y = x * 2
    ...         return y + 1
    >>> gm = torch.export.export(Net(), (torch.ones(2),), strict=False).module()
    >>> inline_grad_regions(gm)
    1
    >>> gm(torch.ones(2))
    tensor([3., 3.])
    """
    count = 0
    while True:
        regions = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is WRAP and _inlinable(n)]
        if not regions:
            break
        for node in regions:
            _inline(gm, node)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _inlinable(node: torch.fx.Node) -> bool:
    sub = node.args[1] if len(node.args) > 1 else None
    return (isinstance(sub, torch.fx.Node) and sub.op == "get_attr" and isinstance(node.args[0], bool)
            and all(u.op == "call_function" and u.target is operator.getitem for u in node.users))


def _inline(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    enabled, sub_node, *operands = node.args
    prefix = sub_node.target
    body: torch.fx.GraphModule = gm.get_submodule(prefix)
    graph = gm.graph
    env: dict[torch.fx.Node, object] = {}
    placeholders = iter(operands)
    results = None
    with graph.inserting_before(node):
        before = graph.call_function(torch.is_grad_enabled, ())
        graph.call_function(torch._C._set_grad_enabled, (enabled,))
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                env[inner] = next(placeholders)
            elif inner.op == "output":
                results = torch.fx.node.map_arg(inner.args[0], lambda n: env[n])
            else:
                copied = graph.node_copy(inner, lambda n: env[n])
                if inner.op in ("get_attr", "call_module"):
                    # the region's own attributes stay on its submodule, reached from the root
                    copied.target = f"{prefix}.{inner.target}"
                env[inner] = copied
        graph.call_function(torch._C._set_grad_enabled, (before,))
    results = results if isinstance(results, (tuple, list)) else (results,)
    for user in list(node.users):
        user.replace_all_uses_with(results[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    if not sub_node.users:
        graph.erase_node(sub_node)


__all__ = ["inline_grad_regions", "WRAP"]
