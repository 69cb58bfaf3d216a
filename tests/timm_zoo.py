"""The timm proof, shared by tests/test_timm.py and benchmarks/timm_sweep.py.

One model at a time (random weights, eval mode): analyze with ``capture="auto"``, prune
~50% of every prunable group (the output shape must hold, and the parameters kept are
counted), prune ~50% of every zero-invariant group and compare with the zeroed
original (the zero-invariance oracle). The same model also goes through Torch-Pruning,
in a forked process with a time limit, since its group building can stall.
"""
from __future__ import annotations

import time
import traceback
from collections import Counter

import torch

import fxprune
from fxprune.passes.verify import check_zero_invariance, output_error
from forked import call_forked
from helpers import branch_oracle_error, count_params, half_plan, unit_scale

# The sweep's list: every family the issue names, plus the common ones; each < 60M params.
MODELS = [
    # no prunable group before functional batch norm had a rule (issue 13)
    "densenet121", "regnetx_002", "cspresnet50", "repvgg_a0", "dpn68", "gernet_s", "mobileone_s0",
    "mobilenetv2_050", "mobilenetv2_100", "cs3darknet_s", "cs3darknet_focus_s", "cspnext_s", "regnetx_004",
    "densenetblur121d", "ese_vovnet19b_dw", "ese_vovnet39b", "resnetv2_34d",
    # kept 90-94% of their parameters
    "efficientnet_b0", "mixnet_s", "rexnet_100", "tinynet_a",
    # did not trace with torch.fx
    "mobilevit_xs", "tf_efficientnet_b0", "tf_mobilenetv3_small_100", "vgg16", "convit_tiny",
    "crossvit_tiny_240", "efficientvit_b0", "efficientvit_m0", "mobilevitv2_050",
    # common families
    "resnet18", "resnet50", "resnet26d", "seresnext26d_32x4d", "ecaresnet26t", "resnext26ts",
    "convnext_atto", "convnextv2_atto", "vit_tiny_patch16_224", "vit_small_patch16_224",
    "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224",
    "levit_128s", "poolformer_s12", "ghostnet_100", "hrnet_w18_small", "mobilenetv3_small_100",
    "mobilenetv3_large_100", "efficientnet_lite0", "fbnetc_100", "mnasnet_100", "lcnet_050",
    "regnety_002", "dla34", "res2net50_26w_4s", "resnest14d", "skresnet18", "selecsls42b",
    "edgenext_xx_small", "fastvit_t8", "efficientformer_l1", "tiny_vit_5m_224", "mixer_s16_224",
    "resmlp_12_224", "pit_ti_224", "xcit_nano_12_p16_224", "repvit_m1", "hgnetv2_b0", "inception_next_tiny",
]
# A small, fast subset that covers the functional and ATen rules (CI).
CI_MODELS = ["regnetx_002", "mobilenetv2_050", "tf_mobilenetv3_small_100", "mobilevitv2_050", "lcnet_050",
             "mobileone_s0"]
SMALL = 64  # the input side tried first; the model's own input size only when it refuses this
KEEP_BELOW = 0.8  # "prunes as it should": under 80% of the parameters after 50% of every group
NO_ORACLE = "no zero-invariant group"  # a row's "oracle" column when the oracle could not run


def make_model(name: str) -> torch.nn.Module:
    import timm

    return unit_scale(timm.create_model(name, pretrained=False)).eval()


def input_for(model: torch.nn.Module) -> torch.Tensor:
    """A 1x3x64x64 image if the model takes it, else its configured input size."""
    g = torch.Generator().manual_seed(0)
    small = torch.randn(1, 3, SMALL, SMALL, generator=g)
    try:
        with torch.no_grad():
            model(small)
        return small
    except Exception:  # fixed patch grids, windows, positional tables
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {})
        return torch.randn(1, *cfg["input_size"], generator=g)


def reason_kind(reason: str) -> str:
    """Collapse a freeze reason to its kind (the op without a rule, when there is one)."""
    if "has no channel rule" in reason or "could not handle" in reason:
        return reason.split(")")[0].split("(")[-1]
    for key in ("graph output", "fixed width", "fixed positions", "channel count is checked", "mixes",
                "carries no channels", "by position"):
        if key in reason:
            return key
    return reason[:40]


def analyzed_row(model: torch.nn.Module, inputs) -> tuple:
    """Analyze with ``capture="auto"``; the graph and a sweep row's first columns (front end,
    seconds, groups, prunable, zero-invariant, the commonest reasons for freezing)."""
    start = time.perf_counter()
    graph = fxprune.analyze(model, inputs, capture="auto")
    prunable = graph.prunable_groups
    frozen = Counter(reason_kind(g.reason) for g in graph.groups if not g.prunable)
    row = {"front_end": graph.capture, "analyze_s": round(time.perf_counter() - start, 1),
           "groups": len(graph.groups), "prunable": len(prunable),
           "zero_invariant": sum(g.zero_invariant for g in prunable),
           "frozen_why": ", ".join(f"{k} x{v}" for k, v in frozen.most_common(3))}
    return graph, row


def check_fxprune(model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Analyze, prune half of every prunable group, run the oracle; a row (raises on failure)."""
    graph, row = analyzed_row(model, x)
    prunable = graph.prunable_groups
    start = time.perf_counter()
    inputs = graph.example_inputs
    with torch.no_grad():
        reference = inputs.call(model)
        small = fxprune.prune(graph, half_plan(graph)).eval() if prunable else model
        output_error(reference, inputs.call(small))  # raises when the output shape changes
    row["kept"] = round(count_params(small) / count_params(model), 3)
    zi = [g for g in prunable if g.zero_invariant]
    row["oracle_error"] = (check_zero_invariance(model, graph, half_plan(graph, zi), tolerance=float("inf"))
                          if zi else None)
    row["branch_oracle_error"] = branch_oracle_error(model, graph)  # every other zero-invariant branch removed
    row["prune_s"] = round(time.perf_counter() - start, 1)
    # No zero-invariant group (every channel meets a layer norm or a mean over channels):
    # the oracle has nothing to check. Such a row passes on its shape and parameter count
    # only, and says so in its own column, so no summary counts it as oracle-checked.
    row["oracle"] = "ran" if zi else NO_ORACLE
    oracle_holds = row["oracle_error"] < 1e-4 if zi else True
    row["fx_ok"] = oracle_holds and row["kept"] < KEEP_BELOW
    return row


def _classifier(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose output is the model's output (timm names them by get_classifier)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    # distilled models and some heads carry a second classifier next to the first
    for attr in ("head_dist", "head_drop"):
        extra = getattr(model, attr, None)
        if isinstance(extra, torch.nn.Linear):
            heads.append(extra)
    return [h for h in heads if isinstance(h, torch.nn.Module) and any(True for _ in h.parameters())]


def _tp_worker(model, x, conn) -> None:
    try:
        import torch_pruning as tp

        torch.set_num_threads(1)
        n0 = count_params(model)
        with torch.no_grad():
            ref = model(x)
        start = time.perf_counter()
        pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                      pruning_ratio=0.5, ignored_layers=_classifier(model),
                                      global_pruning=False)
        pruner.step()
        with torch.no_grad():
            out = model(x)
        kept = count_params(model) / n0
        shape_ok = tuple(out.shape) == tuple(ref.shape)
        ok = shape_ok and kept < KEEP_BELOW
        why = "" if ok else (f"kept {kept:.2f}" if shape_ok else f"output {tuple(out.shape)}")
        conn.send({"tp_ok": ok, "tp_kept": round(kept, 3), "tp_why": why,
                   "tp_s": round(time.perf_counter() - start, 1)})
    except Exception as exc:
        conn.send({"tp_ok": False, "tp_why": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"})


def check_torch_pruning(model: torch.nn.Module, x: torch.Tensor, timeout: float = 120.0) -> dict:
    """Torch-Pruning's MetaPruner at 50% per layer, classifier ignored, in a forked process
    that is killed after ``timeout`` seconds. Shape-checked only: it has no oracle."""
    start = time.perf_counter()
    result, why = call_forked(_tp_worker, (model, x), timeout)
    if result is None:
        result = {"tp_ok": False, "tp_why": why}
    result.setdefault("tp_s", round(time.perf_counter() - start, 1))
    return result


def check_model(name: str, *, torch_pruning: bool = True, tp_timeout: float = 120.0) -> dict:
    """One row of the sweep: fxprune's result and, optionally, Torch-Pruning's."""
    model = make_model(name)
    x = input_for(model)
    row = {"model": name, "params_M": round(count_params(model) / 1e6, 1), "input": x.shape[-1]}
    try:
        row.update(check_fxprune(model, x))
    except Exception as exc:  # a failure is a row, not the end of the sweep
        row.update(fx_ok=False, fx_why=f"{type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
        traceback.print_exc()
    if torch_pruning:
        row.update(check_torch_pruning(make_model(name), x, tp_timeout))
    return row
