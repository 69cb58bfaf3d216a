"""The body of each ``fxprune`` command; the parser lives in ``fxprune.cli``."""
from __future__ import annotations

import dataclasses
import json
import pickle
import sys
from pathlib import Path

import torch

from fxprune.errors import FxpruneError
from fxprune.models import INPUT_SHAPE_ATTR, load_model, parse_shape


def _load(ref: str, input_text: str | None, required: bool = True):
    """(model, example inputs, input shape) for a reference and an optional --input."""
    model, shape = load_model(ref)
    if input_text:
        shape = parse_shape(input_text)
    if shape is None and required:
        raise FxpruneError(f"no input shape known for {ref!r}; pass --input, e.g. --input 1,3,224,224")
    return model, _inputs(shape), shape


def _inputs(shape):
    if shape is None:
        return None
    shapes = shape if isinstance(shape[0], list) else [shape]
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(s, generator=generator) for s in shapes)


def _write(text: str, path: str | None) -> None:
    if path:
        Path(path).write_text(text, encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def cmd_graph(args) -> int:
    from fxprune import analyze
    from fxprune.cli.render import graph_dot, graph_json, graph_mermaid, graph_text

    model, inputs, shape = _load(args.model, args.input)
    graph = analyze(model, inputs, capture=args.capture or "auto", attention_units=args.attention_units or "heads")
    if args.format == "json":
        text = graph_json(graph, args.model, shape)
    elif args.format == "dot":
        text = graph_dot(graph, args.model)
    elif args.format == "mermaid":
        text = graph_mermaid(graph)
    else:
        text = graph_text(graph, args.model)
    _write(text, args.output)
    return 0


def _spec_dict(args, shape) -> dict:
    from fxprune.spec import _read_file

    data = dict(_read_file(Path(args.spec))) if args.spec else {}
    goal = ({"target": {"flops": args.flops}} if args.flops is not None else
            {"target": {"params": args.params}} if args.params is not None else
            {"ratio": args.ratio} if args.ratio is not None else None)
    if goal:
        data.pop("target", None)
        data.pop("ratio", None)
        data.update(goal)
    if "target" not in data and "ratio" not in data and not (args.nm or data.get("nm")):
        raise FxpruneError("no goal: pass --spec FILE, or one of --flops F, --params F, --ratio R, "
                           "or --nm N:M alone (masks only, no channel removed)")
    for name, value in (("score", args.score), ("scope", args.scope), ("nm", args.nm),
                        ("round_to", args.round_to), ("capture", args.capture),
                        ("emit", args.emit), ("verify", args.verify), ("calibration", args.calibration),
                        ("attention_units", args.attention_units), ("branch_score", args.branch_score),
                        ("branch_run", args.branch_run),
                        ("units", args.units)):
        if value is not None:
            data[name] = value
    if args.input or "input_shape" not in data:
        if shape is None:
            raise FxpruneError(f"no input shape known for {args.model!r}; pass --input, e.g. "
                               "--input 1,3,224,224, or set input_shape in the spec")
        data["input_shape"] = shape
    return data


def _save(model: torch.nn.Module, path: str) -> None:
    try:
        torch.save(model, path)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise FxpruneError(
            f"cannot save the pruned {type(model).__name__} with torch.save ({exc}): an emitted module is "
            "pickled by its class's import path; make its module importable, or save the GraphModule "
            "(--emit graph), which needs no class") from exc


def cmd_compress(args) -> int:
    from fxprune import compress
    from fxprune.progress import reporting, step
    from fxprune.spec import Spec

    # a bar on stderr while it runs (a terminal only, not --quiet); the report goes to stdout
    with reporting("fxprune compress", enabled=not args.quiet):
        step(f"loading {args.model}")
        model, _, shape = _load(args.model, args.input, required=False)
        spec = Spec.from_dict(_spec_dict(args, shape))
        # --latency forces timing; otherwise compress decides (a [latency] section or a latency target)
        result = compress(model, spec, measure_latency=True if args.latency else None)
        if args.output:
            step(f"saving {args.output}")
            setattr(result.model, INPUT_SHAPE_ATTR, spec.input_shape)
            _save(result.model, args.output)
    report = result.report
    if args.report:
        data = {**report.to_dict(), "model": args.model, "spec": spec.to_dict(),
                "plan": {str(k): list(v) for k, v in result.plan.items()}}
        Path(args.report).write_text(json.dumps(data, indent=2), encoding="utf-8")
    print(report.to_markdown() if args.markdown else report)
    if not args.output and not args.quiet:
        print("note: no -o FILE given, the compressed model was not saved", file=sys.stderr)
    return 0


def cmd_report(args) -> int:
    from fxprune.cli.render import model_report, model_report_text
    from fxprune.measure import LatencySettings, measure_latency

    model, inputs, shape = _load(args.model, args.input)
    latency = None
    if not args.no_latency:
        settings = LatencySettings(device=args.device, threads=args.threads, repeats=args.repeats)
        latency = measure_latency([model], inputs, settings)
    data = model_report(model, inputs, args.model, shape, latency)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(model_report_text(data, None if args.layers == 0 else args.layers))
    return 0


def cmd_check(args) -> int:
    from fxprune.budget import Budget, BudgetError, check_budget, find_pyproject, load_budget
    from fxprune.measure import LatencySettings

    overrides = {k: getattr(args, f"max_{k[4:]}") for k in
                 ("max_params", "max_flops", "max_size", "max_latency_ms")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    path = args.budget or find_pyproject()
    if path is None and not overrides:
        raise BudgetError("no budget: no pyproject.toml here or in a parent folder; pass "
                          "--budget FILE or --max-params/--max-flops/--max-size")
    if path is not None and (args.budget or not overrides):
        budget = load_budget(path)
        data = {k: getattr(budget, k) for k in ("max_params", "max_flops", "max_size", "max_latency_ms")}
        data = {k: v for k, v in data.items() if v is not None}
        source, base = budget.source, budget
    else:
        data, source, base = {}, "arguments", Budget()
    data.update(overrides)
    if "max_latency_ms" in data:  # the budget's settings, else the defaults, stated in full
        data["latency"] = dataclasses.asdict(base.latency or LatencySettings())
    budget = Budget.from_dict(data, source=source)
    ref = args.model or base.model
    if ref is None:
        raise BudgetError(f"no model: give MODEL or set model = \"torchvision:resnet18\" in {source}")
    model, shape = load_model(ref)
    if args.input:
        shape = parse_shape(args.input)
    elif base.input_shape is not None:
        shape = base.input_shape
    result = check_budget(model, _inputs(shape), budget)
    if args.json:
        print(result.to_json())
    else:
        print(f"fxprune check: {ref}, input {shape}, budget from {source}")
        print(result.table())
    return 0 if result.ok else 1


def cmd_demo(args) -> int:
    from fxprune.demo import run_demo

    for name in ("epochs", "finetune", "threads"):
        if getattr(args, name) < (1 if name == "threads" else 0):
            raise FxpruneError(f"--{name} must be >= {1 if name == 'threads' else 0}")
    run_demo(epochs=args.epochs, finetune=args.finetune, flops=args.flops, threads=args.threads)
    return 0
