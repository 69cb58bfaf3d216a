"""Residual branches as pruning units (depth): found from the graph, removed, and proved.

The oracle for depth: removing a branch equals zeroing its ``role="out"`` slices (the
last producer's parameters) in the original model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune.measure import count_flops
from fxprune.passes.verify import check_zero_invariance

sys.path.insert(0, str(Path(__file__).parent))
from helpers import assert_state_unchanged, count_params, randomize, state_snapshot  # noqa: E402


class MLPBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(MLPBlock(), MLPBlock(), MLPBlock())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x))


class DropPath(nn.Module):
    """timm's stochastic depth: the identity in eval."""

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1) > 0.1
        return x * keep / 0.9


class ScaledConv(nn.Module):
    """x + drop_path(gamma * conv(x)): a layer scale behind stochastic depth."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.gamma = nn.Parameter(torch.full((c, 1, 1), 0.5))
        self.drop = DropPath()

    def forward(self, x):
        return x + self.drop(self.gamma * torch.relu(self.conv(x)))


class Projected(nn.Module):
    """proj(x) + f(x): the conv path is the branch, the projection the shortcut."""

    def __init__(self, cin=4, cout=8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout)
        self.proj, self.bnp = nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout)

    def forward(self, x):
        return torch.relu(self.bnp(self.proj(x)) + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Nested(nn.Module):
    """x + g(x) where g(h) itself holds a residual: h + conv2(h), h = conv1(x)."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1, self.conv2, self.conv3 = (nn.Conv2d(c, c, 3, padding=1) for _ in range(3))

    def forward(self, x):
        x = self.stem(x)
        h = torch.relu(self.conv1(x))
        inner = h + self.conv2(h)
        return x + self.conv3(inner)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b, self.c = Projected(4, 8), ScaledConv(8), ScaledConv(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(self.stem(x)))))


class Gated(nn.Module):
    """x + sigmoid(fc(x)): sigmoid(0) = 0.5, so no parameter zeroes the branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.sigmoid(self.fc(x))


IMAGE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
VECTOR = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def _remove_half(model, inputs, **kw):
    """Remove every other branch: the oracle, shrinking params and FLOPs, an untouched input."""
    model = randomize(model).eval()
    before = state_snapshot(model)
    graph = fxprune.analyze(model, inputs, **kw)
    plan = {b.id: [0] for b in graph.branches[::2]}
    assert plan, str(graph)
    small = fxprune.prune(graph, plan)
    error = check_zero_invariance(model, graph, plan, small, tolerance=1e-5)
    example = graph.example_inputs
    assert count_params(small) < count_params(model)
    assert count_flops(small, example) < count_flops(graph.gm, example)
    assert_state_unchanged(model, before)
    return graph, small, error


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_plain_residual_mlp(capture):
    graph, small, error = _remove_half(Plain(), VECTOR, capture=capture)
    assert len(graph.branches) == 3
    first = graph.branches[0]
    assert first.id == len(graph.groups) and first.size == 1
    assert first.slices([0], role="out") == {"blocks.0.fc2.weight": [(0, list(range(8)))],
                                             "blocks.0.fc2.bias": [(0, list(range(8)))]}
    assert set(first.modules) == {"blocks.0.fc1", "blocks.0.fc2"}
    # blocks 0 and 2 are gone (their parameters too), block 1 stays
    names = {k for k, _ in small.named_parameters()}
    assert not any(k.startswith(("blocks.0.", "blocks.2.")) for k in names), names
    assert any(k.startswith("blocks.1.") for k in names)


def test_layer_scale_drop_path_and_projection():
    graph, small, _ = _remove_half(ConvNet(), IMAGE)
    a, b, c = graph.branches
    assert a.shortcut.startswith("a_bnp") and "a.conv1" in a.modules and "a.proj" not in a.modules
    assert b.slices([0]) == {"b.gamma": [(0, list(range(8)))]}  # the layer scale is the last producer
    assert all(br.zero_invariant for br in graph.branches)
    # the projection shortcut stays when its block's conv path goes
    assert "a.proj.weight" in dict(small.named_parameters()) and "a.conv1.weight" not in dict(small.named_parameters())


def test_nested_branches():
    graph = fxprune.analyze(randomize(Nested()).eval(), IMAGE)
    outer, inner = sorted(graph.branches, key=lambda b: len(b.nodes), reverse=True)
    assert inner.parent == outer.id and outer.parent is None
    assert set(inner.nodes) < set(outer.nodes)
    model = graph.model
    for plan in ({inner.id: [0]}, {outer.id: [0]}, {inner.id: [0], outer.id: [0]}):
        small = fxprune.prune(graph, plan)
        check_zero_invariance(model, graph, plan, small, tolerance=1e-5)
    assert count_params(fxprune.prune(graph, {outer.id: [0]})) == count_params(model.stem)


def test_width_and_depth_in_one_plan():
    model = randomize(ConvNet()).eval()
    graph = fxprune.analyze(model, IMAGE)
    a = graph.branches[0]
    inside = [g for g in graph.prunable_groups if all(p.startswith("a.conv1") or p.startswith("a.bn1")
                                                      for p in g.producers)]
    stream = [g for g in graph.prunable_groups if any(p.startswith("a.conv2") for p in g.producers)]
    assert inside and stream
    plan = {a.id: [0], inside[0].id: [0, 1, 2], stream[0].id: [0, 5]}
    small = fxprune.prune(graph, plan)
    check_zero_invariance(model, graph, plan, small, tolerance=1e-5)
    assert small.get_submodule("head").in_channels == 6  # the stream group spanning the branch is cut
    # feasible_plan takes branch ids next to channels
    assert fxprune.feasible_plan(graph, [(a.id, 0), (stream[0].id, 3)]) == {a.id: [0], stream[0].id: [3]}


def test_bad_branch_plans():
    graph = fxprune.analyze(Plain(), VECTOR)
    b = graph.branches[0]
    with pytest.raises(fxprune.PlanError, match="one unit"):
        fxprune.prune(graph, {b.id: [1]})
    last = graph.branches[-1].id
    beyond = (graph.layers or graph.branches)[-1].id + 1  # whole layers follow the branches
    with pytest.raises(fxprune.PlanError, match=f"branches {b.id}..{last}"):
        fxprune.prune(graph, {beyond: [0]})
    with pytest.raises(fxprune.PlanError, match="one unit"):
        fxprune.feasible_plan(graph, [(b.id, 2)])
    assert fxprune.unit(graph, b.id) is b and fxprune.unit(graph, 0) is graph.groups[0]


def test_branch_that_no_parameter_zeroes():
    model = randomize(Gated()).eval()
    graph = fxprune.analyze(model, VECTOR)
    (b,) = graph.branches
    assert not b.zero_invariant and "sigmoid" in b.reason
    small = fxprune.prune(graph, {b.id: [0]})  # removal still works: the output is the stream
    assert torch.equal(small(VECTOR), VECTOR)
    with pytest.raises(fxprune.PlanError, match="not zero-invariant"):
        check_zero_invariance(model, graph, {b.id: [0]}, small)


def test_resnet18_eight_basic_blocks():
    graph, small, error = _remove_half(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    assert len(graph.branches) == 8 and error < 1e-5
    projected = [b for b in graph.branches if "downsample" in b.shortcut]
    assert len(projected) == 3 and all("downsample" not in m for b in projected for m in b.modules)
    assert all(b.parent is None for b in graph.branches)


@pytest.mark.parametrize("name, count", [("convnext_atto", 8), ("vit_tiny_patch16_224", 8)])
def test_timm(name, count):
    timm = pytest.importorskip("timm")
    # shallower than the originals (the blocks are the same): the test stays cheap
    kw = {"img_size": 32, "depth": 4} if name.startswith("vit") else {"depths": (2, 2, 2, 2)}
    graph, _, error = _remove_half(timm.create_model(name, pretrained=False, **kw), torch.randn(1, 3, 32, 32))
    assert len(graph.branches) == count and error < 1e-5


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("transformers")
    from hf_models import tiny_models

    return tiny_models()


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_exported_transformers(hf, name):
    model, inputs, _ = hf[name]
    graph, _, error = _remove_half(model, inputs)
    assert graph.capture == "export"
    assert len(graph.branches) == 4  # two layers, an attention and an MLP branch each
    attention, mlp = graph.branches[:2]
    assert any("attn" in m or "attention" in m for m in attention.modules)
    assert any("mlp" in m or "intermediate" in m for m in mlp.modules) and not any("attn" in m for m in mlp.modules)


# --- selection: spec.units ----------------------------------------------------------------

class Scaled(nn.Module):
    """Four residual conv blocks whose layer scales set how much each branch matters."""

    def __init__(self, scales=(1.0, 0.01, 1.0, 0.02)):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.ModuleList(ScaledConv(16) for _ in scales)
        with torch.no_grad():
            for block, s in zip(self.blocks, scales):
                block.gamma.fill_(s)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _scaled():
    torch.manual_seed(0)
    return Scaled().eval()


@pytest.mark.parametrize("score", ["output_norm", "block_influence", "group_lasso", "angular_distance",
                                   "calibration_loss"])
def test_branch_scores_rank_the_small_branches_first(score):
    from fxprune.select.branch_score import score_branches

    graph = fxprune.analyze(_scaled(), IMAGE)
    s = score_branches(graph, score)
    ranked = sorted(graph.branches, key=lambda b: s[b.id])
    assert {ranked[0].join, ranked[1].join} == {graph.branches[1].join, graph.branches[3].join}
    if score != "group_lasso":  # the weight norm sees the scale among all the conv's weights
        assert s[graph.branches[1].id] < 0.1 * s[graph.branches[0].id]


def test_units_branches_by_ratio_and_target():
    model = _scaled()
    result = fxprune.compress(model, {"example_inputs": IMAGE, "ratio": 0.5, "units": "branches"})
    n = len(result.graph.groups)
    assert result.plan == {n + 1: [0], n + 3: [0]}  # the two branches scaled by 0.01 and 0.02
    assert abs(result.report.ratios()["flops"] - count_flops(fxprune.prune(result.graph, result.plan), IMAGE)
               / count_flops(model, IMAGE)) < 0.02
    # a target removes branches until the FLOPs land as close as branches allow: each carries ~24%
    result = fxprune.compress(model, {"example_inputs": IMAGE, "target": {"flops": 0.55}, "units": "branches"})
    assert set(result.plan) == {n + 1, n + 3}
    assert 0.45 < result.report.ratios()["flops"] < 0.6


def test_units_channels_and_branches_compete():
    model = _scaled()
    result = fxprune.compress(model, {"example_inputs": IMAGE, "target": {"flops": 0.35}, "round_to": 1,
                                      "units": ["channels", "branches"]})
    n = len(result.graph.groups)
    branches = {gid for gid in result.plan if gid >= n}
    assert branches == {n + 1, n + 3}, result.plan  # exactly the negligible ones
    assert any(gid < n for gid in result.plan), result.plan  # and channels too
    assert abs(result.report.ratios()["flops"] - 0.35) <= 0.02
    with torch.no_grad():
        assert result.model(IMAGE).shape == model(IMAGE).shape


def test_units_spec_errors():
    base = {"example_inputs": IMAGE, "ratio": 0.5}
    with pytest.raises(fxprune.SpecError, match="spec.units"):
        fxprune.Spec(**base, units="blocks")
    with pytest.raises(fxprune.SpecError, match="spec.scope"):
        fxprune.Spec(**base, units="branches", scope="latency")
    with pytest.raises(fxprune.SpecError, match="spec.branch_score"):
        fxprune.Spec(**base, units="branches", branch_score="cosine")
    with pytest.raises(fxprune.SpecError, match="spec.ratio"):
        fxprune.Spec(example_inputs=IMAGE, ratio={"blocks.*": 0.5}, units="branches")
    spec = fxprune.Spec(**base, units=["branches", "channels"])
    assert spec.units == ["channels", "branches"] and fxprune.Spec.from_dict(spec.to_dict()).units == spec.units


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_emit_module_drops_sequential_blocks(capture):
    model = randomize(Plain()).eval()
    graph = fxprune.analyze(model, VECTOR, capture=capture)
    first, _, last = graph.branches
    hidden = {p.split(".")[1]: g.id for g in graph.groups for p in g.producers[:1] if p.endswith("fc1.weight[0]")}
    # blocks 0 and 2 go; block 1 loses two hidden channels, and so would block 0 (removed anyway)
    plan = {first.id: [0], last.id: [0], hidden["1"]: [0, 1], hidden["0"]: [3]}
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is Plain and len(mine.blocks) == 1 and len(model.blocks) == 3
    assert mine.blocks[0].fc1.out_features == 14 and list(mine.state_dict())[0] == "blocks.0.fc1.weight"
    with torch.no_grad():
        assert torch.allclose(mine(VECTOR), fxprune.prune(graph, plan)(VECTOR))


def test_emit_module_refuses_a_block_that_does_more():
    graph = fxprune.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    with pytest.raises(fxprune.WriteBackError, match=r"module 'layer1.0' \(BasicBlock\) computes more .* 'layer1_0_relu_1'"):
        fxprune.prune(graph, {graph.branches[0].id: [0]}, emit="module")


def test_cli_graph_lists_branches():
    from fxprune.cli.render import graph_json, graph_text

    graph = fxprune.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    assert "8 residual branches" in graph_text(graph, "resnet18")
    import json

    data = json.loads(graph_json(graph, "resnet18", [1, 3, 32, 32]))
    assert [b["id"] for b in data["branches"]] == [b.id for b in graph.branches]


def test_max_ratio_caps_the_branches_removed():
    spec = {"example_inputs": IMAGE, "target": {"flops": 0.2}, "units": "branches", "max_ratio": 0.5}
    with pytest.raises(fxprune.SpecError, match="impossible") as error:  # two of four blocks are not enough
        fxprune.compress(_scaled(), spec)
    message = str(error.value)  # names the units that competed and the way out, not channels and round_to
    assert "units=branches, max_ratio=0.5" in message and "let channels compete too" in message
    assert "round_to cannot shrink" not in message
