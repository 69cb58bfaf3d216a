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
    assert data["lam"]["targeted GL"] == digits.LAM["targeted GL"]
    for row in data["table"]:
        assert row["method"] in printed and row["acc % (mean ± std)"] in printed
