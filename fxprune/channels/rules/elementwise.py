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
import torch.nn as nn
import torch.nn.functional as F

from ..registry import op_name, register_rule
from ..values import DimMap, SizeValue, TensorChannels
from .fallback import size_arithmetic_rule, unknown_rule

aten = torch.ops.aten

ADDITIVE = (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
            torch.subtract, "add", "add_", "sub", "sub_", "__add__", "__radd__", "__sub__", "__rsub__",
            aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.sub.Tensor, aten.sub.Scalar,
            aten.sub_.Tensor, aten.rsub.Scalar, aten.rsub.Tensor, aten.subtract.Tensor, aten.subtract.Scalar)
MULTIPLICATIVE = (operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_",
                  "__mul__", "__rmul__", aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor,
                  aten.mul_.Scalar, aten.multiply.Tensor, aten.multiply.Scalar)  # multiply: ConvBERT
DIVISION = (operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_",
            "__truediv__", aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div.Tensor_mode,
            aten.divide.Tensor, aten.divide.Scalar, aten.true_divide.Tensor)
# Tensor comparisons and logic: element-wise, and a zero entry need not compare to zero.
COMPARISONS = (aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor,
               aten.lt.Scalar, aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar,
               aten.ge.Tensor, aten.ge.Scalar, aten.__and__.Tensor, aten.__or__.Tensor,
               aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.logical_and.default,
               aten.logical_or.default, aten.logical_not.default, aten.bitwise_not.default,
               operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge)


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
    """A quotient is zero where its numerator is, unless the divisor is zero there too:
    a divisor channel that zeroing makes zero (``x / scale`` with ``scale`` in the group)
    gives 0/0, so its channels stay prunable but are not zero-invariant."""
    operands = _operands(ctx)
    if not any(isinstance(o, TensorChannels) for o in operands):
        return size_arithmetic_rule(ctx)
    out = broadcast_combine(ctx, operands, "first")
    divisor = operands[1]
    if isinstance(divisor, TensorChannels):
        for d, m in divisor.dims.items():
            if divisor.shape[d] > 1 and m.zi.any():
                ctx.break_zi(DimMap.of(m.ids[m.zi]), "a divisor channel is zero when zeroed (0/0)",
                             only_non_zi=False)
    return out


@register_rule(torch.where, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf,
               aten.where.Scalar)
def where_rule(ctx):
    """``where(cond, a, b)``: element-wise in all three. An entry is zero where a and b
    both are, whatever cond says there (``where(x > 0, x, 0.1 * x)`` keeps x's zeros)."""
    cond, a, b = (ctx.value(ctx.arg(i)) for i in range(3))
    out = broadcast_combine(ctx, [cond, a, b], "all")
    if out is None or not isinstance(cond, TensorChannels):
        return out
    values = broadcast_combine(ctx, [a, b], "all")  # the same ties again; zeros from a and b
    return out.with_dims({d: m.with_zi(values.get(d).zi if values is not None and values.get(d) is not None
                                       else False) for d, m in out.dims.items()})


@register_rule(*COMPARISONS)
def comparison_rule(ctx):
    """Tensor comparisons are element-wise (a mask for ``where`` or ``masked_fill``); a
    comparison of numbers read off shapes is a size check: those channels keep their count."""
    operands = _operands(ctx)
    sizes = SizeValue.merge(operands)
    if sizes is not None:
        ctx.freeze(sizes.ids, f"a channel count is checked by {ctx.where()}")
    if not any(isinstance(o, TensorChannels) for o in operands):
        return ctx.out() if ctx.out_shape() is not None else None
    out = broadcast_combine(ctx, operands, "all")
    return out.map_zi(False) if out is not None else None


@register_rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor, "masked_fill", torch.masked_fill,
               aten.masked_fill_.Scalar, aten.masked_fill_.Tensor, "masked_fill_")  # in place: XLM, Flaubert
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


@register_rule(aten.copy_.default, aten.copy.default, "copy_")
def copy_rule(ctx):
    """``dst.copy_(src)``: src's values, broadcast to dst's shape, land in dst element by
    element, so the aligned dims of both share channels. The result is zero where src is;
    dst itself now holds src's values too, so a channel of dst stops being zero-invariant
    wherever src's is not (or where src broadcasts one value over dst's channels)."""
    dst, src = ctx.value(ctx.arg(0)), ctx.value(ctx.arg(1, "src"))
    if not isinstance(dst, TensorChannels):
        return unknown_rule(ctx)
    out = broadcast_combine(ctx, [dst, src], "all")
    values = broadcast_combine(ctx, [src], "all") if isinstance(src, TensorChannels) else None
    if out is None:
        return None
    dims = {}
    for d, m in out.dims.items():
        from_src = values.get(d) if values is not None else None
        if from_src is None:
            ctx.break_zi(m, "copy_ writes one value over every channel", only_non_zi=False)
            dims[d] = m.with_zi(False)
        else:
            ctx.break_zi(from_src, "copy_ writes a channel that is non-zero when zeroed")
            dims[d] = m.with_zi(from_src.zi)
    return out.with_dims(dims)


@register_rule(nn.GLU, F.glu, torch._C._nn.glu, aten.glu.default)
def glu_rule(ctx):
    """``glu(x, dim) = a * sigmoid(b)`` with ``a, b = x.chunk(2, dim)``: output channel c
    pairs input channels c and c + C/2, so removing it removes both (as a manual chunk then
    product would tie them). Zero where a is; the other dims are element-wise."""
    x = ctx.tensor(0, "input")
    dim = ctx.module.dim if ctx.node.op == "call_module" else ctx.arg(1, "dim", -1)
    if x is None or not isinstance(dim, int):
        return unknown_rule(ctx)
    dim %= x.ndim
    dims = dict(x.dims)
    halves = x.get(dim)
    if halves is not None:
        paired = ctx.tie_blocks(halves, 2, across=True)
        dims[dim] = DimMap(paired.ids, halves.zi[:len(paired)].copy())
    return ctx.out(dims)
