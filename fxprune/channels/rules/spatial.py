"""Padding and resizing: they act on the trailing (spatial) dims, one channel at a time.

Channels on the dims they leave alone pass through; a channel dim that is padded or
resized would gain positions no channel owns, so its channels freeze. Resizing is
linear in each channel (a zeroed channel stays zero); padding keeps zeros unless it
pads with a non-zero constant.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import op_name, register_rule
from ..values import SizeValue, flatten_values
from .fallback import unknown_rule

aten = torch.ops.aten

PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
               nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
               nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
PAD_FUNCTIONS = (F.pad, torch._C._nn.pad, aten.pad.default, aten.constant_pad_nd.default,
                 aten.reflection_pad1d.default, aten.reflection_pad2d.default, aten.reflection_pad3d.default,
                 aten.replication_pad1d.default, aten.replication_pad2d.default, aten.replication_pad3d.default,
                 aten._pad_circular.default)


def _pad_args(ctx):
    """(pad amounts, mode, fill value) in any spelling."""
    if ctx.node.op == "call_module":
        m = ctx.module
        mode = "constant" if isinstance(m, (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d,
                                            nn.ConstantPad2d, nn.ConstantPad3d)) else "other"
        return list(m.padding), mode, getattr(m, "value", 0)
    name = op_name(ctx.node.target)
    pad = list(ctx.arg(1, "pad" if name in ("pad", "constant_pad_nd") else "padding"))
    if name == "constant_pad_nd":
        return pad, "constant", ctx.arg(2, "value", 0)
    if name == "pad":
        return pad, ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None)
    return pad, "other", 0


@register_rule(*PAD_MODULES, *PAD_FUNCTIONS)
def pad_rule(ctx):
    """``F.pad(x, [left, right, top, bottom, ...])``, pairs from the last dim backwards
    (TF-style "same" padding, ZeroPad2d, reflection): unpadded channel dims pass."""
    x = ctx.tensor(0, "input")
    if x is None:
        return unknown_rule(ctx)
    pad, mode, value = _pad_args(ctx)
    for leaf in flatten_values(ctx.value(pad)):
        if isinstance(leaf, SizeValue):  # an amount computed from a channel count
            ctx.freeze(leaf.ids, f"a channel count sets a padding amount at {ctx.where()}")
    # an amount computed at run time (Swin pads up to a window multiple) may be non-zero
    padded = {x.ndim - 1 - i // 2 for i, p in enumerate(pad) if not (isinstance(p, int) and p == 0)}
    dims = {}
    for d, m in x.dims.items():
        if d in padded:
            ctx.freeze(m.ids, f"padding adds positions to a channel dim at {ctx.where()}")
        else:
            dims[d] = m
    out = ctx.out(dims)
    keeps_zero = mode != "constant" or not value  # reflect/replicate/circular copy the channel's own values
    return out if keeps_zero else out.map_zi(False)


RESIZE_MODULES = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
RESIZE_FUNCTIONS = (
    F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear,
    aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
    aten.upsample_nearest1d.default, aten.upsample_nearest2d.default, aten.upsample_nearest3d.default,
    aten._upsample_nearest_exact1d.vec, aten._upsample_nearest_exact2d.vec, aten._upsample_nearest_exact3d.vec,
    aten.upsample_linear1d.vec, aten.upsample_bilinear2d.vec, aten.upsample_trilinear3d.vec,
    aten.upsample_bicubic2d.vec, aten.upsample_linear1d.default, aten.upsample_bilinear2d.default,
    aten.upsample_trilinear3d.default, aten.upsample_bicubic2d.default, aten._upsample_bilinear2d_aa.vec,
    aten._upsample_bicubic2d_aa.vec,
)


@register_rule(*RESIZE_MODULES, *RESIZE_FUNCTIONS)
def resize_rule(ctx):
    """Interpolation resizes dims 2 onwards, each channel on its own: a linear map, so a
    zeroed channel stays zero."""
    x = ctx.tensor(0, "input")
    if x is None:
        return unknown_rule(ctx)
    dims = {}
    for d, m in x.dims.items():
        if d >= 2:
            ctx.freeze(m.ids, f"resizing runs over a channel dim at {ctx.where()}")
        else:
            dims[d] = m
    return ctx.out(dims)


__all__ = ["pad_rule", "resize_rule"]
