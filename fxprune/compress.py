"""``compress``: the whole pipeline in one verb.

    spec -> example inputs -> analyze -> score -> select -> prune -> nm -> fuse -> report

With ``nm`` alone (no ratio or target) score/select/prune are skipped: the model keeps
every channel and only gets N:M masks, chosen by ``spec.mask_method``.

Latency rule: latency is measured (both models timed alternately, see
``fxprune.measure.measure_latency``) only when asked for, because timing costs seconds
and is noisy: pass ``measure_latency=True``, or give a ``latency`` section in the spec
(a dict/file with a ``latency`` key, or a Spec whose ``latency`` differs from the
defaults), or ask for a latency target. A latency target ranks channels by their
FLOPs, then prunes and times candidates with the spec's latency settings until the
measured latency is within 5% of the target.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.fx

from fxprune.channels import analyze
from fxprune.channels.graph import DependencyGraph
from fxprune.errors import WeightError, WriteBackError
from fxprune.measure import LatencySettings
from fxprune.passes.fuse import fuse
from fxprune.passes.prune import prune_graph, verify_values
from fxprune.passes.writeback import write_back
from fxprune.progress import reporting, step
from fxprune.report import Report, build_report, group_row
from fxprune.select.plan import select_and_prune
from fxprune.select.score import score_groups
from fxprune.select.calibration import as_calibration, graph_batches
from fxprune.sparsity.calibrated import apply_nm_calibrated
from fxprune.sparsity.nm import apply_nm, finalize
from fxprune.sparsity.report import sparsity_rows
from fxprune.spec import Spec


_MASK_NAMES = {"magnitude": "magnitude", "activation": "Wanda, |W| * ||X||",
               "sparsegpt": "SparseGPT, compensated on the calibration inputs"}


@dataclass
class Result:
    """What ``compress`` returns: the new model, its report, the plan and the analysis."""

    model: torch.nn.Module
    report: Report
    plan: dict[int, list[int]]
    graph: DependencyGraph
    notes: list[str] = field(default_factory=list)


def _wants_latency(source, spec: Spec, explicit: bool | None) -> bool:
    if explicit is not None:
        return explicit
    if spec.target is not None and "latency" in spec.target:
        return True
    if isinstance(source, Mapping):
        return "latency" in source
    return spec.latency != LatencySettings()


def check_finite(model: torch.nn.Module) -> None:
    """Raise a WeightError naming the parameters and buffers that hold NaN or inf.

    Scores of NaN weights are NaN, NaN sorts anywhere, and the plan would be arbitrary;
    BatchNorm statistics that overflowed poison every output the same way.

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> check_finite(net)
        >>> _ = net.bias.data.fill_(float("nan"))
        >>> check_finite(net)
        Traceback (most recent call last):
        ...
        fxprune.errors.WeightError: the model holds NaN or infinite values in bias (2 of 2 values); ...
    """
    bad = [(name, int((~torch.isfinite(t)).sum()), t.numel())
           for name, t in [*model.named_parameters(), *model.named_buffers()]
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        where = ", ".join(f"{name} ({n} of {total} values)" for name, n, total in bad[:3])
        more = f" and {len(bad) - 3} more tensor(s)" if len(bad) > 3 else ""
        raise WeightError(f"the model holds NaN or infinite values in {where}{more}; channel scores "
                          "would be NaN and the plan arbitrary. Fix: load the weights from a checkpoint "
                          "saved before training diverged (lower the learning rate or clip gradients), "
                          "or check the state_dict you loaded")


def emit_model(graph, plan: dict, pruned: torch.fx.GraphModule, emit: str, notes: list[str]) -> torch.nn.Module:
    """The model ``compress`` returns: the pruned graph, or your class with the plan
    written back (``emit``: "graph", "module", or "auto": module for export and parts
    captures). A parts capture's graph holds only the parts (the model's own forward runs
    the rest), so it is always written back."""
    if graph.capture == "parts" and emit == "graph":
        raise WriteBackError("emit='graph' cannot return a model captured as parts: the graph holds only "
                             "its learnable parts, your forward runs the rest; use emit='module' or 'auto'")
    if emit == "graph" or (emit == "auto" and graph.capture == "fx"):
        return pruned
    try:
        model = write_back(graph, plan, pruned)
    except WriteBackError as exc:
        if emit == "module" or graph.capture == "parts":
            raise
        notes.append(f"emit: a GraphModule (fixed to the example input shapes), not your class: {exc}")
        return pruned
    notes.append(f"emit: your {type(model).__name__}, pruned (emit='module')")
    return model


def compress(model: torch.nn.Module, spec, *, measure_latency: bool | None = None, progress: bool = False,
             **overrides) -> Result:
    """Prune ``model`` as ``spec`` says (a Spec, dict or TOML/JSON path); the input is not mutated.

    ``overrides`` are Spec fields a file cannot hold (``example_inputs``, ``calibration``
    given as a list or callable, ``calib_inputs``, ``loss_fn``). With ``spec.fuse`` (default) the returned model has BatchNorms folded
    and is in eval mode: it is for inference. ``progress=True`` shows a bar on stderr
    (when it is a terminal) counting the steps as they run: worth it for a latency
    target or ``scope="latency"``, which time many candidates; off by default.

    Example:
        >>> import torchvision
        >>> result = compress(torchvision.models.resnet18(weights=None),
        ...                   {"input_shape": [1, 3, 64, 64], "target": {"flops": 0.5}})
        >>> round(result.report.ratios()["flops"], 2)
        0.5
        >>> print(result.report)
        fxprune report
        metric ...
        FLOPs ...
    """
    loaded = Spec.load(spec, **overrides)
    with reporting("compress", enabled=progress):
        return _compress(model, spec, loaded, measure_latency)


def _prune_channels(graph, loaded: Spec, notes: list[str]) -> tuple[dict, torch.nn.Module]:
    """Score, select and prune channels; the plan and the pruned graph."""
    step(f"scoring ({loaded.score_method})")
    if loaded.score == "auto":
        notes.append(f"score: auto chose {loaded.score_method} "
                     f"({'calibration batches given' if loaded.score_method == 'activation' else 'no calibration data'})")
    elif loaded.score != loaded.score_method:
        notes.append(f"score: {loaded.score} chooses masks only; channels are ranked by {loaded.score_method}")
    scores = score_groups(graph, loaded.score_method, calibration=loaded.calibration,
                          calib_inputs=loaded.calib_inputs, loss_fn=loaded.loss_fn, notes=notes)
    step(f"selecting ({loaded.scope} scope)")
    plan, small = select_and_prune(graph, scores, loaded, notes=notes)
    step("pruning")
    if small is None or small is graph.gm:
        small = prune_graph(graph, plan, verify="shapes") if plan else copy.deepcopy(graph.gm)
    if plan and loaded.verify == "values":
        step("verifying values")
        notes.append(f"verify: {verify_values(graph, plan, small).note}")
    return plan, small


def _compress(model: torch.nn.Module, spec, loaded: Spec, measure_latency: bool | None) -> Result:
    inputs = loaded.make_example_inputs()
    step("analysing")
    notes: list[str] = []
    graph = analyze(model, inputs, capture=loaded.capture, attention_units=loaded.attention_units)  # ``model`` itself is never touched
    front_ends = {"fx": "torch.fx symbolic trace", "export": "torch.export",
                  "parts": f"parts ({', '.join(dict.fromkeys(p.path for p in graph.parts or ()))}; "
                           "the rest of forward runs as your code)"}
    notes.append(f"capture: {front_ends[graph.capture]}")
    notes.extend(f"capture: {note}" for note in graph.capture_notes)
    notes.extend(f"capture: {k}={v!r} for the capture" for k, v in graph.capture_kwargs.items())
    check_finite(graph.gm)
    if loaded.prunes_channels:
        plan, small = _prune_channels(graph, loaded, notes)
    else:  # nm alone: masks only, every channel stays
        plan, small = {}, copy.deepcopy(graph.gm)
        notes.append("nm alone: no ratio or target, so no channel is removed")
    small = emit_model(graph, plan, small, loaded.emit, notes)
    nm = None
    if loaded.nm_pair is not None:
        n, m = loaded.nm_pair
        method = loaded.mask_method
        step(f"masking {n}:{m} ({method})")
        if method == "magnitude":
            nm = apply_nm(small, n, m, ignore=loaded.ignore)
        else:
            calibration = loaded.calibration or as_calibration([loaded.calib_inputs])
            nm = apply_nm_calibrated(small, n, m, score=method, ignore=loaded.ignore,
                                     calibration=list(graph_batches(graph, calibration)))
        finalize(small)
        notes.append(f"nm: {n}:{m} masks ({_MASK_NAMES[method]}) on "
                     f"{sum(r.status == 'masked' for r in nm.rows)} layer(s); "
                     "masks give speed only on CUDA sparse kernels "
                     "(fxprune.sparsity.semi_structured.to_semi_structured on a float16/bfloat16 CUDA model)")
        narrow = sum("not a multiple of m" in r.reason for r in nm.rows)
        if narrow and loaded.round_to % m:
            notes.append(f"nm: {narrow} layer(s) skipped because their pruned input width is not a "
                         f"multiple of {m}; set round_to={m} (or a multiple) to keep them eligible")
    if loaded.fuse and isinstance(small, torch.fx.GraphModule):
        step("folding batch norms")
        fused = fuse(small, inputs)
        small = fused.gm
        notes.extend(fused.notes)
        notes.append(f"fuse: folded {len(fused.folded)} batchnorm(s); the model is in eval mode")
    elif loaded.fuse and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in small.modules()):
        notes.append("fuse: skipped, an emitted module keeps its BatchNorms (emit='graph' folds them)")
    latency = None
    if _wants_latency(spec, loaded, measure_latency):
        latency = loaded.latency
    step("measuring the report" + (" (timing latency)" if latency is not None else ""))
    rows = [group_row(g.id, g.size, g.size - len(plan.get(g.id, ())), reason=g.reason or None)
            for g in graph.groups]
    report = build_report(model, small, inputs, latency=latency, group_rows=rows, notes=notes,
                          sparsity_rows=sparsity_rows(small, nm) if nm is not None else ())
    return Result(model=small, report=report, plan=plan, graph=graph, notes=notes)
