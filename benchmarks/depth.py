"""Depth against width: latency quotients at half the FLOPs (issue 20).

For each model (torchvision, random weights, eval, 224x224) five plans meet the same
FLOPs target, everything else at the Spec's defaults:

* ``width``  -- ``units="channels"`` (today's default plan);
* ``width-latency`` -- ``units="channels"``, ``scope="latency"``: channels chosen by
  measured time (the best width plan before branches, docs/selection.md);
* ``depth``  -- ``units="branches"``: whole residual branches (``graph.branches``), ranked
  by ``branch_score`` (default ``output_norm``); lands as close as whole blocks allow;
* ``both``   -- ``units=["channels", "branches"]`` with ``scope="latency"``: one ranking
  by importance per *measured* millisecond saved (each branch and each channel group
  timed with the benchmark's threads, convs in channels_last with ``--compile``), timed
  end to end beside branches alone, the ``width-latency`` channel plan and the local
  channel plan, the fastest kept (docs/depth.md);
* ``tp``     -- Torch-Pruning's default magnitude pruner (``MetaPruner``,
  ``GroupMagnitudeImportance``, classifier kept, ``round_to`` 8), its ``pruning_ratio``
  searched until its FLOPs are within 2% of the target; BatchNorm folded afterwards.

The dense model and the five results are timed alternately in one process (``--batch``
1, ``--threads`` 2; ``--compile`` adds ``torch.compile``; ``--batch2 32`` times the same
plans again at batch 32, eager, so the ranking at both batch sizes can be compared).
Columns: the FLOPs kept, the speedup over the dense model (BatchNorm folded in both, as
``compress`` emits) and the quotient speedup x FLOPs kept (1.0: latency follows FLOPs;
above 1, faster than FLOPs say). The JSON is rewritten after each model, so an
interrupted run keeps the models it finished.

    python benchmarks/depth.py                                # resnet50, eager
    python benchmarks/depth.py --models resnet50,vit_b_16,convnext_tiny,mobilenet_v2,efficientnet_b0 \\
        --compile --batch2 32 --json                          # the docs' tables (about 15 min on 2 quiet cores)

Random weights make the scores of a trained model meaningless: the table is about
latency at equal FLOPs, not accuracy.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torchvision

import fxprune
from _results import add_json_option, header, write
from _tables import depth as depth_table, depth_batch as depth_batch_table, show
from fxprune.measure import LatencySettings, count_flops, measure_latency
from fxprune.passes.fuse import fuse

KINDS = {"width": {"units": "channels"}, "width-latency": {"units": "channels", "scope": "latency"},
         "depth": {"units": "branches"},
         "both": {"units": ["channels", "branches"], "scope": "latency"}}


def fused(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    return fuse(fxprune.trace(model), (x,)).gm  # BatchNorm folded, as compress emits its result


def torch_pruning(dense: torch.nn.Module, x: torch.Tensor, flops: float) -> tuple[torch.nn.Module, float]:
    """Torch-Pruning's default magnitude pruner at the ``pruning_ratio`` whose FLOPs come
    within 2% of ``flops`` (secant steps from FLOPs ~ (1 - ratio)^2); the model and its ratio."""
    import torch_pruning as tp

    total = count_flops(dense, (x,))

    def pruned(ratio: float):
        model = copy.deepcopy(dense)
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
                             ignored_layers=[head], round_to=8).step()
        return model, count_flops(model, (x,)) / total

    tried = []
    ratio = 1 - flops ** 0.5
    for _ in range(6):
        model, kept = pruned(ratio)
        tried.append((ratio, kept, model))
        if abs(kept - flops) <= 0.02 * flops:
            break
        if len(tried) == 1:
            ratio = min(0.9, max(0.01, ratio + (kept - flops) / 2))
        else:
            (r0, k0, _), (r1, k1, _) = tried[-2:]
            ratio = r1 + (k1 - flops) * (r1 - r0) / (k0 - k1) if k0 != k1 else r1 + 0.02
            ratio = min(0.9, max(0.01, ratio))
    ratio, kept, model = min(tried, key=lambda t: abs(t[1] - flops))
    return model.eval(), ratio


def run(name: str, flops: float, settings: LatencySettings, batch2: int | None) -> list[dict]:
    torch.manual_seed(0)
    dense = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    total = count_flops(dense, (x,))
    models, rows = {"dense": fused(dense, x)}, []
    latency = {"threads": settings.threads, "compile": settings.compile, "repeats": 10}
    for kind, spec in KINDS.items():
        try:
            result = fxprune.compress(dense, {"example_inputs": (x,), "target": {"flops": flops},
                                              "latency": latency, **spec})
        except fxprune.SpecError as exc:  # mobilenet_v2: every branch gone still keeps 0.521 of the FLOPs
            rows.append({"model": name, "units": kind, "error": str(exc).split(": ", 1)[1][:120]})
            print(f"{name} {kind}: {rows[-1]['error']}", file=sys.stderr, flush=True)
            continue
        models[kind] = result.model
        n = len(result.graph.groups)
        rows.append({"model": name, "units": kind, "flops_kept": round(count_flops(result.model, (x,)) / total, 3),
                     "branches_removed": sum(1 for gid in result.plan if gid >= n),
                     "branches": len(result.graph.branches),
                     "groups_cut": sum(1 for gid in result.plan if gid < n)})
        print(f"{name} {kind}: " + "; ".join(n for n in result.notes if "scope=latency" in n or "plan removes" in n),
              file=sys.stderr, flush=True)
    try:
        tp_model, ratio = torch_pruning(dense, x, flops)
        models["tp"] = fused(tp_model, x)
        rows.append({"model": name, "units": "tp", "flops_kept": round(count_flops(tp_model, (x,)) / total, 3),
                     "branches_removed": 0, "branches": rows[0]["branches"], "groups_cut": None,
                     "tp_ratio": round(ratio, 3)})
    except Exception as exc:  # noqa: BLE001 -- Torch-Pruning fails on some models: record it, keep going
        rows.append({"model": name, "units": "tp", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}"})
    timed = [r for r in rows if "error" not in r]
    times = measure_latency(list(models.values()), (x,), settings)
    _quotients(timed, dict(zip(models, times.eager_ms)), "")
    if times.compiled_ms:
        _quotients(timed, dict(zip(models, times.compiled_ms)), "compiled_")
    if batch2:
        big = LatencySettings(threads=settings.threads, repeats=max(3, settings.repeats // 4), warmup=1,
                              batch_size=batch2)
        _quotients(timed, dict(zip(models, measure_latency(list(models.values()), (x,), big).eager_ms)),
                   f"b{batch2}_")
    return rows


def _quotients(rows: list[dict], ms: dict[str, float], prefix: str) -> None:
    for row in rows:
        kind = row["units"]
        row[f"{prefix}ms"] = round(ms[kind], 2)
        row[f"{prefix}speedup"] = round(ms["dense"] / ms[kind], 2)
        row[f"{prefix}quotient"] = round(ms["dense"] / ms[kind] * row["flops_kept"], 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet50")
    parser.add_argument("--flops", type=float, default=0.5, help="fraction of the FLOPs to keep")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time under torch.compile")
    parser.add_argument("--batch2", type=int, default=None, help="also time the same plans at this batch (eager)")
    add_json_option(parser, "depth")
    args = parser.parse_args(argv)
    settings = LatencySettings(threads=args.threads, repeats=args.repeats, warmup=3, compile=args.compile)
    torch.set_num_threads(args.threads)
    rows, head = [], header(args)  # taken before any model: the commit the run started from
    for name in args.models.split(","):
        rows.extend(run(name, args.flops, settings, args.batch2))
        print(f"{name}: done", file=sys.stderr, flush=True)
        if args.json:
            write(args.json, rows, head)
    show(depth_table(rows))
    if args.batch2:
        print()
        show(depth_batch_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
