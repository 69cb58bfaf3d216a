"""Grouped matrix products over stacked expert weights (mixture of experts).

``grouped_mm(x, w, offs)``: rows ``offs[e-1]:offs[e]`` of the tokens ``x`` [T, K] (sorted
by expert) are multiplied by expert ``e``'s matrix ``w[e]`` [K, N]. Channels: ``x``'s last
dim is contracted with ``w`` dim 1, ``w`` dim 2 is the output's last dim. The expert dim
``w`` dim 0 carries no channels here: experts are units of their own
(:mod:`fxprune.channels.experts`), removed with their router rows. Stacked weights share
their neuron index, so neuron ``j`` is one unit across every expert of the layer.
"""
from __future__ import annotations

import torch

from ..registry import register_rule
from ..values import TensorChannels
from .attention import einsum_maps
from .fallback import unknown_rule

aten = torch.ops.aten
_VIEWS = {"transpose", "permute", "t", "_to_copy", "to", "alias", "contiguous"}


def grouped_mm_rule(ctx):
    """The rule for ``aten._grouped_mm`` and ``transformers.grouped_mm_fallback``."""
    x, w = ctx.tensor(0, "input"), ctx.tensor(1, "weight")
    if x is None or w is None or x.ndim != 2 or w.ndim != 3:
        return unknown_rule(ctx)
    ctx.freeze(x.get(0).ids if x.get(0) is not None else [], f"tokens carry channels at {ctx.where()}")
    source = stacked_weight(ctx.node.args[1])
    if source is not None:
        ctx.not_channels(source, [0])  # the expert dim: experts are units of their own
    elif w.get(0) is not None:
        ctx.freeze(w.get(0).ids, f"the expert dim of {ctx.where()} is not a stacked parameter")
    no_experts = TensorChannels(w.shape, {d: m for d, m in w.dims.items() if d != 0})
    return einsum_maps(ctx, "tk,ekn->tn", [TensorChannels(x.shape, {1: x.get(1)} if x.get(1) else {}), no_experts])


def stacked_weight(node):
    """The ``get_attr`` parameter a grouped product's weight is a view of (or None)."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        name = getattr(node.target, "__name__", "").split(".")[0]
        if name not in _VIEWS or not node.args:
            return None
        node = node.args[0]
    return node if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


register_rule(aten._grouped_mm.default)(grouped_mm_rule)


def register_late_ops() -> None:
    """Rules for ops that libraries define when imported (transformers' grouped_mm
    fallback): registered once the op exists, without importing the library."""
    ns = getattr(torch.ops, "transformers", None)
    try:
        op = ns.grouped_mm_fallback.default
    except (AttributeError, RuntimeError):
        return
    register_rule(op)(grouped_mm_rule)
