"""The score registry against hand computations on small layers (fxprune/select/score.py).

Each expected value is written out from the weights of the test model, by the definition
in the score module's docstring, over the entries the unit owns: producer rows, their
bias and norm affine, consumer columns (buffers such as running statistics excluded).
Tied units own entries in several layers: a residual add ties its two producers, a
grouped conv ties a block of channels of the producer, of itself and of its consumer.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.select.score import score_groups
from helpers import unit_scale


class ConvBn(nn.Module):
    """conv a (3 -> 4, bias) -> BN -> ReLU -> conv b (4 -> 2): one group of 4 channels."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x)))).mean((2, 3))


class Residual(nn.Module):
    """Two conv+BN producers added: channel c of the sum is channel c of both (one unit)."""

    def __init__(self):
        super().__init__()
        self.p, self.q = nn.Conv2d(3, 4, 1, bias=False), nn.Conv2d(3, 4, 1, bias=False)
        self.bn_p, self.bn_q = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.out(torch.relu(self.bn_p(self.p(x)) + self.bn_q(self.q(x)))).mean((2, 3))


class Grouped(nn.Module):
    """conv a (3 -> 4) -> grouped conv g (4 -> 4, 2 groups) -> conv b: a unit is one block of
    2 channels in a, g and b together."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1, groups=2), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.g(torch.relu(self.a(x))))).mean((2, 3))


def only_group(model):
    graph = fxprune.analyze(unit_scale(model, seed=3).eval(), torch.randn(1, 3, 4, 4))
    (group,) = graph.prunable_groups
    return graph, group


def owned(entries: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([e.detach().reshape(-1) for e in entries]).double()


def by_hand(units: list[list[torch.Tensor]]) -> dict[str, np.ndarray]:
    """magnitude: mean |w|; group_lasso: L2 norm; over each unit's own entries."""
    return {"magnitude": np.array([float(owned(u).abs().mean()) for u in units]),
            "group_lasso": np.array([float(owned(u).norm()) for u in units])}


def check(graph, expected: dict[str, np.ndarray]) -> None:
    for method, want in expected.items():
        (got,) = score_groups(graph, method).values()
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=method)


def test_scores_of_a_conv_bn_channel():
    model = ConvBn()
    graph, group = only_group(model)
    a, bn, b = model.a, model.bn, model.b
    units = [[a.weight[c], a.bias[c:c + 1], bn.weight[c:c + 1], bn.bias[c:c + 1], b.weight[:, c]] for c in range(4)]
    assert group.size == 4
    check(graph, by_hand(units) | {"bn_scale": bn.weight.detach().abs().double().numpy()})


def test_scores_of_a_residual_unit_count_both_producers():
    model = Residual()
    graph, group = only_group(model)
    m = model
    units = [[m.p.weight[c], m.q.weight[c], m.bn_p.weight[c:c + 1], m.bn_p.bias[c:c + 1], m.bn_q.weight[c:c + 1],
              m.bn_q.bias[c:c + 1], m.out.weight[:, c]] for c in range(4)]
    gammas = torch.stack([m.bn_p.weight, m.bn_q.weight]).detach().abs().double()
    check(graph, by_hand(units) | {"bn_scale": gammas.mean(0).numpy()})  # both producers' BatchNorms


def test_scores_of_a_grouped_conv_block():
    model = Grouped()
    graph, group = only_group(model)
    assert group.size == 2 and group.slices([1], "out")["a.weight"] == [(0, [2, 3])]
    m = model
    units = [[m.a.weight[s], m.a.bias[s], m.g.weight[s], m.g.bias[s], m.b.weight[:, s]]
             for s in (slice(0, 2), slice(2, 4))]
    check(graph, by_hand(units))
    notes = []
    (fallback,) = score_groups(graph, "bn_scale", notes=notes).values()  # no BatchNorm: magnitude, noted
    np.testing.assert_allclose(fallback, by_hand(units)["magnitude"], rtol=1e-5)
    assert len(notes) == 1 and "magnitude" in notes[0]


def test_scores_tell_the_methods_apart():
    """On the same unit the three definitions differ (group_lasso returning magnitude would fail)."""
    model = ConvBn()
    graph, _ = only_group(model)
    scores = {m: next(iter(score_groups(graph, m).values())) for m in ("magnitude", "group_lasso", "bn_scale")}
    for x, y in (("magnitude", "group_lasso"), ("magnitude", "bn_scale"), ("group_lasso", "bn_scale")):
        assert not np.allclose(scores[x], scores[y]), (x, y)


@pytest.mark.parametrize("method", ["magnitude", "group_lasso"])
def test_a_larger_weight_scores_higher(method):
    model = ConvBn()
    graph, _ = only_group(model)
    before = next(iter(score_groups(graph, method).values()))
    with torch.no_grad():
        graph.gm.get_submodule("a").weight[1] *= 10
    after = next(iter(score_groups(graph, method).values()))
    assert after[1] > before[1] and np.allclose(np.delete(after, 1), np.delete(before, 1))
