"""Analysis and prune time of fxprune vs Torch-Pruning (DepGraph) as graphs grow.

Measures, for residual MLP stacks of growing depth and a few torchvision models:

* fx nodes     -- nodes in fxprune's traced graph;
* fxprune      -- ``fxprune.analyze`` time, and ``feasible_plan`` + ``prune`` time for
                  removing ~50% of every prunable group;
* Torch-Pruning -- ``DependencyGraph().build_dependency`` time, and ``pruner.step()`` time of a
                  ``MetaPruner`` (GroupMagnitudeImportance, pruning_ratio=0.5, final layer
                  ignored; the pruner's own graph build is not counted);
* TP/fxprune   -- ratio of the two analysis times;
* front ends   -- capture and analysis seconds of torch.fx and torch.export on the same
                  torchvision models, and of torch.export on tiny Hugging Face models.

Every tool gets its own fresh deepcopy of the model. Times are the best of ``--repeats``
runs (time.perf_counter); 1,600 blocks and the torchvision models run once. A Torch-Pruning
error is recorded in its row. The table gives fxprune's analysis time per node (flat if
analysis is linear); under it, both tools' growth exponents between the two largest sizes.

    python benchmarks/analysis_scaling.py                          # everything (minutes)
    python benchmarks/analysis_scaling.py --blocks 25,100 --models resnet50 --skip-tp
    python benchmarks/analysis_scaling.py --json      # writes benchmarks/results/analysis_scaling.json
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
from torch import nn

import fxprune
from _results import add_json_option, header, write
from _tables import analysis_front_ends as front_end_table
from _tables import analysis_scaling as scaling_table
from _tables import show
from fxprune.progress import progress_bar

C = 64


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.ReLU(), nn.Linear(2 * c, c))

    def forward(self, x):
        return x + self.body(x)


class ResidualMLP(nn.Module):
    def __init__(self, blocks: int, c: int = C):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(c) for _ in range(blocks)])
        self.head = nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.blocks(x))


def mlp_case(blocks: int):
    return f"mlp-{blocks}", ResidualMLP(blocks), torch.randn(8, C), (lambda m: m.head)


def torchvision_case(name: str):
    import torchvision.models as tvm
    model = getattr(tvm, name)(weights=None)
    final = {"resnet50": lambda m: m.fc, "densenet121": lambda m: m.classifier,
             "vit_b_16": lambda m: m.heads.head}[name]
    return name, model, torch.randn(1, 3, 224, 224), final


def best_of(repeats: int, fn):
    """Best wall time of ``fn()`` over ``repeats`` runs, and the last result."""
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_fxprune(model, x, repeats):
    # deepcopy is outside the timing: copy first, then time analyze alone
    times, graph = [], None
    for _ in range(repeats):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        graph = fxprune.analyze(m, x)
        times.append(time.perf_counter() - t0)
    groups = [g for g in graph.groups if g.prunable]
    cands = [(g.id, u) for g in groups for u in range(g.size)]
    limit = {g.id: g.size // 2 for g in groups}

    def prune():
        return fxprune.prune(graph, fxprune.feasible_plan(graph, cands, limit))
    t_prune, small = best_of(repeats, prune)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    return len(graph.gm.graph.nodes), min(times), t_prune


def run_tp(model, x, final, repeats):
    import torch_pruning as tp
    build, step = [], []
    for _ in range(repeats):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        tp.DependencyGraph().build_dependency(m, example_inputs=x)
        build.append(time.perf_counter() - t0)
    for _ in range(repeats):
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(m, x, importance=tp.importance.GroupMagnitudeImportance(),
                                      pruning_ratio=0.5, ignored_layers=[final(m)])
        t0 = time.perf_counter()
        pruner.step()
        step.append(time.perf_counter() - t0)
    return min(build), min(step)


def front_end_rows(models: list[str]) -> list[dict]:
    """Capture and analysis seconds of each front end on the same model: torchvision models
    through fx and export, the tiny Hugging Face models (tests/hf_models.py) through export."""
    import os
    import sys

    from fxprune.capture import capture
    from fxprune.channels.analysis import run_rules
    from fxprune.channels.graph import build_groups

    cases = [(name, model, (x,), ("fx", "export")) for name, model, x, _ in map(torchvision_case, models)]
    try:
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from hf_models import tiny_models
        cases += [(f"hf-{name}", model, inputs, ("export",)) for name, (model, inputs, _) in tiny_models().items()]
    except ImportError:  # transformers is an optional extra
        pass
    rows = []
    for name, model, inputs, front_ends in cases:
        model.eval()
        for front_end in front_ends:
            t0 = time.perf_counter()
            captured = capture(model, inputs, capture=front_end)
            t1 = time.perf_counter()
            graph = build_groups(run_rules(captured.gm), captured.inputs, captured.front_end)
            rows.append({"section": "front_end", "model": name, "front_end": front_end,
                         "nodes": len(captured.gm.graph.nodes), "capture_s": t1 - t0,
                         "analysis_s": time.perf_counter() - t1, "prunable": len(graph.prunable_groups)})
    return rows


def error_text(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", default="25,100,400,1600", help="MLP depths, comma-separated ('' for none)")
    ap.add_argument("--models", default="resnet50,densenet121,vit_b_16",
                    help="torchvision models, comma-separated ('' for none)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="repeats for small models (1,600+ blocks and torchvision models run once)")
    ap.add_argument("--skip-tp", action="store_true", help="do not run Torch-Pruning")
    ap.add_argument("--skip-front-ends", action="store_true",
                    help="do not time torch.fx against torch.export capture (torchvision and tiny HF models)")
    add_json_option(ap, "analysis_scaling")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch intra-op threads (on a busy machine 1 avoids OpenMP contention)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cases = [(lambda b=int(b): mlp_case(b)) for b in args.blocks.split(",") if b.strip()]
    cases += [(lambda n=n.strip(): torchvision_case(n)) for n in args.models.split(",") if n.strip()]
    rows, start = [], time.perf_counter()
    for make in progress_bar(cases, "cases"):
        name, model, x, final = make()
        model.eval()
        big = not name.startswith("mlp-") or int(name[4:]) >= 1600
        repeats = 1 if big else args.repeats
        row = {"model": name}
        try:
            row["fx_nodes"], row["fxprune_analyze_s"], row["fxprune_prune_s"] = run_fxprune(model, x, repeats)
        except Exception as exc:  # noqa: BLE001 -- a benchmark reports, it does not stop
            row["fxprune_analyze_s"] = error_text(exc)
        if not args.skip_tp:
            try:
                row["tp_build_s"], row["tp_prune_s"] = run_tp(model, x, final, repeats)
            except Exception as exc:  # noqa: BLE001
                row["tp_build_s"] = error_text(exc)
            a, b = row.get("fxprune_analyze_s"), row.get("tp_build_s")
            if isinstance(a, float) and isinstance(b, float):
                row["tp_over_fxprune"] = b / a
        rows.append(row)
        print(f"  done {name} ({time.perf_counter() - start:.1f} s)", flush=True)

    if not args.skip_front_ends:
        rows += front_end_rows([n.strip() for n in args.models.split(",") if n.strip()])
        show(front_end_table(rows))
    print()
    show(scaling_table(rows))

    mlp = [r for r in rows if r["model"].startswith("mlp-") and isinstance(r.get("fxprune_analyze_s"), float)]
    tp_mlp = [r for r in mlp if isinstance(r.get("tp_build_s"), float)]
    if len(tp_mlp) >= 2:
        r1, r2 = tp_mlp[-2], tp_mlp[-1]
        n1, n2 = r1["fx_nodes"], r2["fx_nodes"]
        for key, label in (("tp_build_s", "Torch-Pruning build"), ("fxprune_analyze_s", "fxprune analyze")):
            k = math.log(r2[key] / r1[key]) / math.log(n2 / n1)
            print(f"  {label} growth exponent {r1['model']} -> {r2['model']}: t ~ n^{k:.2f}")
    print(f"\nTotal run time: {time.perf_counter() - start:.1f} s ({args.threads} torch threads)")
    if args.json:
        write(args.json, rows, header(args))


if __name__ == "__main__":
    main()
