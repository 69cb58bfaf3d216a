"""The routing side of a mixture of experts, read from the graph: which linear is the
router of a top-k, what lies between them (activations, a per-expert selection bias, a
group mask) and which nodes carry the expert count (``fxprune.channels.experts`` builds
the expert sets from these).

Between the router and its top-k, DeepSeek-V3-style routers add a per-expert selection
bias to ``sigmoid(logits)`` and may rank fixed groups of experts first
(``view(-1, n_group, E // n_group)``, a top-2 per group, a ``masked_fill``). The scores'
expert dim then shrinks with the experts, and the group view's size must be rewritten.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.fx

from .registry import op_name

_TO_ROUTER = {"softmax", "_softmax", "sigmoid", "to", "_to_copy", "float", "type", "view", "reshape",
              "alias", "contiguous", "log_softmax"}


def _ancestors(node) -> set:
    seen, todo = set(), [node]
    while todo:
        for n in todo.pop().all_input_nodes:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def _descendants(node: torch.fx.Node) -> list:
    seen, todo, order = {node}, [node], []
    while todo:
        n = todo.pop(0)
        for user in n.users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
                order.append(user)
    return order


def _nearest_topk(node) -> torch.fx.Node | None:
    """The closest top-k among ``node``'s inputs, breadth first (the one whose indices
    route these tokens; an earlier layer's top-k is further up)."""
    seen, todo = set(), [node]
    while todo:
        nxt = []
        for n in todo:
            if not isinstance(n, torch.fx.Node) or n in seen:
                continue
            seen.add(n)
            if n.op in ("call_function", "call_method") and op_name(n.target) == "topk":
                return n
            nxt += list(n.all_input_nodes)
        todo = nxt
    return None


def _shape(node) -> tuple:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else ()


def _last_dim(node) -> int:
    shape = _shape(node)
    return int(shape[-1]) if shape else -1


def _expert_dim(node: torch.fx.Node, size: int):
    """The dim of a per-expert tensor (``[E]``, ``[1, E]``) that indexes experts, or None."""
    shape = _shape(node)
    dims = [i for i, d in enumerate(shape) if d == size]
    return dims[0] if len(dims) == 1 and int(np.prod(shape)) == size else None


def _scoring(router: torch.fx.Node, topk: torch.fx.Node, size: int) -> list[torch.fx.Node]:
    """The nodes between the router and its top-k whose last dim is the experts (or a
    group of them): the scores, the group ranking and the group mask. Their sizes shrink
    with the experts; the top-k's among them (a group's top-2) need experts left."""
    up = _ancestors(topk) | {topk}
    region = [n for n in _descendants(router) if n in up and n is not topk]
    out = []
    for n in [router] + region:
        shape = _shape(n)
        if (shape and shape[-1] == size) or (op_name(n.target) == "topk" and _last_dim(n.args[0]) == size) \
                or (len(shape) == 3 and shape[-1] * shape[-2] == size):
            out.append(n)
    return out


def _bias_reads(scores: list[torch.fx.Node], size: int) -> list[torch.fx.Node]:
    """The views and casts between a selection bias and the add that applies it
    (``bias.squeeze()``): their expert dim shrinks too."""
    out = []
    for n in scores:
        for a in n.args if op_name(n.target) in ("add", "__add__", "sub", "__sub__") else ():
            while isinstance(a, torch.fx.Node) and a.op in ("call_function", "call_method") \
                    and op_name(a.target) in _READS and a.args:
                if _last_dim(a) == size:
                    out.append(a)
                a = a.args[0]
    return out


def _groups(scores: list[torch.fx.Node], size: int) -> int:
    """How many fixed-size groups the router ranks: a view of the scores to
    ``[tokens, G, E / G]`` with ``G > 1`` (1 where there is none)."""
    for n in scores:
        shape = _shape(n)
        if op_name(n.target) in ("view", "reshape", "_unsafe_view") and len(shape) == 3 \
                and shape[-1] * shape[-2] == size and shape[-2] > 1:
            return int(shape[-2])
    return 1


def _size_arg(node: torch.fx.Node, size: int):
    """``(argument index, -1)`` of the size list whose last entry is the expert count (a
    view, expand or reshape of the scores), or None."""
    if op_name(node.target) not in ("view", "reshape", "expand", "_unsafe_view") or _last_dim(node) != size:
        return None
    for i, a in enumerate(node.args[1:], 1):
        if isinstance(a, (list, tuple)) and a and a[-1] == size:
            return i, -1
    return None


_SIZED = ("view", "reshape", "_unsafe_view", "repeat", "expand")


def dense_dispatch(router: torch.fx.Node, topk: torch.fx.Node, size: int):
    """Experts that run on every token (Llama 4): the scores, scattered from the top-k
    into ``-inf`` and put through a sigmoid, scale the tokens tiled ``E`` times
    (``repeat(E, 1)``), which a ``bmm`` over stacked ``[E, ...]`` weights multiplies
    expert by expert before a sum over the experts. A token's unchosen expert sees a zero
    input, so it adds nothing. Returns ``(stacked get_attr nodes, marks, sizes)`` (see
    :class:`ExpertSet`) or None when the graph is not of that form."""
    bmms = [n for n in _descendants(topk) if op_name(n.target) == "bmm" and _nearest_topk(n.args[0]) is topk
            and _param_read(n.args[1]) is not None and _shape(_param_read(n.args[1]))[:1] == (size,)]
    if not bmms:
        return None
    end = bmms[-1]
    while end is not None and not (op_name(end.target) == "sum" and list(end.args[1]) in ([0], (0,))):
        users = list(end.users)
        end = users[0] if len(users) == 1 and op_name(users[0].target) in _SIZED + ("sum",) else None
    if end is None:
        return None
    start = router.args[0]
    region = set(_descendants(start)) & _ancestors(end)
    dims: dict[torch.fx.Node, int] = {router: len(_shape(router)) - 1}
    marks, sizes = [], []
    for n in sorted(region, key=_order(router.graph)):
        dim = _dense_dim(n, dims, size)
        if dim is None:
            continue
        dims[n] = dim
        shape = _shape(n)
        if shape and shape[dim] % size == 0:
            marks.append((n.name, dim, shape[dim] // size))
        for i, a in enumerate(n.args[1:], 1):
            if op_name(n.target) in _SIZED and isinstance(a, (list, tuple)) and a and a[0] == size:
                sizes.append((n.name, i, 0))
    if any(dims.get(b) != 0 for b in bmms):
        return None  # the batch of the expert products is not the experts
    return [_param_read(b.args[1]) for b in bmms], marks, sizes


def _order(graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]


def _dense_dim(n: torch.fx.Node, dims: dict, size: int):
    """The dim of ``n`` that counts experts, from its inputs' (or None): a size list that
    starts with ``E`` makes it dim 0 (experts first), ``-1`` leading a view keeps an
    expert-major dim 0 (experts x tokens), a transpose moves it, elementwise ops and
    ``bmm`` keep it aligned from the right."""
    name = op_name(n.target)
    if name == "topk":
        return None  # its values and indices count the chosen, not the experts
    args = [a for a in n.args if isinstance(a, torch.fx.Node)]
    known = [a for a in args if a in dims]
    if name in _SIZED:
        lst = next((a for a in n.args[1:] if isinstance(a, (list, tuple))), None)
        if lst and lst[0] == size:
            return 0
        if known and dims[known[0]] == 0 and lst and lst[0] == -1:
            return 0
        return None
    if not known:
        return None
    src = known[0]
    if name == "transpose":
        a, b = (d % max(len(_shape(src)), 1) for d in n.args[1:3])
        d = dims[src]
        return b if d == a else a if d == b else d
    if name == "getitem" or not _shape(n):  # a chunk's pieces, a tuple
        return dims[src]
    out_nd, in_nd = len(_shape(n)), len(_shape(src)) if _shape(src) else len(_shape(n))
    d = dims[src] - in_nd + out_nd
    return d if 0 <= d < out_nd else None


def _k(node: torch.fx.Node) -> int:
    k = node.args[1] if len(node.args) > 1 else node.kwargs.get("k", 0)
    return int(k) if isinstance(k, int) else 0


def _router(node, modules, canonical, biases: list | None = None, sliced: list | None = None):
    """The router linear whose logits the top-k ranks, walking up through casts and
    activations; ``masked_fill`` (a group mask) and scalar scalings keep the order of
    the scores, and an added per-expert parameter (a selection bias) is collected in
    ``biases`` as its get_attr node. A slice of the first entries of the last dim (the
    routed experts of a router that also gates shared experts, Inkling) is collected in
    ``sliced``."""
    while isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method"):
        name = op_name(node.target)
        if name in _TO_ROUTER or (name in _SCALINGS and _scalar_operand(node)):
            node = node.args[0]
        elif name == "slice" and sliced is not None and _leading_slice(node):
            sliced.append(node)
            node = node.args[0]
        elif name in ("add", "__add__", "sub", "__sub__") and len(node.args) == 2 \
                and all(isinstance(a, torch.fx.Node) for a in node.args):
            reads = [_param_read(a) for a in node.args]
            if sum(r is not None for r in reads) != 1 or biases is None:
                break
            biases.append(next(r for r in reads if r is not None))
            node = node.args[0] if reads[0] is None else node.args[1]
        else:
            break
    if not isinstance(node, torch.fx.Node):
        return None, []
    if node.op == "call_module" and isinstance(modules.get(node.target), torch.nn.Linear):
        lin = modules[node.target]
        keys = [f"{node.target}.weight"] + ([f"{node.target}.bias"] if lin.bias is not None else [])
        return node, [canonical.get(k, k) for k in keys]
    if node.op == "call_function" and op_name(node.target) == "linear":
        params = [a for a in list(node.args[1:3]) + [node.kwargs.get("bias")] if isinstance(a, torch.fx.Node)]
        params = [_param_read(p) or p for p in params]  # a router read in float32 (``weight.float()``)
        if all(p.op == "get_attr" for p in params) and params:
            return node, [canonical.get(p.target, p.target) for p in params]
    return None, []


_SCALINGS = {"masked_fill", "mul", "__mul__", "div", "__truediv__"}
_READS = {"squeeze", "unsqueeze", "view", "reshape", "to", "_to_copy", "alias", "contiguous", "expand", "float",
          "type", "type_as"}


def router_slices(router: torch.fx.Node) -> list[torch.fx.Node]:
    """Slices of the router's outputs (through casts and activations) along its last dim:
    ``logits[..., :E]`` (the experts) and ``logits[..., E:]`` (shared experts' gates).
    Bounds past the experts move down by the experts removed."""
    out, todo = [], [router]
    while todo:
        node = todo.pop()
        for user in node.users:
            name = op_name(user.target)
            if name == "slice" and user.args[0] is node and _last_dim_slice(user):
                out.append(user)
            elif name in _TO_ROUTER and user.args[0] is node:
                todo.append(user)
    return out


def _last_dim_slice(node: torch.fx.Node) -> bool:
    dim, ndim = node.args[1] if len(node.args) > 1 else 0, len(_shape(node.args[0]))
    return ndim > 0 and dim % ndim == ndim - 1


def _leading_slice(node: torch.fx.Node) -> bool:
    """``x[..., :n]``: a slice of the last dim from 0 with step 1 (the kept entries keep
    their indices)."""
    args = list(node.args) + [None] * 5
    dim, start, step = args[1] if args[1] is not None else 0, args[2] or 0, args[4] or 1
    ndim = len(_shape(node.args[0]))
    return ndim > 0 and dim % ndim == ndim - 1 and start == 0 and step == 1


def _scalar_operand(node: torch.fx.Node) -> bool:
    """``masked_fill(x, mask, v)`` or ``x * c`` / ``x / c`` with a positive constant ``c``:
    the top-k ranks the same experts first (masked entries are never the removed ones')."""
    if op_name(node.target) == "masked_fill":
        return True
    other = node.args[1] if len(node.args) > 1 else None
    return isinstance(other, (int, float)) and not isinstance(other, bool) and other > 0


def _param_read(node):
    """The get_attr node ``node`` reads through views and casts, or None."""
    while isinstance(node, torch.fx.Node) and node.op in ("call_function", "call_method") \
            and op_name(node.target) in _READS and node.args:
        node = node.args[0]
    return node if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None
