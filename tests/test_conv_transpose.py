"""Transposed convolutions in every spelling: ``nn.ConvTranspose{1,2,3}d``,
``F.conv_transpose{1,2,3}d``, ``aten.conv_transpose*`` and ``aten.convolution`` with
``transposed=True``. Their weight is ``(in_channels, out_channels // groups, *kernel)``:
dim 0 consumes the input, dim 1 and the bias own the output, and a grouped one loses
whole groups. Each model is pruned by half of every zero-invariant group under the
oracle, and the transposed conv's weight and attributes are checked afterwards."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from helpers import prune_and_check, randomize

aten = torch.ops.aten
BOTH = pytest.mark.parametrize("capture", ["fx", "export"])
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
F_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
INPUT = {1: (2, 3, 5), 2: (2, 3, 5, 5), 3: (1, 3, 3, 3, 3)}
# Spatial options the channel rule leaves alone but the pruned model must keep
SPATIAL = dict(stride=2, padding=1, output_padding=1, dilation=2)
ATEN_T = (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
          aten.convolution.default, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)


def group_of(graph, origin: str):
    return next(g for g in graph.groups if origin in g.producers)


def transposed_call(gm: torch.fx.GraphModule) -> torch.fx.Node:
    """The one functional/ATen transposed conv of a pruned graph."""
    (node,) = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ATEN_T]
    return node


def groups_arg(node: torch.fx.Node) -> int:
    at = 8 if node.target is aten.convolution.default else 6
    return node.args[at] if len(node.args) > at else node.kwargs.get("groups", 1)


class Decoder(nn.Module):
    """conv -> relu -> transposed conv (stride, padding, output_padding, dilation, groups) -> relu -> conv."""

    def __init__(self, dims: int, groups: int):
        super().__init__()
        self.a = CONV[dims](3, 8, 1)
        self.t = CONV_T[dims](8, 12, 3, groups=groups, **SPATIAL)
        self.b = CONV[dims](12, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.t(torch.relu(self.a(x)))))


@BOTH
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 4])
def test_module_forms_prune_input_and_output_channels(dims, groups, capture):
    model = randomize(Decoder(dims, groups))
    graph, small, _ = prune_and_check(model, torch.randn(INPUT[dims]), capture=capture)
    into = group_of(graph, "a.weight[0]")
    assert into.prunable and into.zero_invariant, into.reason or into.zero_invariance_reason
    k = (3,) * dims
    if groups == 1:
        out = group_of(graph, "t.weight[1]")
        assert out.prunable and out.zero_invariant and out.id != into.id
        assert (into.size, out.size) == (8, 12)
        assert into.slices([0], "in") == {"t.weight": [(0, [0])]}  # dim 0 consumes the input
        assert out.slices([5], "out") == {"t.weight": [(1, [5])], "t.bias": [(0, [5])]}
        expect_w, expect_groups = (4, 6) + k, 1
    else:
        # whole groups: the input block (2 channels) and output block (3) of each group are one unit
        assert into.size == 4 and {"t.weight[1]", "t.bias[0]"} & set(into.producers)
        assert into.slices([1], "in")["t.weight"] == [(0, [2, 3])]
        assert into.slices([1], "out")["t.bias"] == [(0, [3, 4, 5])]
        expect_w, expect_groups = (4, 3) + k, 2  # 2 of 4 groups left, each still 2 in / 3 out
    state = small.state_dict()
    assert tuple(state["t.weight"].shape) == expect_w and tuple(state["t.bias"].shape) == (6,)
    assert tuple(state["b.weight"].shape[:2]) == (4, 6)
    if capture == "fx":
        t = small.get_submodule("t")
        assert (t.in_channels, t.out_channels, t.groups) == (4, 6, expect_groups)
        assert (t.stride, t.padding, t.output_padding, t.dilation) == ((2,) * dims, (1,) * dims, (1,) * dims,
                                                                       (2,) * dims)
    else:
        node = transposed_call(small)
        assert groups_arg(node) == expect_groups
        assert node.args[3:6] == ([2] * dims, [1] * dims, [1] * dims) and node.args[7] == [2] * dims


class Functional(nn.Module):
    """The decoder's transposed conv written as ``F.conv_transpose2d`` or ``aten.convolution``
    on the module's own parameters, groups positional or by keyword, with or without bias."""

    def __init__(self, groups: int, spelling: str, bias: bool = True):
        super().__init__()
        self.groups, self.spelling = groups, spelling
        self.a = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 12 // groups, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(12) * 0.1) if bias else None
        self.b = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.spelling == "keyword":
            y = F.conv_transpose2d(y, self.w, self.bias, stride=2, padding=1, output_padding=1,
                                   groups=self.groups, dilation=2)
        elif self.spelling == "positional":
            y = F.conv_transpose2d(y, self.w, self.bias, 2, 1, 1, self.groups, 2)
        else:  # the op every convolution decomposes to
            y = aten.convolution.default(y, self.w, self.bias, [2, 2], [1, 1], [2, 2], True, [1, 1], self.groups)
        return self.b(torch.relu(y))


@BOTH
@pytest.mark.parametrize("groups,spelling,bias", [
    (1, "keyword", True), (4, "keyword", False), (4, "positional", True), (1, "aten", False), (4, "aten", True)])
def test_functional_and_aten_forms(groups, spelling, bias, capture):
    model = randomize(Functional(groups, spelling, bias))
    graph, small, _ = prune_and_check(model, torch.randn(2, 3, 5, 5), capture=capture)
    into = group_of(graph, "a.weight[0]")
    assert into.prunable and into.zero_invariant, into.reason or into.zero_invariance_reason
    node = transposed_call(small)
    state = small.state_dict()
    if groups == 1:
        out = group_of(graph, "w[1]")
        assert out.prunable and out.zero_invariant and out.size == 12
        assert tuple(state["w"].shape) == (4, 6, 3, 3) and groups_arg(node) == 1
    else:
        assert into.size == 4
        assert tuple(state["w"].shape) == (4, 3, 3, 3) and groups_arg(node) == 2
    if bias:
        assert tuple(state["bias"].shape) == (6,)
    assert tuple(state["b.weight"].shape[:2]) == (4, 6)


@BOTH
def test_a_grouped_one_reading_a_sigmoid_is_prunable_but_not_zero_invariant(capture):
    class AfterSigmoid(Decoder):
        def forward(self, x):
            return self.b(torch.relu(self.t(torch.sigmoid(self.a(x)))))

    model = randomize(AfterSigmoid(2, 4)).eval()
    graph, small, _ = prune_and_check(model, torch.randn(2, 3, 5, 5), capture=capture)
    g = group_of(graph, "a.weight[0]")
    assert g.prunable and not g.zero_invariant and "sigmoid" not in g.reason
    assert "transposed conv" in g.zero_invariance_reason


@BOTH
def test_aten_convolution_without_transposed_keeps_the_conv_rule(capture):
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.w = nn.Conv2d(3, 8, 1), nn.Parameter(torch.randn(4, 8, 3, 3))  # (out, in, k, k)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return aten.convolution.default(y, self.w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)

    graph, small, _ = prune_and_check(randomize(Plain()), torch.randn(2, 3, 5, 5), capture=capture)
    g = group_of(graph, "a.weight[0]")
    assert g.prunable and g.slices([0], "in") == {"w": [(1, [0])]}
    assert tuple(small.state_dict()["w"].shape) == (4, 4, 3, 3)


def test_unbatched_input_has_channels_first():
    class Unbatched(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.t, self.b = nn.Conv1d(3, 8, 1), nn.ConvTranspose1d(8, 6, 3, groups=2), nn.Conv1d(6, 4, 1)

        def forward(self, x):
            return self.b(torch.relu(self.t(torch.relu(self.a(x)))))

    graph, small, _ = prune_and_check(randomize(Unbatched()), torch.randn(3, 7), capture="fx")
    assert group_of(graph, "a.weight[0]").size == 2
    t = small.get_submodule("t")
    assert (t.in_channels, t.out_channels, t.groups, tuple(t.weight.shape)) == (4, 3, 1, (4, 3, 3))


class Generator(nn.Module):
    """Torch-Pruning's transposed-conv test model, a small generator: a linear layer viewed
    as a (B, C, H, W) map, two transposed convs, a linear over the last dim."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 8 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(8, 6, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.up2 = nn.ConvTranspose2d(6, 3, 4, stride=2, padding=1)
        self.head = nn.Linear(16, 16)

    def forward(self, z):
        x = self.fc(z).view(z.shape[0], 8, 4, 4)
        x = self.up2(torch.relu(self.bn(self.up1(torch.relu(x)))))
        return self.head(torch.tanh(x))


@BOTH
def test_torch_pruning_generator(capture):
    # (The view of fc's 128 features as 8 x 4 x 4 gives the channels to its innermost factor,
    # which up1 reads as a spatial dim, so fc's features stay whole: the reshape rule's call.)
    graph, small, _ = prune_and_check(randomize(Generator()), torch.randn(2, 16), capture=capture)
    up1 = group_of(graph, "up1.weight[1]")
    assert up1.prunable and up1.zero_invariant and up1.size == 6
    assert set(up1.slices([2], "out")) == {"up1.weight", "up1.bias", "bn.weight", "bn.bias"}
    assert up1.slices([2], "in") == {"up2.weight": [(0, [2])]}
    state = small.state_dict()
    assert tuple(state["up1.weight"].shape[:2]) == (8, 3) and tuple(state["up2.weight"].shape[:2]) == (3, 3)
    assert tuple(state["bn.running_mean"].shape) == (3,)


class TinyUNet(nn.Module):
    """Encoder, bottleneck, a transposed-conv upsampling, a skip concat, decoder."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def forward(self, x):
        skip = self.enc(x)
        return self.dec(torch.cat([self.up(self.mid(skip)), skip], 1))


@BOTH
def test_tiny_unet_prunes_through_the_upsampling(capture):
    graph, small, _ = prune_and_check(randomize(TinyUNet()), torch.randn(2, 3, 8, 8), capture=capture,
                                      expect_prunable=4)
    for origin in ("mid.1.weight[0]", "up.weight[1]", "enc.0.weight[0]"):
        g = group_of(graph, origin)
        assert g.prunable and g.zero_invariant, (origin, g.reason)
    state = small.state_dict()
    assert tuple(state["up.weight"].shape[:2]) == (8, 4)
    assert tuple(state["dec.0.weight"].shape[:2]) == (4, 8)  # half of up's and half of enc's channels


def test_torchvision_mask_head_with_a_transposed_conv():
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    head = randomize(MaskRCNNPredictor(8, 16, 3))  # ConvTranspose2d -> ReLU -> 1x1 conv
    graph, small, _ = prune_and_check(head, torch.randn(2, 8, 7, 7), capture="fx")
    g = group_of(graph, "conv5_mask.weight[1]")
    assert g.prunable and g.zero_invariant and g.size == 16
    assert small.get_submodule("conv5_mask").out_channels == 8
    assert small.get_submodule("mask_fcn_logits").in_channels == 8


def test_emit_module_under_export_rewrites_the_layer():
    model = randomize(Decoder(2, 4)).eval()
    graph = fxprune.analyze(model, torch.randn(2, 3, 5, 5), capture="export")
    g = group_of(graph, "a.weight[0]")
    mine = fxprune.prune(graph, {g.id: [0, 3]}, emit="module")
    assert type(mine) is Decoder and model.t.groups == 4  # the caller's model is untouched
    assert (mine.t.in_channels, mine.t.out_channels, mine.t.groups) == (4, 6, 2)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.allclose(mine(x), fxprune.prune(graph, {g.id: [0, 3]})(x), atol=1e-6)


def test_a_computed_weight_freezes_the_channels_it_meets():
    class Scaled(Functional):
        def forward(self, x):
            return self.b(F.conv_transpose2d(torch.relu(self.a(x)), self.w * 2, self.bias))

    graph = fxprune.analyze(Scaled(1, "keyword").eval(), torch.randn(2, 3, 5, 5), capture="fx")
    g = group_of(graph, "a.weight[0]")
    assert not g.prunable and "conv_transpose2d" in g.reason and "has no channel rule" in g.reason


@BOTH
def test_activation_score_reads_what_the_transposed_conv_consumes(capture):
    """Wanda-sp needs each consumer's input norms: a transposed conv's input meets weight dim 0."""
    from fxprune.select.activations import input_norms
    from fxprune.select.score import score_groups

    model = randomize(TinyUNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    graph = fxprune.analyze(model, x, capture=capture)
    norms = input_norms(graph.gm, [graph.example_inputs], graph.state.canonical)
    with torch.no_grad():
        mid = model.mid(model.enc(x))
    assert torch.allclose(torch.as_tensor(norms[("up.weight", 0)]).float(), mid.square().sum((0, 2, 3)).sqrt(),
                          rtol=1e-5)
    notes: list[str] = []
    scores = score_groups(graph, "activation", calibration=[x], notes=notes)
    mid_group = group_of(graph, "mid.1.weight[0]")  # consumed by the transposed conv alone
    assert not [n for n in notes if f"group {mid_group.id} " in n], notes
    w = model.up.weight.detach().abs().reshape(16, -1).sum(1)
    assert torch.allclose(torch.as_tensor(scores[mid_group.id]).float(), w * mid.square().sum((0, 2, 3)).sqrt(),
                          rtol=1e-4)
