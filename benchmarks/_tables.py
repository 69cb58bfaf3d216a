"""The tables of the benchmarks, built from their result rows: one definition per table.

Each function takes a results file's rows and returns ``(headers, body)`` for
``tabulate``. The benchmark scripts print these tables, and ``benchmarks/make_docs.py``
writes the same ones into the docs, so a doc table is always a view of a results file.
Nothing here imports torch: regenerating the docs is fast.

Example:
    >>> rows = [{"widths": "8/8/16/16", "seed": s, "acc": a, "flops_x": 15.6, "params": 4962}
    ...         for s, a in ((0, 98.0), (1, 99.0))]
    >>> digits_capacity(rows)
    (['widths', 'FLOPs reduction', 'params', 'accuracy %'], [['8/8/16/16', '15.6x', '4,962', '98.50 ± 0.50']])
"""
from __future__ import annotations

import math
from statistics import mean, pstdev
from typing import Any, Callable

Table = tuple[list[str], list[list[Any]]]


def show(table: Table) -> None:
    """Print a table as every benchmark prints it: GitHub markdown, cells as formatted."""
    from tabulate import tabulate

    head, body = table
    print(tabulate(body, headers=head, tablefmt="github", disable_numparse=True))

# latency.py candidates, in table order, with their names in the docs
CANDIDATES = {"tp": "Torch-Pruning", "tp+fuse": "Torch-Pruning, BN folded", "fx-global": "fxprune global",
              "fx-local": "fxprune local", "fx-latency": "fxprune latency"}


def _mean_std(values: list[float]) -> str:
    return f"{mean(values):.2f} ± {pstdev(values):.2f}"


def _candidates(rows: list[dict]) -> list[str]:
    """latency.py's candidates present in ``rows`` (``fx-SCOPE+ignore`` ones after their scope)."""
    seen = {k[: -len("_flops_x")] for r in rows for k in r if k.endswith("_flops_x")}
    seen |= {k[: -len("_error")] for r in rows for k in r if k.endswith("_error") and k != "tp_error"}
    order = [c for c in CANDIDATES if c in seen]
    order += sorted(c for c in seen if c not in CANDIDATES)
    return order


def _label(candidate: str) -> str:
    base, _, extra = candidate.partition("+ignore")
    return CANDIDATES.get(base, base) + (", ignore" if candidate.endswith("+ignore") else "")


def latency(rows: list[dict]) -> Table:
    """One line per model and candidate: FLOPs reduction, median ms and quotient (speedup / FLOPs
    reduction), eager and, when timed, compiled. A candidate that failed shows its error."""
    compiled = any("dense_compiled_ms" in r for r in rows)
    widths = any(k.endswith("_widths_as_tp") for r in rows for k in r)
    head = ["model", "candidate", "FLOPs ×", "eager ms", "eager quotient"]
    head += ["compiled ms", "compiled quotient"] if compiled else []
    head += ["same widths as TP"] if widths else []
    body = []
    for r in rows:
        dense = [r["model"], "dense / BN folded", "1.00", f"{r['dense_ms']:.2f} / {r['dense+fuse_ms']:.2f}", ""]
        if compiled:
            dense += [f"{r['dense_compiled_ms']:.2f} / {r['dense+fuse_compiled_ms']:.2f}", ""]
        body.append(dense + ([""] if widths else []))
        for c in _candidates([r]) + (["tp"] if "tp_error" in r else []):
            error = r.get(f"{c}_error")
            if error:
                line = [r["model"], _label(c), "fails", error, ""] + (["", ""] if compiled else [])
            else:
                line = [r["model"], _label(c), f"{r[f'{c}_flops_x']:.2f}", _ms(r[f"{c}_ms"], ".2f"),
                        _ms(r[f"{c}_quotient"], ".2f")]
                if compiled:
                    line += [_ms(r.get(f"{c}_compiled_ms"), ".2f"), _ms(r.get(f"{c}_compiled_quotient"), ".2f")]
            if widths:
                same = r.get(f"{c}_widths_as_tp")
                line.append("" if same is None else ("yes" if same else "no"))
            body.append(line)
    return head, body


def latency_glance(rows: list[dict]) -> Table:
    """One line per model: each candidate's quotient, compiled where timed (else eager)."""
    compiled = any("dense_compiled_ms" in r for r in rows)
    key = "_compiled_quotient" if compiled else "_quotient"
    cands = _candidates(rows)
    head = ["model", "FLOPs ×"] + [_label(c) for c in cands]
    body = []
    for r in rows:
        flops = next((r[f"{c}_flops_x"] for c in cands if f"{c}_flops_x" in r), "")
        failed = {c for c in cands if f"{c}_error" in r} | ({"tp", "tp+fuse"} if "tp_error" in r else set())
        body.append([r["model"], f"{flops:.2f}" if flops else ""] +
                    ["fails" if c in failed else _ms(r.get(f"{c}{key}"), ".2f") for c in cands])
    return head, body


def analysis_front_ends(rows: list[dict]) -> Table:
    """Capture and analysis seconds of each front end on the same models."""
    head = ["model", "front end", "nodes", "capture (s)", "analysis (s)", "prunable groups"]
    body = [[r["model"], r["front_end"], r["nodes"], f"{r['capture_s']:.2f}", f"{r['analysis_s']:.3f}",
             r["prunable"]] for r in rows if r.get("section") == "front_end"]
    return head, body


def analysis_scaling(rows: list[dict]) -> Table:
    """Analysis and prune seconds of both tools; fxprune's ms per node (flat when analysis is linear)."""
    rows = [r for r in rows if r.get("section") != "front_end"]
    def sec(value: Any) -> Any:
        return f"{value:.3f}" if isinstance(value, float) else (value if value is not None else "")

    head = ["model", "fx nodes", "fxprune analyze (s)", "fxprune ms/node", "fxprune prune (s)", "TP build (s)",
            "TP prune (s)", "TP/fxprune (analyze)"]
    body = []
    for r in rows:
        analyze = r.get("fxprune_analyze_s")
        per_node = f"{1e3 * analyze / r['fx_nodes']:.3f}" if isinstance(analyze, float) and r.get("fx_nodes") else ""
        body.append([r["model"], r.get("fx_nodes", ""), sec(analyze), per_node, sec(r.get("fxprune_prune_s")),
                     sec(r.get("tp_build_s")), sec(r.get("tp_prune_s")), sec(r.get("tp_over_fxprune"))])
    return head, body


def digits_summary(rows: list[dict]) -> list[dict]:
    """digits.py's per-seed rows, averaged per method and FLOPs reduction (what digits.py prints)."""
    base = next((r["flops"] for r in rows if r["method"] == "dense"), None)
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        for k in sorted({r["speedup"] for r in rows if r["method"] == name}):
            sel = [r for r in rows if r["method"] == name and r["speedup"] == k]
            flops = mean(r["flops"] for r in sel)
            out.append({
                "method": name,
                "target": "1x (no prune)" if k == 1 else f"{k}x fewer",
                "acc % (mean ± std)": _mean_std([r["acc"] for r in sel]),
                "before FT": f"{mean(r['pre_ft'] for r in sel):.1f}" if "pre_ft" in sel[0] else "",
                "kFLOPs": f"{flops / 1e3:.0f}",
                "FLOPs ratio": f"{base / flops:.1f}x" if base else "",
                "params": f"{mean(r['params'] for r in sel):.0f}",
                "zero ch": f"{mean(r['zero'] for r in sel):.0%}",
                "seeds": len(sel),
            })
    return out


def digits(rows: list[dict], speedups: tuple[int, ...] | None = None) -> Table:
    """Method x FLOPs reduction: test accuracy after fine-tuning, mean ± std over seeds, at the
    reduction measured on the pruned models; accuracy right after pruning; zero channels."""
    summary = digits_summary(rows)
    ks = speedups or tuple(sorted({r["speedup"] for r in rows if r["speedup"] > 1}))
    at = 16 if 16 in ks else ks[-1]  # accuracy right after pruning, before fine-tuning, at this reduction
    head = ["method", "trained (1x)"] + [f"{k}x" for k in ks] + [f"right after pruning, {at}x", "zero channels"]
    body = []
    for name in dict.fromkeys(r["method"] for r in summary):
        cells = {int(s["target"].split("x")[0]): s for s in summary if s["method"] == name}
        line = [name, cells[1]["acc % (mean ± std)"] if 1 in cells else "(one model per target)"]
        line += [f"{cells[k]['acc % (mean ± std)']} (at {cells[k]['FLOPs ratio']})" if k in cells else ""
                 for k in ks]
        before = cells.get(at, {}).get("before FT", "")
        zeros = [cells[k]["zero ch"] for k in sorted(cells)]
        line += [before, zeros[0] if 1 in cells else " / ".join(zeros)]
        body.append(line)
    return head, body


def digits_glance(rows: list[dict]) -> Table:
    """The 16x and 32x columns of ``digits``, pruned methods only."""
    head, body = digits(rows)
    keep = [0] + [i for i, h in enumerate(head) if h in ("16x", "32x")]
    return [head[i] for i in keep], [[line[i] for i in keep] for line in body if line[0] != "dense"]


def digits_capacity(rows: list[dict]) -> Table:
    """Accuracy of the digits network trained from scratch at fixed widths, best first."""
    out = []
    for widths in dict.fromkeys(r["widths"] for r in rows):
        sel = [r for r in rows if r["widths"] == widths]
        accs = [r["acc"] for r in sel]
        out.append((mean(accs), [widths, f"{sel[0]['flops_x']}x", f"{sel[0]['params']:,}", _mean_std(accs)]))
    out.sort(key=lambda item: -item[0])
    return ["widths", "FLOPs reduction", "params", "accuracy %"], [line for _, line in out]


def digits_sparse(rows: list[dict]) -> Table:
    """digits_sparse.py's rows by method: accuracy (trained, and after ``compress`` removed the
    ablated neurons), its gap to dense, sparsity, neurons removed, FLOPs dense and non-zero."""
    dense_accs = [r["acc"] for r in rows if r["method"] == "dense"]
    dense = mean(dense_accs) if dense_accs else None  # a run without the dense method (--methods)
    head = ["method", "accuracy %", "vs dense", "after removal %", "sparsity", "neurons removed",
            "FLOPs", "non-zero FLOPs"]
    body = []
    for method in dict.fromkeys(r["method"] for r in rows):
        sel = [r for r in rows if r["method"] == method]
        accs = [r["acc"] for r in sel]
        removed = [r["removed_acc"] for r in sel if "removed_acc" in r]
        gap = "" if dense is None else f"{mean(accs) - dense:+.2f}"
        body.append([method, _mean_std(accs), gap, _mean_std(removed) if removed else "",
                     f"{mean(r['sparsity'] for r in sel):.1%}", f"{mean(r['removed'] for r in sel):.1f}",
                     f"{mean(r['flops'] for r in sel):,.0f}", f"{mean(r['nonzero_flops'] for r in sel):,.0f}"])
    return head, body


NO_ORACLE = "no zero-invariant group"  # a row on which the oracle had nothing to check


def zoo_oracle(row: dict) -> str:
    """Whether the oracle ran on a zoo_sweep.py row: only where a group is zero-invariant
    (rows written before the sweep said so carry an error of 0.0 there)."""
    return "ran" if row.get("zero_invariant") else NO_ORACLE


def zoo_sweep(rows: list[dict]) -> Table:
    """One line per torchvision model: groups, why frozen, the oracle's error and the time."""
    head = ["model", "fx nodes", "groups", "prunable", "zero-inv.", "frozen", "why frozen (kind × count)",
            "oracle error", "branch oracle error", "s", "status"]
    body = [[r["model"], r.get("nodes", ""), r.get("groups", ""), r.get("prunable", ""), r.get("zero_invariant", ""),
             r.get("frozen", ""), r.get("frozen_why", ""),
             (f"{r['oracle_error']:.1e}" if zoo_oracle(r) == "ran" else NO_ORACLE)
             if isinstance(r.get("oracle_error"), float) else "",
             branch_oracle(r), r.get("seconds", ""), r["status"]] for r in rows]
    return head, body


NO_BRANCH = "no zero-invariant branch"


def branch_oracle(row: dict) -> str:
    """The oracle's error with every other zero-invariant residual branch removed (rows
    written before the sweeps measured it: empty)."""
    if "branch_oracle_error" not in row:
        return ""
    error = row["branch_oracle_error"]
    return NO_BRANCH if error is None else f"{error:.1e}"


def zoo_summary(rows: list[dict]) -> Table:
    """The sweep in one line: models passing (the oracle ran and held), groups, and the
    largest oracle error. A model with no zero-invariant group does not count as passing."""
    passed = [r for r in rows if r["status"] == "pass" and zoo_oracle(r) == "ran"]
    errors = [r["oracle_error"] for r in passed if isinstance(r.get("oracle_error"), float)]
    head = ["models passing", "groups", "prunable", "zero-invariant", "frozen", "largest oracle error"]
    return head, [[f"{len(passed)}/{len(rows)}", sum(r["groups"] for r in passed),
                   sum(r["prunable"] for r in passed), sum(r["zero_invariant"] for r in passed),
                   sum(r["frozen"] for r in passed), f"{max(errors):.1e}" if errors else ""]]


def tasks_sweep(rows: list[dict]) -> Table:
    """tasks_sweep.py's rows: fxprune (front end, groups, oracle) and Torch-Pruning, per model."""
    def fmt(value: Any, spec: str = ".3g") -> str:
        return format(value, spec) if isinstance(value, float) else ("" if value is None else str(value))

    head = ["model", "family", "M params", "front end", "groups", "prunable", "zero-inv.", "oracle error",
            "kept", "fxprune", "Torch-Pruning", "TP shape", "TP kept"]
    body = [[r["model"], r["family"], fmt(r.get("params_M")), r.get("front_end", ""), r.get("groups", ""),
             r.get("prunable", ""), r.get("zero_invariant", ""), fmt(r.get("oracle_error"), ".1e"),
             fmt(r.get("kept")), "pass" if r["status"] == "pass" else f"FAIL {r.get('why', '')}"[:70],
             "ran" if r.get("tp_ran") else f"FAIL {r.get('tp_why', '')}"[:60] if "tp_ran" in r else "",
             {True: "kept", False: "changed"}.get(r.get("tp_shape_ok"), ""), fmt(r.get("tp_kept"))]
            for r in rows]
    return head, body


def tasks_summary(rows: list[dict]) -> Table:
    """The tasks sweep per family: models whose oracle holds, and Torch-Pruning's runs that keep the shape."""
    body = []
    for family in [*dict.fromkeys(r["family"] for r in rows), "all"]:
        mine = [r for r in rows if family in ("all", r["family"])]
        errors = [r["oracle_error"] for r in mine if r["status"] == "pass"]
        body.append([family, f"{sum(r['status'] == 'pass' for r in mine)}/{len(mine)}",
                     f"{max(errors):.1e}" if errors else "",
                     f"{sum(bool(r.get('tp_ran') and r.get('tp_shape_ok')) for r in mine)}/{len(mine)}"])
    return ["family", "fxprune: oracle holds", "largest oracle error", "Torch-Pruning: runs, shape kept"], body


NM_MODES = {"eager": "eager", "graph": "CUDA graph", "compiled": 'torch.compile(mode="reduce-overhead")'}


def _ms(value: Any, spec: str = ".3f") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def nm_gpu(rows: list[dict]) -> Table:
    """Whole models, dense vs 2:4: median ms per mode and the speedup of the tuned kernels."""
    head = ["model (input)", "mode", "dense ms", "2:4 ms, algorithm 0", "2:4 ms, tuned", "speedup"]
    body = [[f"{r['model']} ({r['input']})", NM_MODES.get(r["mode"], r["mode"]), _ms(r["dense_ms"]),
             _ms(r["alg0_ms"]), _ms(r["tuned_ms"]), _ms(r["speedup"], ".2f") + ("x" if r["speedup"] else "")]
            for r in rows if r["layer"] == "end-to-end"]
    return head, body


def nm_gpu_layers(rows: list[dict]) -> Table:
    """Every row nm_gpu.py writes: each Linear layer (or why it stays dense) and the whole model."""
    head = ["model", "layer", "weight", "input", "mode", "dense ms", "2:4 ms (alg 0)", "2:4 ms (tuned)", "alg",
            "speedup", "max |diff|", "status", "reason"]
    body = [[r["model"], r["layer"], r["shape"], r["input"], r["mode"], _ms(r["dense_ms"]), _ms(r["alg0_ms"]),
             _ms(r["tuned_ms"]), _ms(r["alg_id"], "d"), _ms(r["speedup"], ".2f"), _ms(r["max_abs_diff"], ".3g"),
             r["status"], r["reason"]] for r in rows]
    return head, body


# name in the docs' markers -> (results file, table)
def timm_oracle(row: dict) -> str:
    """Whether the oracle ran on a timm_sweep.py row (its "oracle" column; rows written
    before it existed: an error was recorded)."""
    if "oracle" in row:
        return row["oracle"]
    return "ran" if row.get("oracle_error") is not None else NO_ORACLE


def timm_sweep(rows: list[dict]) -> Table:
    """timm_sweep.py's rows: fxprune (front end, groups, parameters kept, oracle) and Torch-Pruning."""
    def fmt(value: Any, spec: str = ".3g") -> str:
        return format(value, spec) if isinstance(value, float) else ("" if value is None else str(value))

    head = ["model", "M params", "front end", "groups", "prunable", "kept", "oracle error", "branch oracle error",
            "fxprune", "Torch-Pruning", "TP kept"]
    body = [[r["model"], fmt(r.get("params_M")), r.get("front_end", ""), r.get("groups", ""), r.get("prunable", ""),
             fmt(r.get("kept")), fmt(r.get("oracle_error"), ".1e") if timm_oracle(r) == "ran" else timm_oracle(r),
             branch_oracle(r),
             ("ok" if timm_oracle(r) == "ran" else "ok, shape only") if r.get("fx_ok")
             else f"FAIL {r.get('fx_why', '')}"[:60],
             "ok" if r.get("tp_ok") else f"FAIL {r.get('tp_why', '')}"[:60], fmt(r.get("tp_kept"))]
            for r in rows]
    return head, body


def timm_summary(rows: list[dict]) -> Table:
    """How many models each tool prunes below 80% of their parameters, same list, same run.
    fxprune's count is of models the oracle checked; those with no zero-invariant group
    (shape and parameter count checked only, as Torch-Pruning's) are a line of their own."""
    n = len(rows)
    checked = [r for r in rows if r.get("fx_ok") and timm_oracle(r) == "ran"]
    unchecked = [r["model"] for r in rows if r.get("fx_ok") and timm_oracle(r) != "ran"]
    tp = sum(bool(r.get("tp_ok")) for r in rows)
    exported = sum(r.get("front_end") == "export" for r in checked)
    body = [["fxprune", f"{len(checked)}/{n}", f"oracle ran and held; {exported} captured with torch.export"]]
    if unchecked:
        body.append(["fxprune, no zero-invariant group", f"{len(unchecked)}/{n}",
                     f"shape checked only, the oracle had nothing to check: {', '.join(unchecked)}"])
    body.append(["Torch-Pruning 1.6", f"{tp}/{n}", "shape-checked only (no oracle)"])
    return ["tool", "models pruned below 80% of their parameters", "notes"], body


def _oracle_cell(error: Any) -> str:
    return "" if error is None else (f"{error:.1e}" if error >= 1e-4 else "ok")


def hf_sweep(rows: list[dict]) -> Table:
    """hf_sweep.py's rows: front end, MLP / head / expert groups through the oracle, the
    emitted module's save/load round trip, and Torch-Pruning on the same model."""
    head = ["model", "kind", "front end", "MLP groups", "MLP oracle", "head groups", "heads oracle", "experts",
            "experts oracle", "emit module", "fxprune", "Torch-Pruning"]
    body = [[r["model"], r.get("kind", ""), r.get("front_end", ""), r.get("mlp_groups", ""),
             _oracle_cell(r.get("mlp_error")), r.get("head_groups", ""), _oracle_cell(r.get("head_error")),
             r.get("experts", ""), _oracle_cell(r.get("expert_error")), (r.get("module") or "")[:40],
             "ok" if r.get("mlp_ok") else f"FAIL {r.get('why', '')}"[:70],
             "ok" if r.get("tp_ok") else f"FAIL {r.get('tp_why', '')}"[:60]] for r in rows]
    return head, body


def hf_summary(rows: list[dict]) -> Table:
    """Architectures built, captured, MLP neurons through the oracle (of all, and of those
    torch.export captured), emitted modules that round-trip, Torch-Pruning on the same list."""
    n = len(rows)
    exported = [r for r in rows if r.get("front_end") == "export"]
    captured = [r for r in rows if r.get("front_end")]
    mlp = sum(bool(r.get("mlp_ok")) for r in rows)
    mlp_export = sum(bool(r.get("mlp_ok")) for r in exported)
    share = f"{100 * mlp_export / len(exported):.0f}%" if exported else "-"
    body = [["architectures swept", f"{n}", ", ".join(f"{k} {sum(r.get('kind') == k for r in rows)}"
                                                      for k in dict.fromkeys(r.get("kind") for r in rows))],
            ["built by the generic shrinker, run eagerly", f"{sum(r.get('stage') != 'build' for r in rows)}/{n}", ""],
            ["captured", f"{len(captured)}/{n}", f"{len(exported)} by torch.export"],
            ["fxprune: MLP neurons pruned, oracle holds", f"{mlp}/{n}",
             f"{mlp_export}/{len(exported)} ({share}) of those torch.export captured"],
            ["fxprune: heads pruned, oracle holds",
             f"{sum(r.get('head_error') is not None and r['head_error'] < 1e-4 for r in rows)}/{n}", ""],
            ["fxprune: experts removed, oracle holds",
             f"{sum(r.get('expert_error') is not None and r['expert_error'] < 1e-4 for r in rows)}"
             f"/{sum(bool(r.get('experts')) for r in rows)}", "of the models with routed experts"],
            ["fxprune: emit=\"module\" saves and reloads", f"{sum(r.get('module') == 'ok' for r in rows)}/{mlp}",
             "of the models whose MLP neurons were pruned"],
            ["Torch-Pruning 1.6: runs, output shapes hold, > 5% removed",
             f"{sum(bool(r.get('tp_ok')) for r in rows)}/{n}",
             "no oracle" + (f"; not run on {untried}" if (untried := sum('tp_ok' not in r for r in rows)) else "")]]
    return ["", "count", "notes"], body


def hf_no_rule(rows: list[dict]) -> Table:
    """The ops that froze a group for want of a rule in hf_sweep.py's graphs, with the models."""
    seen: dict[str, list[str]] = {}
    for r in rows:
        for op in r.get("no_rule") or []:
            seen.setdefault(op.removeprefix("ATen op "), []).append(r["model"])
    body = [[op, len(models), ", ".join(models[:8]) + (" ..." if len(models) > 8 else "")]
            for op, models in sorted(seen.items(), key=lambda kv: (-len(kv[1]), kv[0]))]
    return ["op with no rule", "models", "in"], body


def llm_scale(rows: list[dict]) -> Table:
    """llm_scale.py's rows: capture and analysis of Llama shapes on the meta device, and Torch-Pruning."""
    head = ["model", "layers", "nodes", "capture (s)", "analysis (s)", "peak RSS (MB)", "kv-head groups",
            "MLP groups", "hidden groups", "params (B) full / half", "GFLOPs full / half", "Torch-Pruning"]
    body = [[r["model"], r.get("layers", ""), r.get("nodes", ""), r.get("capture_s", r.get("fxprune_error", "")),
             r.get("analysis_s", ""), r.get("peak_rss_mb", ""), r.get("kv_head_groups", ""),
             r.get("mlp_groups", ""), r.get("hidden_groups", ""),
             f"{r['params_b']} / {r['params_half_b']}" if "params_b" in r else "",
             f"{r['gflops']} / {r['gflops_half']}" if "gflops" in r else "",
             f"{r['tp_build_s']} s, {r['tp_groups']} groups" if "tp_build_s" in r else r.get("tp_error", "skipped")]
            for r in rows]
    return head, body


def shards(rows: list[dict]) -> Table:
    """shards.py's rows: peak memory of writing a pruned checkpoint shard by shard."""
    head = ["model", "shards", "model (MB)", "largest shard (MB)", "pruned (MB)", "base RSS (MB)",
            "peak RSS (MB)", "added (MB)", "added / largest shard", "added / model", "analysis (s)", "save (s)"]
    body = [[r["model"], r["shards"], r["model_mb"], r["largest_shard_mb"], r["pruned_mb"], r["base_rss_mb"],
             r["peak_rss_mb"], r["added_mb"], f"{r['added_mb'] / r['largest_shard_mb']:.2f}",
             f"{r['added_mb'] / r['model_mb']:.2f}", r["analysis_s"], r["save_s"]] for r in rows]
    return head, body


def num(value: Any, spec: str = ".3f") -> str:
    """A number as ``spec`` formats it; anything else (a missing cell) as blank."""
    return format(value, spec) if isinstance(value, (int, float)) else ""


def scale(rows: list[dict]) -> Table:
    """scale.py's rows: activation scores from a checkpoint, layer by layer, in 1 or more processes."""
    head = ["model", "processes", "allocator", "checkpoint (MB)", "calibration tokens", "scores (s)", "tokens/s",
            "base RSS (MB)", "peak RSS (MB)", "added (MB)", "added / checkpoint", "equal to in-memory"]
    body = [[r["model"], r["processes"], r.get("allocator", ""), r["checkpoint_mb"], f"{r['batches']} x {r['seq']}", r["scores_s"],
             r["tokens_per_s"], r["base_rss_mb"], r["peak_rss_mb"], r["added_mb"],
             f"{r['added_mb'] / r['checkpoint_mb']:.2f}",
             ("" if "equal" not in r else "yes (bit for bit)" if r["equal"]
              else f"no: max rel. diff {r['max_rel_diff']:.1e}")] for r in rows]
    return head, body


def minilm(rows: list[dict]) -> Table:
    """minilm.py's rows: encoder parameters kept, similarity to the dense embeddings before and
    after distillation, seconds. A row that failed shows its error."""
    head = ["budget", "tool", "score", "scope", "encoder params kept", "mean cosine", "Spearman",
            "distilled cosine", "distilled Spearman", "prune s", "distil s"]
    body = []
    for r in rows:
        budget = "dense" if r["tool"] == "dense" else f"{r['budget']:g}"
        kept = (f"{r['encoder_fraction']:.3f} ({r['encoder_params']:,})" if "encoder_params" in r
                else f"fails: {r.get('error', '')}")
        body.append([budget, r["tool"] if r["tool"] != "dense" else "", r.get("score", ""), r.get("scope", ""), kept,
                     num(r.get("cosine")), num(r.get("spearman")),
                     num(r.get("distilled_cosine")) or r.get("distill_error", ""), num(r.get("distilled_spearman")),
                     num(r.get("prune_s"), ".1f"), num(r.get("distill_s"), ".0f")])
    return head, body


def value_check(rows: list[dict]) -> Table:
    """value_check.py's rows: prune time with shapes only and with the value check."""
    head = ["model", "analyze (s)", "prune, shapes (s)", "prune, values (s)", "values / shapes", "error found"]
    return head, [[r["model"], f"{r['analyze_s']:.2f}", f"{r['prune_shapes_s']:.2f}", f"{r['prune_values_s']:.2f}",
                   f"{r['overhead']:.2f}", f"{r['error']:.1e}"] for r in rows]


NM_METHODS = {"magnitude": "magnitude", "wanda": "Wanda (activation)", "sparsegpt": "SparseGPT",
              "proxsparse": "ProxSparse (learned, original weights)",
              "proxsparse-trained": "ProxSparse (learned, trained weights)", "spartan": "Spartan (learned)", "sr-ste": "SR-STE (learned)",
              "spartan-sparsegpt": "Spartan (learned, from SparseGPT)",
              "sr-ste-sparsegpt": "SR-STE (learned, from SparseGPT)"}


def nm_quality(rows: list[dict]) -> Table:
    """nm_quality.py's rows: pattern, mask method, fidelity to the dense embeddings one-shot and
    after the same distillation, whether the pattern holds on every layer, seconds."""
    head = ["pattern", "method", "mean cosine", "Spearman", "distilled cosine", "distilled Spearman",
            "pattern holds", "mask s", "distil s"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["pattern"], NM_METHODS.get(r["method"], r["method"]), f"fails: {r['error']}",
                         "", "", "", "", "", ""])
            continue
        holds = {True: "yes", False: "no"}.get(r.get("pattern_holds"), "")
        body.append([r["pattern"], NM_METHODS.get(r["method"], r["method"]), num(r.get("cosine")),
                     num(r.get("spearman")), num(r.get("distilled_cosine")), num(r.get("distilled_spearman")),
                     holds, num(r.get("mask_s"), ".1f"), num(r.get("distill_s"), ".0f")])
    return head, body


def nm_steps(rows: list[dict]) -> Table:
    """nm_steps.py's rows: one line per recipe, the held-out cosine at each measured step, then
    the last step's Spearman and cosine on the training sentences."""
    steps = sorted({r["step"] for r in rows})
    head = ["mask", "lr", "augment", "sentences"] + [f"cosine @{s}" for s in steps] + ["Spearman", "train cosine"]
    body = []
    for run in dict.fromkeys(r["run"] for r in rows):
        sel = {r["step"]: r for r in rows if r["run"] == run}
        last = sel[max(sel)]
        body.append([NM_STEPS_MASKS[last["mask"]], f"{last['lr']:g}", f"{last['augment']:g}",
                     last.get("sentences", "all")]
                    + [num(sel[s]["cosine"]) if s in sel else "" for s in steps]
                    + [num(last["spearman"]), num(last["train_cosine"])])
    return head, body


NM_STEPS_MASKS = {"fixed": "SparseGPT, fixed", "spartan": "Spartan from SparseGPT", "sr-ste": "SR-STE from SparseGPT"}


def depth(rows: list[dict]) -> Table:
    """depth.py's rows: width, depth, both (by measured latency) or Torch-Pruning at one FLOPs
    target, batch 1, and the latency quotients, eager and (where timed) compiled."""
    compiled = any("compiled_quotient" in r for r in rows)
    head = ["model", "units", "FLOPs kept", "branches removed", "groups cut", "ms", "quotient"]
    head += ["compiled ms", "compiled quotient"] if compiled else []
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["model"], _DEPTH_UNITS[r["units"]], f"fails: {r['error']}"] + [""] * (len(head) - 3))
            continue
        line = [r["model"], _DEPTH_UNITS[r["units"]], f"{r['flops_kept']:.3f}",
                f"{r['branches_removed']}/{r['branches']}", "" if r["groups_cut"] is None else r["groups_cut"],
                f"{r['ms']:.1f}", f"{r['quotient']:.2f}"]
        if compiled:
            line += [_ms(r.get("compiled_ms"), ".1f"), _ms(r.get("compiled_quotient"), ".2f")]
        body.append(line)
    return head, body


_DEPTH_UNITS = {"width": "width", "width-latency": "width (latency)", "depth": "depth", "both": "both (latency)",
                "tp": "Torch-Pruning width"}


def depth_batch(rows: list[dict]) -> Table:
    """depth.py's plans ranked by eager quotient at batch 1 and again at the larger batch."""
    big = next((k[:-len("_quotient")] for r in rows for k in r if k.startswith("b") and k.endswith("_quotient")), None)
    if big is None:
        return ["model"], []
    head = ["model", "batch 1: eager quotients, best first", f"batch {big[1:]}: eager quotients, best first"]
    body = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model and "error" not in r]

        def ranked(key):
            return ", ".join(f"{_DEPTH_UNITS[r['units']]} {r[key]:.2f}"
                             for r in sorted(mine, key=lambda r: -r[key]))
        body.append([model, ranked("quotient"), ranked(f"{big}_quotient")])
    return head, body


def minilm_depth(rows: list[dict]) -> Table:
    """minilm_depth.py's rows: the unit kind, branch score, what went, encoder parameters kept,
    similarity to the dense embeddings before and after distillation (the best row of each
    kind and budget, marked *), latency at the benchmark's batch. A failed row shows its error."""
    head = ["budget", "units", "branch score", "removed", "encoder params kept", "mean cosine", "Spearman",
            "distilled cosine", "distilled Spearman", "ms", "speedup"]
    body = []
    for r in rows:
        if r["kind"] == "dense":
            body.append(["dense", "", "", "", f"1.000 ({r['encoder_params']:,})", "1.000", "1.000", "", "",
                         f"{num(r.get('ms'), '.0f')} (graph {num(r.get('graph_ms'), '.0f')})", "1.00"])
            continue
        kept = (f"{r['encoder_fraction']:.3f} ({r['encoder_params']:,})" if "encoder_params" in r
                else f"fails: {r.get('error', '')}")
        score = (r["branch_score"] or "-") + (" *" if r.get("best") else "")
        speed = f"{r['speedup']:.2f} ({r['form']})" if "speedup" in r else ""
        body.append([f"{r['budget']:g}", r["kind"], score, r.get("removed", ""), kept, num(r.get("cosine")),
                     num(r.get("spearman")), num(r.get("distilled_cosine")) or r.get("distill_error", ""),
                     num(r.get("distilled_spearman")), num(r.get("ms"), ".0f"), speed])
    return head, body


TABLES: dict[str, tuple[str, Callable[[list[dict]], Table]]] = {
    "timm_sweep": ("timm_sweep", timm_sweep),
    "timm_summary": ("timm_sweep", timm_summary),
    "llm_scale": ("llm_scale", llm_scale),
    "shards": ("shards", shards),
    "scale": ("scale", scale),
    "latency": ("latency", latency),
    "latency_glance": ("latency", latency_glance),
    "analysis_scaling": ("analysis_scaling", analysis_scaling),
    "analysis_front_ends": ("analysis_scaling", analysis_front_ends),
    "digits": ("digits", digits),
    "digits_glance": ("digits", digits_glance),
    "digits_capacity": ("digits_capacity", digits_capacity),
    "digits_sparse": ("digits_sparse", digits_sparse),
    "zoo_sweep": ("zoo_sweep", zoo_sweep),
    "zoo_summary": ("zoo_sweep", zoo_summary),
    "tasks_sweep": ("tasks_sweep", tasks_sweep),
    "tasks_summary": ("tasks_sweep", tasks_summary),
    "nm_gpu": ("nm_gpu", nm_gpu),
    "minilm": ("minilm", minilm),
    "value_check": ("value_check", value_check),
    "depth": ("depth", depth),
    "depth_batch": ("depth", depth_batch),
    "nm_quality": ("nm_quality", nm_quality),
    "nm_steps": ("nm_steps", nm_steps),
    "nm_steps_text": ("nm_steps_text", nm_steps),
    "nm_steps_data": ("nm_steps_data", nm_steps),
    "minilm_depth": ("minilm_depth", minilm_depth),
    "hf_sweep": ("hf_sweep", hf_sweep),
    "hf_summary": ("hf_sweep", hf_summary),
    "hf_no_rule": ("hf_sweep", hf_no_rule),
}
