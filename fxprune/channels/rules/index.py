"""Concatenation, splitting and indexing: channel maps are concatenated and sliced.

A concat along a channel dim concatenates its inputs' maps (one dim may then hold
channels of several spaces, or the same channel twice when a tensor is concatenated
with itself); the other dims are aligned like an element-wise op. A split along a
channel dim slices the map; its sizes are rewritten to the kept counts. A slice with
step 1 is rewritten the same way; an integer index or a strided slice on a channel dim
would select channels by position, so those channels are frozen.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..registry import register_rule
from ..values import DimMap, TensorChannels
from ..context import fixed_map
from .fallback import size_arithmetic_rule, unknown_rule


@register_rule(torch.cat, torch.concat, torch.concatenate)
def cat_rule(ctx):
    tensors = ctx.value(ctx.arg(0, "tensors"))
    dim = ctx.arg(1, "dim", 0)
    shape = ctx.out_shape()
    dim %= len(shape)
    parts = [t for t in tensors if isinstance(t, TensorChannels)]
    dims: dict[int, DimMap] = {}
    pieces = [t.get(dim) or fixed_map(t.shape[dim]) for t in parts]
    if any(p.tracked.size for p in pieces):
        dims[dim] = DimMap.concat(pieces)
    for d in range(len(shape)):
        if d == dim:
            continue
        maps = [t.get(d) for t in parts]
        merged = ctx.unify_all(maps, " (concatenated tensors)")
        if merged is not None:
            dims[d] = DimMap(merged.ids, np.logical_and.reduce([m.zi for m in maps if m is not None]))
    return ctx.out(dims)


def _split_sizes(ctx, total: int) -> list[int]:
    target = ctx.node.target
    how = ctx.arg(1, "split_size_or_sections" if target in (torch.split, "split") else "chunks")
    if target in (torch.chunk, "chunk"):
        chunk = -(-total // how)
        return [min(chunk, total - s) for s in range(0, total, chunk)]
    if isinstance(how, int):
        return [min(how, total - s) for s in range(0, total, how)]
    return list(how)


@register_rule(torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split")
def split_rule(ctx):
    x = ctx.tensor(0, "input" if ctx.node.op == "call_function" else None)
    if ctx.node.target in (torch.tensor_split, "tensor_split"):
        return unknown_rule(ctx)
    dim = ctx.arg(2, "dim", 0) % x.ndim
    m = x.get(dim)
    sizes = _split_sizes(ctx, x.shape[dim])
    outs, start = [], 0
    for size in sizes:
        shape = x.shape[:dim] + (size,) + x.shape[dim + 1:]
        piece = m.take(slice(start, start + size)) if m is not None else None
        ctx.require_nonempty(piece, f"piece {len(outs)} of a split")
        outs.append(TensorChannels(shape, {**x.dims, dim: piece} if piece is not None else
                                   {d: v for d, v in x.dims.items() if d != dim}))
        start += size
    if m is not None:
        ctx.on_prune(_rewrite_split(dim, len(sizes), [m.take(slice(s, s + n)) for s, n in
                                                       zip(np.cumsum([0] + sizes[:-1]), sizes)]))
    return tuple(outs)


def _rewrite_split(dim: int, count: int, pieces: list[DimMap]):
    """Replace split/chunk by ``torch.split`` with the kept size of every piece."""

    def rewrite(p, node):
        sizes = [p.count(piece) for piece in pieces]
        node.target = torch.split
        node.op = "call_function"
        node.args = (node.args[0], sizes, dim)
        node.kwargs = {}

    return rewrite


@register_rule(torch.unbind, "unbind")
def unbind_rule(ctx):
    x = ctx.tensor(0, "input")
    dim = ctx.arg(1, "dim", 0) % x.ndim
    if x.get(dim) is not None:
        ctx.freeze(x.get(dim).ids, f"unbind selects channels by position at {ctx.where()}")
    rest = {(d if d < dim else d - 1): m for d, m in x.dims.items() if d != dim}
    shape = x.shape[:dim] + x.shape[dim + 1:]
    return tuple(TensorChannels(shape, rest) for _ in range(x.shape[dim]))


def tensor_getitem_rule(ctx):
    """``x[...]`` with ints, slices, None and Ellipsis. Tensor indices freeze."""
    x = ctx.tensor(0)
    index = ctx.arg(1)
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (it is None or it is Ellipsis or isinstance(it, (int, slice))) for it in items):
        return unknown_rule(ctx)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        used = sum(1 for it in items if it is not None and it is not Ellipsis)
        items = items[:at] + [slice(None)] * (x.ndim - used) + items[at + 1:]
    items += [slice(None)] * (x.ndim - sum(1 for it in items if it is not None))
    dims: dict[int, DimMap] = {}
    slices: dict[int, tuple[int, int, DimMap]] = {}
    src, dst = 0, 0
    for it in items:
        if it is None:
            dst += 1
            continue
        m = x.get(src)
        if isinstance(it, int):
            if m is not None:
                ctx.freeze(m.ids, f"an integer index selects a channel by position at {ctx.where()}")
        else:
            start, stop, step = it.indices(x.shape[src])
            if m is not None:
                if step != 1:
                    ctx.freeze(m.ids, f"a strided slice picks channels by position at {ctx.where()}")
                elif (start, stop) != (0, x.shape[src]):
                    slices[src] = (start, stop, m)
                    dims[dst] = m.take(slice(start, stop))
                    ctx.require_nonempty(dims[dst], "a slice")
                else:
                    dims[dst] = m
            dst += 1
        src += 1
    if slices:
        ctx.on_prune(_rewrite_slices(slices))
    return ctx.out(dims)


def _rewrite_slices(slices: dict[int, tuple[int, int, DimMap]]):
    """Slice bounds on channel dims become the kept counts before start and stop."""

    def rewrite(p, node):
        index = node.args[1]
        items = list(index) if isinstance(index, tuple) else [index]
        src = 0
        for pos, it in enumerate(items):
            if it is Ellipsis:
                src = p.old_ndim(node.args[0]) - sum(1 for i in items[pos + 1:] if i is not None)
                continue
            if it is None:
                continue
            if src in slices and isinstance(it, slice):
                start, stop, m = slices[src]
                new_start = p.count(m.take(slice(0, start)))
                items[pos] = slice(new_start, new_start + p.count(m.take(slice(start, stop))), None)
            src += 1
        node.args = (node.args[0], tuple(items) if isinstance(index, tuple) else items[0])

    return rewrite


@register_rule(operator.getitem)
def getitem_dispatch(ctx):
    container = ctx.value(ctx.arg(0))
    if isinstance(container, TensorChannels):
        return tensor_getitem_rule(ctx)
    index = ctx.arg(1)
    if isinstance(container, (tuple, list)) and isinstance(index, int):
        return container[index]
    if isinstance(container, (tuple, list)) and isinstance(index, slice):
        return container[index]
    if isinstance(container, dict):
        return container.get(index)
    return size_arithmetic_rule(ctx)
