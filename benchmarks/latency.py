"""Does measured latency follow FLOPs? fxprune against Torch-Pruning, in one run.

For each model (random weights, batch 1, 224x224, CPU):
1. Torch-Pruning prunes 50% of the channels (``GroupMagnitudeImportance``,
   ``MetaPruner``), which gives its FLOPs fraction f.
2. fxprune compresses the same model to the same FLOPs fraction f, once per selection
   scope: ``fx-default`` leaves the selection to the Spec's defaults (what ``compress``
   gives a user who sets nothing; ``--round-to`` is then not passed), ``fx-global`` ranks channels across groups by score per FLOP (thin cheap early
   layers first), ``fx-local`` removes the same share of every group (uniform widths,
   like Torch-Pruning's default), ``fx-latency`` scales each group's share by its
   measured latency per FLOP (kernels timed compiled with ``--compile``, else eager).
3. The dense model and both pruned models are timed alternately in one process.
   ``fx-SCOPE_widths_as_tp`` says whether fxprune's model has every conv and linear
   weight shape of Torch-Pruning's (then the two differ in weights only).

Each tool is measured against its own dense baseline: Torch-Pruning's model is as its
pruner leaves it (eager), and fxprune's is what ``compress`` emits (BatchNorm folded).
``tp+fuse`` folds BN in Torch-Pruning's model too and is compared with the folded dense
model, like fxprune's.

After the full table, one small table per scope sets its latency next to
Torch-Pruning's with BN folded (``eager fx/TP`` <= 1: fxprune's plan is as fast or faster).

The table gives the FLOPs reduction, the latency speedup and their quotient
(speedup / FLOPs reduction; 1.0 means latency follows FLOPs). With ``--compile``, the
speedups under ``torch.compile`` are added.

    python benchmarks/latency.py                          # 8 models, about 20 min on 2 cores; 40 with --compile
    python benchmarks/latency.py --models resnet50 --compile --json latency.json
    python benchmarks/latency.py --compile --scopes default   # the default plan against Torch-Pruning
    python benchmarks/latency.py --compile --json          # writes benchmarks/results/latency.json
    python benchmarks/latency.py --models resnet50,resnet18 --compile --scopes local --ignore 'conv1,layer1.*'

``--ignore`` adds candidates compressed to the same FLOPs with those modules kept at
full width, so the FLOPs come out of the other layers (for resnets: keep the stem and
the 56x56 stage, whose thin convs run far below their FLOPs).
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torchvision
from tabulate import tabulate

import fxprune
from _results import add_json_option, header, write
from _tables import latency as latency_table
from _tables import show
from fxprune.measure import LatencySettings, count_flops, measure_latency
from fxprune.passes.fuse import fuse
from fxprune.progress import progress_bar

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "densenet121", "convnext_tiny",
          "regnet_x_400mf", "vit_b_16"]


def torch_pruning_half(model: torch.nn.Module, x: torch.Tensor, round_to: int | None) -> torch.nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=[head], round_to=round_to)
    pruner.step()
    return model


def weight_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Conv and linear weight shapes by module name (fxprune's models keep the names)."""
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))}


def fused(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    return fuse(fxprune.trace(model), (x,)).gm


def run(name: str, settings: LatencySettings, round_to: int | None, scopes: list[str],
        ignore: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    dense = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    flops = count_flops(dense, (x,))
    row = {"model": name}
    try:
        tp_model = torch_pruning_half(dense, x, round_to).eval()
        f_tp = count_flops(tp_model, (x,)) / flops
    except Exception as exc:  # Torch-Pruning fails on some models: record it, keep going
        tp_model, f_tp = None, 0.5
        row["tp_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    candidates = {"dense": dense, "dense+fuse": fused(dense, x)}
    fractions = {}
    if tp_model is not None:
        candidates.update({"tp": tp_model, "tp+fuse": fused(tp_model, x)})
        fractions.update({"tp": f_tp, "tp+fuse": f_tp})
    for scope in scopes:
        # scope="latency" times kernels the way the model will run: compiled with --compile
        spec = {"example_inputs": (x,), "target": {"flops": f_tp},
                "latency": {"threads": settings.threads, "compile": settings.compile}}
        if scope != "default":  # "default": the Spec's own selection defaults, what users get
            spec.update({"round_to": round_to or 1, "scope": scope})
        variants = {f"fx-{scope}": spec}
        if ignore:  # the same FLOPs taken from the layers not ignored
            variants[f"fx-{scope}+ignore"] = {**spec, "ignore": ignore}
        for tool, variant in variants.items():
            try:
                candidates[tool] = fxprune.compress(dense, variant).model
            except fxprune.SpecError as exc:  # e.g. a target round_to makes unreachable: say so
                row[f"{tool}_error"] = str(exc).splitlines()[0][:160]
                continue
            fractions[tool] = count_flops(candidates[tool], (x,)) / flops
            if tp_model is not None:  # same widths: any time difference is timing noise
                row[f"{tool}_widths_as_tp"] = weight_shapes(candidates[tool]) == weight_shapes(tp_model)
    times = measure_latency(list(candidates.values()), (x,), settings)
    eager = dict(zip(candidates, times.eager_ms))
    compiled = dict(zip(candidates, times.compiled_ms)) if times.compiled_ms else {}
    row.update({"dense_ms": round(eager["dense"], 2), "dense+fuse_ms": round(eager["dense+fuse"], 2)})
    if compiled:
        row.update({"dense_compiled_ms": round(compiled["dense"], 2),
                    "dense+fuse_compiled_ms": round(compiled["dense+fuse"], 2)})
    for tool, frac in fractions.items():
        base = "dense" if tool == "tp" else "dense+fuse"  # each against a dense model in its own form
        speedup = eager[base] / eager[tool]
        row[f"{tool}_flops_x"] = round(1 / frac, 2)
        row[f"{tool}_speedup"] = round(speedup, 2)
        row[f"{tool}_quotient"] = round(speedup * frac, 2)
        row[f"{tool}_ms"] = round(eager[tool], 2)  # absolute: compares the pruned models directly
        if compiled:
            row[f"{tool}_compiled_quotient"] = round(compiled[base] / compiled[tool] * frac, 2)
            row[f"{tool}_compiled_ms"] = round(compiled[tool], 2)
    return row


def against_tp(rows: list[dict], tool: str) -> list[dict]:
    """Per model: ``tool``'s latency next to Torch-Pruning's with BN folded (both against
    the folded dense model), and their quotient; below 1.0 the fxprune plan is faster."""
    table = []
    for row in rows:
        if f"{tool}_ms" not in row or "tp+fuse_ms" not in row:
            continue
        line = {"model": row["model"], "FLOPs x": row[f"{tool}_flops_x"], "TP FLOPs x": row["tp+fuse_flops_x"],
                "eager ms": row[f"{tool}_ms"], "TP eager ms": row["tp+fuse_ms"],
                "eager fx/TP": round(row[f"{tool}_ms"] / row["tp+fuse_ms"], 3)}
        if f"{tool}_compiled_ms" in row:
            line.update({"compiled ms": row[f"{tool}_compiled_ms"], "TP compiled ms": row["tp+fuse_compiled_ms"],
                         "compiled fx/TP": round(row[f"{tool}_compiled_ms"] / row["tp+fuse_compiled_ms"], 3)})
        table.append(line)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--round-to", type=int, default=8, help="channel multiple for both tools (0: none)")
    parser.add_argument("--compile", action="store_true", help="also time under torch.compile")
    parser.add_argument("--scopes", default="default,global,latency",
                        help="fxprune selection scopes to compare: default (the Spec's defaults, what "
                             "compress does unless told otherwise), local, latency, global")
    parser.add_argument("--ignore", default="",
                        help="also compress with these module patterns kept whole (comma list, "
                             "e.g. 'conv1,layer1.*' for resnets): candidates fx-SCOPE+ignore")
    add_json_option(parser, "latency")
    args = parser.parse_args(argv)
    settings = LatencySettings(threads=args.threads, repeats=args.repeats, warmup=5, compile=args.compile)
    torch.set_num_threads(args.threads)
    rows = []
    scopes = args.scopes.split(",")
    for name in progress_bar(args.models.split(","), "models"):
        rows.append(run(name, settings, args.round_to or None, scopes,
                        [p for p in args.ignore.split(",") if p]))
        print(f"{name}: done", file=sys.stderr, flush=True)
    show(latency_table(rows))
    for scope in scopes:
        table = against_tp(rows, f"fx-{scope}")
        if table:
            print(f"\nfx-{scope} against Torch-Pruning with BN folded (tp+fuse), at equal FLOPs:")
            print(tabulate(table, headers="keys", tablefmt="github"))
    if args.json:
        write(args.json, rows, header(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
