"""Depth-wise sparse training (SSL): a group lasso per residual block, then remove the dead blocks.

    python examples/train_ssl_depth.py              # 3 seeds, dense vs SSL; ~3 minutes on one thread
    python examples/train_ssl_depth.py --seeds 1 --lam 0.02

A small residual CNN on scikit-learn's digits (stem conv, four residual blocks of two
3x3 convs with BatchNorm, global pool, linear) is trained twice per seed, from the same
initialisation and batch order (SGD with momentum, cosine schedule, 15 epochs): plainly,
and with a group lasso whose groups are whole residual branches
(``branch_slices_from_graph``: every weight of a block). The proximal step after each
SGD step zeroes whole blocks exactly; ``compress`` with
``units="branches"`` and ``branch_score="group_lasso"`` then removes them (they score 0),
and since a zero block adds nothing to the stream, the pruned model computes what the
trained one does (the depth oracle): no fine-tuning needed.

``lam`` 0.03 was picked on seed 0 from 0.002-0.05: up to 0.02 no block reaches zero
(their norms fall from ~9 to ~1), 0.05 zeroes all four. Under Adam the switch from "none"
to "all" was sharper still (0.3 zeroed none and cost 5 points, 0.4 zeroed all): Adam's
step does not shrink with the gradient, so the prox threshold no longer weighs a block's
use against its size. SGD keeps that balance, and the last block goes first.
"""
import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from digits_common import accuracy, batches, load_data
from tabulate import tabulate

import fxprune
from fxprune.regularize import GroupLasso, branch_slices_from_graph

EXAMPLE = torch.zeros(1, 1, 8, 8)


class ResidualDigitsNet(nn.Module):
    """Stem conv 1 -> ``width``, ``blocks`` residual blocks ``relu(x + bn(conv(relu(bn(conv(x))))))``,
    global average pool, linear to 10."""

    def __init__(self, width: int = 24, blocks: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                          nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
            for _ in range(blocks))
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


def fit(model, data, epochs: int, lam: float, seed: int, sgd: bool = True):
    """SGD (lr 0.05, momentum 0.9, cosine); with ``lam`` > 0 the block group lasso's proximal
    step after every step. Returns the lasso (or None)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if sgd else \
        torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * math.ceil(len(data[0][1]) / 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    lasso = None
    if lam > 0:
        groups = branch_slices_from_graph(model, fxprune.analyze(model, EXAMPLE))
        lasso = GroupLasso(groups, lam=lam, optimizer=opt)   # prox_ follows the schedule's lr
    torch.manual_seed(seed)  # the same batch order with and without the penalty
    for _ in range(epochs):
        model.train()
        for x, y in batches(data):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if lasso is not None:
                lasso.prox_()  # w_b <- max(0, 1 - lr*lam*sqrt(n_b)/||w_b||) * w_b, whole blocks
            sched.step()
    return lasso


def remove_dead_blocks(model, lasso):
    """``compress`` removing the blocks the lasso zeroed (they score 0 under ``group_lasso``)."""
    dead = int(lasso.zero_channels().sum())
    n = len(fxprune.analyze(model, EXAMPLE).branches)
    if dead == 0:
        return model, 0
    if dead == n:
        raise SystemExit(f"every block was zeroed: lower --lam (it was {lasso.lam})")
    spec = {"example_inputs": (EXAMPLE,), "ratio": dead / n, "units": "branches",
            "branch_score": "group_lasso", "fuse": False}
    return fxprune.compress(model, spec).model, dead


def run_seed(data, seed: int, epochs: int, lam: float, width: int, blocks: int) -> dict:
    torch.manual_seed(seed)
    dense = ResidualDigitsNet(width, blocks)
    ssl = ResidualDigitsNet(width, blocks)
    ssl.load_state_dict(dense.state_dict())  # the same initialisation
    fit(dense, data, epochs, 0.0, seed)
    lasso = fit(ssl, data, epochs, lam, seed)
    print(f"seed {seed}: block norms after SSL training {[round(v, 3) for v in lasso.channel_norms().tolist()]}")
    small, dead = remove_dead_blocks(ssl, lasso)
    x = data[1][0]
    ssl.eval(), small.eval()
    with torch.no_grad():
        gap = float((small(x) - ssl(x)).abs().max())
    return {"seed": seed, "dense acc %": accuracy(dense, data), "SSL acc %": accuracy(ssl, data),
            "pruned acc %": accuracy(small, data), "blocks removed": f"{dead}/{blocks}",
            "max |pruned - trained|": gap}


def main(seeds: int = 3, epochs: int = 15, lam: float = 0.03, width: int = 24, blocks: int = 4) -> list[dict]:
    torch.set_num_threads(1)
    data = load_data()
    rows = [run_seed(data, seed, epochs, lam, width, blocks) for seed in range(seeds)]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("dense acc %", "SSL acc %", "pruned acc %")}
    print(tabulate(rows + [{"seed": "mean", **mean}], headers="keys", floatfmt=".2f"))
    print(f"lam {lam}, {epochs} epochs; accuracy change from depth-wise sparse training: "
          f"{mean['pruned acc %'] - mean['dense acc %']:+.2f} points")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lam", type=float, default=0.03)
    ap.add_argument("--width", type=int, default=24)
    ap.add_argument("--blocks", type=int, default=4)
    args = ap.parse_args()
    main(args.seeds, args.epochs, args.lam, args.width, args.blocks)
