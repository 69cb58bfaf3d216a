"""Remove experts from a pruned graph (``fxprune.channels.experts``).

For each expert set the plan names: the router's rows of the removed experts go, as
does index ``e`` (dim 0) of every stacked expert weight, and the nodes that count
experts (``histc`` over the expert ids, ``one_hot``) count the experts left. Kept experts
keep their order, so after the router shrinks, the top-k's index ``i`` names the i-th
kept expert, which is where its weights now are. The shapes that change are recorded in
``ctx.expert_dims`` for the shape check.
"""
from __future__ import annotations

import torch
import torch.fx

from ..channels.experts import ExpertSet, _TO_ROUTER
from ..channels.registry import op_name
from ..channels.rules.experts import _VIEWS


def remove_experts(ctx, removed: list[tuple[ExpertSet, list[int]]]) -> None:
    """Cut the removed experts out of ``ctx.gm`` (the prune pass's graph, channels already cut).

    >>> import torch
    >>> from fxprune.channels.experts import ExpertSet
    >>> remove_experts(None, [])  # nothing to remove
    """
    if not removed:
        return
    gm = ctx.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    dims = getattr(ctx, "expert_dims", {})
    ctx.expert_dims = dims
    for s, chosen in removed:
        kept = [e for e in range(s.size) if e not in set(chosen)]
        left = len(kept)
        rows = kept + list(range(s.size, s.size + s.router_extra))  # a router's rows after the experts stay
        for key, dim in [(k, 0) for k in s.router_keys + s.stacked] + list(s.biases):
            new = _keep_rows(_owner(gm, key), key, rows if key in s.router_keys else kept, dim)
            for alias in ctx.graph.state.aliases.get(key, [key]):
                path, _, attr = alias.rpartition(".")
                setattr(gm.get_submodule(path), attr, new)  # a Parameter stays registered as one
        for name in s.counts:
            node = ctx.replacement.get(name) or nodes[name]
            node.args = tuple(_recount(a, s.size, left) for a in node.args)
            node.kwargs = {k: _recount(v, s.size, left) for k, v in node.kwargs.items()}
            _mark_down(node, 0, left, dims, ("cumsum", "to", "_to_copy"))
        for e, (switch, (join, other)) in enumerate(zip(s.switches, s.joins)):
            if e in chosen:  # the sum without this expert: its nodes then die with dead code
                ctx.replace(ctx.replacement.get(join) or nodes[join], ctx.replacement.get(other) or nodes[other])
            else:  # kept experts move to their index among the kept
                node = ctx.replacement.get(switch) or nodes[switch]
                node.args = (node.args[0], kept.index(e)) + tuple(node.args[2:])
        for name, arg, at in s.sizes:  # view(-1, 1, E) -> view(-1, 1, E'), repeat(E, 1) -> repeat(E', 1)
            node = ctx.replacement.get(name) or nodes[name]
            sizes = list(node.args[arg])
            sizes[at] = left
            node.args = node.args[:arg] + (sizes,) + node.args[arg + 1:]
        for name in s.logit_slices:  # logits[..., E:] -> logits[..., E':]: the shared experts' gates move down
            node = ctx.replacement.get(name) or nodes[name]
            node.args = node.args[:2] + tuple(v - len(chosen) if isinstance(v, int) and v >= s.size else v
                                              for v in node.args[2:4]) + node.args[4:]
        router = ctx.replacement.get(s.router) or nodes[s.router]
        _mark_down(router, -1, left + s.router_extra, dims, _TO_ROUTER)
        for name, dim, per_expert in s.marks:
            dims[getattr(ctx.replacement.get(name), "name", name)] = (dim, per_expert * left)
        sizes = {k: (0, left) for k in s.stacked} | {k: (0, left + s.router_extra) for k in s.router_keys} | \
            {k: (dim, left) for k, dim in s.biases}
        for node in gm.graph.nodes:
            key = ctx.graph.state.canonical.get(node.target, node.target) if node.op == "get_attr" else None
            if key in sizes:
                _mark_down(node, sizes[key][0], sizes[key][1], dims, _VIEWS)
    gm.graph.lint()


def _owner(gm, key: str):
    path, _, attr = key.rpartition(".")
    return getattr(gm.get_submodule(path), attr)


def _keep_rows(tensor: torch.Tensor, key: str, kept: list[int], dim: int = 0) -> torch.Tensor:
    """``tensor`` with only the kept experts along ``dim`` (a Parameter stays one)."""
    new = tensor.detach().index_select(dim, torch.as_tensor(kept, device=tensor.device)).clone()
    return torch.nn.Parameter(new, requires_grad=tensor.requires_grad) if isinstance(tensor, torch.nn.Parameter) else new


def _recount(value, old: int, new: int):
    """Histogram arguments over expert ids: ``bins=E`` becomes ``E'``, ``max=E-1`` ``E'-1``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if value == old:
        return type(value)(new)
    if value == old - 1:
        return type(value)(new - 1)
    return value


def _mark_down(node: torch.fx.Node, dim: int, size: int, dims: dict, through) -> None:
    """Record that ``node`` and the view-like ops after it have ``size`` along ``dim``."""
    todo = [node]
    while todo:
        n = todo.pop()
        dims[n.name] = (dim, size)
        todo += [u for u in n.users if u.op in ("call_function", "call_method") and op_name(u.target) in through]


def expected_shape(ctx, name: str, want: tuple) -> tuple:
    """``want`` (the channel analysis' prediction) with the expert count of a node whose
    experts were removed."""
    entry = getattr(ctx, "expert_dims", {}).get(name)
    if entry is None or not want:
        return want
    dim, size = entry
    shape = list(want)
    shape[dim] = size
    return tuple(shape)


__all__ = ["remove_experts", "expected_shape"]
