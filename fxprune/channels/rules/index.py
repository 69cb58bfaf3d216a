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

from ..registry import op_name, register_rule
from ..values import DimMap, TensorChannels, flatten_values
from ..context import fixed_map
from .fallback import size_arithmetic_rule, unknown_rule


aten = torch.ops.aten


@register_rule(torch.cat, torch.concat, torch.concatenate, aten.cat.default, aten.concat.default)
def cat_rule(ctx):
    tensors = ctx.value(ctx.arg(0, "tensors"))
    dim = ctx.arg(1, "dim", 0)
    shape = ctx.out_shape()
    dim %= len(shape)
    # torch.cat skips 1-D empty tensors whatever the dim (XLM's cache starts as one)
    parts = [t for t in tensors if isinstance(t, TensorChannels) and tuple(t.shape) != (0,)]
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


@register_rule(torch.stack, aten.stack.default)
def stack_rule(ctx):
    """``stack(tensors, dim)``: a new dim (no channels) in front of ``dim``; the tensors'
    aligned dims share channels, as for a concat along the new dim (Mamba's scan steps)."""
    tensors = ctx.value(ctx.arg(0, "tensors"))
    shape = ctx.out_shape()
    new = ctx.arg(1, "dim", 0) % len(shape)
    parts = [t for t in tensors if isinstance(t, TensorChannels)]
    dims: dict[int, DimMap] = {}
    for d in range(len(shape) - 1):
        maps = [t.get(d) for t in parts]
        merged = ctx.unify_all(maps, " (stacked tensors)")
        if merged is not None:
            zi = np.logical_and.reduce([m.zi for m in maps if m is not None]) & (len(parts) == len(tensors))
            dims[d if d < new else d + 1] = DimMap(merged.ids, zi)
    return ctx.out(dims)


@register_rule(torch.split, "split", torch.chunk, "chunk", torch.tensor_split, "tensor_split",
               aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.tensor_split.sections,
               aten.tensor_split.indices, aten.unsafe_split.Tensor)
def split_rule(ctx):
    """Pieces along one dim. Their sizes are read from the recorded outputs, not from the
    arguments: ``torch.split(x, [s, x.shape[1] - s], 1)`` computes them from a shape."""
    x = ctx.tensor(0, "input" if ctx.node.op == "call_function" else None)
    metas = ctx.node.meta.get("tensor_meta")
    if x is None or not isinstance(metas, (tuple, list)):
        return unknown_rule(ctx)
    dim = ctx.arg(2, "dim", 0) % x.ndim
    m = x.get(dim)
    sizes = [int(meta.shape[dim]) for meta in metas]
    if sum(sizes) != x.shape[dim]:
        return unknown_rule(ctx)
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


@register_rule(torch.unbind, "unbind", aten.unbind.int)
def unbind_rule(ctx):
    x = ctx.tensor(0, "input")
    dim = ctx.arg(1, "dim", 0) % x.ndim
    if x.get(dim) is not None:
        ctx.freeze(x.get(dim).ids, f"unbind selects channels by position at {ctx.where()}")
    rest = {(d if d < dim else d - 1): m for d, m in x.dims.items() if d != dim}
    shape = x.shape[:dim] + x.shape[dim + 1:]
    return tuple(TensorChannels(shape, rest) for _ in range(x.shape[dim]))


def _sliced(ctx, m: DimMap | None, size: int, start, stop, step) -> DimMap | None:
    """The map of ``x[start:stop:step]`` along a dim (None: the dim carries no channels)."""
    start, stop, step = slice(start, stop, step).indices(size)
    if m is None:
        return None
    if step != 1:
        ctx.freeze(m.ids, f"a strided slice picks channels by position at {ctx.where()}")
        return None
    if (start, stop) == (0, size):
        return m
    piece = m.take(slice(start, stop))
    ctx.require_nonempty(piece, "a slice")
    return piece


def _kept_bounds(p, m: DimMap, start: int, stop: int) -> tuple[int, int]:
    """Prune time: ``[start, stop)`` of a channel dim becomes the kept counts before each bound."""
    new_start = p.count(m.take(slice(0, start)))
    return new_start, new_start + p.count(m.take(slice(start, stop)))


def tensor_getitem_rule(ctx):
    """``x[...]`` with ints, slices, None and Ellipsis. Tensor indices freeze."""
    x = ctx.tensor(0)
    index = ctx.arg(1)
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(it, torch.fx.Node) for it in items) and all(
            isinstance(it, torch.fx.Node) or it == slice(None) for it in items):
        # ``x[:, idx]``: full slices and tensor indices, read as aten.index
        return tensor_index(ctx, x, [it if isinstance(it, torch.fx.Node) else None for it in items])
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
        elif not all(b is None or isinstance(b, int) for b in (it.start, it.stop, it.step)):
            # bounds computed at run time (Swin crops its padding with x[:, :H, :W]): fine on
            # a dim without channels, unknowable on a channel dim
            if m is not None:
                ctx.freeze(m.ids, f"a slice with run-time bounds on a channel dim at {ctx.where()}")
            for leaf in flatten_values(ctx.value([it.start, it.stop, it.step])):
                ctx.freeze(leaf.ids, f"a channel count is used as a slice bound at {ctx.where()}")
            dst += 1
        else:
            start, stop, step = it.indices(x.shape[src])
            piece = _sliced(ctx, m, x.shape[src], start, stop, step)
            if piece is not None:
                dims[dst] = piece
                if piece is not m:
                    slices[src] = (start, stop, m)
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
                items[pos] = slice(*_kept_bounds(p, m, start, stop), None)
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


@register_rule(aten.slice.Tensor, "narrow", torch.narrow, aten.narrow.default)
def slice_rule(ctx):
    """``aten.slice(x, dim, start, end, step)`` and ``narrow(x, dim, start, length)``: the
    map is sliced; bounds on a channel dim become the kept counts before start and end."""
    x = ctx.tensor(0, "input")
    dim = ctx.arg(1, "dim", 0)
    if x is None or not isinstance(dim, int):
        return unknown_rule(ctx)
    dim %= x.ndim
    narrow = op_name(ctx.node.target) == "narrow"
    start = ctx.arg(2, "start", 0)
    if narrow:
        stop, step = (start + ctx.arg(3, "length")) if isinstance(start, int) else None, 1
    else:
        stop, step = ctx.arg(3, "end"), ctx.arg(4, "step", 1)
    m = x.get(dim)
    if any(isinstance(v, torch.fx.Node) for v in (start, stop, step)) and m is None:
        return x  # bounds read off a dynamic size (``h[..., :seq]`` under export) on a dim without channels
    if not all(v is None or isinstance(v, int) for v in (start, stop, step)):
        return unknown_rule(ctx)
    piece = _sliced(ctx, m, x.shape[dim], start, stop, step)
    dims = {d: v for d, v in x.dims.items() if d != dim}
    if piece is not None:
        dims[dim] = piece
    if piece is not None and piece is not m:
        begin, end, _ = slice(start, stop, step).indices(x.shape[dim])

        def rewrite(p, node):
            new_start, new_stop = _kept_bounds(p, m, begin, end)
            args = list(node.args) + [None] * (4 - len(node.args))
            args[2] = new_start
            args[3] = new_stop - new_start if narrow else new_stop
            node.args = tuple(args[:4]) + tuple(node.args[4:])

        ctx.on_prune(rewrite)
    return ctx.out(dims)


def _picked_dim(ctx, what: str):
    """``(x, dim)`` of an op that picks positions of ``dim`` (their channels are frozen);
    ``(None, None)`` when the call is not of that form."""
    x, dim = ctx.tensor(0, "input"), ctx.arg(1, "dim")
    if x is None or not isinstance(dim, int):
        return None, None
    dim %= x.ndim
    if x.get(dim) is not None:
        ctx.freeze(x.get(dim).ids, f"{what} at {ctx.where()}")
    return x, dim


@register_rule(aten.select.int, "select", torch.select)
def select_rule(ctx):
    """``x.select(dim, i)``: one position of a dim; a channel picked by position is frozen."""
    x, dim = _picked_dim(ctx, "an integer index selects a channel by position")
    if x is None:
        return unknown_rule(ctx)
    return ctx.out({(d if d < dim else d - 1): m for d, m in x.dims.items() if d != dim})


@register_rule(aten.index_select.default, torch.index_select, "index_select")
def index_select_rule(ctx):
    """Positions chosen by a tensor: the chosen dim's channels are frozen, the others pass."""
    x, dim = _picked_dim(ctx, "index_select picks channels by position")
    if x is None:
        return unknown_rule(ctx)
    index = ctx.tensor(2, "index")
    if index is not None and index.dims:
        ctx.freeze(index.all_ids(), f"indices come from channels at {ctx.where()}")
    return ctx.out({d: m for d, m in x.dims.items() if d != dim})


@register_rule(aten.index.Tensor)
def index_tensor_rule(ctx):
    """``x[idx]`` with tensor indices on leading dims (a rotary table read at the positions):
    indexed dims freeze their channels, the dims after them pass to the end of the result."""
    x, indices = ctx.tensor(0, "input"), ctx.arg(1, "indices")
    if x is None or not isinstance(indices, (tuple, list)):
        return unknown_rule(ctx)
    return tensor_index(ctx, x, list(indices))


def tensor_index(ctx, x: TensorChannels, indices: list):
    """Tensor indices (``None``: a full slice) on a run of dims; shared by aten.index and
    ``x[:, idx]``. A tensor index picks positions, so channels of an indexed dim freeze."""
    for t in indices:
        meta = t.meta.get("tensor_meta") if isinstance(t, torch.fx.Node) else None
        if t is not None and (meta is None or not hasattr(meta, "dtype") or meta.dtype in (torch.bool, torch.uint8)):
            return unknown_rule(ctx)  # a mask consumes several dims at once
    used = [i for i, t in enumerate(indices) if t is not None]
    if not used or used != list(range(used[0], used[-1] + 1)):
        return unknown_rule(ctx)  # scattered tensor indices move dims around
    for i in used:
        if x.get(i) is not None:
            ctx.freeze(x.get(i).ids, f"a tensor index picks channels by position at {ctx.where()}")
    for t in ctx.value(list(indices)):
        if isinstance(t, TensorChannels) and t.dims:
            ctx.freeze(t.all_ids(), f"indices come from channels at {ctx.where()}")
    out_nd = len(ctx.out_shape())
    tail = x.ndim - (used[-1] + 1)
    dims = {d: m for d, m in x.dims.items() if d < used[0]}
    dims |= {out_nd - (x.ndim - d): m for d, m in x.dims.items() if d > used[-1] and tail}
    return ctx.out(dims)
