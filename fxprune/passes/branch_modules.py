"""Removed branches in the user's own class (``emit="module"``): whole blocks go.

A copy of the user's model still runs its own ``forward``, so a branch can only go where
a module computes nothing but ``input + branch(input)`` (or, with all its branches
removed, nothing but its input): that module is then the identity. Which module that is
comes from the graph: the innermost module around the branch's add
(``node.meta["nn_module_stack"]``, recorded by both front ends), and every node run inside
it must belong to a removed branch or be one of their adds. An entry of an
``nn.Sequential`` is deleted (the later ones renumber, as ``del seq[i]`` does); any other
module is replaced by ``nn.Identity``. The write-back then checks the copy against the
pruned graph on the example inputs, as for channels.

A block that does more (torchvision's ``BasicBlock`` applies a ReLU after its add) keeps
its class's code, which no copy can change: the :class:`~fxprune.errors.WriteBackError`
names the module and the node, and ``emit="graph"`` carries the plan.
"""
from __future__ import annotations

import torch

from ..errors import WriteBackError

GRAPH_HINT = "emit='graph' returns the pruned GraphModule, which carries every rewritten constant"


def _stack_paths(node) -> list[str]:
    return [value[0] for value in (node.meta.get("nn_module_stack") or {}).values()]


def removed_blocks(graph, branches: list) -> list[str]:
    """The module paths that become the identity once ``branches`` are removed.

    >>> import torch, fxprune
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return x + self.fc(x)
    >>> net = torch.nn.Sequential(Block(), Block())
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> removed_blocks(graph, graph.branches[:1])
    ['0']
    """
    removed = {b.id for b in branches}
    by_path: dict[str, list] = {}
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    for b in branches:
        parent, inside_removed = b.parent, False
        while parent is not None:  # an enclosing removed branch takes this one with it
            inside_removed = inside_removed or parent in removed
            parent = graph.branches[parent - len(graph.groups)].parent
        if inside_removed:
            continue
        paths = _stack_paths(nodes[b.join])
        if not paths or not paths[-1]:
            raise WriteBackError(f"branch {b.id} (add '{b.join}') is computed in the model's own forward, not "
                                 f"in a block the copy could drop; {GRAPH_HINT}")
        by_path.setdefault(paths[-1], []).append(b)
    for path, group in by_path.items():
        allowed = {name for b in group for name in b.nodes} | {b.join for b in group}
        for node in graph.gm.graph.nodes:
            if path in _stack_paths(node) and node.name not in allowed:
                raise WriteBackError(
                    f"module '{path}' computes more than its input plus the removed branch (node "
                    f"'{node.name}' runs in it too), so the copy of your class cannot drop it; {GRAPH_HINT}")
    return sorted(by_path)


def drop_blocks(model: torch.nn.Module, paths: list[str]) -> None:
    """Delete ``nn.Sequential`` entries at ``paths`` and replace other modules by ``nn.Identity``."""
    for path in sorted(paths, key=_sort_key, reverse=True):  # later entries first: indices stay valid
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if isinstance(parent, torch.nn.Sequential) and name.isdigit():
            del parent[int(name)]
        else:
            setattr(parent, name, torch.nn.Identity())


def _sort_key(path: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


__all__ = ["removed_blocks", "drop_blocks"]
