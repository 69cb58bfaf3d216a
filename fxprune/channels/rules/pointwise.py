"""Pointwise ops, known from what they are: ATen's ``torch.Tag.pointwise``.

A pointwise op computes each output entry from the entries at the same position of its
(broadcast) operands, so channels pass through it and aligned operands share them, as for
an add. No hand list of spellings is needed:

- an ATen op (the export front end) is pointwise when its overload carries the tag;
- an fx node (``torch.erf``, ``Tensor.square``, ``F.threshold``, a wrapped function, a
  parameter-free module) is pointwise when every ATen op it ran while its shapes were
  recorded is (``node.meta["fxprune.aten"]``, :mod:`fxprune.capture.aten_calls`), and
  the call read no tensor of its own making (a global of width C could not shrink).

Zero-invariance is read off the op itself: it is evaluated on zeros of the recorded
dtypes. If ``f(0, ..., 0) == 0`` a channel whose every operand entry is zero stays zero
(the additive rule of :mod:`.elementwise`: an operand that is not zero with the channel,
such as a broadcast constant, ends it); if not (``exp``, ``erfc``, ``x + 1``) the channels
stay prunable but are no longer zero-invariant. Rules registered by hand (``mul``, ``where``,
``clamp``, ...) take precedence: they know more (a product is zero if either factor is).
"""
from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

from ...capture.aten_calls import ATEN_CALLS, AtenCalls
from ..values import TensorChannels
from .elementwise import broadcast_combine
from .fallback import size_arithmetic_rule, unknown_rule

aten = torch.ops.aten

# Element-wise ATen ops that lack the tag, and calls that only copy or convert values.
UNTAGGED_POINTWISE = frozenset(map(str, (
    aten.hardswish.default, aten.hardswish_.default, aten.log_sigmoid.default, aten.log_sigmoid_forward.default,
    aten._to_copy.default, aten.alias.default, aten.detach.default, aten.clone.default,
    aten.lift_fresh_copy.default, aten.lift_fresh.default, aten.to.dtype, aten.type_as.default,
    aten.rrelu_with_noise.default,  # F.rrelu's kernel: a leaky relu with a slope per entry
    # tensors shaped like an operand (rrelu's noise buffer): they follow its channels
    aten.empty_like.default, aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
)))


def _overload(name: str):
    """``"aten.erf.default"`` -> the OpOverload (None when it is not an ATen op)."""
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        return None
    packet = getattr(aten, parts[1], None)
    return getattr(packet, parts[2], None) if packet is not None else None


def is_pointwise_op(op) -> bool:
    """True for an ATen overload tagged ``pointwise`` (or a known untagged element-wise op).

    >>> import torch
    >>> is_pointwise_op(torch.ops.aten.erf.default), is_pointwise_op(torch.ops.aten.sum.default)
    (True, False)
    """
    if isinstance(op, str):
        if op in UNTAGGED_POINTWISE:
            return True
        op = _overload(op)
    return isinstance(op, torch._ops.OpOverload) and (
        torch.Tag.pointwise in op.tags or str(op) in UNTAGGED_POINTWISE)


def is_pointwise_node(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes element-wise: by its ATen op's tags, or by the ATen ops
    it ran while its shapes were recorded (fx)."""
    if isinstance(node.target, torch._ops.OpOverload):
        return is_pointwise_op(node.target)
    calls = node.meta.get(ATEN_CALLS)
    if not isinstance(calls, AtenCalls) or not calls.closed:
        return False
    return calls.returns_input if not calls.ops else all(is_pointwise_op(op) for op in calls.ops)


def zero_at_zero(ctx) -> bool:
    """``f(0, ..., 0) == 0`` for this node, every tensor operand zeros of its recorded dtype.

    False whenever it cannot be evaluated (a number computed in the graph, an error)."""
    node = ctx.node

    def zeros(raw):
        if isinstance(raw, torch.fx.Node):
            meta = raw.meta.get("tensor_meta")
            if not isinstance(meta, TensorMetadata):
                raise ValueError("not a tensor")
            return torch.zeros((1,) * len(meta.shape), dtype=meta.dtype)
        if isinstance(raw, (tuple, list)):
            return type(raw)(zeros(r) for r in raw)
        return raw

    try:
        args, kwargs = zeros(tuple(node.args)), {k: zeros(v) for k, v in node.kwargs.items()}
        with torch.no_grad():
            if node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            elif node.op == "call_module":
                out = ctx.module(*args, **kwargs)
            else:
                out = node.target(*args, **kwargs)
        return isinstance(out, torch.Tensor) and bool((out == 0).all())
    except Exception:  # an op that cannot run on these stand-ins: assume nothing
        return False


def pointwise_rule(ctx):
    """Aligned operand dims share channels; zeros survive where ``f(0, ..., 0) == 0``."""
    operands = [v for v in ctx.inputs() if isinstance(v, TensorChannels)]
    if ctx.out_shape() is None:  # several outputs: not the one-to-one map assumed here
        return unknown_rule(ctx) if operands else size_arithmetic_rule(ctx)
    if not operands:
        return ctx.out()
    out = broadcast_combine(ctx, operands, "all")
    return out if zero_at_zero(ctx) else out.map_zi(False)


__all__ = ["is_pointwise_op", "is_pointwise_node", "pointwise_rule", "zero_at_zero"]
