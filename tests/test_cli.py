"""The `fxprune` command. Most tests call ``fxprune.cli.main(argv)`` in-process (fast:
no interpreter start, no torch import per call); three run the installed console script
as a subprocess, exactly as a user would."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fxprune import progress as progress_module
from fxprune.cli import main
from fxprune.measure import count_flops, count_params

TINY = textwrap.dedent('''
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.block(x))
            return self.head(x.mean((2, 3)))

    def build():
        torch.manual_seed(0)
        return Tiny()
''')
SHAPE = "1,3,16,16"


@contextlib.contextmanager
def _chdir(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def fxprune(*args: str, cwd: Path | None = None) -> Ran:
    """``fxprune ARGS`` in this process: ``main(argv)``, its exit code and what it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        if cwd is not None:
            stack.enter_context(_chdir(cwd))
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse: --help, --version and usage errors
            code = exit_.code if isinstance(exit_.code, int) else 2
    return Ran(code, out.getvalue(), err.getvalue())


def console_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed ``fxprune`` console script (or its entry point, if not installed)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    script = Path(sys.executable).with_name("fxprune")
    command = [str(script)] if script.is_file() else [
        sys.executable, "-c", "import sys; from fxprune.cli import main; sys.exit(main())"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=timeout)


def assert_usage_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fxprune: error:")]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "tinynet.py").write_text(TINY)
    return f"{folder / 'tinynet.py'}:build"


@pytest.fixture(scope="module")
def tiny_model(tiny):
    import importlib.util
    path = tiny.rsplit(":", 1)[0]
    spec = importlib.util.spec_from_file_location("tinynet_for_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build().eval()


@pytest.fixture(scope="module")
def compressed(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    out, report = folder / "small.pt", folder / "report.json"
    proc = fxprune("compress", tiny, "--input", SHAPE, "--ratio", "0.5", "-o", str(out),
                   "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    return proc, out, report


def test_help_on_every_command():
    top = fxprune("--help")
    assert top.returncode == 0 and "examples:" in top.stdout
    for command in ("graph", "compress", "report", "check", "demo"):
        proc = fxprune(command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "examples:" in proc.stdout and f"fxprune {command}" in proc.stdout


def test_console_script_help_and_version():
    proc = console_script("--help")
    assert proc.returncode == 0 and "examples:" in proc.stdout and "fxprune compress" in proc.stdout
    proc = console_script("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("fxprune ")


def test_console_script_user_error_is_one_line_exit_2():
    assert_usage_error(console_script("graph", "resnet18"), "did you mean torchvision:resnet18")


def test_console_script_compress_quiet_saves_and_prints_nothing_on_stderr(tiny, tiny_model, tmp_path):
    out = tmp_path / "small.pt"
    proc = console_script("compress", tiny, "--input", SHAPE, "--ratio", "0.5", "-q", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and "fxprune report" in proc.stdout
    small = torch.load(out, weights_only=False)
    assert small.get_submodule("stem.0").out_channels == 8  # half of 16, a multiple of round_to=8
    x = torch.randn(2, 3, 16, 16)
    assert small(x).shape == tiny_model(x).shape


@pytest.mark.parametrize("flags, shown", [((), True), (("--quiet",), False)])
def test_compress_progress_bar_on_a_terminal_unless_quiet(tiny, capsys, monkeypatch, flags, shown):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: True)
    assert main(["compress", tiny, "--input", SHAPE, "--flops", "0.6", *flags]) == 0
    captured = capsys.readouterr()
    assert "fxprune report" in captured.out and "steps" not in captured.out
    assert ("fxprune compress:" in captured.err and "verifying candidate" in captured.err) is shown
    if not shown:
        assert captured.err == ""


def test_compress_progress_bar_only_on_a_terminal(tiny, capsys):
    assert main(["compress", tiny, "--input", SHAPE, "--flops", "0.6"]) == 0
    assert "steps" not in capsys.readouterr().err  # captured stderr is no terminal


def test_graph_text(tiny):
    proc = fxprune("graph", tiny, "--input", SHAPE)
    assert proc.returncode == 0, proc.stderr
    assert "channel groups" in proc.stdout and "prunable" in proc.stdout and "frozen" in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 130


def test_graph_json_is_stable_and_complete(tiny, tiny_model):
    import fxprune as fx
    proc = fxprune("graph", tiny, "--input", SHAPE, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["schema"] == "fxprune.graph/1" and data["input_shape"] == [1, 3, 16, 16]
    expected = fx.analyze(tiny_model, torch.randn(1, 3, 16, 16)).rows()
    assert [g["id"] for g in data["groups"]] == [r["id"] for r in expected]
    for group, row in zip(data["groups"], expected):
        assert set(group) == {"id", "channels", "prunable", "zero_invariant", "reason",
                              "producers", "consumers"}
        assert group["producers"] == row["producers"] and group["consumers"] == row["consumers"]
        assert group["prunable"] or group["reason"]  # a frozen group says why


def test_graph_dot(tiny, tmp_path):
    out = tmp_path / "g.dot"
    proc = fxprune("graph", tiny, "--input", SHAPE, "--format", "dot", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("digraph") and text.count("{") == text.count("}")
    assert "->" in text
    pytest.importorskip("pydot", reason="pydot not installed: DOT checked for syntax only, "
                                        "not read back with networkx.nx_pydot")
    import networkx as nx
    graph = nx.nx_pydot.read_dot(str(out))
    assert graph.number_of_edges() > 0


def test_graph_mermaid(tiny):
    proc = fxprune("graph", tiny, "--input", SHAPE, "--format", "mermaid")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("flowchart LR\n") and "-->" in proc.stdout


def test_compress_saves_model_and_report(compressed, tiny_model):
    proc, out, report = compressed
    assert "fxprune report" in proc.stdout and "FLOPs" in proc.stdout
    data = json.loads(report.read_text())
    assert data["after"]["params"] < data["before"]["params"] and data["plan"]
    small = torch.load(out, weights_only=False)
    x = torch.randn(2, 3, 16, 16)
    assert small(x).shape == tiny_model(x).shape
    assert small.fxprune_input_shape == [1, 3, 16, 16]


def test_compress_spec_file_and_flag_override(tiny, tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('input_shape = [1, 3, 16, 16]\nscore = "magnitude"\n[target]\nparams = 0.9\n')
    proc = fxprune("compress", tiny, "--spec", str(spec), "--flops", "0.5", "--nm", "2:4", "-q",
                   "--markdown")
    assert proc.returncode == 0, proc.stderr
    assert "### fxprune report" in proc.stdout and "target flops=0.5" in proc.stdout
    assert "nm: 2:4" in proc.stdout and proc.stderr == ""


def test_report_text_and_json_on_saved_model(compressed):
    _, out, _ = compressed
    text = fxprune("report", str(out), "--repeats", "3", "--threads", "1")
    assert text.returncode == 0, text.stderr
    assert "latency" in text.stdout and "ms (median of 3 runs, cpu, 1 thread)" in text.stdout
    assert "layer" in text.stdout and "Conv2d" in text.stdout
    proc = fxprune("report", str(out), "--json", "--no-latency")
    data = json.loads(proc.stdout)
    assert data["input_shape"] == [1, 3, 16, 16] and data["latency_ms"] is None
    small = torch.load(out, weights_only=False)
    assert data["params"] == count_params(small)
    assert data["flops"] == count_flops(small, torch.randn(1, 3, 16, 16))
    assert sum(r["flops"] for r in data["layers"]) == data["flops"]


def test_check_budget_boundary_in_pyproject(tiny, tiny_model, tmp_path):
    params = count_params(tiny_model)
    flops = count_flops(tiny_model, torch.randn(1, 3, 16, 16))

    def check(max_params, max_flops):
        (tmp_path / "pyproject.toml").write_text(
            f'[project]\nname = "x"\n\n[tool.fxprune.budget]\nmodel = "{tiny}"\n'
            f'input = "{SHAPE}"\nmax_params = {max_params}\nmax_flops = "{max_flops / 1000}k"\n'
            'max_size = "1MB"\n')
        return fxprune("check", cwd=tmp_path)

    ok = check(params, flops)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "PASS" in ok.stdout and "limit" in ok.stdout and "measured" in ok.stdout
    over = check(params - 1, flops)
    assert over.returncode == 1 and "FAIL" in over.stdout and "max_params" in over.stdout
    over = check(params, flops - 1000)
    assert over.returncode == 1 and "max_flops" in over.stdout


def test_check_latency_states_device_and_threads(tiny, tmp_path):
    budget = tmp_path / "budget.toml"
    budget.write_text(f'[tool.fxprune.budget]\nmodel = "{tiny}"\ninput = [1, 3, 16, 16]\n'
                      'max_latency_ms = "10s"\n[tool.fxprune.budget.latency]\ndevice = "cpu"\n'
                      'threads = 1\nrepeats = 3\n')
    proc = fxprune("check", "--budget", str(budget), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] and data["latency_settings"]["threads"] == 1
    budget.write_text(f'[tool.fxprune.budget]\nmodel = "{tiny}"\nmax_latency_ms = 10\n')
    assert_usage_error(fxprune("check", "--budget", str(budget)), "device and threads")


@pytest.mark.parametrize("args, needles", [
    (("graph", "no_such_model"), ("cannot load model", "accepted forms")),
    (("graph", "resnet18"), ("did you mean torchvision:resnet18",)),
    (("report", "torchvision:resnet_nope"), ("torchvision has no model",)),
    (("graph", "no_such_pkg.models:build"), ("cannot import",)),
    (("compress", "torchvision:resnet18", "--input", "1,3,x,8", "--flops", "0.5"), ("input shape",)),
    (("compress", "torchvision:resnet18", "--input", "1,3,32,32", "--flops", "1.5"), ("spec.target",)),
    (("check", "torchvision:resnet18", "--max-params", "12 apples"), ("max_params", "cannot parse")),
    (("check", "torchvision:resnet18", "--max-size", "20MX"), ("max_size",)),
])
def test_user_errors_are_one_line_exit_2(args, needles):
    assert_usage_error(fxprune(*args), *needles)


def test_missing_budget_table_and_unknown_flag(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n')
    assert_usage_error(fxprune("check", "torchvision:resnet18", cwd=tmp_path),
                       "no [tool.fxprune.budget] table")
    assert_usage_error(fxprune("check", "--budget", str(tmp_path / "missing.toml")), "not found")
    proc = fxprune("graph", "torchvision:resnet18", "--frobnicate")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unrecognized arguments: --frobnicate" in proc.stderr


def test_demo_runs_fast_with_few_epochs():
    proc = fxprune("demo", "--epochs", "1", "--finetune", "0", "--flops", "0.5", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert "fxprune report" in proc.stdout and "test accuracy" in proc.stdout


PLUGIN = textwrap.dedent('''
    import numpy as np
    from fxprune.select.score import register_score

    @register_score("last_first")
    def last_first(graph, **_):
        """The highest channel indices score lowest, so they are pruned first."""
        return {g.id: np.arange(g.size, 0, -1, dtype=float) for g in graph.prunable_groups}
''')


def test_compress_uses_a_score_registered_by_a_plugin(tiny, tmp_path, monkeypatch):
    from fxprune.select import score as score_module

    # the plugin registers in this process: leave the registry as found for later tests
    monkeypatch.setattr(score_module, "SCORE_METHODS", dict(score_module.SCORE_METHODS))
    (tmp_path / "my_scores.py").write_text(PLUGIN)
    args = ("compress", tiny, "--input", SHAPE, "--ratio", "0.5", "--score", "last_first", "-q")
    assert_usage_error(fxprune(*args), "spec.score", "'last_first'")  # unknown without the plugin
    report = tmp_path / "report.json"
    proc = fxprune(*args, "--plugin", "my_scores.py", "--report", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    assert data["spec"]["score"] == "last_first"
    sizes = {row["group"]: row["channels_before"] for row in data["groups"]}
    # each group lost its highest channels: the plugin's score decided, not magnitude
    assert data["plan"] and all(units == list(range(sizes[int(g)] - len(units), sizes[int(g)]))
                                for g, units in data["plan"].items())
    assert_usage_error(fxprune(*args, "--plugin", "no_such_scores", cwd=tmp_path),
                       "--plugin 'no_such_scores'", "cannot import")


def test_compress_emit_module_saves_the_users_class(tiny, tiny_model, tmp_path):
    out = tmp_path / "mine.pt"
    proc = fxprune("compress", tiny, "--input", SHAPE, "--ratio", "0.5", "--emit", "module", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "emit: your Tiny, pruned" in proc.stdout and "fuse: skipped" in proc.stdout
    mine = torch.load(out, weights_only=False)
    assert type(mine).__name__ == "Tiny" and mine.stem[0].out_channels == 8 == mine.stem[1].num_features
    x = torch.randn(2, 3, 16, 16)
    assert mine(x).shape == tiny_model(x).shape


def test_saving_a_class_pickle_cannot_import_names_the_fix(tmp_path):
    from fxprune.cli.commands import _save
    from fxprune.errors import FxpruneError

    class Local(torch.nn.Linear):  # defined in a function: pickle cannot import it
        pass

    with pytest.raises(FxpruneError, match=r"cannot save the pruned Local .*--emit graph"):
        _save(Local(2, 2), str(tmp_path / "m.pt"))


@pytest.mark.parametrize("flags, note", [(["--branch-score", "calibration_loss"], "scored by calibration_loss"),
                                         (["--branch-score", "angular_distance", "--branch-run", "1"],
                                          "scored by angular_distance over runs of 1")])
def test_compress_branch_scores_from_the_cli(tiny, tmp_path, capsys, flags, note):
    out, spec = tmp_path / "small.pt", tmp_path / "spec.toml"
    spec.write_text("input_shape = [1, 3, 16, 16]\nmax_ratio = 1.0\n")  # the one block may go
    assert main(["compress", tiny, "--spec", str(spec), "--flops", "0.2", "--units", "branches", *flags,
                 "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert note in text
    assert not any(k.startswith("block.") for k in torch.load(out, weights_only=False).state_dict())


MOE = textwrap.dedent('''
    import torch
    from torch import nn

    class MoE(nn.Module):
        """A router, softmax, top-2 of 4 experts written as a loop."""

        def __init__(self):
            super().__init__()
            self.router = nn.Linear(8, 4)
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8))
                                         for _ in range(4))

        def forward(self, x):
            weights, chosen = self.router(x).softmax(-1).topk(2, dim=-1)
            out = torch.zeros_like(x)
            for e, expert in enumerate(self.experts):
                out = out + (weights * (chosen == e)).sum(-1, keepdim=True) * expert(x)
            return out

    def build():
        torch.manual_seed(0)
        return MoE()
''')


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("moe")
    (folder / "moenet.py").write_text(MOE)
    return f"{folder / 'moenet.py'}:build"


def test_graph_lists_experts_in_text_and_json(moe, tiny):
    text = fxprune("graph", moe, "--input", "16,8")
    assert text.returncode == 0, text.stderr
    assert "1 routed layers (remove experts 1 and 3 with {id: [1, 3]}" in text.stdout
    [row] = [line.split() for line in text.stdout.splitlines() if line.split()[3:4] == ["loop"]]
    assert row[1:6] == ["4", "2", "loop", "router.weight", "2"]  # count, top_k, form, router, modules each
    data = json.loads(fxprune("graph", moe, "--input", "16,8", "--format", "json").stdout)
    [experts] = data["experts"]
    assert {k: experts[k] for k in ("experts", "top_k", "form", "router", "stacked")} == {
        "experts": 4, "top_k": 2, "form": "loop", "router": "router.weight", "stacked": []}
    assert experts["modules"] == [[f"experts.{e}.0", f"experts.{e}.2"] for e in range(4)]
    assert experts["id"] == len(data["groups"]) + len(data["branches"])  # after the groups and branches
    plain = fxprune("graph", tiny, "--input", SHAPE)
    assert "routed layers" not in plain.stdout
    assert json.loads(fxprune("graph", tiny, "--input", SHAPE, "--format", "json").stdout)["experts"] == []
