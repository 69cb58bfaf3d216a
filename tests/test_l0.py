"""L0 hard-concrete gates: insertion, sharing, sampling, folding, and score='l0'."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
import fxprune.select.score
from fxprune.errors import SpecError
from fxprune.passes.gates import apply_gate, fold_gates, insert_gates
from fxprune.regularize.l0 import L0Gate, l0_gate


class ResNetish(nn.Module):
    """stem conv+BN, a residual block (two convs, BN), a stride-2 conv+BN, a conv without BN."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12)
        self.c4 = nn.Conv2d(12, 12, 3, padding=1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.b1(self.c1(x)))
        x = F.relu(x + self.b2(self.c2(y)))
        x = F.relu(self.b3(self.c3(x)))
        x = F.relu(self.c4(x))
        return self.fc(x.mean((2, 3)))


def _model(seed=0):
    torch.manual_seed(seed)
    m = ResNetish()
    for mod in m.modules():  # non-trivial BN statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(mod.weight, 0.5, 1.5)
            nn.init.uniform_(mod.bias, -0.2, 0.2)
    return m.eval()


@pytest.fixture
def setup():
    model = _model()
    x = torch.randn(4, 1, 8, 8)
    graph = fxprune.analyze(model, x)
    return model, x, graph


def _residual_group(graph):
    return next(g for g in graph.prunable_groups if len(g.spaces) > 1)


def test_gate_shared_across_coupled_producers(setup):
    _, _, graph = setup
    gated = insert_gates(graph)
    res = _residual_group(graph)
    zi = [g.id for g in graph.prunable_groups if g.zero_invariant]
    assert sorted(gated.gates()) == sorted(zi)  # one gate module per group
    points = [p for p in gated.gate_points if p.group == res.id]
    assert sorted(p.node for p in points) == ["b2", "bn0"]  # after the BN, once per producer
    calls = [n for n in gated.graph.nodes if n.op == "call_function" and n.target is apply_gate]
    assert len(calls) == len(gated.gate_points) == 5
    z_of_res = {n.args[1] for n in calls if n.args[0].name in ("bn0", "b2")}
    assert len(z_of_res) == 1  # both points read the same gate value
    assert {p.node for p in gated.gate_points if p.group != res.id} == {"b1", "b3", "c4"}
    assert gated.gates()[res.id].log_alpha.numel() == res.size
    assert graph.gm.training is False and not hasattr(graph.gm, "l0_gates")  # graph untouched


def test_eval_deterministic_and_training_samples_vary(setup):
    _, x, graph = setup
    gated = insert_gates(graph, drop_rate=0.3)
    gated.eval()
    torch.testing.assert_close(gated(x), gated(x))
    z = gated.gates()[_residual_group(graph).id]()
    expect = min(1.0, max(0.0, 0.7 * 1.2 - 0.1))
    torch.testing.assert_close(z, torch.full_like(z, expect))
    gated.train()
    gate = gated.gates()[_residual_group(graph).id]
    a, b = gate(), gate()
    assert not torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    torch.manual_seed(0)
    samples = torch.stack([gate() for _ in range(2000)])
    assert (samples == 0).any() and (samples == 1).any()  # hard concrete hits the ends
    assert not torch.equal(gated(x), gated(x))


def test_expected_l0_hand_checked():
    gate = L0Gate(3, drop_rate=0.5, beta=0.5, gamma=-0.2, zeta=1.2)
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([0.0, 1.0, -2.0]))
    shift = 0.5 * math.log(0.2 / 1.2)
    expect = sum(1 / (1 + math.exp(-(a - shift))) for a in (0.0, 1.0, -2.0))
    assert gate.expected_l0().item() == pytest.approx(expect, rel=1e-6)
    gate.eval()
    det = [min(1, max(0, 1 / (1 + math.exp(-a)) * 1.4 - 0.2)) for a in (0.0, 1.0, -2.0)]
    assert gate().tolist() == pytest.approx(det, rel=1e-6)
    gate.expected_l0().backward()
    assert gate.log_alpha.grad is not None and (gate.log_alpha.grad > 0).all()
    assert L0Gate(2, drop_rate=0.5).log_alpha.tolist() == [0.0, 0.0]
    with pytest.raises(SpecError):
        L0Gate(2, drop_rate=1.0)


def _randomise_gates(gated, closed_frac=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gated.gates().values():
            la = torch.randn(gate.log_alpha.shape, generator=gen) * 2
            closed = torch.rand(la.shape, generator=gen) < closed_frac
            closed[0] = False  # keep every group alive
            la[closed] = -6.0  # sigmoid(-6) * 1.2 - 0.1 < 0: z == 0 exactly
            gate.log_alpha.copy_(la)


def test_fold_equals_gated_in_eval(setup):
    model, x, graph = setup
    gated = insert_gates(graph)
    _randomise_gates(gated)
    folded = fold_gates(gated)
    gated.eval(), folded.eval()
    torch.testing.assert_close(folded(x), gated(x), rtol=1e-5, atol=1e-6)
    assert not any(n.op == "call_function" and n.target is apply_gate for n in folded.graph.nodes)
    assert not any("l0_" in k for k in folded.state_dict())
    assert set(folded.state_dict()) == set(model.state_dict())
    meta = folded.meta["fxprune_l0"]
    assert {"bn0.weight", "b2.bias", "c4.weight", "c4.bias"} <= set(meta)


def test_closed_gates_pruned_give_same_output(setup):
    _, x, graph = setup
    gated = insert_gates(graph)
    _randomise_gates(gated, closed_frac=0.4, seed=1)
    folded = fold_gates(gated).eval()
    fgraph = fxprune.analyze(folded, x)
    plan = {gid: np.flatnonzero(z == 0).tolist() for gid, z in gated.deterministic_gates().items()}
    plan = {gid: ch for gid, ch in plan.items() if ch}
    assert plan and sum(map(len, plan.values())) >= 3
    small = fxprune.prune(fgraph, plan)
    torch.testing.assert_close(small(x), folded(x), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in folded.parameters())


def test_score_l0_prunes_closed_gates_first(setup):
    _, x, graph = setup
    gated = insert_gates(graph)
    _randomise_gates(gated, closed_frac=0.4, seed=2)
    folded = fold_gates(gated).eval()
    closed = {gid: set(np.flatnonzero(z == 0).tolist()) for gid, z in gated.deterministic_gates().items()}
    n_closed = sum(map(len, closed.values()))
    fgraph = fxprune.analyze(folded, x)
    scores = fxprune.select.score.score_groups(fgraph, "l0")
    probs = gated.gate_probabilities()
    for gid, s in scores.items():
        order = np.argsort(s, kind="stable")
        k = len(closed[gid])
        assert set(order[:k].tolist()) == closed[gid]
        open_ = [u for u in range(len(s)) if u not in closed[gid]]
        np.testing.assert_allclose(s[open_], probs[gid][open_])
    assert n_closed > 0


def test_score_l0_without_gates_raises(setup):
    model, x, _ = setup
    with pytest.raises(SpecError, match="fold_gates"):
        fxprune.compress(model, {"example_inputs": (x,), "ratio": 0.5, "score": "l0"})


def test_compress_with_l0_score_and_flops_target(setup):
    _, x, graph = setup
    gated = insert_gates(graph)
    _randomise_gates(gated, closed_frac=0.3, seed=3)
    folded = fold_gates(gated).eval()
    result = fxprune.compress(folded, {"example_inputs": (x,), "target": {"flops": 0.5},
                                       "score": "l0", "fuse": False, "round_to": 1})
    closed = {gid: set(np.flatnonzero(z == 0).tolist()) for gid, z in gated.deterministic_gates().items()}
    for gid, removed in result.plan.items():  # closed units are removed before any open one
        removed = set(removed)
        assert closed[gid] <= removed or removed <= closed[gid]
    assert result.model(x).shape == (4, 5)


# learning rate and L0 weight large enough that a gate's log_alpha falls below the point where
# its deterministic value clamps to 0 (sigmoid(log_alpha) <= -gamma / (zeta - gamma)) within the steps
@pytest.mark.parametrize("opt_name, lr, penalty, steps", [("sgd", 0.5, 0.3, 20), ("adam", 0.3, 0.05, 12)])
def test_training_with_optimizers_closes_gates(opt_name, lr, penalty, steps):
    torch.manual_seed(0)
    model = _model().train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    gated = l0_gate(model, x)
    gated.train()
    assert len(gated.gate_parameters()) == 4
    assert not any((z == 0).any() for z in gated.deterministic_gates().values())  # all open at the start
    if opt_name == "sgd":
        opt = torch.optim.SGD(gated.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.Adam(gated.parameters(), lr=lr)
    before = gated.expected_l0().item()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(gated(x), y) + penalty * gated.expected_l0()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in gated.gate_parameters())
    assert gated.expected_l0().item() < before
    closed = sum(int((z == 0).sum()) for z in gated.deterministic_gates().values())
    assert closed > 0, "no gate reached zero"
    gated.eval()
    folded = fold_gates(gated).eval()
    torch.testing.assert_close(folded(x), gated(x), rtol=1e-4, atol=1e-5)
