"""Renderings of a dependency graph (text, JSON, DOT, Mermaid) and of a model's layers."""
from __future__ import annotations

import json

import torch
from tabulate import tabulate
from torch.utils.flop_counter import FlopCounterMode

from fxprune._util import eval_mode, format_si
from fxprune.capture.inputs import as_example_inputs
from fxprune.measure import count_flops, count_params, size_bytes

GRAPH_SCHEMA = "fxprune.graph/1"
REPORT_SCHEMA = "fxprune.model-report/1"


def graph_json(graph, model_ref: str, input_shape) -> str:
    """Stable JSON: schema, model, input shape, counts and one object per group."""
    rows = graph.rows()
    return json.dumps({
        "schema": GRAPH_SCHEMA, "model": model_ref, "input_shape": input_shape, "capture": graph.capture,
        "groups_total": len(rows), "groups_prunable": sum(r["prunable"] for r in rows),
        "groups": [{"id": r["id"], "channels": r["channels"], "prunable": r["prunable"],
                    "zero_invariant": r["zero_invariant"], "reason": r["reason"],
                    "producers": r["producers"], "consumers": r["consumers"]} for r in rows],
        "branches": [{"id": b.id, "join": b.join, "shortcut": b.shortcut, "parent": b.parent,
                      "zero_invariant": b.zero_invariant, "reason": b.reason, "modules": b.modules}
                     for b in graph.branches],
        "layers": [{"id": l.id, "path": l.path, "entry": l.shortcut, "exit": l.join, "parent": l.parent,
                    "modules": l.modules} for l in graph.layers],
    }, indent=2)


def _dot_quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _group_flow(graph, lines: list[str], group_lines, tensor_line, edge) -> list[str]:
    """Append a producers -> group box -> consumers diagram to ``lines``; each tensor node is
    declared (``tensor_line(node id, name)``) just before its first edge."""
    tensors: dict[str, str] = {}

    def tensor_node(name: str) -> str:
        if name not in tensors:
            tensors[name] = f"t{len(tensors)}"
            lines.append(tensor_line(tensors[name], name))
        return tensors[name]

    for row in graph.rows():
        group = f"g{row['id']}"
        lines.extend(group_lines(group, row, "prunable" if row["prunable"] else "frozen"))
        for producer in row["producers"]:
            lines.append(edge(tensor_node(producer), group))
        for consumer in row["consumers"]:
            lines.append(edge(group, tensor_node(consumer)))
    return lines


def graph_dot(graph, model_ref: str) -> str:
    """Graphviz DOT: producer tensors -> group box -> consumer tensors."""
    def group_lines(node: str, row: dict, state: str) -> list[str]:
        label = f"group {row['id']}\n{row['channels']} channels\n{state}"
        if row["reason"]:
            label += "\n" + (row["reason"][:60] + ("..." if len(row["reason"]) > 60 else ""))
        color = "palegreen" if row["prunable"] else "lightgrey"
        return [f"  {node} [label={_dot_quote(label)}, shape=box, style=filled, fillcolor={color}];"]

    lines = _group_flow(
        graph,
        ["digraph fxprune {", f"  label={_dot_quote('fxprune groups of ' + model_ref)};",
         "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];'],
        group_lines,
        lambda node, name: f"  {node} [label={_dot_quote(name)}, shape=ellipse];",
        lambda a, b: f"  {a} -> {b};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_label(text: str) -> str:
    return '"' + str(text).replace('"', "#quot;").replace("\n", "<br/>") + '"'


def graph_mermaid(graph) -> str:
    """A Mermaid flowchart (renders in GitHub markdown inside a ```mermaid block)."""
    def group_lines(node: str, row: dict, state: str) -> list[str]:
        text = f"group {row['id']}: {row['channels']} channels, {state}"
        return [f"  {node}[{_mermaid_label(text)}]", f"  class {node} {state}"]

    lines = _group_flow(graph, ["flowchart LR"], group_lines,
                        lambda node, name: f"  {node}({_mermaid_label(name)})",
                        lambda a, b: f"  {a} --> {b}")
    lines += ["  classDef prunable fill:#cfc,stroke:#393", "  classDef frozen fill:#ddd,stroke:#777"]
    return "\n".join(lines) + "\n"


def layer_rows(model: torch.nn.Module, inputs) -> list[dict]:
    """One row per leaf module with parameters: name, type, output shape, params, FLOPs."""
    shapes: dict[str, list] = {}
    hooks = []
    leaves = [(n, m) for n, m in model.named_modules()
              if n and not list(m.children()) and any(True for _ in m.parameters(recurse=False))]
    for name, module in leaves:
        def hook(_m, _inp, out, name=name):
            if isinstance(out, torch.Tensor):
                shapes.setdefault(name, list(out.shape))
        hooks.append(module.register_forward_hook(hook))
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), eval_mode(model), counter:
            as_example_inputs(inputs).call(model)
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    return [{"name": name, "type": type(module).__name__, "output_shape": shapes.get(name),
             "params": sum(p.numel() for p in module.parameters(recurse=False)),
             "flops": int(sum(counts.get(f"{root}.{name}", {}).values()))}
            for name, module in leaves]


def model_report(model, inputs, model_ref, input_shape, latency) -> dict:
    """FLOPs, params, size, latency (a LatencyResult or None) and the per-layer rows."""
    return {"schema": REPORT_SCHEMA, "model": model_ref, "input_shape": input_shape,
            "flops": count_flops(model, inputs), "params": count_params(model),
            "size_bytes": size_bytes(model),
            "latency_ms": None if latency is None else latency.eager_ms[0],
            "latency_settings": None if latency is None else vars(latency.settings).copy(),
            "flops_convention": "2 FLOPs per multiply-accumulate (torch.utils.flop_counter)",
            "layers": layer_rows(model, inputs)}


def _short(value: float) -> str:
    return format_si(value, space=False)


def model_report_text(data: dict, max_layers: int | None = None) -> str:
    s = data.get("latency_settings")
    latency = (f"{data['latency_ms']:.3f} ms (median of {s['repeats']} runs, {s['device']}, "
               f"{s['threads']} thread{'s' if s['threads'] != 1 else ''})" if s else "not measured (--no-latency)")
    summary = tabulate([["FLOPs", f"{_short(data['flops'])} ({data['flops']:,})"],
                        ["params", f"{_short(data['params'])} ({data['params']:,})"],
                        ["size (state_dict)", f"{data['size_bytes'] / 1e6:.2f} MB ({data['size_bytes']:,} B)"],
                        ["latency", latency]], tablefmt="plain", disable_numparse=True)
    total = data["flops"] or 1
    layers = data["layers"] if max_layers is None else data["layers"][:max_layers]
    rows = [[r["name"], r["type"], "x".join(map(str, r["output_shape"] or [])) or "-",
             f"{r['params']:,}", _short(r["flops"]), f"{r['flops'] / total:.1%}"] for r in layers]
    table = tabulate(rows, headers=["layer", "type", "output", "params", "FLOPs", "% FLOPs"],
                     colalign=("left", "left", "left", "right", "right", "right"), disable_numparse=True)
    more = len(data["layers"]) - len(layers)
    tail = f"\n... {more} more layers (--layers 0 shows all)" if more > 0 else ""
    return (f"fxprune report: {data['model']}, input {data['input_shape']}\n\n{summary}\n\n"
            f"FLOPs: {data['flops_convention']}.\n\n{table}{tail}")


def graph_text(graph, model_ref: str) -> str:
    """A table that fits a ~120-column terminal; ``--format json`` has every member."""
    def short(text: str, limit: int) -> str:
        return text if len(text) <= limit else text[:limit - 3] + "..."

    rows = graph.rows()
    table = [[r["id"], r["channels"], "prunable" if r["prunable"] else "frozen",
              "yes" if r["zero_invariant"] else "no",
              short(r["producers"][0], 34) + (f" +{len(r['producers']) - 1}" if len(r["producers"]) > 1 else "")
              if r["producers"] else "-", len(r["consumers"]), short(r["reason"], 44)]
             for r in rows]
    prunable = sum(r["prunable"] for r in rows)
    head = (f"{model_ref}: {len(rows)} channel groups, {prunable} prunable, {len(rows) - prunable} frozen "
            f"(captured with {graph.capture})")
    body = tabulate(table, headers=["group", "channels", "state", "zero-inv", "producers",
                                    "consumers", "reason"], disable_numparse=True,
                    colalign=("right", "right", "left", "left", "left", "right", "left"))
    return (f"{head}\n{body}\nproducers: first tensor[dim] (+ how many more); all members: --format json"
            + branches_text(graph) + layers_text(graph))


def branches_text(graph) -> str:
    """The residual branches (depth units) as a table, or nothing when there are none."""
    if not graph.branches:
        return ""
    table = [[b.id, b.parent if b.parent is not None else "-", "yes" if b.zero_invariant else "no",
              b.join, b.shortcut, len(b.modules),
              (b.modules[0] + (f" +{len(b.modules) - 1}" if len(b.modules) > 1 else "")) if b.modules else "-"]
             for b in graph.branches]
    body = tabulate(table, headers=["branch", "in", "zero-inv", "join", "shortcut", "modules", "first module"],
                    disable_numparse=True)
    return (f"\n\n{len(graph.branches)} residual branches (remove one with {{id: [0]}}; "
            f"--units branches in compress)\n{body}")


def layers_text(graph) -> str:
    """The whole layers (depth units: list entries that can become the identity) as a
    table, or nothing when there are none."""
    if not graph.layers:
        return ""
    params = dict(graph.gm.named_parameters(remove_duplicate=False))
    table = [[l.id, l.path, l.parent if l.parent is not None else "-", l.shortcut, l.join,
              sum(params[k].numel() for k in l.slices([0], "all") if k in params)] for l in graph.layers]
    body = tabulate(table, headers=["layer", "module", "in", "entry", "exit", "params"], disable_numparse=True)
    return (f"\n\n{len(graph.layers)} layers (remove one with {{id: [0]}}: it becomes the identity; "
            f"--units layers in compress)\n{body}")
