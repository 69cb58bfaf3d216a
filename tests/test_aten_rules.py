"""Rules for ops timm models use, in every spelling: module, functional, and the ATen op
that ``torch.export`` records. Each tiny model is analysed with ``capture="export"`` and
with ``capture="fx"``; the zero-invariance oracle proves the zero-invariant groups and
50% of every prunable group must keep the output shape."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.passes.verify import check_zero_invariance, output_error
from helpers import half_plan, randomize

BOTH = pytest.mark.parametrize("capture", ["fx", "export"])


def check(model: nn.Module, x, capture: str):
    """Analyze with ``capture``, prune half of everything (the shape holds) and run the
    oracle on half of every zero-invariant group. Returns the graph."""
    model = randomize(model).eval()
    graph = fxprune.analyze(model, x, capture=capture)
    assert graph.capture == capture
    inputs = graph.example_inputs
    with torch.no_grad():
        output_error(inputs.call(model), inputs.call(fxprune.prune(graph, half_plan(graph))))
    zi = [g for g in graph.prunable_groups if g.zero_invariant]
    if zi:
        assert check_zero_invariance(model, graph, half_plan(graph, zi)) < 1e-5
    return graph


def group_of(graph, origin: str):
    return next(g for g in graph.groups if origin in g.producers)


class Padded(nn.Module):
    """TF "same" padding, a ZeroPad2d and a reflection pad between convolutions."""

    def __init__(self, mode="constant", value=0.0):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, stride=2), nn.Conv2d(8, 4, 1)
        self.zero = nn.ZeroPad2d((1, 0, 1, 0))
        self.mode, self.value = mode, value

    def forward(self, x):
        x = F.pad(torch.relu(self.a(x)), [1, 1, 0, 1], mode=self.mode, value=self.value)
        x = self.b(self.zero(x))
        return self.c(F.pad(x, [1, 1, 1, 1], mode="reflect"))


@BOTH
def test_pad_passes_channels_and_keeps_zeros(capture):
    graph = check(Padded(), torch.randn(1, 3, 12, 12), capture)
    for origin in ("a.weight[0]", "b.weight[0]"):
        g = group_of(graph, origin)
        assert g.prunable and g.zero_invariant, g.reason or g.zero_invariance_reason


@BOTH
def test_pad_with_a_non_zero_constant_is_prunable_but_not_zero_invariant(capture):
    graph = check(Padded(value=1.0), torch.randn(1, 3, 12, 12), capture)
    g = group_of(graph, "a.weight[0]")
    assert g.prunable and not g.zero_invariant


class PadChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(10, 4, 1)

    def forward(self, x):
        return self.b(F.pad(self.a(x), [0, 0, 0, 0, 1, 1]))


@BOTH
def test_padding_a_channel_dim_freezes_it(capture):
    graph = fxprune.analyze(PadChannels().eval(), torch.randn(1, 3, 4, 4), capture=capture)
    g = group_of(graph, "a.weight[0]")
    assert not g.prunable and "padding adds positions to a channel dim" in g.reason


class Resized(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(16, 4, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")

    def forward(self, x):
        y = F.interpolate(self.a(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.b(torch.cat([y, self.up(self.a(x))], 1))


@BOTH
def test_interpolate_and_upsample_pass_channels(capture):
    graph = check(Resized(), torch.randn(1, 3, 6, 6), capture)
    g = group_of(graph, "a.weight[0]")
    assert g.prunable and g.zero_invariant


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN: a p-norm over space, a mean over channels, and addcmul."""

    def __init__(self, c=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, c), nn.Linear(c, 4)
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.gate = nn.Linear(4, c)

    def forward(self, x):  # x: [B, H, W, 4]
        h = F.gelu(self.fc1(x))
        g = h.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        h = h + torch.addcmul(self.bias, self.weight, h * n)
        # a second addcmul whose channels no mean couples: zero-invariant
        s = torch.addcmul(self.bias, self.weight, self.gate(x) * torch.linalg.vector_norm(h, dim=(1, 2), keepdim=True))
        return self.fc2(h) + self.fc2(s)


@BOTH
def test_norm_and_addcmul(capture):
    graph = check(GlobalResponseNorm(), torch.randn(2, 5, 5, 4), capture)
    hidden = group_of(graph, "fc1.weight[0]")
    assert hidden.prunable and not hidden.zero_invariant  # the mean over channels counts them
    assert "mean over channels" in hidden.zero_invariance_reason
    assert group_of(graph, "gate.weight[0]") is hidden  # the elementwise ops tie gate to fc1


class AddcmulOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        h = torch.addcmul(self.a(x), self.scale, torch.relu(self.b(x)), value=0.5)
        return self.c(h) + self.c(torch.addcdiv(self.a(x), self.b(x), self.scale.abs() + 1))


@BOTH
def test_addcmul_and_addcdiv_are_zero_invariant(capture):
    graph = check(AddcmulOnly(), torch.randn(2, 4), capture)
    g = group_of(graph, "a.weight[0]")
    assert g.prunable and g.zero_invariant and "b.weight[0]" in g.producers


class AttentionBias(nn.Module):
    """LeViT's relative position bias: a [heads, N] table read as ``table[:, idx]``."""

    def __init__(self, heads=4, n=6):
        super().__init__()
        self.qkv = nn.Linear(8, 3 * heads * 4)
        self.proj = nn.Linear(heads * 4, 8)
        self.table = nn.Parameter(torch.randn(heads, n))
        self.register_buffer("idx", torch.randint(0, n, (n, n)))
        self.heads = heads

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, 4).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) + self.table[:, self.idx]).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


@BOTH
def test_tensor_index_on_a_parameter_table(capture):
    graph = check(AttentionBias(), torch.randn(2, 6, 8), capture)
    assert not any("has no channel rule" in g.reason for g in graph.groups)
    positions = group_of(graph, "table[1]")  # looked up by position: frozen
    assert "a tensor index picks channels by position" in positions.reason
    # the head dim of the table is aligned with the scores' head dim, not frozen by the index
    assert "by position" not in group_of(graph, "table[0]").reason


class FlatNorm(nn.Module):
    """LeViT's LinearNorm: a BatchNorm1d over flattened tokens, reshaped back with reshape_as."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)
        self.gate = nn.Parameter(torch.ones(1, 1, 8))

    def forward(self, x):
        h = self.a(x)
        h = self.bn(h.flatten(0, 1)).reshape_as(h)
        return self.b(h * self.gate.expand_as(h))


@BOTH
def test_reshape_as_and_expand_as_follow_the_other_tensor(capture):
    graph = check(FlatNorm(), torch.randn(2, 5, 4), capture)
    g = group_of(graph, "a.weight[0]")
    assert g.prunable and g.zero_invariant and any("gate" in s.origin for s in g.spaces)


class ReparamBlock(nn.Module):
    """MobileOne's block: a sum that starts from ``0`` and an identity batch norm, with
    the batch norm called as ``F.batch_norm(x, mean, var, weight=..., bias=...)``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        bn = self.bn
        out = 0
        # sigmoid(0) is not zero; the affine norm, zeroed with the channel, zeroes it again
        out += F.batch_norm(torch.sigmoid(x), bn.running_mean, bn.running_var, weight=bn.weight, bias=bn.bias)
        out = out + self.conv(x)
        return self.head(F.relu(out + 0))


@BOTH
def test_affine_batch_norm_and_adding_zero_keep_zero_invariance(capture):
    graph = check(ReparamBlock(), torch.randn(1, 3, 6, 6), capture)
    g = group_of(graph, "conv.weight[0]")
    assert g.prunable and g.zero_invariant, g.zero_invariance_reason
    assert "bn.weight" in {b.key for b in g.bindings}


class FunctionalGroupNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.gn, self.b = nn.Conv2d(3, 8, 1), nn.GroupNorm(4, 8), nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.b(F.group_norm(self.a(x), num_groups=4, weight=self.gn.weight, bias=self.gn.bias))


@BOTH
def test_functional_group_norm_with_keyword_arguments(capture):
    graph = check(FunctionalGroupNorm(), torch.randn(1, 3, 4, 4), capture)
    g = group_of(graph, "a.weight[0]")
    assert g.prunable and g.zero_invariant and g.size == 4  # whole groups of 2 channels


class WindowPad(nn.Module):
    """Swin's padding up to a window multiple, computed from the shape, and the crop back
    with ``x[:, :H, :W, :]``: run-time amounts on the spatial dims only."""

    def __init__(self, window=4):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)
        self.window = window

    def forward(self, x):  # [B, H, W, 3]
        h = self.a(x)
        _, H, W, _ = h.shape
        pad_h, pad_w = (self.window - H % self.window) % self.window, (self.window - W % self.window) % self.window
        h = F.pad(h, (0, 0, 0, pad_w, 0, pad_h))
        h = h * 2
        return self.b(h[:, :H, :W, :].contiguous())


@BOTH
def test_run_time_padding_and_crop_on_spatial_dims(capture):
    graph = check(WindowPad(), torch.randn(1, 6, 7, 3), capture)
    g = group_of(graph, "a.weight[0]")
    assert g.prunable and g.zero_invariant, g.reason
