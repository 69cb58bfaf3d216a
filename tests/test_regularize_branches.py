"""Residual branches as group-lasso groups (depth-wise SSL): penalty, gradient, zeroing, removal."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.errors import SpecError
from fxprune.passes.verify import check_zero_invariance
from fxprune.regularize import GroupLasso, branch_slices_from_graph


class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x):
        x = x + self.a(x)
        return x + self.b(x)


def test_penalty_and_gradient_by_hand():
    model = TwoLinear()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
        model.a.bias.copy_(torch.tensor([0.0, 4.0]))       # branch a: 6 entries, norm 5
        model.b.weight.fill_(1.0)
        model.b.bias.fill_(1.0)                            # branch b: 6 entries, norm sqrt(6)
    groups = branch_slices_from_graph(model, fxprune.analyze(model, torch.randn(3, 2)))
    assert [sorted(tuple(s.param.shape) for s in g) for g in groups] == [[(2,), (2, 2)]] * 2
    lasso = GroupLasso(groups, lam=0.1)
    penalty = lasso.penalty()
    assert penalty.item() == pytest.approx(0.1 * (math.sqrt(6) * 5 + math.sqrt(6) * math.sqrt(6)), rel=1e-6)
    penalty.backward()
    # d/dw of lam * sqrt(n) * ||w|| is lam * sqrt(n) * w / ||w||
    assert torch.allclose(model.a.weight.grad, 0.1 * math.sqrt(6) * model.a.weight.detach() / 5)
    assert torch.allclose(model.b.bias.grad, 0.1 * math.sqrt(6) * torch.ones(2) / math.sqrt(6))


class ResMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(3))

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def test_training_zeroes_a_branch_and_compress_removes_it():
    torch.manual_seed(0)
    model, x = ResMLP(), torch.randn(64, 4)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    graph = fxprune.analyze(model, x[:1])
    groups = branch_slices_from_graph(model, graph)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # only the middle block is penalised: the run is short and the outcome deterministic
    lasso = GroupLasso(groups, lam=0.05, optimizer=opt, weights=torch.tensor([0.0, 1.0, 0.0]))
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        lasso.prox_()
    assert lasso.zero_channels().tolist() == [False, True, False]
    assert all(bool((s.param == 0).all()) for s in groups[1])      # every weight of block 1
    dead = groups[1].label[1]
    result = fxprune.compress(model, {"example_inputs": (x[:1],), "ratio": 1 / 3, "units": "branches",
                                      "branch_score": "group_lasso", "fuse": False})
    assert result.plan == {dead: [0]}
    assert not any(k.startswith("blocks.1.") for k in result.model.state_dict())
    # the oracle: removing the zeroed block equals the trained model
    assert check_zero_invariance(model, graph, {dead: [0]}) == 0.0
    model.eval()
    with torch.no_grad():
        assert torch.allclose(result.model(x), model(x), atol=1e-6)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        y = self.a(x)
        y = y + self.b(y)
        return x + self.c(y)


def test_nested_branches_default_to_the_inner_one_and_overlaps_are_refused():
    model = Nested()
    graph = fxprune.analyze(model, torch.randn(2, 4))
    inner = next(b for b in graph.branches if b.parent is not None)
    (group,) = branch_slices_from_graph(model, graph)
    assert group.label == ("branch", inner.id) and {id(s.param) for s in group} == \
        {id(model.b.weight), id(model.b.bias)}
    outer = branch_slices_from_graph(model, graph, [inner.parent])
    assert {id(s.param) for s in outer[0]} == {id(p) for p in model.parameters()}
    with pytest.raises(SpecError, match=f"branch {inner.id} nests in branch {inner.parent}"):
        branch_slices_from_graph(model, graph, [inner.parent, inner.id])
    with pytest.raises(SpecError, match="no branch with id 99"):
        branch_slices_from_graph(model, graph, [99])
