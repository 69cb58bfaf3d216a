"""LLM-sized graphs without weights: fxprune's capture and analysis of Llama-3-shaped models
on the meta device, next to Torch-Pruning's group building on the same model.

For each shape (Llama-3.2-1B, Llama-3-8B, Llama-3-70B: grouped-query attention, random
config, nothing downloaded) a fresh subprocess builds ``LlamaForCausalLM`` on the meta
device (no weight memory), then measures:

* capture (s)  -- ``torch.export`` of the model (fxprune's export front end);
* analysis (s) -- channel rules and group building on the captured graph;
* peak RSS     -- the subprocess's peak resident memory (MB): the graph, not the weights;
* groups       -- prunable groups by kind: key/value-head groups (each unit a kv head with
                  its query heads), MLP neurons, hidden size;
* cost         -- FLOPs and parameters before and after a plan that removes half the kv
                  heads and half the MLP neurons, counted on the meta device;
* Torch-Pruning -- ``DependencyGraph().build_dependency`` and the enumeration of its pruning
                  groups (``get_all_groups``, what every pruner does first) on the same model,
                  in its own subprocess, stopped after ``--tp-timeout`` seconds. It runs the
                  model (it fails on the meta device), so it gets random bfloat16 weights on
                  the CPU where they fit.

    python benchmarks/llm_scale.py                       # 1B, 8B, 70B (about 5 minutes)
    python benchmarks/llm_scale.py --models 8b --tp-timeout 120 --json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


from _results import add_json_option, header, write
from _tables import llm_scale as table
from _tables import show

SHAPES = {  # name: (layers, hidden, heads, kv heads, intermediate, vocabulary)
    "1b": (16, 2048, 32, 8, 8192, 128256),
    "8b": (32, 4096, 32, 8, 14336, 128256),
    "70b": (80, 8192, 64, 8, 28672, 128256),
    # two layers of the 1B shape: loads whole in about 1.3 GB (scale.py checks its scores against it)
    "1b-2layers": (2, 2048, 32, 8, 8192, 128256),
}
SEQ = 16


REAL_WEIGHTS_LIMIT = 2e9  # parameters: Torch-Pruning gets real bfloat16 weights up to this size


def build(name: str, device: str = "meta"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, heads, kv, inter, vocab = SHAPES[name]
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab, use_cache=False)
    default = torch.get_default_dtype()
    if device != "meta":
        torch.set_default_dtype(torch.bfloat16)  # random weights, made in bfloat16 directly
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model, {"input_ids": torch.zeros(1, SEQ, dtype=torch.long, device=device)}, config


def measure_fxprune(name: str) -> dict:
    """Runs in its own process: capture, analysis, peak memory, groups and the plan's cost."""
    import resource

    import torch

    import fxprune
    from fxprune.capture import capture
    from fxprune.channels.analysis import run_rules
    from fxprune.channels.graph import build_groups
    from fxprune.measure import count_flops, count_params

    torch.set_num_threads(2)
    model, inputs, config = build(name)
    t0 = time.perf_counter()
    captured = capture(model, inputs, capture="export")
    t1 = time.perf_counter()
    graph = build_groups(run_rules(captured.gm), captured.inputs, captured.front_end)
    t2 = time.perf_counter()
    head_dim = config.hidden_size // config.num_attention_heads
    q_rows = "model.layers.0.self_attn.q_proj.weight"
    kinds = {"kv": 0, "mlp": 0, "hidden": 0}
    plan = {}
    for g in graph.prunable_groups:
        rows = {k: sum(len(i) for _, i in v) for k, v in g.slices([0], "out").items()}
        if any(k.endswith("self_attn.k_proj.weight") for k in rows):
            kinds["kv"] += 1
            plan[g.id] = list(range(g.size // 2))
            assert rows.get(q_rows, head_dim * config.num_attention_heads // config.num_key_value_heads) % head_dim == 0
        elif any(k.endswith("mlp.gate_proj.weight") for k in rows):
            kinds["mlp"] += 1
            plan[g.id] = list(range(g.size // 2))
        elif g.size == config.hidden_size:
            kinds["hidden"] += 1
    small = fxprune.prune(graph, plan)
    return {
        "model": f"llama-{name}", "layers": config.num_hidden_layers, "nodes": len(captured.gm.graph.nodes),
        "capture_s": round(t1 - t0, 2), "analysis_s": round(t2 - t1, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "kv_head_groups": kinds["kv"], "mlp_groups": kinds["mlp"], "hidden_groups": kinds["hidden"],
        "params_b": round(count_params(model) / 1e9, 2), "params_half_b": round(count_params(small) / 1e9, 2),
        "gflops": round(count_flops(graph.gm, inputs) / 1e9, 1),
        "gflops_half": round(count_flops(small, inputs) / 1e9, 1),
    }


def measure_tp(name: str) -> dict:
    """Runs in its own process: Torch-Pruning's dependency graph on the same model. It runs
    the model for real (``Tensor.item()`` fails on the meta device), so it gets random
    bfloat16 weights on the CPU where they fit (``REAL_WEIGHTS_LIMIT``)."""
    import torch_pruning as tp

    layers, hidden, _, _, inter, vocab = SHAPES[name]
    params = layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden
    if params > REAL_WEIGHTS_LIMIT:
        return {"tp_error": f"fails on the meta device; real weights ({params * 2 / 1e9:.0f} GB bf16) not tried"}
    import torch

    model, inputs, _ = build(name, device="cpu")
    t0 = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=inputs["input_ids"])
    groups = list(graph.get_all_groups(ignored_layers=[model.lm_head], root_module_types=[torch.nn.Linear]))
    return {"tp_build_s": round(time.perf_counter() - t0, 2), "tp_groups": len(groups),
            "tp_weights": "random bf16 (CPU)"}


def in_subprocess(kind: str, name: str, timeout: float) -> dict:
    """The row part that ``kind`` measures, from a fresh interpreter (so peak memory is its own)."""
    cmd = [sys.executable, __file__, "--child", kind, "--models", name]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {f"{kind}_error": f"not finished after {timeout:.0f} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {f"{kind}_error": last[:160]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="1b,8b,70b", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--tp-timeout", type=float, default=150, help="seconds before Torch-Pruning is stopped")
    ap.add_argument("--skip-tp", action="store_true", help="do not run Torch-Pruning")
    ap.add_argument("--child", choices=("fxprune", "tp"), help=argparse.SUPPRESS)
    add_json_option(ap, "llm_scale")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    if args.child:  # one measurement, printed as JSON for the parent
        print(json.dumps((measure_fxprune if args.child == "fxprune" else measure_tp)(names[0])))
        return 0
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(SHAPES)}")
    rows = []
    for name in names:
        row = {"model": f"llama-{name}", **in_subprocess("fxprune", name, 1800)}
        if not args.skip_tp:
            row.update(in_subprocess("tp", name, args.tp_timeout))
        rows.append(row)
        print(f"  done llama-{name}", file=sys.stderr, flush=True)
    show(table(rows))
    if args.json:
        write(args.json, rows, header(args, threads=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
