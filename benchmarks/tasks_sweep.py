"""torchvision beyond classification through fxprune and Torch-Pruning: one row per model.

Segmentation, video, detection and optical-flow models of torchvision (random weights,
``weights=None, weights_backbone=None``, eval mode, small inputs). Per model: the capture
front end fxprune chose, its groups (prunable, zero-invariant), and the zero-invariance
oracle on about half of every zero-invariant group: a row passes only when the oracle
ran and held (< 1e-4), else the status says why. Detectors are captured as parts
(``capture="parts"``: backbone, FPN, heads; post-processing stays eager) and their pruned
copy (``emit="module"``) must still return boxes, labels and scores through its own
``forward``. The same model then goes through Torch-Pruning's MetaPruner (L2 magnitude,
``pruning_ratio=0.5``, output layers ignored) in a forked process with a time limit: did
it run, did the output keep its shape, the parameters left.

    OMP_NUM_THREADS=1 python benchmarks/tasks_sweep.py --json       # all models
    python benchmarks/tasks_sweep.py --models r3d_18,fcos_resnet50_fpn
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch
import torchvision
from tabulate import tabulate
from torch.utils._pytree import tree_flatten

import fxprune
from fxprune.passes.verify import check_zero_invariance

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from forked import call_forked  # noqa: E402
from helpers import count_params, half_plan  # noqa: E402
from timm_zoo import analyzed_row  # noqa: E402

from _results import add_json_option, header, load, write  # noqa: E402
from _tables import tasks_sweep as tasks_table  # noqa: E402

TOLERANCE = 1e-4
DETECT = dict(min_size=128, max_size=128)  # Generalized R-CNN, RetinaNet, FCOS resize to this
# name -> (family, constructor keywords, input maker, layers Torch-Pruning must not prune
# (name prefixes: the layers that write the model's outputs))
MODELS: dict[str, tuple] = {
    "fcn_resnet50": ("segmentation", {}, "image", ("classifier.4",)),
    "deeplabv3_resnet50": ("segmentation", {}, "image", ("classifier.4",)),
    "deeplabv3_mobilenet_v3_large": ("segmentation", {}, "image", ("classifier.4",)),
    "lraspp_mobilenet_v3_large": ("segmentation", {}, "image", ("classifier.low_classifier",
                                                                "classifier.high_classifier")),
    "r3d_18": ("video", {}, "clip", ("fc",)),
    "mc3_18": ("video", {}, "clip", ("fc",)),
    "r2plus1d_18": ("video", {}, "clip", ("fc",)),
    "s3d": ("video", {}, "clip224", ("classifier",)),
    "mvit_v1_b": ("video", {}, "clip224", ("head",)),
    "mvit_v2_s": ("video", {}, "clip224", ("head",)),
    "swin3d_t": ("video", {}, "clip", ("head",)),
    "fasterrcnn_resnet50_fpn": ("detection", DETECT, "images", ("rpn.head.cls_logits", "rpn.head.bbox_pred",
                                                               "roi_heads.box_predictor")),
    "fasterrcnn_mobilenet_v3_large_fpn": ("detection", DETECT, "images", ("rpn.head.cls_logits",
                                                                         "rpn.head.bbox_pred",
                                                                         "roi_heads.box_predictor")),
    "retinanet_resnet50_fpn": ("detection", DETECT, "images", ("head.classification_head.cls_logits",
                                                              "head.regression_head.bbox_reg")),
    "fcos_resnet50_fpn": ("detection", DETECT, "images", ("head.classification_head.cls_logits",
                                                         "head.regression_head.bbox_reg",
                                                         "head.regression_head.bbox_ctrness")),
    "ssd300_vgg16": ("detection", {}, "images", ("head.",)),
    "ssdlite320_mobilenet_v3_large": ("detection", {}, "images", ("head.classification_head.module_list",
                                                                 "head.regression_head.module_list")),
    "maskrcnn_resnet50_fpn": ("detection", DETECT, "images", ("rpn.head.cls_logits", "rpn.head.bbox_pred",
                                                             "roi_heads.box_predictor",
                                                             "roi_heads.mask_predictor.mask_fcn_logits")),
    "keypointrcnn_resnet50_fpn": ("detection", DETECT, "images", ("rpn.head.cls_logits", "rpn.head.bbox_pred",
                                                                 "roi_heads.box_predictor",
                                                                 "roi_heads.keypoint_predictor")),
    "raft_small": ("optical flow", {}, "pair", ("update_block.flow_head.conv2",)),
}


def make_model(name: str) -> torch.nn.Module:
    """Random weights (seeded), nothing downloaded, eval mode."""
    torch.manual_seed(0)
    keywords = {"weights": None, **MODELS[name][1]}
    if MODELS[name][0] in ("segmentation", "detection"):
        keywords["weights_backbone"] = None
    return torchvision.models.get_model(name, **keywords).eval()


def make_inputs(name: str) -> tuple:
    """Small inputs the model takes: positional arguments (a detector takes a list of images)."""
    g = torch.Generator().manual_seed(0)
    kind = MODELS[name][2]
    if kind == "image":
        return (torch.randn(1, 3, 64, 64, generator=g),)
    if kind == "images":
        return ([torch.rand(3, 128, 128, generator=g)],)
    if kind == "pair":
        return (torch.randn(1, 3, 128, 128, generator=g), torch.randn(1, 3, 128, 128, generator=g))
    frames, side = {"clip": (4, 64), "clip224": (16, 224)}[kind]
    return (torch.randn(1, 3, frames, side, side, generator=g),)


def _shapes(output) -> list[tuple]:
    """Every output tensor's shape; a detection's count (dim 0 of its boxes) is data-dependent."""
    detection = isinstance(output, list) and output and isinstance(output[0], dict)
    return [tuple(t.shape[1:]) if detection else tuple(t.shape)
            for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]


def check_fxprune(model: torch.nn.Module, inputs: tuple) -> dict:
    """Analyze, prune half of every zero-invariant group, run the oracle; a row (raises on failure)."""
    graph, row = analyzed_row(model, inputs)
    prunable = graph.prunable_groups
    zero_invariant = [g for g in prunable if g.zero_invariant]
    if not zero_invariant:
        row["why"] = "no zero-invariant group" if prunable else "no prunable group"
        return row
    start = time.perf_counter()
    plan = half_plan(graph, zero_invariant)
    small = fxprune.prune(graph, plan)
    row["oracle_error"] = check_zero_invariance(model, graph, plan, small, tolerance=float("inf"))
    if graph.capture == "parts":  # the pruned detector's own forward, post-processing included
        mine = fxprune.prune(graph, plan, emit="module")
        with torch.no_grad():
            want, got = _shapes(model(*inputs)), _shapes(mine(*inputs))
        if want != got:
            row["why"] = f"own forward returns {got}, the model {want}"
        small = mine
    row["kept"] = round(count_params(small) / count_params(model), 3)
    row["prune_s"] = round(time.perf_counter() - start, 1)
    if row["oracle_error"] >= TOLERANCE:
        row["why"] = f"oracle error {row['oracle_error']:.2g}"
    return row


def _ignored(model: torch.nn.Module, prefixes: tuple) -> list[torch.nn.Module]:
    return [m for n, m in model.named_modules() if n and any(n.startswith(p) for p in prefixes)
            and isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear))]


def _tp_worker(name: str, conn) -> None:
    try:
        import torch_pruning as tp

        torch.set_num_threads(1)
        model, inputs = make_model(name), make_inputs(name)
        n0 = count_params(model)
        with torch.no_grad():
            want = _shapes(model(*inputs))
        start = time.perf_counter()
        pruner = tp.pruner.MetaPruner(model, inputs, importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=0.5, ignored_layers=_ignored(model, MODELS[name][3]),
                                      global_pruning=False)
        pruner.step()
        with torch.no_grad():
            got = _shapes(model(*inputs))
        conn.send({"tp_ran": True, "tp_shape_ok": got == want, "tp_kept": round(count_params(model) / n0, 3),
                   "tp_why": "" if got == want else f"output {got[:2]} (was {want[:2]})",
                   "tp_s": round(time.perf_counter() - start, 1)})
    except Exception as exc:  # noqa: BLE001 - a failure is a row
        conn.send({"tp_ran": False, "tp_why": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:80]}"
                   if str(exc).strip() else type(exc).__name__})


def check_torch_pruning(name: str, timeout: float) -> dict:
    """Torch-Pruning in a forked process killed after ``timeout`` s (its group building can stall)."""
    result, why = call_forked(_tp_worker, (name,), timeout)
    if result is None:
        result = {"tp_ran": False, "tp_why": why}
    return result


def check_model(name: str, *, torch_pruning: bool = True, tp_timeout: float = 300.0) -> dict:
    """One row: fxprune's result and, optionally, Torch-Pruning's."""
    model, inputs = make_model(name), make_inputs(name)
    row = {"model": name, "family": MODELS[name][0], "params_M": round(count_params(model) / 1e6, 1)}
    start = time.perf_counter()
    try:
        row.update(check_fxprune(model, inputs))
    except Exception as exc:  # noqa: BLE001 - a failure is a row, not the end of the sweep
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        row["why"] = f"{type(exc).__name__}: {first[:140]}"
        traceback.print_exc()
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["status"] = "pass" if "why" not in row else "fail"
    if torch_pruning:
        row.update(check_torch_pruning(name, tp_timeout))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated names (default: all {len(MODELS)})")
    parser.add_argument("--no-tp", action="store_true", help="leave Torch-Pruning out")
    parser.add_argument("--tp-timeout", type=float, default=300.0, help="seconds Torch-Pruning gets per model")
    parser.add_argument("--update", action="store_true",
                        help="with --json: replace only these models' rows in the results file")
    add_json_option(parser, "tasks_sweep")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    head = header(args)
    names = args.models.split(",") if args.models else list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(MODELS)}")
    earlier = load(args.json)["rows"] if args.update and args.json and os.path.exists(args.json) else []
    rows: list[dict] = []
    for name in names:
        rows.append(check_model(name, torch_pruning=not args.no_tp, tp_timeout=args.tp_timeout))
        print(f"{name}: {rows[-1]['status']} {rows[-1].get('why', '')} ({rows[-1]['seconds']} s)", flush=True)
        if args.json:  # rewritten as it goes so a long sweep leaves partial results
            fresh = {r["model"] for r in rows}
            merged = [r for r in earlier if r["model"] not in fresh] + rows
            write(args.json, sorted(merged, key=lambda r: list(MODELS).index(r["model"])), head)
    table_head, body = tasks_table(rows)
    print(tabulate(body, headers=table_head, tablefmt="github", disable_numparse=True))
    for family in dict.fromkeys(r["family"] for r in rows):
        mine = [r for r in rows if r["family"] == family]
        print(f"{family}: {sum(r['status'] == 'pass' for r in mine)}/{len(mine)} pass")
    passed = sum(r["status"] == "pass" for r in rows)
    print(f"\n{passed}/{len(rows)} models pass")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
