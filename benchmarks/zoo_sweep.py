"""The whole torchvision classification zoo through fxprune: one row per model.

For every model of ``torchvision.models.list_models(module=torchvision.models)``
(random weights, eval mode): analyze, prune ~50% of every prunable group (the output
shape must hold), prune ~50% of every zero-invariant group and compare with the
zeroed original (the oracle); a model passes only when the oracle ran on it. Prints groups, frozen groups and why, the oracle error
and the time taken; ``--json [FILE]`` writes the same rows (by default to
benchmarks/results/zoo_sweep.json), rewritten after every model.

    python benchmarks/zoo_sweep.py --json             # all 80 models (about an hour on 2 cores)
    python benchmarks/zoo_sweep.py --models resnet18,vit_b_16
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch
from tabulate import tabulate

from fxprune.progress import progress_bar

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from zoo import ALL_MODELS, check_model  # noqa: E402

from _results import add_json_option, header, load, write  # noqa: E402
from _tables import NO_ORACLE, zoo_oracle  # noqa: E402
from _tables import zoo_sweep as zoo_table  # noqa: E402


def _write(args, rows: list[dict], head: dict) -> None:
    if not args.update:
        write(args.json, rows, head)
        return
    earlier = load(args.json)
    fresh = {r["model"]: r for r in rows}
    kept = [r for r in earlier["rows"] if r["model"] not in fresh]
    merged = sorted(kept + rows, key=lambda r: r["model"])
    write(args.json, merged, head, earlier_rows={
        "models": [r["model"] for r in kept], "git_commit": earlier["header"]["git_commit"],
        "date": earlier["header"].get("date")})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated names (default: all 80)")
    add_json_option(parser, "zoo_sweep")
    parser.add_argument("--update", action="store_true",
                        help="with --json and --models: replace only these models' rows in the results "
                             "file; the others stay, and the header says which run they come from")
    args = parser.parse_args(argv)
    if args.update and not (args.json and args.models):
        parser.error("--update needs --json and --models (the rows to replace)")
    torch.set_num_threads(2)
    head = header(args)
    names = args.models.split(",") if args.models else sorted(ALL_MODELS)
    rows = []
    for name in progress_bar(names, "models"):
        try:
            row = check_model(name)
            # a pass is a model the oracle checked; without a zero-invariant group it had nothing to check
            row["status"] = "pass" if zoo_oracle(row) == "ran" else f"shape only ({NO_ORACLE})"
        except Exception as exc:  # a failure is a row, not the end of the sweep
            row = {"model": name, "status": f"FAIL {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
            traceback.print_exc()
        rows.append(row)
        print(f"{name}: {row['status']} ({row.get('seconds', '-')} s)", flush=True)
        if args.json:  # rewrite as it goes so a long sweep leaves partial results
            _write(args, rows, head)
    table_head, body = zoo_table(rows)
    print(tabulate(body, headers=table_head, tablefmt="github", disable_numparse=True))
    passed = sum(r["status"] == "pass" for r in rows)
    print(f"\n{passed}/{len(rows)} models pass (the oracle ran and held)")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
