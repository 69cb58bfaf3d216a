"""Every prune is checked by values, mutating calls survive the rewrite, and broken
rewrites are caught: a dropped call, a wrong slice, a mismatched constant."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.passes import prune as prune_pass
from fxprune.passes.verify import output_error, zeroed_copy
from helpers import randomize


@torch.fx.wrap
def add_into(x, y):
    """Adds ``y`` into ``x`` in place, like torchvision MViT's ``_add_shortcut``."""
    x.add_(y)
    return x


class InPlaceJoin(nn.Module):
    """An MLP whose result gets a second branch added in place by a call whose value is unused."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.q, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        q = self.q(x)
        if self.how == "wrapped":
            add_into(h, q)
        elif self.how == "method":
            h.add_(q)
        else:  # index assignment, spelled so that fx can trace it
            h[:, :4].copy_(q[:, :4])
        return self.out(h)


def _hidden_group(graph) -> int:
    (group,) = [g for g in graph.prunable_groups if g.size == 16]
    return group.id


@pytest.mark.parametrize("how", ["wrapped", "method", "copy_into_slice"])
@pytest.mark.parametrize("capture", ["fx", "export"])
def test_mutating_calls_whose_result_is_unused_survive_pruning(how, capture):
    model = randomize(InPlaceJoin(how).eval())
    x = torch.randn(4, 8)
    graph = fxprune.analyze(model, x, capture=capture)
    plan = {_hidden_group(graph): [0, 3, 5, 7]}
    small = fxprune.prune(graph, plan)
    assert small.meta["fxprune.value_check"]["error"] < 1e-5
    with torch.no_grad():
        assert output_error(zeroed_copy(model, graph, plan)(x), small(x)) < 1e-5
        # the branch the call adds matters: without it the output is far away
        assert output_error(model(x), model.out(model.fc2(torch.relu(model.fc1(x))))) > 1e-2
    if capture == "fx" and how == "wrapped":
        assert "add_into" in small.code


def test_a_dropped_call_is_caught(monkeypatch):
    """The MViT bug: plain dead-code elimination drops the unused in-place call."""
    model = randomize(InPlaceJoin("wrapped").eval())
    graph = fxprune.analyze(model, torch.randn(4, 8), capture="fx")
    monkeypatch.setattr(prune_pass, "eliminate_dead_code", lambda gm: gm.graph.eliminate_dead_code())
    with pytest.raises(fxprune.VerificationError, match="removed units masked by .* first diverging node"):
        fxprune.prune(graph, {_hidden_group(graph): [0, 1]})
    with pytest.raises(fxprune.VerificationError):
        fxprune.check_zero_invariance(model, graph, {_hidden_group(graph): [0, 1]})
    # verify="shapes" is the documented way out: shapes alone do not see it
    assert "add_into" not in fxprune.prune(graph, {_hidden_group(graph): [0, 1]}, verify="shapes").code


def test_a_wrong_slice_of_the_right_size_is_caught_and_the_node_named(monkeypatch):
    model = randomize(nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).eval())
    graph = fxprune.analyze(model, torch.randn(3, 6))
    cut = prune_pass.cut_tensor

    def off_by_one(tensor, cuts):  # keeps as many rows as planned, but the wrong ones
        return cut(tensor, [(d, (i + 1) % tensor.shape[d]) for d, i in cuts] if tensor.ndim == 1 else cuts)

    monkeypatch.setattr(prune_pass, "cut_tensor", off_by_one)
    with pytest.raises(fxprune.VerificationError, match=r"first diverging node: '_0'"):
        fxprune.prune(graph, {1: [2, 5, 6]})


class HardCodedReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 16, 1), nn.Linear(256, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).reshape(2, 16, 16).flatten(1))


def test_a_mismatched_constant_is_caught_by_the_shape_check():
    model = randomize(HardCodedReshape().eval())
    graph = fxprune.analyze(model, torch.randn(2, 3, 4, 4))
    (name, rewrite), = [(n, r) for n, r in graph.state.rewrites if n.startswith("reshape")]

    def transposed_sizes(ctx, node):  # the right numel, the wrong layout
        rewrite(ctx, node)
        node.args = (node.args[0], 2, 16, 8)

    graph.state.rewrites = [(n, transposed_sizes if n == name else r) for n, r in graph.state.rewrites]
    with pytest.raises(fxprune.VerificationError, match=r"node 'reshape' has shape \(2, 16, 8\) after pruning, "
                                                        r"the analysis predicted \(2, 8, 16\)"):
        fxprune.prune(graph, {graph.prunable_groups[0].id: list(range(8))}, verify="shapes")


def test_groups_without_a_masking_are_named_and_the_rest_is_checked():
    model = randomize(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 8), nn.ReLU(),
                                    nn.Linear(8, 2)).eval())
    graph = fxprune.analyze(model, torch.randn(3, 4))
    norm_group, hidden = (g.id for g in graph.prunable_groups)
    assert graph.group(norm_group).oracle_role is None and graph.group(hidden).oracle_role == "out"
    check = fxprune.prune(graph, {norm_group: [0], hidden: [1, 2]}).meta["fxprune.value_check"]
    assert check["error"] < 1e-5 and f"groups {norm_group} have none and were checked by shape" in check["note"]
    check = fxprune.prune(graph, {norm_group: [0]}).meta["fxprune.value_check"]
    assert check["error"] is None and "values not checked" in check["note"]


def test_meta_device_models_skip_the_value_check_with_a_note():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    graph = fxprune.analyze(model, torch.randn(2, 4, device="meta"), capture="export")
    check = fxprune.prune(graph, {graph.prunable_groups[0].id: [0]}).meta["fxprune.value_check"]
    assert check["error"] is None and "meta device" in check["note"]


def test_compress_checks_values_by_default_and_says_so():
    model = randomize(nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)).eval())
    spec = {"example_inputs": torch.randn(3, 4), "ratio": 0.5, "round_to": 1}
    notes = fxprune.compress(model, spec).notes
    assert any(n.startswith("verify: values checked on the example inputs") for n in notes), notes
    assert not any(n.startswith("verify:") for n in fxprune.compress(model, {**spec, "verify": "shapes"}).notes)
    with pytest.raises(fxprune.SpecError, match="spec.verify: must be one of 'values', 'shapes'"):
        fxprune.Spec(**{**spec, "verify": "value"})
