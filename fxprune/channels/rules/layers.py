"""Layers that own channels: convolutions, linear layers, embeddings.

Their output dim opens a new channel space owned by weight dim 0 (and the bias). Their
input dim is consumed by weight dim 1. A grouped or depthwise conv ties input, output
and ``groups``: fxprune removes whole groups, so one pruning unit is a group's block
of input channels together with its block of output channels.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_rule
from ..values import DimMap, TensorChannels
from .fallback import unknown_rule

aten = torch.ops.aten


def _consume(ctx, x_map: DimMap | None, key: str, dim: int, size: int, what: str) -> None:
    """Bind weight ``key`` dim ``dim`` to the incoming channels (role "in")."""
    if x_map is None:
        ids = ctx.new_space(size, f"{key}[{dim}]")
        ctx.freeze(ids, f"{what} input has a fixed width (a graph input or a dim without channels) at {ctx.where()}")
        ctx.bind(key, dim, ids, "in")
        return
    ctx.break_zi(x_map, f"a channel that is non-zero when zeroed is consumed by {what}")
    ctx.require_nonempty(x_map, f"the input of {what}")
    ctx.bind(key, dim, x_map, "in")


def _freeze_other_dims(ctx, x: TensorChannels, keep: set[int]) -> None:
    for d, m in x.dims.items():
        if d not in keep:
            ctx.freeze(m.ids, f"a channel dim is used as a spatial or batch dim by {ctx.where()}")


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_rule(ctx):
    conv = ctx.module
    x = ctx.tensor(0, "input")
    cdim = 1 if x.ndim == conv.weight.ndim else 0  # unbatched input has channels first
    _freeze_other_dims(ctx, x, {cdim})
    w_key, b_key = ctx.param_key("weight"), ctx.param_key("bias")
    out_ids = ctx.new_space(conv.out_channels, f"{w_key}[0]")
    out = DimMap.of(out_ids)
    if conv.groups == 1:
        _consume(ctx, x.get(cdim), w_key, 1, conv.in_channels, "conv")
    else:
        # Whole groups go: tie each group's input block and output block into one unit.
        x_map = x.get(cdim)
        if x_map is None:
            ctx.freeze(out_ids, f"grouped conv input carries no channels at {ctx.where()}")
        else:
            tie_groups(ctx, x_map, out, conv.groups)
    ctx.bind(w_key, 0, out, "out")
    if conv.bias is not None:
        ctx.bind(b_key, 0, out, "out")
    ctx.on_prune(_fix_conv)
    return ctx.out({cdim: out})


def tie_groups(ctx, x_map: DimMap, out: DimMap, groups: int) -> None:
    """Group g's input block and output block become one unit (whole groups are removed)."""
    ctx.unify(ctx.tie_blocks(x_map, groups, across=False), ctx.tie_blocks(out, groups, across=False))


def fix_conv_widths(conv: nn.Module, dim0: str, dim1: str) -> None:
    """Set a pruned conv's width attributes from its weight: ``dim0`` names the attribute
    weight dim 0 holds (``out_channels`` for a conv, ``in_channels`` for a transposed one),
    ``dim1`` the one weight dim 1 holds per group; ``groups`` shrinks with whole groups."""
    old = getattr(conv, dim0)
    setattr(conv, dim0, conv.weight.shape[0])
    if conv.groups > 1:
        conv.groups = conv.groups * conv.weight.shape[0] // old
    setattr(conv, dim1, conv.weight.shape[1] * conv.groups)


def _fix_conv(p, node):
    fix_conv_widths(p.module(node.target), "out_channels", "in_channels")


@register_rule(nn.Linear)
def linear_rule(ctx):
    lin = ctx.module
    x = ctx.tensor(0, "input")
    w_key = ctx.param_key("weight")
    _consume(ctx, x.get(-1), w_key, 1, lin.in_features, "linear")
    out = DimMap.of(ctx.new_space(lin.out_features, f"{w_key}[0]"))
    ctx.bind(w_key, 0, out, "out")
    if lin.bias is not None:
        ctx.bind(ctx.param_key("bias"), 0, out, "out")

    def fix(p, node):
        m = p.module(node.target)
        m.out_features, m.in_features = m.weight.shape

    ctx.on_prune(fix)
    dims = {d: m for d, m in x.dims.items() if d != x.ndim - 1}
    dims[x.ndim - 1] = out
    return ctx.out(dims)


def _consume_param(ctx, x_map: DimMap | None, w: TensorChannels, raw_w, dim: int, what: str) -> None:
    """A get_attr weight's input dim ``dim`` consumes the incoming channels (role "in")."""
    if x_map is None:
        ctx.freeze(w.get(dim).ids if w.get(dim) is not None else (),
                   f"{what} input has a fixed width (a graph input or a dim without channels) at {ctx.where()}")
        ctx.set_role(raw_w, dim, "in")
        return
    ctx.break_zi(x_map, f"a channel that is non-zero when zeroed is consumed by {what}")
    ctx.require_nonempty(x_map, f"the input of {what}")
    ctx.adopt(raw_w, dim, x_map, "in")


def _produce(ctx, w: TensorChannels, dim: int, b: TensorChannels | None) -> DimMap | None:
    """The output channels: weight dim ``dim`` tied to the bias."""
    out = w.get(dim)
    if b is not None:
        out = ctx.unify(out, b.get(0), " (bias)")
    return DimMap.of(out.ids) if out is not None else None


@register_rule(F.linear, aten.linear.default)
def functional_linear_rule(ctx):
    """``F.linear(x, w, b)`` / ``aten.linear`` with ``w``/``b`` read by get_attr (their
    dims are already spaces): x's last dim meets w's dim 1, w's dim 0 is the output."""
    x, w, b = ctx.tensor(0, "input"), ctx.tensor(1, "weight"), ctx.tensor(2, "bias")
    if x is None or w is None or w.ndim != 2:
        return unknown_rule(ctx)
    _consume_param(ctx, x.get(-1), w, ctx.arg(1, "weight"), 1, "linear")
    out = _produce(ctx, w, 0, b)
    dims = {d: m for d, m in x.dims.items() if d != x.ndim - 1}
    if out is not None:
        dims[x.ndim - 1] = out
    return ctx.out(dims)


@register_rule(aten.addmm.default)
def addmm_rule(ctx):
    """``bias + mat1 @ mat2`` with a [in, out] weight (Hugging Face's GPT-2 ``Conv1D``)."""
    bias, x, w = ctx.tensor(0), ctx.tensor(1), ctx.tensor(2)
    if x is None or w is None or ctx.attr_key(ctx.arg(2)) is None or x.ndim != 2 or (
            bias is not None and bias.ndim != 1):
        return unknown_rule(ctx)
    _consume_param(ctx, x.get(1), w, ctx.arg(2), 0, "addmm")
    return ctx.out({0: x.get(0), 1: _produce(ctx, w, 1, bias)})


_CONV_ARGS = {  # where each spelling keeps its groups argument
    F.conv1d: 6, F.conv2d: 6, F.conv3d: 6, aten.conv1d.default: 6, aten.conv2d.default: 6,
    aten.conv3d.default: 6, aten.convolution.default: 8,
    # padding="same"/"valid" as a string (SigLIP's patch embedding): the same layout otherwise
    aten.conv1d.padding: 6, aten.conv2d.padding: 6, aten.conv3d.padding: 6,
}


# aten.convolution is registered in conv_transpose.py: its ``transposed`` flag picks the rule
@register_rule(*(t for t in _CONV_ARGS if t is not aten.convolution.default))
def functional_conv_rule(ctx):
    """``F.conv2d(x, w, b, ..., groups)`` / ``aten.conv2d`` / ``aten.convolution``: the
    functional and ATen forms of :func:`conv_rule`, with w and b read by get_attr."""
    x, w, b = ctx.tensor(0, "input"), ctx.tensor(1, "weight"), ctx.tensor(2, "bias")
    groups_at = _CONV_ARGS[ctx.node.target]
    groups = ctx.arg(groups_at, "groups", 1)
    transposed = ctx.node.target is aten.convolution.default and ctx.arg(6, "transposed")
    if x is None or w is None or ctx.attr_key(ctx.arg(1, "weight")) is None or transposed or not isinstance(groups, int):
        return unknown_rule(ctx)
    raw_w = ctx.arg(1, "weight")
    ctx.not_channels(raw_w, range(2, w.ndim))
    cdim = 1 if x.ndim == w.ndim else 0
    _freeze_other_dims(ctx, x, {cdim})
    out = _produce(ctx, w, 0, b)
    x_map = x.get(cdim)
    if groups == 1:
        _consume_param(ctx, x_map, w, raw_w, 1, "conv")
    else:
        ctx.set_role(raw_w, 1, "in")
        if w.get(1) is not None:
            ctx.freeze(w.get(1).ids, f"positions inside a conv group keep their count at {ctx.where()}")
        if x_map is None:
            ctx.freeze(out.ids, f"grouped conv input carries no channels at {ctx.where()}")
        else:
            tie_groups(ctx, x_map, out, groups)
        _rewrite_groups(ctx, groups_at, cdim, len(out) // groups)
    return ctx.out({cdim: out})


def _rewrite_groups(ctx, groups_at: int, cdim: int, per_group: int) -> None:
    """After pruning, a functional/ATen grouped conv's ``groups`` argument (position
    ``groups_at`` or keyword ``groups``) is its new output width over ``per_group``."""

    def fix_groups(p, node):
        new = p.new_shape(node)[cdim] // per_group
        args = list(node.args)
        if len(args) > groups_at:
            args[groups_at] = new
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, "groups": new}

    ctx.on_prune(fix_groups)


@register_rule(nn.Embedding)
def embedding_rule(ctx):
    emb = ctx.module
    idx = ctx.tensor(0, "input")
    if idx is not None and idx.dims:
        ctx.freeze(idx.all_ids(), f"token indices come from channels at {ctx.where()}")
    key = ctx.param_key("weight")
    out = DimMap.of(ctx.new_space(emb.embedding_dim, f"{key}[1]"))
    ctx.bind(key, 1, out, "out")

    def fix(p, node):
        p.module(node.target).embedding_dim = p.module(node.target).weight.shape[1]

    ctx.on_prune(fix)
    shape = ctx.out_shape()
    return ctx.out({len(shape) - 1: out})


@register_rule(F.embedding, aten.embedding.default)
def functional_embedding_rule(ctx):
    """Rows of a get_attr table picked by token ids: the output's last dim is the table's dim 1."""
    aten_form = ctx.node.target is aten.embedding.default
    raw_w = ctx.arg(0) if aten_form else ctx.arg(1, "weight")
    idx = ctx.tensor(1) if aten_form else ctx.tensor(0, "input")
    w = ctx.value(raw_w)
    if not isinstance(w, TensorChannels) or w.ndim != 2:
        return unknown_rule(ctx)
    if idx is not None and idx.dims:
        ctx.freeze(idx.all_ids(), f"token indices come from channels at {ctx.where()}")
    ctx.not_channels(raw_w, [0])  # the vocabulary is looked up, not a channel dim
    out = w.get(1)
    return ctx.out({len(ctx.out_shape()) - 1: out} if out is not None else {})


__all__ = ["conv_rule", "linear_rule", "embedding_rule", "functional_conv_rule", "functional_linear_rule",
           "functional_embedding_rule", "addmm_rule"]
