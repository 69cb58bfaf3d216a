"""Removed branches in the user's own class (``emit="module"``): whole blocks go.

A copy of the user's model still runs its own ``forward``, so a branch can only go where
a module computes nothing but ``input + branch(input)`` (or, with all its branches
removed, nothing but its input): that module is then the identity. Which module that is
comes from the graph: the innermost module around the branch's add
(``node.meta["nn_module_stack"]``, recorded by both front ends), and every node run inside
it must belong to a removed branch or be one of their adds. A Hugging Face decoder layer
is such a module once both its branches (attention and MLP) go. An entry of an
``nn.Sequential``, or of an ``nn.ModuleList`` whose entries the forward runs one after
the other in list order (the graph shows it: a ``for layer in self.layers`` loop), is
deleted (the later ones renumber, as ``del layers[i]`` does; :func:`removed_layers` says
which old entries each list keeps, for layer indices, config fields and checkpoint keys);
any other module is replaced by ``nn.Identity``. The write-back then checks the copy
against the pruned graph on the example inputs, as for channels.

A block that does more (torchvision's ``BasicBlock`` applies a ReLU after its add) keeps
its class's code, which no copy can change: the :class:`~fxprune.errors.WriteBackError`
names the module and the node, and ``emit="graph"`` carries the plan.
"""
from __future__ import annotations

import torch

from ..channels.layers import Layer, covers, is_assert as _is_assert, is_identity_cast as _is_identity
from ..channels.layers import stack_paths as _stack_paths
from ..errors import WriteBackError
from .hf_config import GRAPH_HINT


def removed_blocks(graph, branches: list) -> list[str]:
    """The module paths that become the identity once ``branches`` are removed (whole
    layers among them, ``fxprune.channels.layers``, are their own module).

    >>> import torch, fxprune
    >>> from fxprune.testing import ResidualLinear
    >>> net = torch.nn.Sequential(ResidualLinear(4), ResidualLinear(4))
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> removed_blocks(graph, graph.branches[:1])
    ['0']
    """
    layers = [b for b in branches if isinstance(b, Layer)]
    branches = [b for b in branches if not isinstance(b, Layer) and not any(covers(l, b) for l in layers)]
    removed = {b.id for b in branches}
    by_path: dict[str, list] = {l.path: [] for l in layers}  # a layer is the identity by definition
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
    # a module holds every removed branch whose add runs inside it (a ViT layer adds its
    # MLP inside its output module): the outermost such module is the one that goes
    chosen = [b for group in by_path.values() for b in group]
    by_path = {path: [b for b in chosen if path in _stack_paths(nodes[b.join])] for path in by_path}
    kept_branches = [b for b in graph.branches if b.id not in removed]
    accepted = {l.path for l in layers}
    for path, group in sorted(by_path.items(), key=lambda item: -len(_sort_key(item[0]))):  # innermost first
        if not group:
            continue  # a whole layer
        node = _computes_more(graph, path, group)
        if node is not None:
            raise WriteBackError(_more_than_branches(graph, path, group, node, kept_branches))
        while True:  # climb while the enclosing module is the identity too (a T5 block of two layers)
            stack = _stack_paths(nodes[group[0].join])
            outer = stack[stack.index(path) - 1] if stack.index(path) > 0 else ""
            wider = [b for b in chosen if outer and outer in _stack_paths(nodes[b.join])]
            if not outer or _computes_more(graph, outer, wider) is not None:
                break
            path, group = outer, wider
        accepted.add(path)
    by_path = dict.fromkeys(accepted)
    paths = sorted((p for p in by_path if not any(p.startswith(f"{q}.") for q in by_path)), key=_sort_key)
    _check_lists_run_in_order(graph, paths)
    return paths


def _computes_more(graph, path: str, group: list):
    """The first node run in module ``path`` that is neither in the removed branches of
    ``group`` (nor one of their adds), nor fed only them, nor a check or a no-op cast:
    None when the module computes only its input once they go."""
    dead = {name for b in group for name in b.nodes}
    joins = {b.join for b in group}  # rewritten to their shortcut: what they add stays live
    inside = [n for n in graph.gm.graph.nodes if path in _stack_paths(n)]
    for node in reversed(inside):  # users before what they use
        if node.name in dead or node.name in joins or _is_assert(node):
            continue
        if node.users and all(u.name in dead or _is_assert(u) for u in node.users):
            dead.add(node.name)  # it fed only the removed branches: it goes with them
        elif not _is_identity(node):
            return node
    return None


def _more_than_branches(graph, path: str, group: list, node, kept_branches: list) -> str:
    """Why module ``path`` cannot go: another branch of it stays (a transformer layer whose
    attention goes but not its MLP), or it computes something beyond its branches (a
    post-norm layer's LayerNorm, a ReLU after the add)."""
    cls = type(graph.model.get_submodule(path)).__name__ if graph.model is not None else "module"
    gone = ", ".join(f"{b.id} ({_short(b.modules)})" for b in group)
    other = next((b for b in kept_branches if node.name in b.nodes or node.name == b.join), None)
    if other is not None:
        return (f"module '{path}' ({cls}) keeps branch {other.id} ({_short(other.modules)}) while branch {gone} "
                f"goes: your class runs every sublayer it holds and no config field can skip one (a layer's "
                f"attention without its MLP); remove every branch of '{path}' to drop the whole layer, or {GRAPH_HINT}")
    return (f"module '{path}' ({cls}) computes more than its input plus the removed branch {gone} (node "
            f"'{node.name}' runs in it too, e.g. a post-norm layer's LayerNorm or a ReLU after the add), so the "
            f"copy of your class cannot drop it; {GRAPH_HINT}")


def _short(modules: list[str]) -> str:
    return ", ".join(modules[:2]) + (", ..." if len(modules) > 2 else "")


def _check_lists_run_in_order(graph, paths: list[str]) -> None:
    """An ``nn.ModuleList`` loses entries only where the forward runs them one after the
    other in list order, each once (``for layer in self.layers``): then deleting some
    runs the others in the same order. Read from the graph's module stacks."""
    model = graph.model
    lists = {p.rpartition(".")[0] for p in paths if p.rpartition(".")[2].isdigit()}
    for list_path in sorted(lists):
        container = model.get_submodule(list_path) if model is not None else None
        if not isinstance(container, torch.nn.ModuleList):
            continue
        runs: list[int] = []
        prefix = f"{list_path}." if list_path else ""
        for node in graph.gm.graph.nodes:
            for p in _stack_paths(node):
                head, _, rest = p[len(prefix):].partition(".") if p.startswith(prefix) else ("", "", "")
                if head.isdigit() and not rest and (not runs or runs[-1] != int(head)):
                    runs.append(int(head))
                    break
        if runs != list(range(len(container))):
            raise WriteBackError(
                f"nn.ModuleList '{list_path}' is not run entry after entry in list order (the graph runs its "
                f"entries as {runs[:12]}{' ...' if len(runs) > 12 else ''} of {len(container)}): deleting entries "
                f"would change which entry runs where; {GRAPH_HINT}")


def removed_layers(model: torch.nn.Module, paths: list[str]) -> dict[str, tuple[int, list[int]]]:
    """``{list path: (old length, old indices kept)}`` of the ``nn.Sequential`` and
    ``nn.ModuleList`` that :func:`drop_blocks` shortens.

    >>> net = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh(), torch.nn.ReLU())
    >>> removed_layers(net, ["1"])
    {'': (3, [0, 2])}
    """
    gone: dict[str, set[int]] = {}
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        if name.isdigit() and isinstance(model.get_submodule(parent_path), (torch.nn.Sequential, torch.nn.ModuleList)):
            gone.setdefault(parent_path, set()).add(int(name))
    return {p: (len(model.get_submodule(p)), [i for i in range(len(model.get_submodule(p))) if i not in idx])
            for p, idx in gone.items()}


def renamed_key(key: str, layers: dict[str, tuple[int, list[int]]], blocks: list[str]) -> str | None:
    """A state_dict key after :func:`drop_blocks`: None when its module went, else the key
    with its list index renumbered (``model.layers.5.mlp.up_proj.weight`` -> ``model.layers.3...``).

    >>> renamed_key("layers.2.fc.weight", {"layers": (3, [0, 2])}, ["layers.1"])
    'layers.1.fc.weight'
    >>> renamed_key("layers.1.fc.weight", {"layers": (3, [0, 2])}, ["layers.1"]) is None
    True
    """
    if any(key.startswith(f"{b}.") for b in blocks):
        return None
    for list_path, (_, kept) in sorted(layers.items(), key=lambda item: -len(item[0])):
        prefix = f"{list_path}." if list_path else ""
        head, _, rest = key[len(prefix):].partition(".") if key.startswith(prefix) else ("", "", "")
        if head.isdigit() and rest:
            return f"{prefix}{kept.index(int(head))}.{rest}" if int(head) in kept else None
    return key


def drop_blocks(model: torch.nn.Module, paths: list[str]) -> None:
    """Delete ``nn.Sequential`` and ``nn.ModuleList`` entries at ``paths`` and replace other
    modules by ``nn.Identity``."""
    for path in sorted(paths, key=_sort_key, reverse=True):  # later entries first: indices stay valid
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        if isinstance(parent, (torch.nn.Sequential, torch.nn.ModuleList)) and name.isdigit():
            del parent[int(name)]
        else:
            setattr(parent, name, torch.nn.Identity())


def _sort_key(path: str) -> list:
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


__all__ = ["removed_blocks", "drop_blocks", "removed_layers", "renamed_key"]
