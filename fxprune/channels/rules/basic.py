"""Graph inputs, parameters, outputs, pass-through ops and the numbers read off shapes."""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import op_name, register_rule, register_when_imported
from ..values import DimMap, SizeValue, TensorChannels, flatten_values
from .fallback import size_arithmetic_rule, unknown_rule
from .shape import reversed_dims, transposed_last_two

aten = torch.ops.aten


def input_rule(ctx):
    """A graph input carries no channels: whatever meets it keeps its size (frozen)."""
    return ctx.out() if ctx.out_shape() is not None else None


def get_attr_rule(ctx):
    """A parameter or buffer used directly (class token, layer scale, position embedding).

    Each dim of size > 1 opens its own space, bound to that dim; the ops that use the
    tensor then tie it to the channels it meets. Entries are zero-invariant: they are
    the channel's own values and are zeroed with it.
    """
    shape = ctx.out_shape()
    if shape is None:
        return None
    if not ctx.node.meta["tensor_meta"].dtype.is_floating_point:
        return ctx.out()  # integer tables (position or token-type ids) are looked up, not scaled
    key = ctx.node.target
    dims = {}
    for d, size in enumerate(shape):
        if size > 1:
            ids = ctx.new_space(size, f"{key}[{d}]")
            ctx.bind(key, d, ids, "out")
            dims[d] = DimMap.of(ids)
    return ctx.out(dims)


def output_rule(ctx):
    """Everything that reaches the graph output is frozen: the interface never changes."""
    ctx.freeze_value(ctx.value(ctx.node.args[0]), "reaches the graph output")
    return None


# ---- pass-through ops: the output has the input's channels, index for index -------
ZERO_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU,
    nn.CELU, nn.Mish, nn.Hardtanh, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
)
# Calls that move or copy values without computing (not all carry the pointwise tag).
# Element-wise math (relu, gelu, erf, sigmoid, ...) needs no list: rules/pointwise.py
# knows it from ATen's tags and evaluates f(0) for zero-invariance.
ZERO_PRESERVING_FUNCTIONS = (
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clone, torch.dropout,
    aten.dropout.default, aten.dropout_.default, aten.alias.default, aten.clone.default,
    aten.contiguous.default, aten.detach.default, aten.lift_fresh_copy.default, aten.to.dtype,
    aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default,
    aten.hardswish.default, aten.hardswish_.default, aten.gelu_.default,
)
ZERO_PRESERVING_METHODS = (
    "contiguous", "clone", "detach", "float", "half", "double", "bfloat16", "to", "type_as", "cpu",
    "cuda", "requires_grad_",
)
# Modules whose f(0) != 0: a zeroed channel comes out non-zero, so pruning it is not invariant.
NONZERO_AT_ZERO = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid, aten.log_sigmoid_forward.default)


@register_rule(*ZERO_PRESERVING_MODULES, *ZERO_PRESERVING_FUNCTIONS, *ZERO_PRESERVING_METHODS)
def passthrough_rule(ctx):
    x = ctx.tensor(0, "input")
    return x if x is not None else size_arithmetic_rule(ctx)


@register_rule(*NONZERO_AT_ZERO)
def nonzero_at_zero_rule(ctx):
    x = ctx.tensor(0, "input")
    return x.map_zi(False) if x is not None else unknown_rule(ctx)


@register_rule(torch.pow, "pow", operator.pow, aten.pow.Tensor_Scalar)
def pow_rule(ctx):
    """``x ** e`` keeps zeros for e > 0 (an RMS norm's square); otherwise 0 ** e is not 0."""
    x, e = ctx.tensor(0, "input"), ctx.arg(1, "exponent")
    if x is None or not isinstance(e, (int, float)):
        return unknown_rule(ctx) if x is not None else size_arithmetic_rule(ctx)
    return x if e > 0 else x.map_zi(False)


@register_rule(torch.clamp, "clamp", aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default)
def clamp_rule(ctx):
    """Clamping keeps zeros when 0 lies inside the bounds."""
    x = ctx.tensor(0, "input")
    if x is None:
        return unknown_rule(ctx)
    name = op_name(ctx.node.target)
    lo = ctx.arg(1, "min") if name != "clamp_max" else None
    hi = ctx.arg(2, "max") if name == "clamp" else (ctx.arg(1, "max") if name == "clamp_max" else None)
    if any(v is not None and not isinstance(v, (int, float)) for v in (lo, hi)):
        return unknown_rule(ctx)
    keeps_zero = (lo is None or lo <= 0) and (hi is None or hi >= 0)
    return x if keeps_zero else x.map_zi(False)


# Checks of dtype and device, and range facts for the compiler: they read no channel count.
@register_rule(aten._assert_tensor_metadata.default, aten._assert_scalar.default,
               aten.sym_constrain_range_for_size.default, aten._assert_async.msg)
def no_op_rule(ctx):
    return None


# New tensors whose values do not depend on any input's values.
@register_rule(aten.arange.default, aten.arange.start, aten.arange.start_step,
               aten.empty.memory_format, aten.scalar_tensor.default,
               aten.new_empty.default, torch.arange, torch.zeros, torch.ones, torch.full)
def creation_rule(ctx):
    """The result carries no channels, and anything it meets keeps its width. A size read
    off a channel dim (``torch.zeros(x.size(1))`` under fx) would change with pruning while
    the result's map cannot follow: those channels are frozen."""
    for leaf in flatten_values(ctx.inputs()):
        if isinstance(leaf, SizeValue):
            ctx.freeze(leaf.ids, f"a channel count is used as the size of a new tensor at {ctx.where()}")
    return ctx.out() if ctx.out_shape() is not None else None


_SIZED_FILLS = {  # target -> (position of the size list, fill value; None: read the argument after it)
    aten.zeros.default: (0, 0), aten.ones.default: (0, 1), aten.full.default: (0, None),
    aten.new_zeros.default: (1, 0), aten.new_ones.default: (1, 1), aten.new_full.default: (1, None),
}


@register_rule(*_SIZED_FILLS)
def fill_rule(ctx):
    """A constant fill of a constant size (Mamba's zero recurrent state ``zeros([B, C, N])``
    under export): each dim may take the channels it meets element-wise. It opens a space
    per dim that is no group on its own (like a kernel dim), and the size list is rewritten
    when the channels it joined shrink. Entries are zero-invariant for a zero fill."""
    at, fill = _SIZED_FILLS[ctx.node.target]
    size = ctx.node.args[at] if len(ctx.node.args) > at else None
    if (ctx.out_shape() is None or not isinstance(size, (list, tuple))
            or not all(isinstance(n, int) or isinstance(ctx.value(n), int) for n in size)):
        return creation_rule(ctx)
    fill = ctx.arg(at + 1, "fill_value") if fill is None else fill
    dims = {}
    for d, n in enumerate(ctx.out_shape()):
        if n > 1 and isinstance(size[d], int):  # a size read off a dynamic dim (the batch) carries none
            origin = f"{ctx.node.name}[{d}]"
            dims[d] = DimMap.of(ctx.new_space(n, origin), fill == 0)
            for space in ctx.state.spaces_at[(ctx.node.name, origin)]:
                space.dropped, space.produces = True, False

    def fix_size(p, node):
        args, new = list(node.args), p.new_shape(node)
        args[at] = [new[d] if isinstance(n, int) else n for d, n in enumerate(args[at])]
        node.args = tuple(args)

    ctx.on_prune(fix_size)
    return ctx.out(dims)


@register_rule(aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
               aten.empty_like.default, torch.zeros_like, torch.ones_like, torch.full_like)
def like_rule(ctx):
    """``zeros_like(x)`` has x's shape, read when it runs: it shrinks with x's channels.
    Its entries are the fill value, zero only for ``zeros_like``."""
    x = ctx.tensor(0, "input")
    if x is None:
        return creation_rule(ctx)
    name = op_name(ctx.node.target)
    fill = 0 if name == "zeros_like" else 1 if name == "ones_like" else ctx.arg(1, "fill_value")
    return x.map_zi(fill == 0)


def stochastic_depth_rule(ctx):
    """Drops whole samples at random in training (a per-sample scale): channels pass."""
    return ctx.tensor(0, "input")


def _register_torchvision_rules() -> None:
    from torchvision.ops import stochastic_depth

    register_rule(stochastic_depth)(stochastic_depth_rule)


register_when_imported("torchvision", _register_torchvision_rules)


@register_rule(nn.PReLU)
def prelu_rule(ctx):
    x = ctx.tensor(0, "input")
    if ctx.module.num_parameters > 1 and x is not None and x.ndim > 1:
        ch = x.get(1)
        if ch is None:
            ctx.freeze(ctx.new_space(ctx.module.num_parameters, f"{ctx.param_key('weight')}[0]"),
                       f"per-channel PReLU on a dim that carries no channels at {ctx.where()}")
        else:
            ctx.bind(ctx.param_key("weight"), 0, ch, "out")
            ctx.on_prune(lambda p, node: setattr(p.module(node.target), "num_parameters",
                                                 p.module(node.target).weight.shape[0]))
    return x


# ---- shapes read as numbers -----------------------------------------------------
def _dim_size_value(x: TensorChannels, dim: int):
    m = x.get(dim)
    return SizeValue(m.tracked) if m is not None and m.tracked.size else x.shape[dim]


@register_rule("size", aten.sym_size.int)
def size_rule(ctx):
    x = ctx.tensor(0)
    dim = ctx.arg(1, "dim")
    if dim is not None:
        return _dim_size_value(x, dim)
    return tuple(_dim_size_value(x, d) for d in range(x.ndim))


@register_rule(getattr)
def getattr_rule(ctx):
    x = ctx.tensor(0)
    attr = ctx.arg(1)
    if x is not None and attr == "shape":
        return tuple(_dim_size_value(x, d) for d in range(x.ndim))
    if x is not None and attr in ("T", "H"):  # ``self.weight.T`` (Falcon's linear layers)
        return reversed_dims(x, ctx.out_shape())
    if x is not None and attr in ("mT", "mH"):
        return transposed_last_two(x, ctx.out_shape())
    if x is not None and attr in ("dtype", "device", "ndim", "is_cuda"):
        return None
    return unknown_rule(ctx)


@register_rule("dim", "numel_is_static")
def dim_rule(ctx):
    return None


@register_rule(torch._assert)
def size_check_rule(ctx):
    """Assertions on shapes would break if a channel count changed (comparisons of
    numbers read off shapes freeze too: see :func:`.elementwise.comparison_rule`)."""
    for leaf in flatten_values(ctx.inputs()):
        ids = leaf.ids if isinstance(leaf, SizeValue) else leaf.all_ids()
        ctx.freeze(ids, f"a channel count is checked by {ctx.where()}")
    return ctx.out() if ctx.out_shape() is not None else None


__all__ = ["input_rule", "get_attr_rule", "output_rule", "passthrough_rule"]
