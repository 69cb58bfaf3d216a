"""How accurate can the digits network be at a given width, trained from scratch?

``benchmarks/digits.py`` prunes its network to 16x fewer FLOPs and fine-tunes it. This
script asks what that budget allows at best: it trains networks of the same
architecture at fixed widths from scratch with the same budget a pruned model gets
(30 epochs at lr 2e-3, then 15 at lr 1e-3, the same schedule, split and seeds) and
prints their test accuracy. The widths are (residual stream, inside the residual
block, after the stride-2 conv, after the last conv); the dense network is 32/32/64/64
and 8/8/16/16 is what uniform pruning keeps at 16x.

    python benchmarks/digits_capacity.py                       # the default widths, 5 seeds, ~8 min with --jobs 2
    python benchmarks/digits_capacity.py --jobs 2 --json     # writes benchmarks/results/digits_capacity.json
    python benchmarks/digits_capacity.py --widths 8/8/16/16,8/4/16/32 --seeds 3 --json cap.json
"""
from __future__ import annotations

import argparse
import time

import torch

from _results import add_json_option, header, write
from _tables import digits_capacity as capacity_table
from _tables import show
from digits import EXAMPLE, DigitsNet, accuracy, load_data, run_all, train
from fxprune.measure import count_flops, count_params

# uniform 16x, and non-uniform allocations at about the same FLOPs (15-17.5x)
WIDTHS = "8/8/16/16,8/4/16/32,4/8/16/32,4/4/16/40,8/8/12/24,6/4/16/32,12/6/12/16,16/4/8/16,10/6/16/16"


def parse(text: str) -> tuple[int, int, int, int]:
    widths = tuple(int(v) for v in text.split("/"))
    if len(widths) != 4 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"widths {text!r}: expected four positive ints like 8/8/16/16")
    return widths


def run(widths, seed, args, data) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    model = DigitsNet(widths=widths)
    train(model, data, args.epochs, 2e-3, seed)
    train(model, data, args.finetune, 1e-3, seed + 16000)  # the seed digits.py fine-tunes 16x models with
    flops_x = round(count_flops(DigitsNet(), EXAMPLE) / count_flops(model, EXAMPLE), 1)
    return {"widths": "/".join(map(str, widths)), "seed": seed, "acc": accuracy(model, data), "flops_x": flops_x,
            "params": count_params(model)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default=WIDTHS, help="comma list of a/b/c/d widths")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--finetune", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="trainings run in this many processes")
    add_json_option(ap, "digits_capacity")
    args = ap.parse_args(argv)
    configs = [parse(w) for w in args.widths.split(",")]
    data = load_data()
    start = time.perf_counter()
    work = [(w, seed, args, data) for w in configs for seed in range(args.seeds)]
    rows = run_all(run, work, args.jobs)
    show(capacity_table(rows))
    print(f"\n{args.seeds} seed(s), {time.perf_counter() - start:.0f} s")
    if args.json:
        write(args.json, rows, header(args, threads=args.threads))


if __name__ == "__main__":
    main()
