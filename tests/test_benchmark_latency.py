"""benchmarks/latency.py runs end to end on one model and writes the rows it prints."""
import json

import pytest


def test_resnet18_row_compares_at_equal_flops_and_reports_an_impossible_ignore(import_benchmark, tmp_path,
                                                                                   capsys):
    latency = import_benchmark("latency")
    out = tmp_path / "latency.json"
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
    # absolute times: each speedup is its dense form's time over the pruned model's
    assert row["tp_speedup"] == pytest.approx(row["dense_ms"] / row["tp_ms"], abs=0.02)
    assert row["fx-default_speedup"] == pytest.approx(row["dense+fuse_ms"] / row["fx-default_ms"], abs=0.02)
    # at Torch-Pruning's FLOPs, the default (local) shares halve every group, as Torch-Pruning does
    assert row["fx-default_widths_as_tp"] is True
    assert "is impossible" in row["fx-default+ignore_error"]
    assert "fx-default+ignore_quotient" not in row
    assert f"{row['fx-default_quotient']:.2f}" in printed
    # the default plan's own table against Torch-Pruning with BN folded
    assert "fx-default against Torch-Pruning with BN folded" in printed
    assert format(round(row["fx-default_ms"] / row["tp+fuse_ms"], 3), "g") in printed  # as tabulate prints it
