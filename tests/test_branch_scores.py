"""The angular-distance and SLEB (calibration-loss) branch scores, against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import SpecError
from fxprune.select.branch_score import BRANCH_SCORES, angular_distance, score_branches
from fxprune.select.depth import branches_by_ratio
from fxprune.select.sleb import sleb_order


class Chain(nn.Module):
    """``x -> x + a(x) -> x + b(x) -> x + c(x)``, each branch one bias-free linear layer."""

    def __init__(self, weights):
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(len(w), len(w), bias=False) for w in weights)
        with torch.no_grad():
            for layer, w in zip((self.a, self.b, self.c), weights):
                layer.weight.copy_(torch.tensor(w, dtype=torch.float32))

    def forward(self, x):
        x = x + self.a(x)
        x = x + self.b(x)
        return x + self.c(x)


def _ids(graph):
    """Branch ids by module name."""
    return {b.modules[0]: b.id for b in graph.branches}


def test_angular_distance_formula():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 3.0], [-2.0, 0.0], [5.0, 0.0]])
    assert angular_distance(a, b).tolist() == pytest.approx([0.25, 0.5, 1.0, 0.0])
    # 4-d tensors: the angle is taken along the channel dim, per pixel
    x = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    y = torch.tensor([1.0, math.sqrt(3)]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    assert angular_distance(x, y).flatten().tolist() == pytest.approx([1 / 3] * 4)


def test_angular_distance_over_runs_by_hand():
    # on x = (t, 0): a adds (0, t) -> (t, t), 45 deg; b adds (-t, 0) -> (0, t), 45 deg; c adds 0
    model = Chain([[[0, 0], [1, 0]], [[-1, 0], [0, 0]], [[0, 0], [0, 0]]])
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    graph = fxprune.analyze(model, x)
    ids = _ids(graph)
    one = score_branches(graph, "angular_distance")
    assert [one[ids[m]] for m in "abc"] == pytest.approx([0.25, 0.25, 0.0])
    # runs of 2: (a, b) turns (t, 0) into (0, t): 0.5; (b, c) turns (t, t) into (0, t): 0.25
    two = score_branches(graph, "angular_distance", run=2)
    assert [two[ids[m]] for m in "abc"] == pytest.approx([0.5, 0.25, 0.25])
    # a run of 3 is the whole chain; a run of 4 fits nowhere: removed last
    assert list(score_branches(graph, "angular_distance", run=3).values()) == pytest.approx([0.5] * 3)
    assert set(score_branches(graph, "angular_distance", run=4).values()) == {math.inf}
    # through the spec: a ratio removing 2 of 3 with runs of 2 takes the best run, (b, c)
    spec = fxprune.Spec(example_inputs=x, ratio=2 / 3, units="branches", branch_score="angular_distance",
                        branch_run=2)
    notes = []
    assert branches_by_ratio(graph, spec, notes) == {ids["b"]: [0], ids["c"]: [0]}
    assert "angular_distance over runs of 2" in notes[0]


def _gains(a, b, c):
    """The 1-d chain ``y = (1 + a)(1 + b)(1 + c) x``: removing a branch sets its factor to 1."""
    return Chain([[[a]], [[b]], [[c]]])


def test_sleb_order_by_hand_differs_from_one_shot():
    # factors 2, 0.5, 1.3: full output 1.3 x. Removed alone (relative squared output change):
    # a -> 0.65x: 0.25, b -> 2.6x: 1, c -> 1.0x: (0.3/1.3)^2; one shot ranks c, a, b.
    # SLEB after c (1.0x): a -> 0.5x: (0.8/1.3)^2, b -> 2.0x: (0.7/1.3)^2, so b goes second.
    graph = fxprune.analyze(_gains(1.0, -0.5, 0.3), torch.tensor([[1.0], [2.0]]))
    ids = _ids(graph)
    order = sleb_order(graph)
    assert [bid for bid, _ in order] == [ids["c"], ids["b"], ids["a"]]
    assert [v for _, v in order] == pytest.approx([(0.3 / 1.3) ** 2, (0.7 / 1.3) ** 2, (0.3 / 1.3) ** 2])
    scores = score_branches(graph, "calibration_loss")
    assert scores[ids["c"]] == pytest.approx((0.3 / 1.3) ** 2)
    assert scores[ids["b"]] == pytest.approx((0.7 / 1.3) ** 2)
    # the last step's loss is lower than the second's: the score stays above it (one ulp)
    assert scores[ids["a"]] == np.nextafter(scores[ids["b"]], np.inf)
    spec = fxprune.Spec(example_inputs=torch.ones(1, 1), ratio=2 / 3, units="branches",
                        branch_score="calibration_loss")
    assert branches_by_ratio(graph, spec, []) == {ids["c"]: [0], ids["b"]: [0]}


def test_sleb_uses_loss_fn_and_calibration_batches():
    # loss (y - 1)^2 on x = 1: full 1.3 -> 0.09. Remove c: y = 1.0, loss 0; then a: y = 0.5 (0.25)
    # beats b: y = 2.0 (1.0); then b: y = 1.0 (0).
    model = _gains(1.0, -0.5, 0.3)
    graph = fxprune.analyze(model, torch.tensor([[5.0]]))
    ids = _ids(graph)
    spec = fxprune.Spec(example_inputs=torch.tensor([[5.0]]), ratio=1 / 3, units="branches",
                        branch_score="calibration_loss", calibration=[torch.ones(1, 1)] * 2,
                        loss_fn=lambda y: (y - 1).square().mean())
    order = sleb_order(graph, calibration=spec.calibration, loss_fn=spec.loss_fn)
    assert [bid for bid, _ in order] == [ids["c"], ids["a"], ids["b"]]
    assert [v for _, v in order] == pytest.approx([-0.18, 0.32, -0.18])  # summed over the 2 batches
    assert branches_by_ratio(graph, spec, []) == {ids["c"]: [0]}


@pytest.mark.parametrize("score", BRANCH_SCORES)
def test_a_zero_branch_scores_lowest_under_every_score(score):
    torch.manual_seed(0)
    model = Chain([torch.randn(4, 4).tolist(), [[0.0] * 4] * 4, torch.randn(4, 4).tolist()])
    graph = fxprune.analyze(model, torch.randn(16, 4))
    ids = _ids(graph)
    s = score_branches(graph, score)
    assert min(s, key=s.get) == ids["b"]
    # arccos is steep at 1: an angle of exactly 0 comes out near 1e-9 in float64
    assert s[ids["b"]] == pytest.approx(0.0, abs=1e-7) and min(s[ids["a"]], s[ids["c"]]) > 1e-3


def test_branch_run_must_be_a_positive_int():
    with pytest.raises(SpecError, match="spec.branch_run"):
        fxprune.Spec(input_shape=[1, 4], ratio=0.5, units="branches", branch_run=0)
    graph = fxprune.analyze(_gains(1.0, 1.0, 1.0), torch.ones(1, 1))
    with pytest.raises(SpecError, match="branch_run"):
        score_branches(graph, "angular_distance", run=0)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))

    def forward(self, x):
        x = x * 1.0  # not the caller's tensor
        x = x.add_(self.a(x))  # the join overwrites the stream it read
        return x


@pytest.mark.parametrize("score", ["block_influence", "angular_distance"])
def test_an_in_place_join_is_scored_on_the_stream_before_it(score):
    # (1, 0) -> (1, 1): 1 - cos 45 deg, or 45 deg / 180; reading x after the add_ would give 0
    graph = fxprune.analyze(InPlace(), torch.tensor([[1.0, 0.0]]))
    (value,) = score_branches(graph, score).values()
    assert value == pytest.approx(1 - math.sqrt(0.5) if score == "block_influence" else 0.25)
