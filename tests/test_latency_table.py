"""The measured latency table and scope="latency" selection."""
import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
import fxprune.select.plan as select_pass
from fxprune.compress import compress
from fxprune.measure import LatencyResult, LatencySettings, count_flops
from fxprune.select import latency_verify
from fxprune.select.latency_table import GroupLatency, efficiency, latency_table, modules_of
from fxprune.select.score import score_groups
from fxprune.select.metrics import unit_costs

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
FAST = LatencySettings(threads=1, warmup=1, repeats=3)


class Twins(nn.Module):
    """Two identical conv blocks in sequence (same shapes), then a different third one."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 16, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = x + self.a2(torch.relu(self.a1(x)))
        x = x + self.b2(torch.relu(self.b1(x)))
        return self.head(torch.relu(self.c(x)).mean((2, 3)))


@pytest.fixture(scope="module")
def twins_table():
    torch.manual_seed(0)
    graph = fxprune.analyze(Twins().eval(), (X,))
    groups = graph.prunable_groups
    scores = score_groups(graph, "magnitude")
    limit = {g.id: g.size - 1 for g in groups}
    costs = unit_costs(graph, groups, "flops")
    return graph, groups, latency_table(graph, groups, scores, costs, limit, FAST), costs


def _group_of(graph, module):
    (gid,) = [g.id for g in graph.prunable_groups if f"{module}.weight[0]" in g.producers]
    return gid


def test_every_group_is_measured_with_half_its_channels_and_their_flops(twins_table):
    graph, groups, table, costs = twins_table
    assert sorted(table) == sorted(g.id for g in groups)
    for g in groups:
        row = table[g.id]
        assert row.removed == g.size // 2
        assert row.saved_ms >= 0
        # the half removed is the lowest-scoring half: its FLOPs are half the group's, within rounding
        assert 0 < row.saved_flops <= costs[g.id].sum()


def test_groups_with_the_same_kernels_share_one_saving(twins_table):
    graph, _, table, _ = twins_table
    a, b = _group_of(graph, "a1"), _group_of(graph, "b1")
    assert table[a].saved_ms == table[b].saved_ms
    assert table[a].saved_flops == pytest.approx(table[b].saved_flops)


def test_modules_of_names_the_leaf_modules_a_group_slices(twins_table):
    graph, *_ = twins_table
    inner = [g for g in graph.prunable_groups if g.id == _group_of(graph, "a1")][0]
    assert modules_of(graph, inner) == {"a1", "a2"}
    bn_model = torchvision.models.resnet18(weights=None).eval()
    bn_graph = fxprune.analyze(bn_model, (X,))
    stem = [g for g in bn_graph.prunable_groups if "conv1.weight[0]" in g.producers][0]
    assert "bn1" in modules_of(bn_graph, stem)
    assert "bn1" not in modules_of(bn_graph, stem, batchnorm=False)


def test_efficiency_is_relative_to_the_whole_model():
    table = {1: GroupLatency(1, 4, saved_ms=2.0, saved_flops=100.0),
             2: GroupLatency(2, 4, saved_ms=1.0, saved_flops=300.0)}
    eff = efficiency(table)
    # the model saves 3 ms per 400 FLOPs; group 1 saves 2 per 100
    assert eff[1] == pytest.approx((2 / 100) / (3 / 400))
    assert eff[2] == pytest.approx((1 / 300) / (3 / 400))
    # FLOPs-weighted mean efficiency is 1 by construction
    assert (eff[1] * 100 + eff[2] * 300) / 400 == pytest.approx(1.0)
    assert efficiency({1: GroupLatency(1, 1, 0.0, 10.0)}) == {1: 1.0}


def test_latency_scope_takes_more_from_groups_whose_flops_buy_more_time(monkeypatch):
    torch.manual_seed(0)
    model = Twins().eval()
    graph = fxprune.analyze(model, (X,))
    fast_group = _group_of(graph, "c")  # declared 4x as efficient as every other group

    def fake_table(graph, groups, scores, costs, limit, settings, **kwargs):
        return {g.id: GroupLatency(g.id, g.size // 2, (4.0 if g.id == fast_group else 1.0) * costs[g.id].sum(),
                                   float(costs[g.id].sum())) for g in groups}

    monkeypatch.setattr(select_pass, "latency_table", fake_table)
    # the end-to-end check would time the tiny model for real; it is tested on its own below
    monkeypatch.setattr(select_pass, "faster_plan", lambda graph, local, weighted, spec, notes, others=None, scale=None: weighted)
    spec = {"example_inputs": (X,), "target": {"flops": 0.5}, "scope": "latency", "fuse": False, "round_to": 1}
    result = compress(model, spec)
    frac = count_flops(result.model, (X,)) / count_flops(model, (X,))
    assert abs(frac - 0.5) <= 0.02 * 0.5
    kept = {name: m.out_channels for name, m in result.model.named_modules() if isinstance(m, nn.Conv2d)}
    # local shares would be equal; here "c" (64 wide) loses a larger share than "a1" (32 wide)
    assert 1 - kept["c"] / 64 > 1 - kept["a1"] / 32
    assert any("scope=latency" in n for n in result.notes)


def test_latency_scope_measures_for_real_and_lands_the_target():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    spec = {"example_inputs": (X,), "target": {"flops": 0.5}, "scope": "latency", "round_to": 8,
            "latency": {"threads": 1, "warmup": 1, "repeats": 3}}
    result = compress(model, spec)
    frac = count_flops(result.model, (X,)) / count_flops(model, (X,))
    assert abs(frac - 0.5) <= 0.02 * 0.5, frac
    notes = [n for n in result.notes if "scope=latency" in n]
    (measured,) = [n for n in notes if "measured" in n]
    assert "of the model's" in measured
    # timings are real, so on a noisy machine the weighted shares may not land and the
    # documented fallbacks may follow; else both plans were timed end to end
    if not any("trying flatter weights" in n for n in notes):
        (verdict,) = [n for n in notes if "end to end" in n or "; kept" in n]
        assert "ms eager" in verdict and "local plan" in verdict
    assert torch.allclose(model(X), model(X))  # still usable, eval mode kept
    assert not model.training


def test_latency_scope_with_a_ratio_removes_that_share_of_all_channels():
    torch.manual_seed(0)
    graph = fxprune.analyze(Twins().eval(), (X,))
    spec = fxprune.Spec(example_inputs=(X,), ratio=0.25, scope="latency", round_to=1,
                        latency={"threads": 1, "warmup": 1, "repeats": 3})
    plan = select_pass.select(graph, score_groups(graph, "magnitude"), spec)
    total = sum(g.size for g in graph.prunable_groups)
    assert sum(map(len, plan.values())) == int(round(0.25 * total))
    sizes = {g.id: g.size for g in graph.prunable_groups}
    assert all(0 < len(units) < sizes[gid] for gid, units in plan.items())


def test_latency_scope_falls_back_to_flatter_weights_then_local_when_it_cannot_land(monkeypatch):
    torch.manual_seed(0)
    model = Twins().eval()
    graph = fxprune.analyze(model, (X,))
    fast_group = _group_of(graph, "c")
    monkeypatch.setattr(select_pass, "latency_table", lambda graph, groups, scores, costs, *a, **k: {
        g.id: GroupLatency(g.id, g.size // 2, (4.0 if g.id == fast_group else 1.0) * costs[g.id].sum(),
                           float(costs[g.id].sum())) for g in groups})
    real_land, attempts = select_pass.land, []  # keys of every landing attempt

    def only_local_lands(problem, notes):
        plan, model, landed = real_land(problem, notes)
        attempts.append(problem.keys)
        return plan, model, landed and len(attempts) == 1  # the first attempt is the local plan

    monkeypatch.setattr(select_pass, "land", only_local_lands)
    spec = {"example_inputs": (X,), "target": {"flops": 0.5}, "fuse": False}
    result = compress(model, {**spec, "scope": "latency"})
    assert len(attempts) == 3  # local, efficiency**2, efficiency**1
    notes = [n for n in result.notes if "trying flatter weights" in n]
    assert [n.split("efficiency**")[1].split()[0] for n in notes] == ["2", "1"]
    assert any("fell back to the local plan" in n for n in result.notes)
    monkeypatch.setattr(select_pass, "land", real_land)
    assert result.plan == compress(model, {**spec, "scope": "local"}).plan


def test_latency_table_from_a_base_plan_measures_the_channels_it_leaves(twins_table):
    graph, groups, _, costs = twins_table
    scores = score_groups(graph, "magnitude")
    limit = {g.id: g.size - 1 for g in groups}
    base = {g.id: list(range(g.size // 2)) for g in groups}
    table = latency_table(graph, groups, scores, costs, limit, FAST, base=base)
    for g in groups:
        assert table[g.id].removed == round(0.5 * (g.size - g.size // 2))
        assert table[g.id].saved_ms >= 0


class _Timings:
    """Stands in for measure_latency: fixed medians, and a record of what was timed."""

    def __init__(self, local_ms, weighted_ms, *others_ms, compiled=False):
        self.ms, self.compiled, self.timed = [local_ms, weighted_ms, *others_ms], compiled, []

    def __call__(self, models, inputs, settings):
        self.timed.append(models)
        return LatencyResult([10.0] * len(self.ms) if self.compiled else self.ms, self.ms if self.compiled else None,
                             settings)


@pytest.mark.parametrize("local_ms, weighted_ms, winner", [
    (5.0, 4.0, "weighted"), (4.0, 5.0, "local"),
    (5.0, 4.95, "local"),  # 1% faster is within the timing noise: the local plan stays
])
def test_latency_scope_keeps_the_plan_that_runs_faster_end_to_end(monkeypatch, local_ms, weighted_ms, winner):
    graph = fxprune.analyze(Twins().eval(), (X,))
    groups = graph.prunable_groups
    local = ({g.id: [0] for g in groups}, None)
    weighted = ({groups[0].id: [0, 1]}, None)
    timings = _Timings(local_ms, weighted_ms, compiled=True)
    monkeypatch.setattr(latency_verify, "measure_latency", timings)
    notes = []
    spec = fxprune.Spec(example_inputs=(X,), ratio=0.25, scope="latency", latency={"compile": True})
    chosen = latency_verify.faster_plan(graph, local, weighted, spec, notes)
    assert chosen is (weighted if winner == "weighted" else local)
    (note,) = notes
    assert f"{weighted_ms:.2f} ms compiled" in note and f"{local_ms:.2f} ms" in note
    assert ("fell back to the local plan" in note) == (winner == "local")
    # both models were timed pruned, in eval mode, as compress emits them
    (models,) = timings.timed
    widths = [[m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)] for model in models]
    assert widths == [[15, 31, 15, 31, 15, 63], [14, 32, 14, 32, 14, 64]]
    assert not any(model.training for model in models)


def test_latency_check_times_nothing_when_the_plans_agree(monkeypatch):
    graph = fxprune.analyze(Twins().eval(), (X,))
    timings = _Timings(1.0, 2.0)
    monkeypatch.setattr(latency_verify, "measure_latency", timings)
    plan = {graph.prunable_groups[0].id: [0]}
    spec = fxprune.Spec(example_inputs=(X,), ratio=0.25, scope="latency")
    notes = []
    chosen = latency_verify.faster_plan(graph, (plan, None), (dict(plan), "model"), spec, notes)
    assert chosen == (plan, "model") and notes == [] and timings.timed == []


@pytest.mark.parametrize("depth_ms, winner", [(3.0, "depth-only"), (4.5, "weighted"), (5.5, "weighted")])
def test_latency_scope_times_the_other_candidates_in_the_same_run(monkeypatch, depth_ms, winner):
    """With branches competing, the plan of branches alone is a candidate beside the joint
    one: the fastest of them is kept when it beats the local plan by MIN_GAIN."""
    graph = fxprune.analyze(Twins().eval(), (X,))
    groups = graph.prunable_groups
    local, weighted, depth = ({g.id: [0] for g in groups}, None), ({groups[0].id: [0, 1]}, None), \
        ({groups[1].id: [0, 1, 2]}, None)
    timings = _Timings(5.0, 4.0, depth_ms)
    monkeypatch.setattr(latency_verify, "measure_latency", timings)
    notes = []
    spec = fxprune.Spec(example_inputs=(X,), ratio=0.25, scope="latency")
    chosen = latency_verify.faster_plan(graph, local, weighted, spec, notes, others={"depth-only": depth})
    assert chosen is {"depth-only": depth, "weighted": weighted}[winner]
    assert len(timings.timed[0]) == 3  # local, weighted and depth-only in one run
    (note,) = notes
    assert f"the depth-only plan {depth_ms:.2f} ms" in note and f"kept the {winner} plan" in note


@pytest.mark.parametrize("per_ms, per_flop, chosen, factor", [
    ((True, 0.5), (True, 0.495), "per-ms", 1.0),        # both land: the closer one
    ((False, 0.6), (False, 0.48), "per-flop", 0.5 / 0.48),  # a near miss below a FLOPs target, time scaled
    ((False, 0.44), (False, 0.53), None, None),       # too far below, or above the target: no candidate
])
def test_depth_only_candidate_is_the_closest_landing_of_two_rankings(monkeypatch, per_ms, per_flop, chosen, factor):
    """Branches alone are ranked per measured ms and per FLOP; whole branches rarely land
    within 2%, so a plan keeping up to DEPTH_UNDERSHOOT less than a FLOPs target is a
    candidate too, its time scaled by target / kept; otherwise a note says none was timed."""
    calls = []

    def fake_land(graph, groups, keys, costs, spec, limit, metric, target, notes, ms_saved=None, landed=None):
        calls.append(ms_saved)
        landed.append(per_ms if ms_saved is not None else per_flop)
        return ({"per-ms" if ms_saved is not None else "per-flop": [0]}, None)

    monkeypatch.setattr(select_pass, "land_with_branches", fake_land)
    notes = []
    saved = {0: 1.0}
    others, scale = select_pass._depth_only(None, None, {}, "flops", 0.5, saved, notes)
    assert calls == [saved, None]
    if chosen is None:
        assert others == {} and scale == {}
        assert notes == ["select: scope=latency: branches alone cannot land near the target; not timed on their own"]
    else:
        assert others == {"depth-only": ({chosen: [0]}, None)} and scale["depth-only"] == pytest.approx(factor)
        assert f"ranked by importance per {'measured ms' if chosen == 'per-ms' else 'FLOP'}" in notes[0]
    # under a parameter target a near miss is not a candidate: time does not follow parameters
    calls.clear()
    assert select_pass._depth_only(None, None, {}, "params", 0.5, saved, [])[0] == ({} if chosen != "per-ms" else
                                                                                    {"depth-only": ({"per-ms": [0]},
                                                                                                    None)})


def test_faster_plan_compares_a_scaled_candidate_at_the_target(monkeypatch):
    """A depth-only plan that removed more than the target races with its time scaled up:
    3.0 ms at 0.45 of the FLOPs counts as 3.33 ms against the joint plan's 3.2 ms."""
    graph = fxprune.analyze(Twins().eval(), (X,))
    groups = graph.prunable_groups
    local, weighted, depth = ({g.id: [0] for g in groups}, None), ({groups[0].id: [0, 1]}, None), \
        ({groups[1].id: [0, 1, 2]}, None)
    monkeypatch.setattr(latency_verify, "measure_latency", _Timings(5.0, 3.2, 3.0))
    notes = []
    spec = fxprune.Spec(example_inputs=(X,), ratio=0.25, scope="latency")
    chosen = latency_verify.faster_plan(graph, local, weighted, spec, notes, others={"depth-only": depth},
                                        scale={"depth-only": 0.5 / 0.45})
    assert chosen is weighted
    assert "the depth-only plan 3.00 ms (3.33 ms scaled to the target)" in notes[0] and "kept the weighted" in notes[0]
