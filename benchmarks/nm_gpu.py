"""Dense vs 2:4 semi-structured sparse latency on a CUDA GPU, in bfloat16.

For each model, the baseline is the 2:4-masked model with dense weights (same values).
Two candidates: the same model after ``to_semi_structured`` with cuSPARSELt's default
algorithm (0), and after ``to_semi_structured(..., example_inputs=x)``, which times every
cuSPARSELt algorithm per layer on the activations it sees and keeps the fastest ("tuned").
All three are timed per nn.Linear layer (on its real activations) and end to end, with
CUDA events, rotating their order every iteration after a warm-up; the table gives
medians. Each is timed eagerly (every call pays torch's CPU-side cost of launching the
matmul) and replaying a CUDA graph (GPU time only); whole models also under
``torch.compile(mode="reduce-overhead")``, which is how a user gets CUDA graphs. Layers
that stay dense are listed with the reason.

Needs a CUDA GPU with compute capability >= 8.0 (sparse tensor cores); exits with a
message otherwise. Weights are random (``weights=None``): latency does not depend on them.

    python benchmarks/nm_gpu.py                      # vit_b_16 and the 4096-16384-4096 MLP
    python benchmarks/nm_gpu.py --json               # writes benchmarks/results/nm_gpu.json
    python benchmarks/nm_gpu.py --models mlp --tokens 1024 8192 --json nm_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn

from fxprune.measure import cuda_graph
from fxprune.sparsity.nm import apply_nm, finalize
from fxprune.sparsity.semi_structured import layer_inputs, to_semi_structured
from _results import add_json_option, header, write
from _tables import nm_gpu_layers

MODELS = ("vit_b_16", "mlp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to run")
    parser.add_argument("--batch", type=int, default=8, help="vit_b_16 batch size (224x224 images)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192],
                        help="MLP token counts (rows of the input), one run each")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations of each variant")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations of each variant")
    parser.add_argument("--backend", choices=("cusparselt", "cutlass"), default=None,
                        help="sparse kernel backend (default: cuSPARSELt if available; CUTLASS has no "
                             "algorithm search and runs on compute capability 8.x only)")
    add_json_option(parser, "nm_gpu")
    return parser.parse_args(argv)


def require_cuda() -> torch.device:
    if not torch.cuda.is_available():
        raise SystemExit(
            "nm_gpu.py: no CUDA GPU (torch.cuda.is_available() is False). Semi-structured sparse "
            "kernels only exist on CUDA; on CPU a 2:4 mask gives no speed, so there is nothing to time."
        )
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        raise SystemExit(f"nm_gpu.py: compute capability {capability} < (8, 0): this GPU has no sparse tensor cores.")
    return torch.device("cuda")


def build(name: str, size: int) -> tuple[nn.Module, torch.Tensor]:
    """``size``: the batch of images (vit_b_16) or the number of tokens (mlp)."""
    if name == "vit_b_16":
        import torchvision

        return torchvision.models.vit_b_16(weights=None), torch.randn(size, 3, 224, 224)
    mlp = nn.Sequential(nn.Linear(4096, 16384), nn.GELU(), nn.Linear(16384, 4096))
    return mlp, torch.randn(size, 4096)


def time_variants(fns: dict[str, Callable[[], object]], warmup: int, iters: int) -> dict[str, float]:
    """Median milliseconds of each callable, rotating which runs first every iteration."""
    labels = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {label: [] for label in labels}
    for i in range(iters):
        for label in labels[i % len(labels):] + labels[:i % len(labels)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[label]()
            end.record()
            end.synchronize()
            times[label].append(start.elapsed_time(end))
    return {label: statistics.median(t) for label, t in times.items()}


VARIANTS = ("dense", "alg0", "tuned")


def time_row(row: dict, calls: dict[str, Callable[[], object]], args: argparse.Namespace,
             compiled: Callable[[], dict[str, Callable[[], object]]] | None = None) -> list[dict]:
    """One row per mode (eager, CUDA graph, and compiled where ``compiled`` builds the calls)
    with each variant's median ms and the speedup of the tuned (else alg 0) variant."""
    builders = {"eager": lambda: calls, "graph": lambda: {k: cuda_graph(fn) for k, fn in calls.items()}}
    if compiled is not None:
        builders["compiled"] = compiled
    out = []
    for mode, build_calls in builders.items():
        r = dict(row, mode=mode)
        try:
            ms = time_variants(build_calls(), args.warmup, args.iters)
        except Exception as err:  # noqa: BLE001 -- a sparse op torch cannot run, capture or compile: report it
            ms = {}
            r["reason"] = (r["reason"] + "; " if r["reason"] else "") + f"{mode} failed: {str(err).splitlines()[0]}"
        for variant in VARIANTS:
            r[f"{variant}_ms"] = ms.get(variant)
        best = r["tuned_ms"] or r["alg0_ms"]
        r["speedup"] = r["dense_ms"] / best if r["dense_ms"] and best else None
        out.append(r)
    return out


def bench_model(name: str, size: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    model, x = build(name, size)
    dense = model.to(device, torch.bfloat16).eval()
    x = x.to(device, torch.bfloat16)
    apply_nm(dense, 2, 4)
    finalize(dense)  # baseline: the same 2:4 values in plain dense weights
    models = {"dense": dense, "alg0": copy.deepcopy(dense)}
    kernel_rows = {r.name: r for r in to_semi_structured(models["alg0"], backend=args.backend)}
    tune = (args.backend or "cusparselt") == "cusparselt" and any(r.status == "sparse" for r in kernel_rows.values())
    if tune:
        models["tuned"] = copy.deepcopy(dense)
        kernel_rows = {r.name: r for r in to_semi_structured(models["tuned"], backend=args.backend, example_inputs=x)}
    mods = {variant: dict(m.named_modules()) for variant, m in models.items()}
    tokens = f"{size} images" if name == "vit_b_16" else f"{size} tokens"
    rows = []
    with torch.inference_mode():
        # Each variant's layers get the activations of that variant's own model: a sparse
        # layer's output layout differs from a dense one's and changes the next matmul's speed.
        linears = {layer for layer, mod in dense.named_modules() if isinstance(mod, nn.Linear)}
        inputs = {variant: layer_inputs(m, linears, x) for variant, m in models.items()}
        for layer, kr in kernel_rows.items():
            if not isinstance(mods["dense"][layer], nn.Linear):
                continue
            row = {"model": name, "layer": layer, "shape": "x".join(map(str, kr.shape)), "input": tokens,
                   "status": kr.status, "alg_id": kr.alg_id, "reason": kr.reason, "max_abs_diff": None}
            inp = inputs["dense"].get(layer)
            if inp is None:
                row["reason"] = (row["reason"] + "; " if row["reason"] else "") + "not called as a module: not timed"
            if kr.status != "sparse" or inp is None:
                rows.append(dict(row, mode="", **{f"{v}_ms": None for v in VARIANTS}, speedup=None))
                continue
            calls = {variant: (lambda m=m, v=variant: m[layer](inputs[v][layer])) for variant, m in mods.items()}
            row["max_abs_diff"] = (calls["dense"]() - calls[list(calls)[-1]]()).abs().max().item()
            rows += time_row(row, calls, args)
        sparse = sum(r.status == "sparse" for r in kernel_rows.values())
        end = {"model": name, "layer": "end-to-end", "shape": "", "input": tokens,
               "status": f"{sparse}/{len(kernel_rows)} sparse", "alg_id": None, "reason": "", "max_abs_diff": None}
        calls = {variant: (lambda m=m: m(x)) for variant, m in models.items()}
        try:
            end["max_abs_diff"] = (calls["dense"]().float() - calls[list(calls)[-1]]().float()).abs().max().item()
        except (RuntimeError, NotImplementedError) as err:
            end["reason"] = f"sparse model failed: {str(err).splitlines()[0]}"
            return rows + [dict(end, mode="", **{f"{v}_ms": None for v in VARIANTS}, speedup=None)]
        def compiled():
            torch._dynamo.reset()
            fns = {variant: torch.compile(m, mode="reduce-overhead") for variant, m in models.items()}
            return {variant: (lambda fn=fn: fn(x)) for variant, fn in fns.items()}

        rows += time_row(end, calls, args, compiled)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = require_cuda()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  median of {args.iters} (CUDA events), bf16; "
          "speedup = dense / 2:4 tuned (alg 0 where nothing was tuned)")
    rows = []
    for name in args.models:
        for size in ([args.batch] if name == "vit_b_16" else args.tokens):
            rows += bench_model(name, size, args, device)
    head, body = nm_gpu_layers(rows)
    print(tabulate(body, headers=head, disable_numparse=True))
    if args.json:
        write(args.json, rows, header(args, gpu=torch.cuda.get_device_name(), dtype="bfloat16",
                                      cusparselt=getattr(torch.backends.cusparselt, "version", lambda: None)()))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
