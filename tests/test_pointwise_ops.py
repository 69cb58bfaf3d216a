"""conv -> one pointwise op -> conv: the middle channels stay prunable under both front ends.

Pointwise ops are known from ATen's ``torch.Tag.pointwise`` (fxprune/channels/rules/
pointwise.py), whatever their spelling: an ATen op under export, a function, a Tensor
method or a composite under fx (classified by the ATen ops it ran). Where f(0) == 0 the
zero-invariance oracle holds; where f(0) != 0 the channels are prunable but not
zero-invariant. Before this rule 29 of these 59 stayed prunable under fx, 38 under export.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from helpers import prune_and_check

# name -> (f, f(0) == 0). Ops that are undefined for negative inputs see |x|.
OPS = {
    "relu": (torch.relu, True), "relu6": (F.relu6, True), "gelu": (F.gelu, True),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), True), "silu": (F.silu, True),
    "mish": (F.mish, True), "hardswish": (F.hardswish, True), "elu": (F.elu, True), "selu": (F.selu, True),
    "celu": (F.celu, True), "leaky_relu": (F.leaky_relu, True), "hardtanh": (F.hardtanh, True),
    "softshrink": (F.softshrink, True), "hardshrink": (F.hardshrink, True), "tanhshrink": (F.tanhshrink, True),
    "softsign": (F.softsign, True), "tanh": (torch.tanh, True), "sin": (torch.sin, True),
    "abs": (torch.abs, True), "neg": (torch.neg, True), "sqrt": (lambda x: torch.sqrt(x.abs()), True),
    "Tensor.square": (lambda x: x.square(), True), "torch.square": (torch.square, True),
    "sinh": (torch.sinh, True), "asinh": (torch.asinh, True), "atan": (torch.atan, True),
    "erf": (torch.erf, True), "expm1": (torch.expm1, True), "log1p": (lambda x: torch.log1p(x.abs()), True),
    "floor": (torch.floor, True), "ceil": (torch.ceil, True), "round": (torch.round, True),
    "trunc": (torch.trunc, True), "sign": (torch.sign, True), "nan_to_num": (torch.nan_to_num, True),
    "threshold": (lambda x: F.threshold(x, 0.1, 0.0), True), "clamp_min": (lambda x: torch.clamp_min(x, 0.0), True),
    "Tensor.clamp_min": (lambda x: x.clamp_min(0.0), True), "clamp": (lambda x: torch.clamp(x, -1, 1), True),
    "maximum": (lambda x: torch.maximum(x, 0.5 * x), True), "minimum": (lambda x: torch.minimum(x, 0.5 * x), True),
    "where_gt": (lambda x: torch.where(x > 0, x, 0.1 * x), True),
    "masked_fill_lt": (lambda x: x.masked_fill(x < 0, 0.0), True),
    "lerp": (lambda x: torch.lerp(x, torch.relu(x), 0.3), True), "pow2": (lambda x: x ** 2, True),
    "mul_scalar": (lambda x: x * 2, True), "div_scalar": (lambda x: x / 2, True),
    "swish_manual": (lambda x: x * torch.sigmoid(x), True), "frac": (torch.frac, True),
    "deg2rad": (torch.deg2rad, True), "atan2": (lambda x: torch.atan2(x, torch.relu(x) + x), True),
    "sigmoid": (torch.sigmoid, False), "exp": (torch.exp, False), "cos": (torch.cos, False),
    "softplus": (F.softplus, False), "hardsigmoid": (F.hardsigmoid, False), "logsigmoid": (F.logsigmoid, False),
    "erfc": (torch.erfc, False), "add_one": (lambda x: x + 1, False),
}


class ConvOpConv(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.a, self.b, self.f = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3), f

    def forward(self, x):
        return self.b(self.f(self.a(x)))


def _middle(graph):
    (group,) = [g for g in graph.groups if "a.weight" in g.slices([0], role="out")]
    return group


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(OPS))
def test_pointwise_op_keeps_channels_prunable(name, capture):
    f, zero_at_zero = OPS[name]
    torch.manual_seed(0)
    model = ConvOpConv(f).eval()
    x = torch.randn(1, 3, 10, 10)
    if zero_at_zero:
        graph, _, error = prune_and_check(model, x, capture=capture)  # the oracle holds
        assert graph.capture == capture and _middle(graph).zero_invariant and error < 1e-4
    else:
        graph = fxprune.analyze(model, x, capture=capture)
        middle = _middle(graph)
        assert middle.prunable and not middle.zero_invariant, middle.reason


def _tagged_unary_functions() -> list[str]:
    """``torch.X`` / ``F.X`` whose ATen op ``aten.X.default`` is tagged pointwise, takes one
    tensor and returns one floating-point tensor of its shape: drawn from the tags, not listed."""
    found = []
    for space, prefix in ((torch, "torch"), (F, "F")):
        for name in sorted(dir(space)):
            packet = getattr(torch.ops.aten, name, None)
            if name.startswith("_") or name.endswith("_") or packet is None or "default" not in packet.overloads():
                continue
            op = packet.default
            required = [a for a in op._schema.arguments if not a.has_default_value() and not a.kwarg_only]
            if torch.Tag.pointwise not in op.tags or len(required) != 1 or str(required[0].type) != "Tensor":
                continue
            try:
                out = getattr(space, name)(torch.randn(2, 3))
            except Exception:
                continue
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (2, 3):
                found.append(f"{prefix}.{name}")
    return found


TAGGED = _tagged_unary_functions()


def test_tags_draw_the_usual_functions():
    assert len(TAGGED) >= 40 and {"torch.erf", "torch.square", "F.relu6", "torch.sigmoid"} <= set(TAGGED)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("name", TAGGED)
def test_every_tagged_function_keeps_channels_prunable(name, capture):
    space, attr = name.split(".")
    f = getattr(torch if space == "torch" else F, attr)
    model = ConvOpConv(f).eval()
    x = torch.randn(1, 3, 10, 10)
    middle = _middle(fxprune.analyze(model, x, capture=capture))
    assert middle.prunable, middle.reason
    with torch.no_grad():
        assert middle.zero_invariant == bool((f(torch.zeros(3)) == 0).all())


def test_timm_filter_response_norm_prunes_with_the_oracle():
    """timm's FRN (``x.square()``, then ``torch.maximum(x, tau)``) froze every group before."""
    timm = pytest.importorskip("timm")
    from helpers import randomize

    model = randomize(timm.create_model("resnetv2_50d_frn", pretrained=False, layers=[1, 1, 1, 1],
                                        channels=(32, 64, 96, 128), stem_chs=16, num_classes=10))
    graph, _, error = prune_and_check(model, torch.randn(1, 3, 64, 64), expect_prunable=10, capture="fx")
    assert all(g.zero_invariant for g in graph.prunable_groups) and error < 1e-4
