"""Normalisation layers: their affine parameters join the space of the dim they scale.

BatchNorm and InstanceNorm normalise each channel on its own, so a zeroed channel
(with its affine zeroed) stays zero: zero-invariant. LayerNorm's statistics span the
channels, so removing one changes the others: structurally prunable, not invariant.
GroupNorm keeps groups of equal size: fxprune removes whole groups, which leaves the
other groups' statistics untouched.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import op_name, register_rule
from ..values import DimMap, TensorChannels
from .fallback import unknown_rule

aten = torch.ops.aten


_INSTANCE_NORMS = {nn.InstanceNorm1d: 3, nn.InstanceNorm2d: 4, nn.InstanceNorm3d: 5}


def _channel_dim(module, x) -> int:
    """Dim 1, except for an unbatched input to an instance norm ([C, ...])."""
    batched_ndim = _INSTANCE_NORMS.get(type(module))
    return 0 if batched_ndim is not None and x.ndim == batched_ndim - 1 else 1


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def batchnorm_rule(ctx):
    bn = ctx.module
    x = ctx.tensor(0, "input")
    cdim = _channel_dim(bn, x)
    ch = x.get(cdim)
    if ch is None:
        ids = ctx.new_space(bn.num_features, f"{ctx.param_key('weight')}[0]")
        ctx.freeze(ids, f"normalised dim carries no channels at {ctx.where()}")
        ch = DimMap.of(ids)
    if bn.affine:
        ctx.bind(ctx.param_key("weight"), 0, ch, "out")
        ctx.bind(ctx.param_key("bias"), 0, ch, "out")
        out = ch.with_zi(True)  # zeroed weight and bias zero the channel, whatever came in
    elif type(bn) in _INSTANCE_NORMS:
        out = ch  # per-sample statistics of a zero channel are zero: it stays zero
    else:
        out = ch.with_zi(False)  # (0 - running_mean) / std is not zero
    if getattr(bn, "running_mean", None) is not None:
        ctx.bind(ctx.param_key("running_mean"), 0, ch, "buffer")
        ctx.bind(ctx.param_key("running_var"), 0, ch, "buffer")

    def fix(p, node):
        m = p.module(node.target)
        ref = m.weight if m.affine else m.running_mean
        if ref is not None:
            m.num_features = ref.shape[0]

    ctx.on_prune(fix)
    return x.with_dims({**x.dims, cdim: out})


def _layer_norm(ctx, x, normalized_ndim: int, fix):
    """Shared by the module and functional forms: the normalised dims stop being
    zero-invariant, since the statistics span them."""
    for j in range(normalized_ndim):
        m = x.get(x.ndim - normalized_ndim + j)
        if m is not None:
            ctx.break_zi(m, "layer-norm statistics span the channels", only_non_zi=False)
    ctx.on_prune(fix)
    return x


@register_rule(nn.LayerNorm)
def layernorm_rule(ctx):
    ln = ctx.module
    x = ctx.tensor(0, "input")
    k = len(ln.normalized_shape)
    for j in range(k):
        d = x.ndim - k + j
        m = x.get(d)
        if m is None:
            continue
        if ln.weight is not None:
            ctx.bind(ctx.param_key("weight"), j, m, "out")
        if ln.bias is not None:
            ctx.bind(ctx.param_key("bias"), j, m, "out")

    def fix(p, node):
        m = p.module(node.target)
        shape_src = m.weight if m.weight is not None else None
        if shape_src is not None:
            m.normalized_shape = tuple(shape_src.shape)
        else:
            m.normalized_shape = tuple(p.new_shape(node.args[0])[-k:])

    return _layer_norm(ctx, x, k, fix)


@register_rule(F.layer_norm, aten.layer_norm.default, F.rms_norm, aten.rms_norm.default)
def functional_layer_norm_rule(ctx):
    """Layer and RMS norms with get_attr parameters; RMS norm has a weight and no bias."""
    x = ctx.tensor(0, "input")
    shape_arg = ctx.arg(1, "normalized_shape")
    k = len(shape_arg) if isinstance(shape_arg, (tuple, list)) else 1
    raws = [ctx.arg(2, "weight")] + ([ctx.arg(3, "bias")] if op_name(ctx.node.target) == "layer_norm" else [])
    for raw in raws:
        if isinstance(ctx.value(raw), TensorChannels):
            for j in range(k):
                d = x.ndim - k + j
                m = ctx.adopt(raw, j, x.get(d), "out")
                if m is not None:
                    x = x.with_dims({**x.dims, d: m})

    def fix(p, node):
        new = tuple(p.new_shape(node.args[0])[-k:])
        if len(node.args) > 1:
            node.args = (node.args[0], new, *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "normalized_shape": new}

    return _layer_norm(ctx, x, k, fix)


@register_rule(nn.GroupNorm)
def groupnorm_rule(ctx):
    gn = ctx.module
    x = ctx.tensor(0, "input")
    ch = x.get(1)
    if ch is None:
        ch = DimMap.of(ctx.new_space(gn.num_channels, f"{ctx.param_key('weight')}[0]"))
        ctx.freeze(ch.ids, f"normalised dim carries no channels at {ctx.where()}")
    ctx.tie_blocks(ch, gn.num_groups, across=False)  # whole groups go
    if gn.affine:
        ctx.bind(ctx.param_key("weight"), 0, ch, "out")
        ctx.bind(ctx.param_key("bias"), 0, ch, "out")
    else:
        ch = ch.with_zi(False)

    def fix(p, node):
        m = p.module(node.target)
        new_channels = p.new_shape(node.args[0])[1]
        m.num_groups = m.num_groups * new_channels // m.num_channels
        m.num_channels = new_channels

    ctx.on_prune(fix)
    return x.with_dims({**x.dims, 1: ch})


# Where each spelling keeps weight, bias, running_mean and running_var: (position, keyword).
_TORCH_ORDER = ((3, "weight"), (4, "bias"), (1, "running_mean"), (2, "running_var"))
_ATEN_ORDER = ((1, "weight"), (2, "bias"), (3, "running_mean"), (4, "running_var"))
_BATCH_NORM_ARGS = {
    F.batch_norm: _TORCH_ORDER,
    F.instance_norm: _TORCH_ORDER,
    aten.batch_norm.default: _ATEN_ORDER,
    aten._native_batch_norm_legit_no_training.default: _ATEN_ORDER,
    aten._native_batch_norm_legit.default: _ATEN_ORDER,
    aten._native_batch_norm_legit_functional.default: _ATEN_ORDER,
    aten.native_batch_norm.default: _ATEN_ORDER,
    aten.instance_norm.default: _ATEN_ORDER,
}


@register_rule(*_BATCH_NORM_ARGS)
def functional_batch_norm_rule(ctx):
    """The functional and ATen forms of :func:`batchnorm_rule` (timm's norm+activation
    layers call ``F.batch_norm`` with their own parameters): every parameter and statistic
    joins dim 1; zeroing weight and bias zeroes the channel."""
    x = ctx.tensor(0, "input")
    if x is None or x.ndim < 2:
        return unknown_rule(ctx)
    raws = [ctx.arg(i, name) for i, name in _BATCH_NORM_ARGS[ctx.node.target]]
    params = [ctx.value(r) for r in raws]
    ch = x.get(1)
    for raw, param, role in zip(raws, params, ("out", "out", "buffer", "buffer")):
        if isinstance(param, TensorChannels):
            ch = ctx.adopt(raw, 0, ch, role)
    if ch is None:
        return unknown_rule(ctx)
    affine = all(isinstance(p, TensorChannels) for p in params[:2])
    instance = op_name(ctx.node.target) == "instance_norm"
    # zeroed weight and bias zero the channel whatever came in; without them an instance
    # norm keeps a zero channel zero, a batch norm shifts it by its running mean
    out = ch.with_zi(True) if affine else ch if instance else ch.with_zi(False)
    result = x.with_dims({**x.dims, 1: out})
    if ctx.out_shape() is None:  # the native forms also return the batch statistics
        stats = tuple(TensorChannels(tuple(m.shape), {0: ch} if m.shape and m.shape[0] == len(ch) else {})
                      for m in ctx.node.meta["tensor_meta"][1:])
        return (result, *stats)
    return result


@register_rule(F.group_norm, aten.group_norm.default)
def functional_group_norm_rule(ctx):
    """The functional and ATen forms of :func:`groupnorm_rule`: whole groups go, and the
    group count in the call is rewritten."""
    x, groups = ctx.tensor(0, "input"), ctx.arg(1, "num_groups")
    if x is None or not isinstance(groups, int):
        return unknown_rule(ctx)
    ch = x.get(1)
    for i, name in ((2, "weight"), (3, "bias")):
        if ctx.tensor(i, name) is not None:
            ch = ctx.adopt(ctx.arg(i, name), 0, ch, "out")
    if ch is None:
        return unknown_rule(ctx)
    ctx.tie_blocks(ch, groups, across=False)
    if ctx.tensor(2, "weight") is None or ctx.tensor(3, "bias") is None:
        ch = ch.with_zi(False)
    per_group = len(ch) // groups

    def fix(p, node):
        groups_now = p.new_shape(node.args[0])[1] // per_group
        if len(node.args) > 1:
            node.args = (node.args[0], groups_now, *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "num_groups": groups_now}

    ctx.on_prune(fix)
    return x.with_dims({**x.dims, 1: ch})
