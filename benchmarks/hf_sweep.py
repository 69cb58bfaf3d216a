"""transformers' architectures through fxprune and Torch-Pruning, in the same run: one row per model.

Every architecture of transformers' auto mappings (causal LMs, masked-LM encoders, image
classifiers, CTC and audio-classification speech encoders), built from its own config
class shrunk generically (``tests/hf_zoo.py``: two layers, width 64, four heads, MLP
width 96, four experts; random unit-scale weights, nothing downloaded). Per model, in a
forked process with a time limit (a hang or a crash is a row): the front end
``capture="auto"`` chose; the zero-invariance oracle on half of every MLP-neuron group,
of every head group and one expert of every routed layer; ``emit="module"`` of the neuron
plan with a ``save_pretrained`` / ``from_pretrained`` round trip; the ops that froze a
group for want of a rule. Then Torch-Pruning's MetaPruner (L1, 50% per layer, output
layers kept) on a fresh copy, in its own forked process: it counts when it runs, keeps
the output shapes and removes over 5% of the parameters (it has no oracle).

    python benchmarks/hf_sweep.py --json                          # every architecture
    python benchmarks/hf_sweep.py --families llama,mixtral,bert --no-tp
    python benchmarks/hf_sweep.py --kinds causal --limit 40 --json
    python benchmarks/hf_sweep.py --merge a.json,b.json --json     # parallel parts into one file
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from importlib import metadata

import torch

from _results import add_json_option, header, load, write
from _tables import hf_sweep as sweep_table
from _tables import hf_summary, show

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from forked import call_forked  # noqa: E402
from hf_zoo import architectures, check_model, torch_pruning_worker  # noqa: E402

KINDS = ("causal", "encoder", "vision", "speech")


def _fx_worker(model_type: str, conn) -> None:
    torch.set_num_threads(1)
    conn.send(check_model(model_type))


def sweep_row(model_type: str, timeout: float, tp_timeout: float | None) -> dict:
    """fxprune's row (in a forked process) and, unless ``tp_timeout`` is None, Torch-Pruning's."""
    kind, name = architectures()[model_type]
    start = time.perf_counter()
    row, why = call_forked(_fx_worker, (model_type,), timeout)
    if row is None:
        row = {"model": model_type, "kind": kind, "class": name, "stage": "crash", "why": why, "mlp_ok": False}
    row["seconds"] = round(time.perf_counter() - start, 1)
    if tp_timeout is not None:
        tp, why = call_forked(torch_pruning_worker, (model_type,), tp_timeout)
        row.update(tp if tp is not None else {"tp_ok": False, "tp_why": why})
    return row


def merge(args: argparse.Namespace, known: dict) -> int:
    """Rows of several partial runs in one file, in the mappings' order; the header lists the parts'."""
    paths = args.merge.split(",")
    parts = [load(path) for path in paths]
    args.merge = ",".join(os.path.basename(p) for p in paths)  # the header names files, not this machine's paths
    rows: dict[str, dict] = {}
    for r in (r for part in parts for r in part["rows"]):  # a later part's row replaces an earlier one,
        earlier = rows.get(r["model"], {})                 # but a --no-tp rerun keeps Torch-Pruning's columns
        kept = {} if any(k.startswith("tp_") for k in r) else {k: v for k, v in earlier.items() if k.startswith("tp_")}
        rows[r["model"]] = {**r, **kept}
    order = list(known)
    merged = sorted(rows.values(), key=lambda r: order.index(r["model"]) if r["model"] in known else len(order))
    left_out = [t for t in known if t not in rows]
    head = header(args, transformers=metadata.version("transformers"), left_out=left_out,
                  parts=[{k: p["header"][k] for k in ("git_commit", "arguments", "date")} for p in parts])
    if args.json:
        write(args.json, merged, head)
    show(hf_summary(merged))
    print(f"{len(merged)} architectures, {len(left_out)} left out (not run)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", help="comma-separated model types (default: every one of --kinds)")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {KINDS}")
    parser.add_argument("--limit", type=int, help="the first N architectures only")
    parser.add_argument("--no-tp", action="store_true", help="leave Torch-Pruning out")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds fxprune gets per model")
    parser.add_argument("--tp-timeout", type=float, default=120.0, help="seconds Torch-Pruning gets per model")
    parser.add_argument("--update", action="store_true",
                        help="with --json: replace only these models' rows in the results file")
    parser.add_argument("--merge", help="comma-separated results files of parts run in parallel: write their "
                                        "rows (a later file's row replaces an earlier one's) to --json")
    add_json_option(parser, "hf_sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    known = architectures()
    if args.merge:
        return merge(args, known)
    kinds = args.kinds.split(",")
    names = args.families.split(",") if args.families else [t for k in kinds for t, (kk, _) in known.items() if kk == k]
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown model types {unknown}")
    names = names[:args.limit] if args.limit else names
    head = header(args, transformers=metadata.version("transformers"))
    earlier = load(args.json)["rows"] if args.update and args.json and os.path.exists(args.json) else []
    rows: list[dict] = []
    for name in names:
        rows.append(sweep_row(name, args.timeout, None if args.no_tp else args.tp_timeout))
        r = rows[-1]
        print(f"{name}: {r['stage']} {r.get('front_end', '')} mlp={r.get('mlp_ok')} module={r.get('module', '')} "
              f"tp={r.get('tp_ok')} {r.get('why', '')} {r.get('tp_why', '')} ({r['seconds']} s)", flush=True)
        if args.json:  # rewritten as it goes so a long sweep leaves partial results
            fresh = {x["model"] for x in rows}
            write(args.json, [x for x in earlier if x["model"] not in fresh] + rows, head)
    show(sweep_table(rows))
    show(hf_summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
