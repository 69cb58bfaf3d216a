"""benchmarks/latency.py runs end to end on one model and writes the rows it prints; its
numbers are re-derived from what this run measured (the timings it took, FLOPs counted here
with torch's own FlopCounterMode), not from the committed results file."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode


def _flops(model, x) -> int:
    """FLOPs counted by torch itself, independently of fxprune.measure."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def test_resnet18_row_compares_at_equal_flops_and_reports_an_impossible_ignore(import_benchmark, tmp_path,
                                                                                   capsys, monkeypatch):
    latency = import_benchmark("latency")
    out = tmp_path / "latency.json"
    measured = []  # the timings this run takes, as measure_latency returns them
    measure = latency.measure_latency
    monkeypatch.setattr(latency, "measure_latency", lambda *a, **k: measured.append(measure(*a, **k)) or measured[-1])
    # keeping resnet18's stem and layer1 whole cannot reach Torch-Pruning's FLOPs:
    # the candidate is reported with compress's error, the others still run
    latency.main(["--models", "resnet18", "--repeats", "2", "--scopes", "default",
                  "--ignore", "conv1,layer1.*", "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert data["header"]["arguments"]["models"] == "resnet18" and data["header"]["threads"] == 2
    assert row["model"] == "resnet18" and "tp_error" not in row
    assert row["fx-default_flops_x"] == pytest.approx(row["tp_flops_x"], rel=0.02)
    for tool in ("tp", "tp+fuse", "fx-default"):
        assert row[f"{tool}_speedup"] > 0  # timed (how fast is the benchmark's business, not CI's)
        assert row[f"{tool}_quotient"] == pytest.approx(row[f"{tool}_speedup"] / row[f"{tool}_flops_x"],
                                                         abs=0.01)
    # the speedups, from the times measure_latency returned in this run (candidates in the
    # order run() builds them: dense, dense+fuse, tp, tp+fuse, fx-default)
    (times,) = measured
    dense, dense_fused, tp, _, fx = times.eager_ms
    assert row["dense_ms"] == pytest.approx(dense, abs=0.01) and row["tp_ms"] == pytest.approx(tp, abs=0.01)
    assert row["tp_speedup"] == pytest.approx(dense / tp, abs=0.01)
    assert row["fx-default_speedup"] == pytest.approx(dense_fused / fx, abs=0.01)
    # Torch-Pruning's FLOPs reduction, pruned again here and counted by torch's FlopCounterMode
    torch.manual_seed(0)
    model = latency.torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    pruned = latency.torch_pruning_half(model, x, 8).eval()
    assert row["tp_flops_x"] == pytest.approx(_flops(model, x) / _flops(pruned, x), abs=0.01)
    # at Torch-Pruning's FLOPs, the default (local) shares halve every group, as Torch-Pruning does
    assert row["fx-default_widths_as_tp"] is True
    assert "is impossible" in row["fx-default+ignore_error"]
    assert "fx-default+ignore_quotient" not in row
    assert f"{row['fx-default_quotient']:.2f}" in printed
    # the default plan's own table against Torch-Pruning with BN folded
    assert "fx-default against Torch-Pruning with BN folded" in printed
    assert format(round(row["fx-default_ms"] / row["tp+fuse_ms"], 3), "g") in printed  # as tabulate prints it
