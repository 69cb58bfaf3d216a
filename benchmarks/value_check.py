"""What the value check of every prune costs: prune time with ``verify="shapes"`` and
with ``verify="values"`` (the default) on torchvision models, random weights, batch 1.

Each model: analyze once, then a plan of half of every zero-invariant group, pruned
``--repeats`` times each way (median seconds). The value check adds two forward passes
(the analysed graph with the plan masked, and the pruned graph) to a prune that already
re-propagates shapes once.

    python benchmarks/value_check.py --json          # the default models (a few minutes on 2 cores)
    python benchmarks/value_check.py --models resnet18 --repeats 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torchvision

import fxprune

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import half_plan, randomize  # noqa: E402

from _results import add_json_option, header, write  # noqa: E402
from _tables import show, value_check  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "convnext_tiny", "vit_b_16", "densenet121")


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, repeats: int) -> dict:
    """One row: analysis and prune times, shapes only and with values, and the error found."""
    model = randomize(torchvision.models.get_model(name, weights=None).eval())
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    graph = fxprune.analyze(model, x)
    analyze_s = time.perf_counter() - start
    plan = half_plan(graph, [g for g in graph.prunable_groups if g.zero_invariant])
    shapes = _median_seconds(lambda: fxprune.prune(graph, plan, verify="shapes"), repeats)
    values = _median_seconds(lambda: fxprune.prune(graph, plan), repeats)
    check = fxprune.prune(graph, plan).meta["fxprune.value_check"]["error"]
    return {"model": name, "analyze_s": round(analyze_s, 3), "prune_shapes_s": round(shapes, 3),
            "prune_values_s": round(values, 3), "overhead": round(values / shapes, 2),
            "error": float(f"{check:.2g}")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated torchvision names")
    parser.add_argument("--repeats", type=int, default=3, help="prunes per mode; the median is kept")
    add_json_option(parser, "value_check")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    rows = [measure(name, args.repeats) for name in args.models.split(",")]
    show(value_check(rows))
    if args.json:
        write(args.json, rows, header(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
