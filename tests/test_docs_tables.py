"""The docs' benchmark tables are what benchmarks/make_docs.py builds from benchmarks/results/,
and the README stays a front door: at most 300 lines, its two top commands those of .ci/run."""
import re
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import make_docs  # noqa: E402
from _tables import TABLES, timm_summary, zoo_summary  # noqa: E402


def test_docs_tables_are_up_to_date(capsys):
    assert make_docs.main(["--check"]) == 0, capsys.readouterr().err


def test_every_table_is_in_the_docs_and_every_results_file_has_a_table():
    text = "".join(p.read_text(encoding="utf-8") for p in make_docs.doc_files())
    used = {m["name"] for m in make_docs.MARKER.finditer(text)}
    assert used == set(TABLES)
    files = {p.stem for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    assert files == {results for results, _ in TABLES.values()}


def test_a_stale_table_is_rewritten_and_an_unknown_one_is_refused(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("intro\n<!-- table:zoo_summary -->\n| old |\n<!-- /table -->\nend\n", encoding="utf-8")
    new = make_docs.regenerate(doc)
    assert "| old |" not in new and "80/80" in new
    assert new.startswith("intro\n<!-- table:zoo_summary -->\n") and new.endswith("<!-- /table -->\nend\n")
    assert "From `benchmarks/results/zoo_sweep.json`" in new  # docs pages name the run
    doc.write_text("<!-- table:nope -->\n<!-- /table -->\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="unknown table 'nope'"):
        make_docs.regenerate(doc)


def test_a_model_the_oracle_did_not_check_is_not_counted_as_passing_it():
    """A sweep row with no zero-invariant group passed on its shape only: the summaries count
    it apart (timm) or not at all (torchvision zoo), never as oracle-checked."""
    timm_rows = [{"model": "a", "fx_ok": True, "oracle": "ran", "oracle_error": 1e-7, "tp_ok": True},
                 {"model": "b", "fx_ok": True, "oracle": "no zero-invariant group", "oracle_error": None},
                 {"model": "c", "fx_ok": True, "oracle_error": None},  # a row written before the column
                 {"model": "d", "fx_ok": False, "oracle": "ran", "oracle_error": 0.5}]
    _, body = timm_summary(timm_rows)
    assert body[0][:2] == ["fxprune", "1/4"]
    assert body[1][:2] == ["fxprune, no zero-invariant group", "2/4"] and body[1][2].endswith(": b, c")
    assert body[2][:2] == ["Torch-Pruning 1.6", "1/4"]
    zoo_row = dict(groups=3, prunable=2, frozen=1, status="pass")
    zoo_rows = [{**zoo_row, "model": "a", "zero_invariant": 2, "oracle_error": 1e-6},
                {**zoo_row, "model": "b", "zero_invariant": 0, "oracle_error": 0.0}]
    _, (line,) = zoo_summary(zoo_rows)
    assert line[0] == "1/2" and line[3] == 2 and line[-1] == "1.0e-06"


def test_readme_fits_on_a_few_screens():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; move details to docs/"


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", text, re.DOTALL)


def _steps(command: str) -> list[list[str]]:
    return [shlex.split(step) for step in command.split("&&")]


def _quiet_dropped(tokens: list[str]) -> list[str]:
    return [t for t in tokens if t not in ("-q", "--quiet")]


def test_readme_top_commands_are_the_ones_ci_runs():
    ci = [shlex.split(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    ci_install = next(t for t in ci if t[:2] == ["pip", "install"])
    ci_tests = next(t for t in ci if t[:3] == ["python", "-m", "pytest"])
    demo, tests = _bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))[:2]
    for command in (demo, tests):
        venv, activate, *_ = _steps(command)
        assert venv[:3] == ["python3", "-m", "venv"] and activate == [".", f"{venv[3]}/bin/activate"]
    *_, install, run = _steps(tests)
    # the same install (CI only adds -q) and the same test command
    assert _quiet_dropped(install) == _quiet_dropped(ci_install)
    assert run == ci_tests
    *_, install, run = _steps(demo)
    assert _quiet_dropped(install) == [t.replace(".[test]", ".[examples]") for t in _quiet_dropped(ci_install)]
    assert run == ["fxprune", "demo"]
