"""timm architectures through fxprune and Torch-Pruning, in the same run: one row per model.

For every model of ``tests/timm_zoo.py``'s list (random weights, eval mode, a 1x3x64x64
input or the model's own size when it refuses that): fxprune analyzes with
``capture="auto"`` (the front end that ran is recorded), prunes ~50% of every prunable
group (the output shape must hold; the parameter fraction kept is reported) and runs the
zero-invariance oracle on ~50% of every zero-invariant group. A model "prunes as it
should" when the oracle holds, the shape holds and it keeps under 80% of its parameters;
a model with no zero-invariant group (the oracle has nothing to check) says so in its
oracle column and is counted on a line of its own, as shape-checked only.
Torch-Pruning's MetaPruner (L1 magnitude, ``pruning_ratio=0.5``, classifier ignored,
``global_pruning=False``) runs on a fresh copy in a forked process with a time limit;
it counts when its model runs, keeps the output shape and is under 80% (it has no oracle).

    python benchmarks/timm_sweep.py --json        # writes benchmarks/results/timm_sweep.json
    python benchmarks/timm_sweep.py --models resnet18,vit_tiny_patch16_224 --no-tp
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata

import torch

from _results import add_json_option, header, write
from _tables import timm_sweep as sweep_table
from _tables import show, timm_summary

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from timm_zoo import MODELS, check_model  # noqa: E402

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help=f"comma-separated timm names (default: the {len(MODELS)} listed)")
    add_json_option(parser, "timm_sweep")
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--tp-timeout", type=float, default=120.0, help="seconds Torch-Pruning gets per model")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models.split(",") if args.models else MODELS
    rows = []
    for name in names:
        row = check_model(name, torch_pruning=not args.no_tp, tp_timeout=args.tp_timeout)
        rows.append(row)
        print(f"{name}: fxprune {'ok' if row.get('fx_ok') else 'FAIL'} (kept {row.get('kept')}, "
              f"{row.get('front_end')}), TP {'ok' if row.get('tp_ok') else 'FAIL'} {row.get('tp_why', '')}",
              flush=True)
        if args.json:  # rewrite as it goes so a long sweep leaves partial results
            write(args.json, rows, header(args, timm=metadata.version("timm")))
    show(sweep_table(rows))
    show(timm_summary(rows))  # fxprune's count is of rows the oracle checked
    return 0


if __name__ == "__main__":
    sys.exit(main())
