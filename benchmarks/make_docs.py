"""Regenerate the benchmark tables in README.md and docs/*.md from benchmarks/results/*.json.

A table lives between two marker comments; the text between them is replaced:

    <!-- table:latency -->
    (generated)
    <!-- /table -->

The names are the keys of ``_tables.TABLES``; each names its results file
(``benchmarks/results/NAME.json``) and the function that builds the table. Tables in
docs/ end with a line naming the run (commit, versions, CPU, threads, date).

    python benchmarks/make_docs.py            # rewrite the tables
    python benchmarks/make_docs.py --check    # exit 1 and list the tables that are out of date
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import REPO, default_path, load  # noqa: E402
from _tables import TABLES  # noqa: E402

MARKER = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.DOTALL)


def doc_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def source_line(name: str, head: dict, earlier: dict | None = None) -> str:
    """Which run a table comes from, in one line; fields the file does not know are named, not shown."""
    known = {k: str(v) for k, v in head.items() if not str(v).startswith("unknown")}
    commit = known.get("git_commit", str(head["git_commit"]))  # an unknown commit says where the rows came from
    commit = commit[:10] + commit[40:] if re.match(r"[0-9a-f]{40}", commit) else commit
    parts = [f"commit {commit}"]
    parts += [f"{label} {known[k]}" for k, label in (("python", "Python"), ("torch", "torch"),
              ("torchvision", "torchvision"), ("torch_pruning", "Torch-Pruning"), ("cpu", "CPU"),
              ("gpu", "GPU"), ("threads", "threads:"), ("date", "date")) if k in known]
    missing = [k for k in ("python", "torch", "torchvision", "torch_pruning", "cpu", "threads", "date")
               if k not in known]
    if missing:
        parts.append(f"not recorded: {', '.join(missing)}")
    if earlier:  # a partial rerun (``--update``) kept the other rows of an earlier run
        parts.append(f"{len(earlier['models'])} rows kept from commit {str(earlier['git_commit'])[:10]} "
                     f"({earlier.get('date') or 'date not recorded'})")
    return f"<sub>From `benchmarks/results/{name}.json`: {'; '.join(parts)}.</sub>\n"


def render(table: str, brief: bool) -> str:
    """The markdown of table ``table``; ``brief`` leaves out the line naming the run."""
    if table not in TABLES:
        raise SystemExit(f"make_docs: unknown table {table!r} in a marker; known: {', '.join(TABLES)}")
    results, build = TABLES[table]
    path = default_path(results)
    if not path.is_file():
        raise SystemExit(f"make_docs: {path.relative_to(REPO)} is missing; run "
                         f"`python benchmarks/{results}.py --json` to write it")
    data = load(path)
    head, body = build(data["rows"])
    text = tabulate([[str(c) for c in line] for line in body], headers=head, tablefmt="github",
                    disable_numparse=True) + "\n"
    return text if brief else text + "\n" + source_line(results, data["header"], data.get("earlier_rows"))


def regenerate(path: Path) -> str:
    """``path``'s text with every marked table rebuilt."""
    brief = path.name == "README.md"  # the front door shows the tables only
    return MARKER.sub(lambda m: m[1] + render(m["name"], brief) + m[4], path.read_text(encoding="utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    stale = []
    for path in doc_files():
        old = path.read_text(encoding="utf-8")
        new = regenerate(path)
        if new != old:
            stale.append(path.relative_to(REPO).as_posix())
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run `python benchmarks/make_docs.py`", file=sys.stderr)
        return 1
    print(("rewrote " + ", ".join(stale)) if stale else "all tables are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
