"""Sparse training at 90% on digits: SRigL and Spartan against the dense network.

The network, data split, optimizer and schedule are ``benchmarks/digits.py``'s
(``DigitsNet``, Adam lr 2e-3, batch 64, cosine, ``--epochs`` epochs); each method trains
from the same initialisation and batch order per seed:

* ``dense``: plain training (the reference);
* ``SRigL 90%``: ``SRigL(model, density=0.1, total_steps, delta_t=DELTA_T, seed=seed)`` over every
  conv and the classifier (ERK layer densities; ERK leaves the stem conv dense), ``step()``
  after each Adam step; the neurons it ablated then leave through ``compress``
  (``remove_ablated``: the channels whose every producer row is zero);
* ``SRigL 97%``: the same at density 0.03, where SRigL ablates neurons (at 90% it ablates
  none on this network), to show them leave and their FLOPs go;
* ``Spartan 3:32``: ``Spartan(model, 3, 32, total_steps)`` (90.6% of the weights it masks;
  the stem conv, with one input channel, is not a multiple of 32 and stays dense), then
  ``finish()``: the fixed masks.

Measured per seed: test accuracy of the trained sparse model and of the model
``compress`` returns without the ablated neurons (no fine-tuning), the weights' sparsity
over the masked layers, FLOPs of the (smaller) dense model as ``count_flops`` counts them,
and the FLOPs its non-zero conv/linear weights need (2 per non-zero weight per output
position), which is what a sparse kernel would run.

    python benchmarks/digits_sparse.py --jobs 2 --json     # 5 seeds, writes benchmarks/results/digits_sparse.json
    python benchmarks/digits_sparse.py --seeds 1 --epochs 5  # smoke
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from _results import add_json_option, header, write
from _tables import digits_sparse as table
from _tables import show
from digits import EXAMPLE, DigitsNet, Hooks, accuracy, load_data, run_all, train
from fxprune.errors import SpecError
from fxprune.measure import count_flops, count_params
from fxprune.regularize import SRigL, Spartan
from fxprune.regularize.srigl import remove_ablated
from fxprune.sparsity.masks import finalize

METHODS = ("dense", "SRigL 90%", "SRigL 97%", "Spartan 3:32")
SRIGL_DENSITY = {"SRigL 90%": 0.1, "SRigL 97%": 0.03}
DELTA_T = 25  # steps between SRigL updates: 21 steps an epoch, ~20 updates before t_end
SPARTAN_NM = (3, 32)


def nonzero_flops(model: nn.Module) -> int:
    """2 FLOPs per non-zero Conv/Linear weight per output position, one 8x8 image."""
    total = [0]

    def count(module, _, out):
        positions = out[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
        total[0] += 2 * int((module.weight != 0).sum()) * positions

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(EXAMPLE)
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def masked_sparsity(model: nn.Module, names: list[str]) -> float:
    weights = [model.get_submodule(n).weight.detach() for n in names]
    return 1 - sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def run(method: str, seed: int, args, data) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(seed)
    model = DigitsNet()
    steps = args.epochs * -(-len(data[0][1]) // 64)
    row = {"method": method, "seed": seed}
    t0 = time.perf_counter()
    if method == "dense":
        train(model, data, args.epochs, args.lr, seed)
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    elif method.startswith("SRigL"):
        srigl = SRigL(model, density=SRIGL_DENSITY[method], total_steps=steps, delta_t=DELTA_T,
                      seed=seed)  # each seed its own initial mask

        class Dynamic(Hooks):
            def after_step(self):
                srigl.step()
        train(model, data, args.epochs, args.lr, seed, Dynamic())
        names = list(srigl.masks)
        row["ablated"] = sum(map(len, srigl.ablated().values()))
    else:
        schedule = Spartan(model, *SPARTAN_NM, total_steps=steps)

        class Soft(Hooks):
            def after_step(self):
                schedule.step()
        train(model, data, args.epochs, args.lr, seed, Soft())
        names = list(schedule.masks)
        schedule.finish()
    finalize(model)
    row.update(acc=accuracy(model, data), sparsity=round(masked_sparsity(model, names), 4),
               train_s=round(time.perf_counter() - t0, 1))
    small, removed = model, 0
    if method.startswith("SRigL"):
        try:
            result = remove_ablated(model, EXAMPLE, fuse=False)
            small, removed = result.model, sum(map(len, result.plan.values()))
        except SpecError:  # nothing ablated: the model stays as it is
            pass
        row["removed_acc"] = accuracy(small, data)
    row.update(removed=removed, flops=count_flops(small, EXAMPLE), nonzero_flops=nonzero_flops(small),
               params=count_params(small), nonzero_params=sum(int((p != 0).sum()) for p in small.parameters()))
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1, help="trainings run in this many processes")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list out of {', '.join(METHODS)}")
    add_json_option(ap, "digits_sparse")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    data = load_data()
    start = time.perf_counter()
    work = [(method, seed, args, data) for seed in range(args.seeds) for method in methods]
    rows = run_all(run, work, args.jobs)
    show(table(rows))
    print(f"\n{args.seeds} seed(s), {time.perf_counter() - start:.0f} s")
    if args.json:
        write(args.json, rows, header(args, threads=args.threads, srigl_density=SRIGL_DENSITY, delta_t=DELTA_T,
                                      spartan=f"{SPARTAN_NM[0]}:{SPARTAN_NM[1]}"))


if __name__ == "__main__":
    main()
