"""benchmarks/_results.py: every results file has the standard header and no path of this machine."""
import argparse
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _results  # noqa: E402

SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")
                 and p.stem != "make_docs")


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "results").glob("*.json")), ids=lambda p: p.name)
def test_results_files_have_the_header_and_no_absolute_paths(path):
    data = _results.load(path)
    assert data["rows"] and all(isinstance(r, dict) for r in data["rows"])
    text = path.read_text(encoding="utf-8")
    assert str(ROOT) not in text and not re.search(r'"(/work|/tmp|/home|/root|/Users)/', text)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_writes_its_default_results_file(script):
    source = (ROOT / "benchmarks" / f"{script}.py").read_text(encoding="utf-8")
    assert f'add_json_option(parser, "{script}")' in source or f'add_json_option(ap, "{script}")' in source
    assert "write(args.json" in source
    assert _results.default_path(script).is_file(), f"run `python benchmarks/{script}.py --json`"


def test_header_records_the_run_and_paths_stay_relative(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18")
    _results.add_json_option(parser, "latency")
    args = parser.parse_args(["--json", str(tmp_path / "out.json")])
    head = _results.header(args, threads=3, gpu="none")
    assert set(_results.HEADER_KEYS) <= set(head) and head["gpu"] == "none" and head["threads"] == 3
    assert head["arguments"] == {"models": "resnet18", "json": "out.json"}  # outside the repo: the name only
    assert re.fullmatch(r"[0-9a-f]{40}( \(with uncommitted changes\))?|unknown.*", head["git_commit"])
    _results.write(args.json, [{"model": "resnet18", "ms": 1.0}], head, extra=[str(_results.REPO / "x")])
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["rows"] == [{"model": "resnet18", "ms": 1.0}] and data["extra"] == ["x"]
    assert parser.parse_args(["--json"]).json == str(_results.default_path("latency"))


def test_a_file_without_the_header_is_refused(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps([{"model": "m"}]))
    with pytest.raises(ValueError, match="expected .'header'"):
        _results.load(old)
    old.write_text(json.dumps({"header": {"date": "x"}, "rows": []}))
    with pytest.raises(ValueError, match="header lacks git_commit"):
        _results.load(old)
