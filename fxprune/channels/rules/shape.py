"""Ops that move dims around: reshape/view/flatten, permute/transpose, expand, shuffles.

A reshape is read as groups of dims whose sizes multiply to the same number:
- one dim to one dim: the map is carried over;
- several dims merged into one (flatten before a linear): each channel becomes a
  contiguous block of the merged dim;
- one dim split into several (``[B, N, 3*C] -> [B, N, 3, H, C/H]``, or a channel
  shuffle's ``[B, C] -> [B, g, C/g]``): the innermost factor carries the channels and
  position p is tied across every outer block, so every block keeps the same
  positions and the reshape stays valid after pruning;
- anything else mixes dims: the channels involved are frozen.
Hard-coded sizes of channel dims in ``view``/``reshape``/``expand`` are rewritten by
the prune pass to the new channel counts.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from ..registry import register_rule
from ..values import DimMap, SizeValue, TensorChannels
from .fallback import unknown_rule
from .query_slots import merged_slots, slot_channels
from .shuffle import find_shuffle_ending_at, match_shuffle, permuted, rewrite_as_index_select

aten = torch.ops.aten


def match_dims(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of dims of shape ``a`` and ``b`` whose sizes have the same product."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        if i < len(a) and a[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(b) and b[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(a) or j >= len(b):
            groups.append((list(range(i, len(a))), list(range(j, len(b)))))
            break
        gi, gj, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb and i < len(a):
                gi.append(i)
                pa *= a[i]
                i += 1
            elif j < len(b):
                gj.append(j)
                pb *= b[j]
                j += 1
            else:
                break
        groups.append((gi, gj))
    return groups


def reshape_maps(ctx, x: TensorChannels, out_shape: tuple[int, ...]) -> dict[int, DimMap]:
    dims: dict[int, DimMap] = {}
    for gi, gj in match_dims(x.shape, tuple(out_shape)):
        tracked = [d for d in gi if x.get(d) is not None]
        if not tracked:
            continue
        if len(gi) == 1 and len(gj) == 1:
            dims[gj[0]] = x.get(gi[0])
        elif len(gj) == 1 and len(tracked) == 1:
            d = tracked[0]
            sizes = [x.shape[k] for k in gi]
            axis = gi.index(d)
            view = [1] * len(gi)
            view[axis] = sizes[axis]
            m = x.get(d)
            ids = np.broadcast_to(m.ids.reshape(view), sizes).ravel()
            zi = np.broadcast_to(m.zi.reshape(view), sizes).ravel()
            dims[gj[0]] = DimMap(ids.copy(), zi.copy())
        elif len(gi) == 1 and len(gj) > 1:
            split = [k for k in gj if out_shape[k] > 1]
            m = x.get(gi[0])
            if len(split) >= 2 and out_shape[split[-1]] in ctx.state.head_reshapes.get(ctx.node.name, ()):
                # heads x head_dim in front of attention: a whole head is one unit. Tie
                # position p across the outer blocks (q/k/v of a fused projection), then
                # every head_dim position inside a head.
                heads, head_dim = split[-2], out_shape[split[-1]]
                outer = x.shape[gi[0]] // (out_shape[heads] * head_dim)
                per_head = ctx.tie_blocks(m, outer, across=True) if outer > 1 else m
                dims[heads] = ctx.tie_blocks(per_head, out_shape[heads], across=False)
            else:  # position p of the innermost factor is tied across every outer block
                inner = split[-1]
                dims[inner] = ctx.tie_blocks(m, x.shape[gi[0]] // out_shape[inner], across=True)
        elif len(gj) == 1 and gi == [ctx.state.kv_merges.get(ctx.node.name, -2) + k for k in (0, 1)]:
            dims[gj[0]] = merged_slots(ctx, x.get(gi[0]), x.get(gi[1]))  # repeat_kv under query slots
        else:
            for d in tracked:
                ctx.freeze(x.get(d).ids, f"reshape mixes a channel dim with other dims at {ctx.where()}")
    return dims


def _shape_args(ctx, first: int) -> list:
    """The requested shape of view/reshape/expand: varargs or one sequence argument."""
    args = ctx.node.args[first:]
    if not args:
        args = (ctx.node.kwargs.get("shape", ctx.node.kwargs.get("size", ())),)
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0])
    return list(args)


def _check_size_args(ctx, out: TensorChannels, sizes: list) -> None:
    """A size computed from channel counts may only stand where the prune pass rewrites it."""
    for pos, raw in enumerate(sizes):
        v = ctx.value(raw)
        if isinstance(v, SizeValue) and out.get(pos) is None:
            ctx.freeze(v.ids, f"a channel count is used as the size of another dim at {ctx.where()}")


def _pinned_sizes(ctx, out: TensorChannels, sizes: list) -> list[int]:
    """Positions whose size is computed from channel counts but whose dim carries none
    (``c // heads`` as head_dim, with heads as units): the dim keeps its size, so the prune
    pass writes the recorded number there instead of the expression."""
    offset = out.ndim - len(sizes)
    return [pos for pos, raw in enumerate(sizes)
            if isinstance(ctx.value(raw), SizeValue) and out.get(pos + offset) is None]


def rewrite_sizes(first: int, pinned: list[int] = ()):
    """Prune-time rewrite: sizes at channel dims become the new channel counts; ``pinned``
    positions (see :func:`_pinned_sizes`) become their recorded constant."""

    def rewrite(p, node):
        args = list(node.args[first:])
        packed = len(args) == 1 and isinstance(args[0], (tuple, list))
        sizes = list(args[0]) if packed else args
        if not args:
            key = "shape" if "shape" in node.kwargs else "size"
            sizes = list(node.kwargs[key])
        new_shape = p.new_shape(node)
        offset = len(new_shape) - len(sizes)
        for pos in range(len(sizes)):
            if (p.is_channel_dim(node, pos + offset) and sizes[pos] != -1) or pos in pinned:
                sizes[pos] = new_shape[pos + offset]
        if not args:
            node.kwargs = {**node.kwargs, key: tuple(sizes)}
        elif packed:
            node.args = (*node.args[:first], type(args[0])(sizes))
        else:
            node.args = (*node.args[:first], *sizes)

    return rewrite


@register_rule("view", "reshape", torch.reshape, aten.view.default, aten.reshape.default,
               aten._unsafe_view.default)
def reshape_rule(ctx):
    x = ctx.tensor(0, "input")
    if x is None:
        return unknown_rule(ctx)
    starting = match_shuffle(ctx.node)
    if starting is not None:  # the start of a channel shuffle: its input map moves to the end
        d = starting.dim
        return ctx.out({(k if k < d else k + 1): m for k, m in x.dims.items() if k != d})
    shuffle = find_shuffle_ending_at(ctx.node)
    if shuffle is not None:  # the end of one: a permutation of the shuffle's input
        source = ctx.value(shuffle.source)
        src_map = source.get(shuffle.dim)
        if src_map is not None:
            ctx.on_prune(rewrite_as_index_select(shuffle.source.name, shuffle.dim, shuffle.perm, src_map))
        return permuted(source, shuffle.dim, shuffle.perm)
    out = ctx.out(reshape_maps(ctx, x, ctx.out_shape()))
    ctx.on_prune(rewrite_sizes(1, _pinned_sizes(ctx, out, _shape_args(ctx, 1))))
    return out


@register_rule(torch.flatten, "flatten", nn.Flatten, torch.ravel, "ravel", nn.Unflatten, "unflatten",
               torch.unflatten, torch.squeeze, "squeeze", torch.unsqueeze, "unsqueeze",
               aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.default, aten.squeeze.dim,
               aten.squeeze.dims, aten.unsqueeze.default)
def flatten_rule(ctx):
    """Reshapes whose arguments name dims, not sizes: nothing to rewrite but unflatten."""
    x = ctx.tensor(0, "input")
    out = ctx.out(reshape_maps(ctx, x, ctx.out_shape()))
    if ctx.node.target in ("unflatten", torch.unflatten, aten.unflatten.int):
        sizes = list(ctx.arg(2, "sizes"))
        dim = ctx.arg(1, "dim") % x.ndim
        _check_size_args(ctx, out, [None] * dim + sizes)

        def rewrite_unflatten(p, node):
            new = p.new_shape(node)
            node.args = (node.args[0], node.args[1], [new[dim + j] if p.is_channel_dim(node, dim + j) and s != -1
                                                      else s for j, s in enumerate(sizes)])

        ctx.on_prune(rewrite_unflatten)
    if ctx.node.op == "call_module" and isinstance(ctx.module, nn.Unflatten):
        def fix(p, node):
            m = p.module(node.target)
            start = m.dim % len(p.new_shape(node))
            m.unflattened_size = tuple(p.new_shape(node)[start:start + len(m.unflattened_size)])

        ctx.on_prune(fix)
    return out


@register_rule("expand", aten.expand.default)
def expand_rule(ctx):
    x = ctx.tensor(0)
    shape = ctx.out_shape()
    lead = len(shape) - x.ndim
    dims = {d + lead: m for d, m in x.dims.items() if x.shape[d] == shape[d + lead]}
    slot = ctx.state.kv_repeats.get(ctx.node.name)
    if slot is not None:  # repeat_kv's group size, under attention_units="query_slots"
        dims[slot] = slot_channels(ctx, shape[slot])
    out = ctx.out(dims)
    sizes = _shape_args(ctx, 1)
    _check_size_args(ctx, out, sizes)
    ctx.on_prune(rewrite_sizes(1))
    return out


@register_rule("repeat", aten.repeat.default)
def repeat_rule(ctx):
    x = ctx.tensor(0)
    reps = _shape_args(ctx, 1)
    lead = len(reps) - x.ndim
    dims = {}
    for d, m in x.dims.items():
        r = reps[d + lead]
        if not isinstance(r, int):
            ctx.freeze(m.ids, f"repeat count is not a constant at {ctx.where()}")
            continue
        dims[d + lead] = DimMap(np.tile(m.ids, r), np.tile(m.zi, r))
    return ctx.out(dims)


@register_rule("repeat_interleave", torch.repeat_interleave, aten.repeat_interleave.self_int)
def repeat_interleave_rule(ctx):
    """``x.repeat_interleave(r, dim)`` with an integer ``r``: each index of ``dim`` becomes
    ``r`` neighbours that keep its channel (Mamba-2's groups to heads, Cohere's rotary
    pairs); ``r`` still holds after pruning, and a fixed ``output_size`` (Mamba-2,
    Nemotron-H: the size of ``dim`` out, a hint that must be exact) is rewritten to the
    pruned size. Tensor counts and no ``dim`` (a flatten) are left to the fallback."""
    x = ctx.tensor(0, "input")
    repeats, dim = ctx.arg(1, "repeats"), ctx.arg(2, "dim")
    if x is None or not isinstance(repeats, int) or not isinstance(dim, int):
        return unknown_rule(ctx)
    dim %= x.ndim
    dims = dict(x.dims)
    if dim in dims:
        dims[dim] = DimMap(np.repeat(dims[dim].ids, repeats), np.repeat(dims[dim].zi, repeats))
    out = ctx.out(dims)
    if ctx.node.kwargs.get("output_size") is not None:
        def rewrite_output_size(p, node):
            node.kwargs = {**node.kwargs, "output_size": p.new_shape(node)[dim]}

        ctx.on_prune(rewrite_output_size)
    return out


def _permuted(x: TensorChannels, order: list[int], shape) -> TensorChannels:
    order = [d % x.ndim for d in order]
    return TensorChannels(tuple(shape), {i: x.dims[d] for i, d in enumerate(order) if d in x.dims})


@register_rule(torch.permute, "permute", aten.permute.default)
def permute_rule(ctx):
    x = ctx.tensor(0, "input")
    order = ctx.node.args[1:] if ctx.node.op == "call_method" else ctx.arg(1, "dims")
    if len(order) == 1 and isinstance(order[0], (tuple, list)):
        order = order[0]
    return _permuted(x, list(order), ctx.out_shape())


@register_rule(torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims",
               aten.transpose.int)
def transpose_rule(ctx):
    x = ctx.tensor(0, "input")
    d0, d1 = ctx.arg(1, "dim0"), ctx.arg(2, "dim1")
    order = list(range(x.ndim))
    order[d0 % x.ndim], order[d1 % x.ndim] = order[d1 % x.ndim], order[d0 % x.ndim]
    return _permuted(x, order, ctx.out_shape())


@register_rule("t", torch.t, aten.t.default, aten.numpy_T.default, aten.adjoint.default)
def t_rule(ctx):
    """``t``, ``.T`` (``aten.numpy_T``) reverse the dims; ``mT``/``adjoint`` swap the last two."""
    x = ctx.tensor(0)
    if ctx.node.target is aten.adjoint.default:
        return transposed_last_two(x, ctx.out_shape())
    return _permuted(x, list(reversed(range(x.ndim))), ctx.out_shape())


@register_rule(aten.mT.default, aten.mH.default)
def mt_rule(ctx):
    return transposed_last_two(ctx.tensor(0), ctx.out_shape())


def transposed_last_two(x: TensorChannels, shape) -> TensorChannels:
    """The maps of ``x.mT``: its last two dims swapped."""
    order = list(range(x.ndim))
    order[-2:] = order[-1], order[-2]
    return _permuted(x, order, shape)


def reversed_dims(x: TensorChannels, shape) -> TensorChannels:
    """The maps of ``x.T``: every dim reversed."""
    return _permuted(x, list(reversed(range(x.ndim))), shape)


@register_rule(nn.PixelShuffle, torch.pixel_shuffle, aten.pixel_shuffle.default)
def pixel_shuffle_rule(ctx):
    """[.., C*r*r, H, W] -> [.., C, H*r, W*r]: each output channel owns r*r inputs."""
    x = ctx.tensor(0, "input")
    r = ctx.module.upscale_factor if ctx.node.op == "call_module" else ctx.arg(1, "upscale_factor")
    cdim = x.ndim - 3
    for d in (x.ndim - 2, x.ndim - 1):
        if x.get(d) is not None:
            ctx.freeze(x.get(d).ids, f"pixel shuffle mixes a channel dim into space at {ctx.where()}")
    m = x.get(cdim)
    out = ctx.tie_blocks(m, m.ids.size // (r * r), across=False) if m is not None else None
    return ctx.out({d: v for d, v in x.dims.items() if d < cdim} | ({cdim: out} if out else {}))


@register_rule(nn.PixelUnshuffle, torch.pixel_unshuffle, aten.pixel_unshuffle.default)
def pixel_unshuffle_rule(ctx):
    x = ctx.tensor(0, "input")
    r = ctx.module.downscale_factor if ctx.node.op == "call_module" else ctx.arg(1, "downscale_factor")
    return ctx.out(_channels_in_blocks(x, x.ndim - 3, r * r))


def _channels_in_blocks(x: TensorChannels, cdim: int, block: int) -> dict:
    """The maps of an op that turns [.., C, spatial..] into [.., C*block, ..]: channel ``c``
    owns rows ``c*block .. (c+1)*block - 1`` (pixel_unshuffle, im2col)."""
    m = x.get(cdim)
    out = DimMap(np.repeat(m.ids, block), np.repeat(m.zi, block)) if m is not None else None
    return {d: v for d, v in x.dims.items() if d < cdim} | ({cdim: out} if out else {})


@register_rule(nn.Unfold, F.unfold, aten.im2col.default)
def im2col_rule(ctx):
    """``F.unfold`` / ``im2col``: [.., C, H, W] -> [.., C*kh*kw, L], channel ``c`` becoming
    rows ``c*kh*kw .. (c+1)*kh*kw - 1`` (a flatten of C with the kernel window; zero
    padding keeps a zeroed channel's rows zero). Its arguments name no channel count."""
    x = ctx.tensor(0, "input")
    kernel = ctx.module.kernel_size if ctx.node.op == "call_module" else ctx.arg(1, "kernel_size")
    window = int(np.prod(_pair(kernel)))
    for d in (x.ndim - 2, x.ndim - 1):
        if x.get(d) is not None:
            ctx.freeze(x.get(d).ids, f"im2col mixes a channel dim into its sliding blocks at {ctx.where()}")
    return ctx.out(_channels_in_blocks(x, x.ndim - 3, window))


@register_rule(nn.ChannelShuffle, torch.channel_shuffle, torch.native_channel_shuffle,
               aten.channel_shuffle.default, aten.native_channel_shuffle.default)
def channel_shuffle_rule(ctx):
    """A permutation that interleaves g blocks; rewritten to an index_select when pruned."""
    x = ctx.tensor(0, "input")
    g = ctx.module.groups if ctx.node.op == "call_module" else ctx.arg(1, "groups")
    m = x.get(1)
    if m is None:
        return x
    perm = np.arange(len(m)).reshape(g, -1).T.ravel()
    ctx.on_prune(rewrite_as_index_select(ctx.node.args[0].name, 1, perm, m))
    return permuted(x, 1, perm)


@register_rule("reshape_as", "view_as", aten.view_as.default, aten.reshape_as.default)
def reshape_as_rule(ctx):
    """``x.reshape_as(y)``: x's channels land where the reshape puts them, and each dim of
    the result must shrink with y's (they are one size after pruning too, so tie them)."""
    x, y = ctx.tensor(0), ctx.tensor(1, "other")
    if x is None or y is None:
        return unknown_rule(ctx)
    moved = reshape_maps(ctx, x, ctx.out_shape())
    dims = {}
    for d in range(len(ctx.out_shape())):
        merged = ctx.unify(moved.get(d), y.get(d), " (reshaped like another tensor)")
        if merged is not None:
            dims[d] = DimMap(merged.ids, moved[d].zi) if d in moved else merged.with_zi(False)
    return ctx.out(dims)


@register_rule("expand_as", aten.expand_as.default)
def expand_as_rule(ctx):
    """``x.expand_as(y)``: like ``expand`` to y's shape; a dim x broadcasts follows y's
    channels with one value for all of them (not zero when y's channel is zeroed)."""
    x, y = ctx.tensor(0), ctx.tensor(1, "other")
    if x is None or y is None:
        return unknown_rule(ctx)
    shape = ctx.out_shape()
    lead = len(shape) - x.ndim
    dims = {}
    for d in range(len(shape)):
        broadcast = d < lead or (x.shape[d - lead] == 1 and shape[d] != 1)
        if broadcast:
            if y.get(d) is not None:  # expand_as follows y's width after pruning
                dims[d] = y.get(d).with_zi(False)
            continue
        own = x.get(d - lead)
        merged = ctx.unify(own, y.get(d), " (expanded like another tensor)")
        if merged is not None:
            dims[d] = DimMap(merged.ids, own.zi) if own is not None else merged.with_zi(False)
    return ctx.out(dims)
