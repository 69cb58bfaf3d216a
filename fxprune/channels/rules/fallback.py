"""What runs when no rule fits: freeze what an unknown op touches, carry numbers along.

Every rule module may fall back on these, so they live apart from the rules (no cycles).
"""
from __future__ import annotations

from ..values import SizeValue, TensorChannels


def unknown_rule(ctx):
    """An op without a rule freezes every channel it touches — never a guess."""
    reason = (
        f"{ctx.where()} has no channel rule "
        "(register one with fxprune.register_rule, or mark the module a leaf with a rule)"
    )
    ctx.freeze_value(ctx.inputs(), reason)
    shape = ctx.out_shape()
    return ctx.out() if shape is not None else None


def size_arithmetic_rule(ctx):
    """Numbers computed from numbers: carry along which channel counts they depend on."""
    return SizeValue.merge(ctx.inputs())


def is_size_only(ctx) -> bool:
    """True when no input of the node is a tensor: the op computes with numbers."""
    return not any(isinstance(v, TensorChannels) for v in ctx.inputs()) and ctx.out_shape() is None


__all__ = ["unknown_rule", "size_arithmetic_rule", "is_size_only"]
