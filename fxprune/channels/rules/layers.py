"""Layers that own channels: convolutions, linear layers, embeddings.

Their output dim opens a new channel space owned by weight dim 0 (and the bias). Their
input dim is consumed by weight dim 1. A grouped or depthwise conv ties input, output
and ``groups``: fxprune removes whole groups, so one pruning unit is a group's block
of input channels together with its block of output channels.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_rule
from ..values import DimMap, TensorChannels
from .fallback import unknown_rule


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
            in_units = ctx.tie_blocks(x_map, conv.groups, across=False)
            out_units = ctx.tie_blocks(out, conv.groups, across=False)
            ctx.unify(in_units, out_units)
    ctx.bind(w_key, 0, out, "out")
    if conv.bias is not None:
        ctx.bind(b_key, 0, out, "out")
    ctx.on_prune(_fix_conv)
    return ctx.out({cdim: out})


def _fix_conv(p, node):
    conv = p.module(node.target)
    old_out = conv.out_channels
    conv.out_channels = conv.weight.shape[0]
    if conv.groups > 1:
        conv.groups = conv.groups * conv.out_channels // old_out
    conv.in_channels = conv.weight.shape[1] * conv.groups


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


@register_rule(F.linear)
def functional_linear_rule(ctx):
    """``F.linear(x, w, b)`` with ``w``/``b`` from get_attr: their dims are already spaces."""
    x, w, b = ctx.tensor(0, "input"), ctx.tensor(1, "weight"), ctx.tensor(2, "bias")
    if x is None or w is None:
        return unknown_rule(ctx)
    x_map = x.get(-1)
    ctx.break_zi(x_map, "a channel that is non-zero when zeroed is consumed by linear")
    ctx.unify(x_map, w.get(1) if w.ndim == 2 else None)
    out = w.get(0)
    if b is not None:
        out = ctx.unify(out, b.get(0))
    dims = {d: m for d, m in x.dims.items() if d != x.ndim - 1}
    if out is not None:
        dims[x.ndim - 1] = DimMap.of(out.ids)
    return ctx.out(dims)


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


@register_rule(F.embedding)
def functional_embedding_rule(ctx):
    w = ctx.tensor(1, "weight")
    shape = ctx.out_shape()
    out = w.get(1) if w is not None else None
    return ctx.out({len(shape) - 1: out} if out is not None else {})


__all__ = ["conv_rule", "linear_rule", "embedding_rule"]
