"""Depth against width: latency quotients at the same FLOPs target (issue 20, first cut).

For each model (torchvision, random weights, eval, 224x224) ``compress`` meets a FLOPs
target three ways, with everything else at the Spec's defaults:

* ``width``  -- ``units="channels"`` (today's default plan);
* ``depth``  -- ``units="branches"``: whole residual branches (``graph.branches``), ranked
  by ``branch_score`` (default ``output_norm``); lands as close as whole blocks allow;
* ``both``   -- ``units=["channels", "branches"]``: one ranking (docs/depth.md).

The dense model and the three results are timed alternately in one process (eager,
``--batch`` 1, ``--threads`` 2; ``--compile`` adds ``torch.compile``). Columns: the FLOPs
kept, the speedup over the dense model (BatchNorm folded in both, as ``compress``
emits) and the quotient speedup x FLOPs kept (1.0: latency follows FLOPs; above 1,
faster than FLOPs say).

    python benchmarks/depth.py                                # resnet50 at half the FLOPs
    python benchmarks/depth.py --models resnet50,convnext_tiny --flops 0.5 --compile --json depth.json

Random weights make the branch scores of a trained model meaningless: the table is about
latency at equal FLOPs, not accuracy.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torchvision

import fxprune
from _results import add_json_option, header, write
from _tables import depth as depth_table, show
from fxprune.measure import LatencySettings, count_flops, measure_latency
from fxprune.passes.fuse import fuse

KINDS = {"width": "channels", "depth": "branches", "both": ["channels", "branches"]}


def run(name: str, flops: float, settings: LatencySettings) -> list[dict]:
    torch.manual_seed(0)
    dense = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(settings.batch_size or 1, 3, 224, 224)
    base = fuse(fxprune.trace(dense), (x,)).gm  # BatchNorm folded, as compress emits its result
    total = count_flops(dense, (x,))
    models, rows = {"dense": base}, []
    for kind, units in KINDS.items():
        result = fxprune.compress(dense, {"example_inputs": (x,), "target": {"flops": flops}, "units": units})
        models[kind] = result.model
        n = len(result.graph.groups)
        rows.append({"model": name, "units": kind, "flops_kept": round(count_flops(result.model, (x,)) / total, 3),
                     "branches_removed": sum(1 for gid in result.plan if gid >= n),
                     "branches": len(result.graph.branches),
                     "groups_cut": sum(1 for gid in result.plan if gid < n)})
    times = measure_latency(list(models.values()), (x,), settings)
    eager = dict(zip(models, times.eager_ms))
    compiled = dict(zip(models, times.compiled_ms)) if times.compiled_ms else {}
    for row in rows:
        kind = row["units"]
        row["ms"] = round(eager[kind], 2)
        row["speedup"] = round(eager["dense"] / eager[kind], 2)
        row["quotient"] = round(row["speedup"] * row["flops_kept"], 2)
        if compiled:
            row["compiled_ms"] = round(compiled[kind], 2)
            row["compiled_quotient"] = round(compiled["dense"] / compiled[kind] * row["flops_kept"], 2)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--flops", type=float, default=0.5, help="fraction of the FLOPs to keep")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time under torch.compile")
    add_json_option(parser, "depth")
    args = parser.parse_args(argv)
    settings = LatencySettings(threads=args.threads, repeats=args.repeats, warmup=3, compile=args.compile,
                               batch_size=args.batch)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows.extend(run(name, args.flops, settings))
        print(f"{name}: done", file=sys.stderr, flush=True)
    show(depth_table(rows))
    if args.json:
        write(args.json, rows, header(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
