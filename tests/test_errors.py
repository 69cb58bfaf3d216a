"""Bad input gets a clear fxprune error that names the problem and the fix."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import fxprune
from helpers import randomize


class DataDependentIf(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Conv2d(3, 4, 1), Branchy())

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # the line the error must point at
            return x * 2
        return x


def test_untraceable_forward_names_module_line_and_fix():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(DataDependentIf(), torch.randn(1, 3, 4, 4), capture="fx")
    msg = str(info.value)
    assert "in module 'inner.1' (Branchy)" in msg
    assert "test_errors.py" in msg and "if x.sum() > 0" in msg
    assert "leaf_modules" in msg and "concrete_args" in msg


def test_concrete_args_fix_a_python_flag():
    class Flag(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x, double: bool = False):
            y = self.a(x)
            if double:
                y = y * 2
            return self.b(y)

    with pytest.raises(fxprune.TraceError):
        fxprune.analyze(Flag(), torch.randn(2, 4), capture="fx")
    graph = fxprune.analyze(Flag(), torch.randn(2, 4), capture="fx", concrete_args={"double": False})
    assert [g.size for g in graph.prunable_groups] == [6]
    # torch.export runs the Python branch on the example inputs: "auto" falls back to it
    graph = fxprune.analyze(Flag(), torch.randn(2, 4))
    assert graph.capture == "export" and [g.size for g in graph.prunable_groups] == [6]


class WeightInTheBranch(nn.Module):
    """Its only weight is read by the value-dependent code itself: no part to capture."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        if x.sum() > 0:
            return x * self.scale[:, None, None]
        return x


def test_every_front_end_failing_gives_every_reason():
    with pytest.raises(fxprune.TraceError) as info:
        fxprune.analyze(WeightInTheBranch(), torch.randn(1, 3, 4, 4))
    msg = str(info.value)
    assert "no front end" in msg and "[fx]" in msg and "[export]" in msg and "[parts]" in msg
    assert msg.count("fix:") >= 3


def test_auto_captures_the_parts_around_value_dependent_code_and_says_why():
    graph = fxprune.analyze(DataDependentIf(), torch.randn(1, 3, 4, 4))
    assert graph.capture == "parts" and [p.path for p in graph.parts] == ["inner.0"]
    assert [n.split(":")[0] for n in graph.capture_notes] == ["fx could not capture the whole model",
                                                              "export could not capture the whole model"]


def test_unknown_capture_names_the_choices():
    with pytest.raises(fxprune.TraceError, match="auto, fx, export, parts"):
        fxprune.analyze(nn.Linear(2, 2), torch.randn(1, 2), capture="jit")


def test_wrong_input_shape_names_the_node_and_shapes():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(fxprune.AnalysisError) as info:
        fxprune.analyze(net, torch.randn(1, 4, 8, 8))
    msg = str(info.value)
    assert "(1, 4, 8, 8)" in msg and "node '_0'" in msg and "fix:" in msg


def test_wrong_number_of_inputs():
    with pytest.raises(fxprune.AnalysisError, match="takes 1 input"):
        fxprune.analyze(nn.Linear(2, 2), (torch.randn(1, 2), torch.randn(1, 2)))
    with pytest.raises(fxprune.AnalysisError, match="tuple of positional inputs or a dict of keyword inputs"):
        fxprune.analyze(nn.Linear(2, 2), [[1.0, 2.0]][0][0])


class Mystery(nn.Module):
    """A custom leaf module fxprune has no rule for."""

    def forward(self, x):
        return torch.roll(x, 1, dims=1)


def test_unknown_op_freezes_with_reason_and_plans_on_it_fail_clearly():
    net = nn.Sequential(nn.Conv2d(3, 8, 1), Mystery(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    graph = fxprune.analyze(randomize(net), torch.randn(1, 3, 4, 4), leaf_modules=[Mystery])
    frozen = next(g for g in graph.groups if "0.weight[0]" in g.producers)
    assert not frozen.prunable
    assert "module '1'" in frozen.reason and "Mystery" in frozen.reason and "register_rule" in frozen.reason
    with pytest.raises(fxprune.PlanError, match="frozen.*Mystery"):
        fxprune.prune(graph, {frozen.id: [0]})
    # the rest of the model is still prunable
    assert any("2.weight[0]" in g.producers for g in graph.prunable_groups)


def test_register_rule_makes_a_custom_module_prunable():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 3

    @fxprune.register_rule(Scale)
    def scale_rule(ctx):
        return ctx.tensor(0)

    net = nn.Sequential(nn.Conv2d(3, 8, 1), Scale(), nn.Conv2d(8, 2, 1))
    graph = fxprune.analyze(net, torch.randn(1, 3, 4, 4), leaf_modules=[Scale])
    assert [g.size for g in graph.prunable_groups] == [8]


@pytest.fixture
def simple_graph():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    return fxprune.analyze(net, torch.randn(2, 4))


@pytest.mark.parametrize("plan, match", [
    ({"P": [6]}, r"channels 0..5; \[6\] are out of range"),
    ({"P": [-1]}, "out of range"),
    ({"P": range(6)}, "removes all 6 channels of group P; keep at least one"),
    ({99: [0]}, "no group 99"),
    ({"0": [0]}, "no group '0'"),
    ({"P": ["a"]}, "channels must be integers"),
    ([0, 1], "a plan is a dict"),
    ({"F": [0]}, "frozen and cannot be pruned: reaches the graph output"),
])
def test_bad_plans(simple_graph, plan, match):
    prunable = simple_graph.prunable_groups[0].id
    frozen = next(g.id for g in simple_graph.groups if "2.weight[0]" in g.producers)
    if isinstance(plan, dict):
        plan = {({"P": prunable, "F": frozen}.get(k, k) if k in ("P", "F") else k): v for k, v in plan.items()}
    with pytest.raises(fxprune.PlanError, match=match.replace("group P", f"group {prunable}")):
        fxprune.prune(simple_graph, plan)


def test_plan_that_empties_one_layer_of_a_group_is_refused():
    class Concat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 4)
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            return self.out(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))

    graph = fxprune.analyze(Concat(), torch.randn(2, 3))
    g = graph.prunable_groups[0]
    assert g.size == 4
    with pytest.raises(fxprune.PlanError, match="zero width"):
        fxprune.prune(graph, {g.id: [0, 1]})  # both of a's channels
    assert fxprune.feasible_plan(graph, [(g.id, u) for u in range(4)]) == {g.id: [0, 2]}


def test_not_a_module():
    with pytest.raises(fxprune.TraceError, match="expected a torch.nn.Module"):
        fxprune.analyze(lambda x: x, torch.randn(1))


def test_pruned_model_saves_and_loads_without_the_original_class(tmp_path):
    class Private(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
            self.b = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.b(self.a(x)).flatten(1)

    model = randomize(Private()).eval()
    x = torch.randn(1, 3, 6, 6)
    graph = fxprune.analyze(model, x)
    small = fxprune.prune(graph, {graph.prunable_groups[0].id: [0, 1, 2]})
    torch.save(small, tmp_path / "small.pt")
    torch.save(x, tmp_path / "x.pt")
    torch.save(small(x).detach(), tmp_path / "y.pt")
    script = textwrap.dedent(f"""
        import torch
        m = torch.load(r"{tmp_path / 'small.pt'}", weights_only=False)
        x, y = torch.load(r"{tmp_path / 'x.pt'}"), torch.load(r"{tmp_path / 'y.pt'}")
        assert torch.allclose(m(x), y, atol=1e-6), "outputs differ after reload"  # thread counts may differ
        print(type(m).__name__, m.a[0].out_channels if hasattr(m.a, '__getitem__') else m.get_submodule('a.0').out_channels)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["GraphModule", "5"]


def test_analysis_is_deterministic():
    from test_channel_rules import DenseConcat, ResidualStack

    for make in (ResidualStack, DenseConcat):
        model = randomize(make()).eval()
        a = fxprune.analyze(model, torch.randn(2, 3, 8, 8))
        b = fxprune.analyze(model, torch.randn(2, 3, 8, 8))
        assert [(g.size, g.prunable, g.producers) for g in a.groups] == [(g.size, g.prunable, g.producers) for g in b.groups]
        plan = {g.id: list(range(0, g.size - 1, 3)) for g in a.prunable_groups}
        sa, sb = fxprune.prune(a, plan).state_dict(), fxprune.prune(b, plan).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_mode_model_is_not_mutated():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 2, 1)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    graph = fxprune.analyze(net, torch.randn(4, 3, 6, 6))
    fxprune.prune(graph, {graph.prunable_groups[0].id: [0]})
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_graph_renders_as_table_and_networkx(simple_graph):
    text = str(simple_graph)
    assert text.startswith("3 channel groups, 1 prunable, 2 frozen")
    assert "0.weight[0]" in text and "reaches the graph output" in text
    nxg = simple_graph.to_networkx()
    hidden = f"group:{simple_graph.prunable_groups[0].id}"
    assert nxg.nodes[hidden]["channels"] == 6
    assert {(v, d["dim"], d["role"]) for u, v, d in nxg.edges(data=True) if u == hidden} == {
        ("0.weight", 0, "out"), ("0.bias", 0, "out"), ("2.weight", 1, "in")}


def test_plugins_from_entry_points_are_loaded_once(monkeypatch):
    import importlib.metadata as md

    from fxprune.channels import registry

    calls = []

    class FakeEntryPoint:
        name = "demo"

        def load(self):
            return lambda: calls.append("registered")

    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(md, "entry_points", lambda group: [FakeEntryPoint()] if group == "fxprune.plugins" else [])
    assert registry.load_plugins() == ["demo"]
    assert registry.load_plugins() == []  # once per process
    assert calls == ["registered"]


def _small_convnet():
    return randomize(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 2, 1))).eval()


def test_ignore_pattern_that_matches_nothing_names_the_closest_modules():
    spec = {"input_shape": [1, 3, 8, 8], "ratio": 0.5, "round_to": 1}
    with pytest.raises(fxprune.SpecError) as info:
        fxprune.compress(_small_convnet(), {**spec, "ignore": ["3", "30*"]})
    msg = str(info.value)
    assert msg.startswith("spec.ignore: pattern '30*' matches no module")
    assert "closest module names: '3'" in msg and "fxprune graph" in msg
    # a pattern far from every name still says what names look like
    with pytest.raises(fxprune.SpecError, match=r"'nope\.\*'.*module names look like '0', '1', '2'"):
        fxprune.compress(_small_convnet(), {**spec, "ignore": ["nope.*"]})
    # a pattern that matches is honoured, and the group it names keeps every channel
    result = fxprune.compress(_small_convnet(), {**spec, "ignore": ["3"]})
    assert result.model.get_submodule("3").out_channels == 16
    assert result.model.get_submodule("0").out_channels == 8


@pytest.mark.parametrize("where, bad", [("3.weight", float("nan")), ("1.running_var", float("inf"))])
def test_nan_or_inf_weights_are_refused_before_scoring(where, bad):
    model = _small_convnet()
    with torch.no_grad():
        dict([*model.named_parameters(), *model.named_buffers()])[where].view(-1)[:2] = bad
    with pytest.raises(fxprune.WeightError) as info:
        fxprune.compress(model, {"input_shape": [1, 3, 8, 8], "target": {"flops": 0.5}})
    msg = str(info.value)
    assert f"{where} (2 of " in msg and "NaN or infinite" in msg and "Fix:" in msg
    # nothing else is named: the message points at the one broken tensor
    assert msg.count(" values)") == 1
