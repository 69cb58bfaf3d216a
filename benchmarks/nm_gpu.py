"""Dense vs 2:4 semi-structured sparse latency on a CUDA GPU, in bfloat16.

For each model, the baseline is the 2:4-masked model with dense weights (same values);
the candidate is the same model after ``to_semi_structured``. Both are timed per
nn.Linear layer (on the activations the layer really sees) and end to end, with CUDA
events, alternating dense/sparse order every iteration after a warm-up; the table gives
medians. Layers that stay dense are listed with the reason.

Needs a CUDA GPU with compute capability >= 8.0 (sparse tensor cores); exits with a
message otherwise. Weights are random (``weights=None``): latency does not depend on them.

    python benchmarks/nm_gpu.py                      # vit_b_16 and the 4096-16384-4096 MLP
    python benchmarks/nm_gpu.py --models mlp --json nm_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn

from fxprune.passes.nm import apply_nm, finalize, to_semi_structured

MODELS = ("vit_b_16", "mlp")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="models to run")
    parser.add_argument("--batch", type=int, default=8, help="vit_b_16 batch size (224x224 images)")
    parser.add_argument("--tokens", type=int, default=1024, help="MLP tokens (rows of the input)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations of each variant")
    parser.add_argument("--iters", type=int, default=50, help="timed iterations of each variant")
    parser.add_argument("--backend", choices=("cusparselt", "cutlass"), default=None,
                        help="sparse kernel backend (default: cuSPARSELt if available)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
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


def build(name: str, args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor]:
    if name == "vit_b_16":
        import torchvision

        return torchvision.models.vit_b_16(weights=None), torch.randn(args.batch, 3, 224, 224)
    mlp = nn.Sequential(nn.Linear(4096, 16384), nn.GELU(), nn.Linear(16384, 4096))
    return mlp, torch.randn(args.tokens, 4096)


def time_pair(dense: Callable[[], object], sparse: Callable[[], object], warmup: int, iters: int) -> tuple[float, float]:
    """Median milliseconds of ``dense`` and ``sparse``, alternating which runs first."""
    for _ in range(warmup):
        dense()
        sparse()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for i in range(iters):
        order = (("dense", dense), ("sparse", sparse)) if i % 2 == 0 else (("sparse", sparse), ("dense", dense))
        for label, fn in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[label].append(start.elapsed_time(end))
    return statistics.median(times["dense"]), statistics.median(times["sparse"])


def capture_linear_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each nn.Linear receives when called as a module (fused readers never call it)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        mod.register_forward_pre_hook(lambda _m, inp, name=name: seen.setdefault(name, inp[0].detach()))
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return seen


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    model, x = build(name, args)
    dense = model.to(device, torch.bfloat16).eval()
    x = x.to(device, torch.bfloat16)
    apply_nm(dense, 2, 4)
    finalize(dense)  # baseline: the same 2:4 values in plain dense weights
    sparse = copy.deepcopy(dense)
    kernel_rows = {r.name: r for r in to_semi_structured(sparse, backend=args.backend)}
    dense_mods, sparse_mods = dict(dense.named_modules()), dict(sparse.named_modules())
    rows = []
    with torch.inference_mode():
        inputs = capture_linear_inputs(dense, x)
        for layer, kr in kernel_rows.items():
            if not isinstance(dense_mods[layer], nn.Linear):
                continue
            row = {"model": name, "layer": layer, "shape": "x".join(map(str, kr.shape)), "status": kr.status,
                   "reason": kr.reason, "dense_ms": None, "sparse_ms": None, "speedup": None, "max_abs_diff": None}
            inp = inputs.get(layer)
            if inp is None:
                row["reason"] = (row["reason"] + "; " if row["reason"] else "") + "not called as a module: not timed"
            elif kr.status == "sparse":
                d, s = dense_mods[layer], sparse_mods[layer]
                row["dense_ms"], row["sparse_ms"] = time_pair(lambda: d(inp), lambda: s(inp), args.warmup, args.iters)
                row["max_abs_diff"] = (d(inp) - s(inp)).abs().max().item()
            rows.append(row)
        end = {"model": name, "layer": "end-to-end", "shape": "x".join(map(str, x.shape)),
               "status": f"{sum(r.status == 'sparse' for r in kernel_rows.values())}/{len(kernel_rows)} sparse",
               "reason": ""}
        try:
            end["dense_ms"], end["sparse_ms"] = time_pair(lambda: dense(x), lambda: sparse(x), args.warmup, args.iters)
            end["max_abs_diff"] = (dense(x).float() - sparse(x).float()).abs().max().item()
        except (RuntimeError, NotImplementedError) as err:  # a sparse op torch has no kernel for
            end.update(dense_ms=None, sparse_ms=None, max_abs_diff=None, reason=f"sparse model failed: {err}")
        rows.append(end)
    for row in rows:
        if row["dense_ms"] and row["sparse_ms"]:
            row["speedup"] = row["dense_ms"] / row["sparse_ms"]
    return rows


def print_table(rows: list[dict]) -> None:
    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    body = [(r["model"], r["layer"], r["shape"], fmt(r["dense_ms"], ".3f"), fmt(r["sparse_ms"], ".3f"),
             fmt(r["speedup"], ".2f"), fmt(r["max_abs_diff"], ".3g"), r["status"], r["reason"]) for r in rows]
    head = ("model", "layer", "shape", "dense ms", "2:4 ms", "speedup", "max |diff|", "status", "reason")
    print(tabulate(body, headers=head))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = require_cuda()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  median of {args.iters} (CUDA events), bf16")
    rows = []
    for name in args.models:
        rows += bench_model(name, args, device)
    print_table(rows)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16",
                "iters": args.iters, "warmup": args.warmup}
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
