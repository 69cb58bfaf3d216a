"""scope="latency" with branches: branches and channels ranked by importance per measured ms."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
import fxprune.select.plan as select_pass
from fxprune.measure import LatencySettings, measure_latency
from fxprune.select.branch_latency import branch_module, branch_times
from fxprune.select.depth import _one_scale
from fxprune.select.latency_table import GroupLatency

X = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
LATENCY = {"threads": 1, "warmup": 2, "repeats": 15}


class Blocks(nn.Module):
    """Six residual MLP blocks on one token: every kernel is tiny, so a block's time is
    its launches and Python calls, which thinning it keeps and removing it takes away."""

    def __init__(self, width=128, n=6):
        super().__init__()
        self.stem, self.head = nn.Linear(16, width), nn.Linear(width, 10)
        self.fc1 = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        self.fc2 = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x):
        x = self.stem(x)
        for a, b in zip(self.fc1, self.fc2):
            x = x + b(torch.relu(a(x)))
        return self.head(x)


def _blocks():
    torch.manual_seed(0)
    return Blocks().eval()


def _spec(**extra):
    return {"example_inputs": (X,), "target": {"flops": 0.5}, "round_to": 1, "latency": LATENCY, **extra}


def test_branch_module_computes_the_join():
    model = _blocks()
    graph = fxprune.analyze(model, (X,))
    b = graph.branches[2]
    module, inputs = branch_module(graph.gm, b)
    assert len(inputs) == 1  # the stream: the branch's parameters are its own
    with torch.no_grad():
        x = torch.randn(1, 128)
        assert torch.equal(module(x), x + model.fc2[2](torch.relu(model.fc1[2](x))))


def test_branch_times_pool_identical_branches():
    graph = fxprune.analyze(_blocks(), (X,))
    ms = branch_times(graph, graph.branches, LatencySettings(threads=1, warmup=1, repeats=5))
    assert sorted(ms) == [b.id for b in graph.branches]
    assert len(set(ms.values())) == 1 and next(iter(ms.values())) > 0  # six equal blocks: one mean


def test_one_scale_is_importance_per_cost_over_the_whole_kind():
    # a cheap unit with a huge key no longer drags its kind's scale: the cost-weighted mean is 1
    keys = {0: np.array([0.1, 0.2]), 1: np.array([10.0, np.inf])}
    costs = {0: np.array([100.0, 100.0]), 1: np.array([1.0, 0.0])}
    scaled = _one_scale(keys, costs)
    total = sum(float((scaled[g][np.isfinite(scaled[g])] * costs[g][np.isfinite(scaled[g])]).sum()) for g in keys)
    assert total / 201.0 == pytest.approx(1.0)
    assert scaled[0][0] == pytest.approx(0.1 / (40.0 / 201.0)) and np.isinf(scaled[1][1])


def test_joint_latency_plan_removes_blocks_where_they_save_the_time():
    model = _blocks()
    width = fxprune.compress(model, _spec(units="channels"))
    joint = fxprune.compress(model, _spec(units=["channels", "branches"], scope="latency"))
    n = len(joint.graph.groups)
    removed = [gid for gid in joint.plan if gid >= n]
    assert len(removed) >= 3, (joint.plan, joint.notes)  # half the FLOPs: about half the blocks
    assert abs(joint.report.ratios()["flops"] - 0.5) <= 0.05
    assert any("timed" in note and "branch(es)" in note for note in joint.notes)
    ms = measure_latency([width.model, joint.model], (X,), LatencySettings(threads=1, warmup=3, repeats=30)).eager_ms
    assert ms[1] < 0.9 * ms[0], ms  # and it is faster than the width plan at the same FLOPs
    with torch.no_grad():
        assert joint.model(X).shape == model(X).shape


@pytest.mark.parametrize("cheaper", ["branches", "channels"])
def test_the_kind_that_saves_more_time_goes_first(monkeypatch, cheaper):
    """Same model and scores, two sets of measured times: the plan follows the times."""
    fast, slow = 1.0, 1e-4  # ms saved per unit removed: a branch, or a channel of any group
    branch_ms, channel_ms = (fast, slow * 1e-2) if cheaper == "branches" else (slow, fast)

    def table(graph, groups, scores, costs, limit, settings, **kw):
        return {g.id: GroupLatency(g.id, g.size // 2, channel_ms * (g.size // 2), float(costs[g.id].sum()) / 2)
                for g in groups}

    monkeypatch.setattr(select_pass, "latency_table", table)
    monkeypatch.setattr(select_pass, "branch_times", lambda graph, branches, *a, **k: {b.id: branch_ms for b in branches})
    monkeypatch.setattr(select_pass, "faster_plan", lambda graph, local, weighted, spec, notes, others=None, scale=None: weighted)
    result = fxprune.compress(_blocks(), _spec(units=["channels", "branches"], scope="latency"))
    n = len(result.graph.groups)
    removed = [gid for gid in result.plan if gid >= n]
    if cheaper == "branches":
        assert len(removed) >= 3 and sum(len(u) for gid, u in result.plan.items() if gid < n) < 64, result.plan
    else:
        assert removed == [] and result.plan, result.plan
    assert abs(result.report.ratios()["flops"] - 0.5) <= 0.05


def test_latency_scope_with_branches_needs_a_target():
    with pytest.raises(fxprune.SpecError, match="spec.scope.*target"):
        fxprune.Spec(example_inputs=(X,), ratio=0.5, units="branches", scope="latency")
    fxprune.Spec(example_inputs=(X,), target={"flops": 0.5}, units="branches", scope="latency")
