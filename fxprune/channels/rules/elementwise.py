"""Element-wise ops: aligned dims (broadcasting from the right) share channels.

A residual add ties the channels of its two producers; a squeeze-excitation multiply
(``[B,C,H,W] * [B,C,1,1]``) ties the excitation's channels to the features. A scalar
operand changes no channels but may end zero-invariance (``x + 1`` is not zero where
x is).
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from ..registry import op_name, register_rule
from ..values import DimMap, TensorChannels
from .fallback import size_arithmetic_rule, unknown_rule

aten = torch.ops.aten

ADDITIVE = (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
            torch.subtract, "add", "add_", "sub", "sub_", "__add__", "__radd__", "__sub__", "__rsub__",
            aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.sub.Tensor, aten.sub.Scalar,
            aten.sub_.Tensor, aten.rsub.Scalar, aten.rsub.Tensor)
MULTIPLICATIVE = (operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_",
                  "__mul__", "__rmul__", aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor,
                  aten.mul_.Scalar)
DIVISION = (operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_",
            "__truediv__", aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div.Tensor_mode)
# Tensor comparisons and logic: element-wise, and a zero entry need not compare to zero.
COMPARISONS = (aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor,
               aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
               aten.ge.Tensor, aten.ge.Scalar, aten.__and__.Tensor, aten.__or__.Tensor,
               aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.logical_and.default,
               aten.logical_or.default, aten.logical_not.default, aten.bitwise_not.default,
               aten.minimum.default, aten.maximum.default, aten.min.other, aten.max.other)


def broadcast_combine(ctx, operands: list, zero_rule: str) -> TensorChannels | None:
    """Unify the aligned channel dims of ``operands`` and combine zero-invariance.

    ``zero_rule``: "all" (a sum is zero only if every term is), "any" (a product is
    zero if any factor is), "first" (a quotient is zero if its numerator is).
    """
    shape = ctx.out_shape()
    if shape is None:
        return None
    ndim = len(shape)
    dims: dict[int, DimMap] = {}
    for d in range(ndim):
        maps, zis = [], []
        for op in operands:
            if not isinstance(op, TensorChannels):
                # a constant term: ``x + 0`` (timm's empty branches) keeps zeros, ``x + 1`` does not
                zero_term = zero_rule == "all" and isinstance(op, (int, float)) and op == 0
                zis.append(None if op is None or zero_term else False)
                continue
            od = d - (ndim - op.ndim)
            if od < 0 or op.shape[od] == 1:
                zis.append(False)  # broadcast: the same value for every channel
                continue
            m = op.get(od)
            maps.append(m)
            zis.append(m.zi if m is not None else False)
        merged = ctx.unify_all(maps, " (element-wise)")
        if merged is None:
            continue
        dims[d] = DimMap.of(merged.ids, _combine_zi(zis, zero_rule, len(merged)))
    return ctx.out(dims)


def _combine_zi(zis: list, rule: str, size: int) -> np.ndarray:
    """Zero-invariance of the result from each operand's (array, False or None)."""
    if rule == "first":
        first = zis[0]
        return np.array(first, bool) if first is not None and first is not False else np.zeros(size, bool)
    arrays = [np.asarray(z, bool) for z in zis if z is not None and z is not False]
    if rule == "all":
        if any(z is False for z in zis):
            return np.zeros(size, bool)
        return np.logical_and.reduce(arrays) if arrays else np.zeros(size, bool)
    return np.logical_or.reduce(arrays) if arrays else np.zeros(size, bool)  # "any"


def _operands(ctx):
    a = ctx.value(ctx.arg(0, "input"))
    b = ctx.value(ctx.arg(1, "other"))
    return [a, b]


@register_rule(*ADDITIVE)
def additive_rule(ctx):
    operands = _operands(ctx)
    if not any(isinstance(o, TensorChannels) for o in operands):
        return size_arithmetic_rule(ctx)
    if not isinstance(ctx.arg(2, "alpha", 1), (int, float)):
        return unknown_rule(ctx)
    return broadcast_combine(ctx, operands, "all")


@register_rule(*MULTIPLICATIVE)
def multiplicative_rule(ctx):
    operands = _operands(ctx)
    if not any(isinstance(o, TensorChannels) for o in operands):
        return size_arithmetic_rule(ctx)
    return broadcast_combine(ctx, operands, "any")


@register_rule(*DIVISION)
def division_rule(ctx):
    operands = _operands(ctx)
    if not any(isinstance(o, TensorChannels) for o in operands):
        return size_arithmetic_rule(ctx)
    return broadcast_combine(ctx, operands, "first")


@register_rule(torch.where, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
               aten.where.Scalar)
def where_rule(ctx):
    cond, a, b = (ctx.value(ctx.arg(i)) for i in range(3))
    return broadcast_combine(ctx, [cond, a, b], "all")


@register_rule(*COMPARISONS)
def comparison_rule(ctx):
    operands = _operands(ctx)
    if not any(isinstance(o, TensorChannels) for o in operands):
        return size_arithmetic_rule(ctx)
    out = broadcast_combine(ctx, operands, "all")
    return out.map_zi(False) if out is not None else None


@register_rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor, "masked_fill", torch.masked_fill)
def masked_fill_rule(ctx):
    """``x.masked_fill(mask, v)``: element-wise in x and mask; zeros stay zero only for v = 0."""
    x, mask, value = ctx.value(ctx.arg(0)), ctx.value(ctx.arg(1)), ctx.arg(2, "value")
    out = broadcast_combine(ctx, [x, mask], "first")
    return out if value == 0 else out.map_zi(False)


@register_rule(torch.addcmul, "addcmul", aten.addcmul.default, torch.addcdiv, "addcdiv", aten.addcdiv.default)
def addcmul_rule(ctx):
    """``input + value * t1 * t2`` (or ``t1 / t2``): element-wise in all three; zero where
    input is zero and the product (or the numerator) is zero."""
    inp, t1, t2 = (ctx.value(ctx.arg(i, name)) for i, name in enumerate(("input", "tensor1", "tensor2")))
    if not isinstance(ctx.arg(3, "value", 1), (int, float)):
        return unknown_rule(ctx)
    product = broadcast_combine(ctx, [t1, t2], "any" if op_name(ctx.node.target) == "addcmul" else "first")
    return broadcast_combine(ctx, [inp, product], "all")
