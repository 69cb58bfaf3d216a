"""Remove residual branches from a pruned graph: depth as a pruning unit.

Each removed branch's add (``shortcut + branch``) is rewritten to its shortcut, and the
branch's nodes are erased; every user of a node of the branch is in the branch (that
is what makes it one, see :mod:`fxprune.channels.branches`), so nothing else changes.
The parameters and buffers only the branch read go with it: its modules are dropped by
``delete_all_unused_submodules``, and tensors read with ``get_attr`` (exported graphs,
layer scales) are deleted here. Shapes elsewhere are unchanged: the add's output has its
shortcut's shape, which the analysis checked.
"""
from __future__ import annotations

import torch
import torch.fx

from ..channels.branches import Branch, unit
from ..channels.layers import covers
from ..errors import VerificationError


def remove_branches(ctx, branches: list[Branch]) -> None:
    """Rewrite each branch's join to its shortcut and erase the branch (in ``ctx.gm``).

    ``ctx`` is the prune pass's ``PruneContext`` (it knows which node stands for which
    analysed node after the channel rewrites). A whole layer (``fxprune.channels.layers``)
    is removed the same way: its exit is the join, its entry the shortcut. A branch
    nested in another removed branch or layer is gone with it.

    >>> import torch, fxprune
    >>> from fxprune.testing import ResidualLinear
    >>> graph = fxprune.analyze(ResidualLinear(4), torch.randn(2, 4))
    >>> small = fxprune.prune(graph, {graph.branches[0].id: [0]})
    >>> [n.op for n in small.graph.nodes], sum(p.numel() for p in small.parameters())
    (['placeholder', 'output'], 0)
    """
    if not branches:
        return
    gm = ctx.gm
    by_name = {n.name: n for n in gm.graph.nodes}
    removed = {b.id for b in branches}

    def current(name: str):
        node = ctx.replacement.get(name)
        return node if node is not None else by_name.get(name)

    erased_attrs: set[str] = set()
    doomed: set[torch.fx.Node] = set()
    moved: dict[torch.fx.Node, torch.fx.Node] = {}
    for branch in branches:
        if _inside_removed(branch, removed, ctx.graph) or any(covers(other, branch) for other in branches):
            continue  # an enclosing branch or layer goes, and this one with it
        join, shortcut = current(branch.join), current(branch.shortcut)
        while shortcut in moved:  # the shortcut is itself a removed branch's join: take what replaced it
            shortcut = moved[shortcut]
        if join is None or shortcut is None:
            raise VerificationError(f"branch {branch.id}: node '{branch.join}' or '{branch.shortcut}' vanished "
                                    "before the branch was removed. This is a bug; please report it with the model.")
        join.replace_all_uses_with(shortcut)
        moved[join] = shortcut
        doomed.add(join)
        doomed.update(n for n in map(current, branch.nodes) if n is not None and n.op != "placeholder")
    for node in reversed(list(gm.graph.nodes)):  # users before what they use
        if node not in doomed:
            continue
        if node.users:
            raise VerificationError(f"node '{node.name}' of a removed branch is still used by "
                                    f"{[u.name for u in node.users]}. This is a bug; please report it with the model.")
        if node.op == "get_attr":
            erased_attrs.add(node.target)
        gm.graph.erase_node(node)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in erased_attrs - still_read:
        _delete_attr(gm, target)


def _inside_removed(branch: Branch, removed: set[int], graph) -> bool:
    parent = branch.parent
    while parent is not None:
        if parent in removed:
            return True
        parent = unit(graph, parent).parent  # a branch's parent is a branch, a layer's a layer
    return False


def _delete_attr(gm: torch.nn.Module, target: str) -> None:
    path, _, attr = target.rpartition(".")
    module = gm.get_submodule(path)
    for table in (module._parameters, module._buffers):
        if attr in table:
            del table[attr]
            return
    if hasattr(module, attr):
        delattr(module, attr)


__all__ = ["remove_branches"]
