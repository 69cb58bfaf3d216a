"""benchmarks/digits.py runs end to end on a tiny budget and writes the rows it prints."""
import json

import pytest


def test_smoke_run_writes_every_method_and_target(import_benchmark, tmp_path, capsys):
    digits = import_benchmark("digits")
    out = tmp_path / "digits.json"
    digits.main(["--seeds", "1", "--methods", "tgl,tpmag", "--epochs", "1", "--finetune", "1",
                 "--speedups", "4", "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    rows = {(r["method"], r["speedup"]): r for r in data["rows"]}
    # TP magnitude needs the dense model, which is added; targeted GL has no unpruned row
    assert set(rows) == {("dense", 1), ("TP magnitude", 1), ("TP magnitude", 4),
                         ("targeted GL", 4)}
    base = rows[("dense", 1)]["flops"]
    assert rows[("targeted GL", 4)]["flops"] == pytest.approx(base / 4, rel=0.02)
    assert rows[("TP magnitude", 4)]["flops"] == pytest.approx(base / 4, rel=0.1)
    assert data["header"]["lam"]["targeted GL"] == digits.LAM["targeted GL"]
    for row in digits.digits_summary(data["rows"]):  # the printed table, rebuilt from the rows
        assert row["method"] in printed and row["acc % (mean ± std)"] in printed


def test_capacity_smoke_run_trains_the_widths_it_is_given(import_benchmark, tmp_path, capsys):
    capacity = import_benchmark("digits_capacity")
    out = tmp_path / "capacity.json"
    capacity.main(["--widths", "8/8/16/16,4/4/8/8", "--seeds", "1", "--epochs", "1", "--finetune", "1",
                   "--json", str(out)])
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    uniform, quarter = data["rows"]
    assert [uniform["widths"], quarter["widths"]] == ["8/8/16/16", "4/4/8/8"]
    assert uniform["flops_x"] == 15.6  # what uniform pruning keeps at 16x
    assert quarter["flops_x"] > 50 and quarter["params"] < uniform["params"]
    assert all(0 <= r["acc"] <= 100 for r in data["rows"])
    assert "8/8/16/16" in printed and f"{uniform['acc']:.2f} ± 0.00" in printed


def test_capacity_rejects_malformed_widths(import_benchmark):
    capacity = import_benchmark("digits_capacity")
    with pytest.raises(Exception, match="four positive ints"):
        capacity.parse("8/8/16")


def test_sparse_smoke_run_writes_every_method(import_benchmark, tmp_path, capsys):
    sparse = import_benchmark("digits_sparse")
    out = tmp_path / "sparse.json"
    sparse.main(["--seeds", "1", "--epochs", "1", "--json", str(out)])
    printed = capsys.readouterr().out
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == list(sparse.METHODS)
    # ERK leaves the stem dense: over the layers SRigL masks, more than 1 - density is zero
    assert rows["SRigL 90%"]["sparsity"] > 0.9 and rows["SRigL 97%"]["sparsity"] > 0.965
    assert rows["Spartan 3:32"]["sparsity"] == pytest.approx(1 - 3 / 32, abs=1e-3)
    assert rows["dense"]["nonzero_flops"] == rows["dense"]["flops"]
    for method, row in rows.items():  # the ablated neurons' FLOPs are gone from the model counted
        assert row["flops"] <= rows["dense"]["flops"] and (row["flops"] < rows["dense"]["flops"]) == (row["removed"] > 0)
        assert method in printed


def test_sparse_rejects_an_unknown_method(import_benchmark):
    sparse = import_benchmark("digits_sparse")
    with pytest.raises(SystemExit):
        sparse.main(["--methods", "RigL"])
