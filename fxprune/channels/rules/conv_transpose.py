"""Transposed convolutions: ``nn.ConvTranspose{1,2,3}d``, ``F.conv_transpose{1,2,3}d``, their
ATen ops and ``aten.convolution`` with ``transposed=True``.

A transposed conv's weight is laid out the other way round from a conv's:
``(in_channels, out_channels // groups, *kernel)``. So weight dim 0 consumes the input
channels and weight dim 1 (with the bias) opens the output space. A grouped one ties
input, output and ``groups`` as a grouped conv does: whole groups go, one unit being a
group's block of input channels together with its block of output channels. Stride,
padding, ``output_padding`` and dilation act on spatial dims only and are left alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_rule
from ..values import DimMap
from .fallback import unknown_rule
from .layers import (_consume, _consume_param, _freeze_other_dims, _produce, _rewrite_groups, fix_conv_widths,
                     functional_conv_rule, tie_groups)

aten = torch.ops.aten


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def conv_transpose_rule(ctx):
    """``nn.ConvTranspose*d``: weight dim 0 meets the input channels, weight dim 1 and the
    bias own the output's; grouped ones tie each group's input and output blocks.

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(),
    ...                           torch.nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2), torch.nn.Conv2d(6, 4, 1))
    >>> graph = fxprune.analyze(net, torch.randn(1, 3, 4, 4))
    >>> [(g.size, g.producers) for g in graph.prunable_groups]   # 2 groups: 4 inputs + 3 outputs each
    [(2, ['0.weight[0]', '2.weight[1]'])]
    >>> fxprune.prune(graph, {graph.prunable_groups[0].id: [1]}).get_submodule("2")
    ConvTranspose2d(4, 3, kernel_size=(2, 2), stride=(2, 2))
    """
    conv = ctx.module
    x = ctx.tensor(0, "input")
    if x is None:
        return unknown_rule(ctx)
    cdim = 1 if x.ndim == conv.weight.ndim else 0  # unbatched input has channels first
    _freeze_other_dims(ctx, x, {cdim})
    w_key, b_key = ctx.param_key("weight"), ctx.param_key("bias")
    out = DimMap.of(ctx.new_space(conv.out_channels, f"{w_key}[1]"))
    x_map = x.get(cdim)
    # Weight dim 0 consumes the input in a grouped one too (role "in"): the input's own
    # producer makes the unit's input zero, and gates and regularisers act on it there.
    _consume(ctx, x_map, w_key, 0, conv.in_channels, "transposed conv")
    if conv.groups == 1:
        ctx.bind(w_key, 1, out, "out")
    elif x_map is None:
        ctx.freeze(out.ids, f"grouped transposed conv input carries no channels at {ctx.where()}")
    else:
        tie_groups(ctx, x_map, out, conv.groups)
    if conv.bias is not None:
        ctx.bind(b_key, 0, out, "out")
    ctx.on_prune(_fix_conv_transpose)
    return ctx.out({cdim: out})


def _fix_conv_transpose(p, node):
    fix_conv_widths(p.module(node.target), "in_channels", "out_channels")


_GROUPS_AT = {  # where each spelling keeps its groups argument
    F.conv_transpose1d: 6, F.conv_transpose2d: 6, F.conv_transpose3d: 6, aten.conv_transpose1d.default: 6,
    aten.conv_transpose2d.input: 6, aten.conv_transpose3d.input: 6, aten.convolution.default: 8,
}


@register_rule(*(t for t in _GROUPS_AT if t is not aten.convolution.default))
def functional_conv_transpose_rule(ctx):
    """``F.conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation)``,
    ``aten.conv_transpose2d`` and transposed ``aten.convolution``: :func:`conv_transpose_rule`
    with w and b read by get_attr."""
    x, w, b = ctx.tensor(0, "input"), ctx.tensor(1, "weight"), ctx.tensor(2, "bias")
    groups_at = _GROUPS_AT[ctx.node.target]
    groups = ctx.arg(groups_at, "groups", 1)
    raw_w = ctx.arg(1, "weight")
    if x is None or w is None or ctx.attr_key(raw_w) is None or not isinstance(groups, int):
        return unknown_rule(ctx)
    ctx.not_channels(raw_w, range(2, w.ndim))
    cdim = 1 if x.ndim == w.ndim else 0
    _freeze_other_dims(ctx, x, {cdim})
    x_map = x.get(cdim)
    _consume_param(ctx, x_map, w, raw_w, 0, "transposed conv")
    if groups == 1:
        return ctx.out({cdim: _produce(ctx, w, 1, b)})
    # Positions inside a group keep their count: weight dim 1 is out_channels // groups.
    ctx.not_channels(raw_w, [1])
    if w.get(1) is not None:
        ctx.freeze(w.get(1).ids, f"positions inside a transposed conv group keep their count at {ctx.where()}")
    width = ctx.out_shape()[cdim]
    bias = b.get(0) if b is not None else None
    out = DimMap.of(bias.ids) if bias is not None else DimMap.of(ctx.new_space(width, f"{ctx.attr_key(raw_w)}[1]"))
    if x_map is None:
        ctx.freeze(out.ids, f"grouped transposed conv input carries no channels at {ctx.where()}")
    else:
        tie_groups(ctx, x_map, out, groups)
    _rewrite_groups(ctx, groups_at, cdim, width // groups)
    return ctx.out({cdim: out})


@register_rule(aten.convolution.default)
def convolution_rule(ctx):
    """``aten.convolution``: its ``transposed`` flag says which of the two conv rules applies."""
    if ctx.arg(6, "transposed"):
        return functional_conv_transpose_rule(ctx)
    return functional_conv_rule(ctx)


__all__ = ["conv_transpose_rule", "functional_conv_transpose_rule", "convolution_rule"]
