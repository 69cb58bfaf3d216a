"""Pooling, reductions and softmax.

Pooling works per channel: the map passes through (spatial dims change size, so they
must not carry channels). A reduction over a channel dim removes it: a sum of a zeroed
channel adds nothing, but a mean divides by the channel count, which pruning changes.
Softmax over a channel dim couples all channels; over another dim it turns a zeroed
channel into a uniform one (not zero).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import op_name, register_rule
from ..values import TensorChannels
from .fallback import unknown_rule

aten = torch.ops.aten

POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, torch._C._nn.avg_pool2d, torch._C._nn.avg_pool3d,
    torch.max_pool1d, torch.max_pool2d, torch.max_pool3d, torch.avg_pool1d,
    torch._C._nn.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool3d,
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
    aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default,
    aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default,
)
_POOL_NDIM = {"1d": 1, "2d": 2, "3d": 3}


def _pool_spatial_dims(ctx, x) -> int:
    name = type(ctx.module).__name__ if ctx.node.op == "call_module" else op_name(ctx.node.target)
    name = name.removesuffix("_with_indices")
    return next((n for suffix, n in _POOL_NDIM.items() if name.endswith(suffix)), 2)


@register_rule(*POOL_MODULES, *POOL_FUNCTIONS)
def pool_rule(ctx):
    x = ctx.tensor(0, "input")
    spatial = _pool_spatial_dims(ctx, x)
    out_shape = ctx.out_shape()
    if out_shape is None:  # return_indices=True gives a tuple; indices depend on values only
        return unknown_rule(ctx)
    dims = {}
    for d, m in x.dims.items():
        if d >= x.ndim - spatial:
            ctx.freeze(m.ids, f"pooling runs over a channel dim at {ctx.where()}")
        else:
            dims[d] = m
    return ctx.out(dims)


def _reduced_dims(ctx, x):
    dim = ctx.arg(1, "dim")
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):  # aten: an empty list is all dims
        return list(range(x.ndim))
    dims = dim if isinstance(dim, (tuple, list)) else [dim]
    return [d % x.ndim for d in dims]


@register_rule(torch.mean, "mean", torch.sum, "sum", torch.amax, "amax", torch.amin, "amin",
               torch.nansum, "nansum", torch.logsumexp, "logsumexp", torch.std, "std", torch.var, "var",
               aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default, aten.amax.default,
               aten.amin.default, aten.logsumexp.default, aten.var.correction, aten.std.correction,
               aten.var.dim, aten.std.dim)
def reduction_rule(ctx):
    x = ctx.tensor(0, "input")
    reduced = _reduced_dims(ctx, x)
    name = op_name(ctx.node.target)
    at = 3 if isinstance(ctx.node.target, torch._ops.OpOverload) and name in ("var", "std") else 2
    keepdim = bool(ctx.arg(at, "keepdim", False))
    dims = {}
    for d, m in x.dims.items():
        if d in reduced:
            if name in ("sum", "nansum"):
                ctx.break_zi(m, f"{name} over channels of a non-zero-invariant value")
            else:
                ctx.break_zi(m, f"{name} over channels depends on their count", only_non_zi=False)
            continue
        new_d = d if keepdim else d - sum(1 for r in reduced if r < d)
        zero_kept = name in ("sum", "nansum", "mean", "amax", "amin")
        dims[new_d] = m if zero_kept else m.with_zi(False)
    return ctx.out(dims)


@register_rule(torch.norm, "norm", aten.linalg_vector_norm.default, torch.linalg.vector_norm, aten.norm.ScalarOpt_dim)
def norm_rule(ctx):
    """A p-norm over some dims (p >= 0): a zeroed entry adds nothing to it, so over a
    channel dim it acts like a sum; the norm of a zeroed channel's vector is zero."""
    x = ctx.tensor(0, "input")
    p = ctx.arg(1, "ord" if op_name(ctx.node.target).endswith("vector_norm") else "p", 2)
    dim = ctx.arg(2, "dim")
    keepdim = bool(ctx.arg(3, "keepdim", False))
    if x is None or not (p in (None, "fro") or isinstance(p, (int, float)) and p >= 0):
        return unknown_rule(ctx)
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):
        reduced = list(range(x.ndim))
    else:
        reduced = [d % x.ndim for d in (dim if isinstance(dim, (tuple, list)) else [dim])]
    dims = {}
    for d, m in x.dims.items():
        if d in reduced:
            ctx.break_zi(m, "a norm over channels of a non-zero-invariant value")
            continue
        dims[d if keepdim else d - sum(1 for r in reduced if r < d)] = m
    return ctx.out(dims)


@register_rule(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
               "softmax", "log_softmax", aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
               aten._log_softmax.default)
def softmax_rule(ctx):
    x = ctx.tensor(0, "input")
    dim = ctx.module.dim if ctx.node.op == "call_module" else ctx.arg(1, "dim")
    dim = (dim if dim is not None else -1) % x.ndim
    if x.get(dim) is not None:
        ctx.break_zi(x.get(dim), "softmax over channels couples them", only_non_zi=False)
    return x.with_dims({d: m.with_zi(False) for d, m in x.dims.items()})


# scan -> whether a zeroed entry stays zero: a running sum or product of zeros is zero,
# a running log-sum-exp is not (log k after k zeros)
_SCANS = {"cumsum": True, "cumprod": True, "logcumsumexp": False}


@register_rule(torch.cumsum, "cumsum", torch.cumprod, "cumprod", torch.logcumsumexp, "logcumsumexp",
               aten.cumsum.default, aten.cumprod.default, aten.logcumsumexp.default)
def scan_rule(ctx):
    """A running sum/product/log-sum-exp along ``dim``: element-wise along every other dim,
    so their channels pass through. Along ``dim`` each entry mixes those before it: a
    channel there cannot go (the entries after it would change), so it is frozen."""
    x = ctx.tensor(0, "input")
    dim = ctx.arg(1, "dim")
    if x is None or not isinstance(dim, int):
        return unknown_rule(ctx)
    dim %= max(x.ndim, 1)
    keeps_zero = _SCANS[op_name(ctx.node.target)]
    dims = {}
    for d, m in x.dims.items():
        if d == dim:
            ctx.freeze(m.ids, f"{op_name(ctx.node.target)} runs along a channel dim at {ctx.where()}")
        else:
            dims[d] = m if keeps_zero else m.with_zi(False)
    return ctx.out(dims)


__all__ = ["pool_rule", "reduction_rule", "softmax_rule", "scan_rule"]
