"""Cost measurement (fxprune.measure) and the before/after report (fxprune.report)."""

import json

import pytest
import torch
from torch import nn

from fxprune.errors import SpecError
from fxprune.measure import (
    FLOPS_CONVENTION,
    LatencyResult,
    LatencySettings,
    count_flops,
    count_params,
    measure_latency,
    size_bytes,
)
from fxprune.report import ModelStats, Report, build_report, group_row

FAST = dict(warmup=1, repeats=3)


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 4))


# --- FLOPs, params, bytes -------------------------------------------------------------


def test_flops_of_linear_is_two_per_mac():
    assert count_flops(nn.Linear(10, 20), (torch.randn(3, 10),)) == 2 * 3 * 10 * 20


def test_flops_accepts_a_single_tensor():
    x = torch.randn(3, 10)
    assert count_flops(nn.Linear(10, 20), x) == count_flops(nn.Linear(10, 20), (x,))


def test_flops_of_strided_conv_by_hand():
    conv = nn.Conv2d(4, 6, kernel_size=3, stride=2, bias=False)
    x = torch.randn(2, 4, 9, 9)  # output 2 x 6 x 4 x 4
    macs = 2 * 6 * 4 * 4 * (4 * 3 * 3)  # per output element: in_channels * kH * kW
    assert count_flops(conv, (x,)) == 2 * macs


def test_flops_of_grouped_conv_by_hand():
    conv = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=4, bias=False)
    x = torch.randn(1, 8, 5, 5)
    macs = 8 * 5 * 5 * (2 * 3 * 3)  # each output channel sees in_channels / groups = 2
    assert count_flops(conv, (x,)) == 2 * macs


def test_count_flops_does_not_mutate_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_flops(model, torch.randn(2, 3, 8, 8))
    assert model.training and model[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 100)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_params_count_tied_weights_once():
    assert count_params(TiedLM()) == 100 * 16 + 100


def test_params_of_linear():
    assert count_params(nn.Linear(10, 20)) == 10 * 20 + 20


def test_size_bytes_grows_with_params():
    small, big = size_bytes(nn.Linear(10, 10)), size_bytes(nn.Linear(100, 100))
    assert 0 < small < big
    assert big >= 4 * (100 * 100 + 100)  # float32 payload at least


# --- latency --------------------------------------------------------------------------


def test_measure_latency_two_models_positive():
    result = measure_latency([mlp(64), mlp(8)], torch.randn(4, 16), LatencySettings(**FAST))
    assert isinstance(result, LatencyResult)
    assert len(result.eager_ms) == 2 and all(ms > 0 for ms in result.eager_ms)
    assert result.compiled_ms is None
    json.dumps(result.to_dict())


def test_measure_latency_restores_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        measure_latency([mlp(8)], torch.randn(2, 16), LatencySettings(threads=2, **FAST))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(previous)


class Exploding(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_measure_latency_restores_threads_on_error():
    previous = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        measure_latency([Exploding()], torch.randn(2, 16),
                        LatencySettings(threads=previous + 1, **FAST))
    assert torch.get_num_threads() == previous


def test_measure_latency_restores_training_flags():
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)).train()
    stats = model[1].running_mean.clone()
    measure_latency([model], torch.randn(4, 16), LatencySettings(**FAST))
    assert model.training and model[1].training
    assert torch.equal(model[1].running_mean, stats)


class BatchRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def forward(self, x, y):
        self.seen.add((x.shape[0], y.shape[0]))
        return x


@pytest.mark.parametrize("batch_size", [1, 5])
def test_measure_latency_resizes_batch(batch_size):
    model = BatchRecorder()
    measure_latency([model], (torch.randn(2, 3), torch.randn(2)),
                    LatencySettings(batch_size=batch_size, **FAST))
    assert model.seen == {(batch_size, batch_size)}


def test_measure_latency_compiled_timings():
    settings = LatencySettings(compile=True, compile_backend="eager", **FAST)
    result = measure_latency([mlp(32), mlp(8)], torch.randn(4, 16), settings)
    assert len(result.compiled_ms) == 2 and all(ms > 0 for ms in result.compiled_ms)
    assert len(result.eager_ms) == 2


@pytest.mark.parametrize("field, value", [
    ("repeats", 0), ("repeats", True), ("warmup", -1), ("threads", 0),
    ("batch_size", 0), ("device", "tpu"), ("device", "cuda:x"), ("compile", "yes"),
    ("compile_backend", ""),
])
def test_invalid_settings_name_the_field(field, value):
    with pytest.raises(SpecError, match=f"latency.{field}"):
        LatencySettings(**{field: value})


def test_compile_needs_warmup():
    with pytest.raises(SpecError, match="latency.warmup"):
        measure_latency([mlp(8)], torch.randn(2, 16),
                        LatencySettings(compile=True, warmup=0, repeats=1))


def test_cuda_unavailable_is_a_spec_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SpecError, match=r"latency.device='cuda'.*is_available\(\) is False"):
        measure_latency([mlp(8)], torch.randn(2, 16), LatencySettings(device="cuda", **FAST))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measure_latency_on_cuda_leaves_model_on_cpu():
    model = mlp(64)
    result = measure_latency([model, mlp(8)], torch.randn(4, 16),
                             LatencySettings(device="cuda", **FAST))
    assert all(ms > 0 for ms in result.eager_ms)
    assert next(model.parameters()).device.type == "cpu"


# --- report ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report():
    rows = [group_row(0, 64, 8), {"id": 1, "channels_before": 4, "channels_after": 4,
                                  "reason": "reaches the graph output"}]
    return build_report(mlp(64), mlp(8), torch.randn(4, 16),
                        latency=LatencySettings(**FAST), group_rows=rows,
                        notes=["fuse: conv 'conv1' output has 2 users"])


def test_report_measures_both_models(report):
    assert report.before.flops == 2 * 4 * (16 * 64 + 64 * 4)
    assert report.after.flops == 2 * 4 * (16 * 8 + 8 * 4)
    assert report.before.params > report.after.params
    assert report.before.bytes > report.after.bytes
    assert report.before.latency_ms > 0 and report.after.latency_ms > 0
    assert report.before.latency_compiled_ms is None
    ratios, reductions = report.ratios(), report.reductions()
    assert ratios["flops"] == pytest.approx(report.after.flops / report.before.flops)
    assert reductions["flops"] == pytest.approx(report.before.flops / report.after.flops)


def test_report_str_has_tables_and_convention(report):
    text = str(report)
    assert FLOPS_CONVENTION in text and "2 FLOPs per multiply-accumulate" in text
    header = next(line for line in text.splitlines() if line.startswith("metric"))
    for column in ("before", "after", "after/before", "reduction"):
        assert column in header
    assert any(set(line) <= {"-", " "} and "---" in line for line in text.splitlines())
    flops_line = next(line for line in text.splitlines() if line.startswith("FLOPs"))
    assert "8.00x" in flops_line and "0.125" in flops_line  # 10240 -> 1280 FLOPs
    assert "reaches the graph output" in text
    assert "fuse: conv 'conv1' output has 2 users" in text
    assert "0.125" in text  # kept ratio of group 0


def test_report_markdown_is_github_tables(report):
    md = report.to_markdown()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| metric"))
    assert header.count("|") == 6
    assert any(line.startswith("|---") for line in lines)
    assert "2 FLOPs per multiply-accumulate" in md
    assert "| group" in md


def test_report_dict_round_trips_through_json(report):
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["flops_convention"] == FLOPS_CONVENTION
    assert data["groups"][0]["kept_ratio"] == 0.125
    assert data["groups"][1]["group"] == 1
    again = Report.from_dict(json.loads(json.dumps(data)))
    assert again.to_dict() == data
    assert str(again) == str(report)


def test_missing_latency_renders_dash():
    report = Report(before=ModelStats(flops=100, params=10, bytes=400),
                    after=ModelStats(flops=0, params=5, bytes=200))
    text = str(report)
    latency_line = next(line for line in text.splitlines() if line.startswith("latency eager"))
    assert latency_line.split()[3:] == ["-", "-", "-", "-"]
    assert "latency compiled" not in text
    assert "not measured" in text
    data = report.to_dict()
    assert data["ratio"]["latency_ms"] is None
    assert data["reduction"]["flops"] is None  # 100 / 0 is undefined, not inf
    json.dumps(data, allow_nan=False)
    assert "| latency eager (ms) |" in report.to_markdown().replace("  ", " ").replace("  ", " ")


def test_report_with_compiled_latency_row():
    report = Report(before=ModelStats(1, 1, 1, 2.0, 1.0), after=ModelStats(1, 1, 1, 1.0, 0.5))
    line = next(x for x in str(report).splitlines() if x.startswith("latency compiled"))
    assert "2.00x" in line and "0.500" in line


def test_group_row_needs_channel_counts():
    with pytest.raises(ValueError, match="channels_after"):
        build_report(mlp(8), mlp(8), torch.randn(2, 16),
                     group_rows=[{"group": 0, "channels_before": 4}])
