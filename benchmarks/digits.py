"""Accuracy vs FLOPs on scikit-learn's digits: sparse training + structured pruning.

A small residual CNN (stem conv 1->32, a residual block of two 32-channel convs, a
stride-2 conv to 64, a 64-channel conv; BatchNorm after every conv, ReLU, global
average pool, linear to 10) is trained from scratch on ``load_digits`` (8x8 images,
fixed stratified 75/25 split: 1,347 train / 450 test) with Adam (lr 2e-3, batch 64,
cosine schedule) for ``--epochs`` epochs under each method's regulariser, pruned to
4x, 8x, 16x and 32x fewer FLOPs, and fine-tuned ``--finetune`` epochs (Adam, lr 1e-3, cosine,
no regulariser). FLOPs are counted with ``fxprune.measure.count_flops`` for every
model, fxprune's and Torch-Pruning's alike (2 FLOPs per MAC, one 8x8 image).

The sparse regularisers act on each channel's producer slices (conv rows and BN affine),
so a channel they zero has a zero BN scale: the fxprune methods other than L0 use the
``bn_scale`` score, which ranks those channels first (the ``group_lasso`` score also
counts consumer columns, which the regularisers leave alone).

Methods (all fxprune ones prune with ``fxprune.compress(model, {"example_inputs": ...,
"target": {"flops": 1/k}, "score": ..., "scope": "local", "fuse": False, "round_to": 1})``; ``--scope
global`` ranks channels across groups by score per FLOP instead, which thins the cheap
8x8 layers first and trained back worse on seed 0):

* ``dense``          plain training, not pruned (the reference);
* ``group lasso``    ``GroupLasso`` over every channel's output slices, proximal step after
                     each Adam step; score ``bn_scale``;
* ``L0 gates``       ``insert_gates`` + ``lam * expected_l0()``, then ``fold_gates``; score ``l0``;
* ``Lp decay p=0.5`` grouped ``LpDecay`` (per channel); score ``bn_scale``;
* ``DWF D=3``        grouped deep weight factorization (3 factors of each channel's scale),
                     ``collapse`` before pruning; score ``bn_scale``;
* ``BN-L1``          ``BNScaleL1`` with a proximal step (network slimming); score ``bn_scale``;
* ``targeted GL``    ``TargetedGroupLasso`` given the same spec as ``compress``: proximal
                     group lasso on just the channels that FLOPs target removes (re-chosen
                     every epoch by norm), strength growing over the first 10 epochs; one
                     training per target; score ``bn_scale``;
* ``TP GroupNorm``   Torch-Pruning 1.6.1 ``GroupNormPruner`` (``pruner.regularize(model)``
                     after every backward), then pruned by it;
* ``TP magnitude``   the dense model pruned by Torch-Pruning ``MagnitudePruner`` with
                     ``MagnitudeImportance`` (no sparse training).

Torch-Pruning prunes by ratio with its default local scope (the same share of every
group, like fxprune's ``scope="local"``; its global scope collapsed GroupNorm models to
20% at 16x), at the scanned ratio whose pruned model comes closest to the FLOPs target
on either side (see ``prune_tp``). "zero ch" is the share of prunable
channels whose producer slices (conv rows, BN affine) are all exactly zero after sparse
training, before pruning (for L0: the share of closed gates).

    python benchmarks/digits.py                        # 5 seeds
    python benchmarks/digits.py --jobs 2 --json       # writes benchmarks/results/digits.json
    python benchmarks/digits.py --seeds 3 --json digits.json
    python benchmarks/digits.py --seeds 1 --methods dense,l0 --epochs 5 --finetune 2   # smoke
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

import fxprune
from _results import add_json_option, header, write
from _tables import digits_summary
from fxprune.measure import count_flops, count_params
from fxprune.passes.gates import fold_gates, insert_gates
from fxprune.progress import progress_bar
from fxprune.regularize import (BNScaleL1, GroupLasso, LpDecay, TargetedGroupLasso,
                                channel_slices_from_graph, collapse, factorize)

EXAMPLE = torch.zeros(1, 1, 8, 8)
CLOSED = "closed_gate_share"  # GraphModule.meta key: share of L0 gates closed after training

# Regulariser strengths: one value per method, picked on seed 0 from a sweep at 16x
# (``--seeds 1 --speedups 16 --lam ...``; the README lists what was tried). Under Adam
# the proximal and decoupled methods switch from "no channel zero" to "every channel
# zero" within a factor of 1.5-2 (group lasso: 0.2 zeroes 40% of the channels, 0.3 all
# of them), so these sit just below the collapse.
LAM = {
    "group lasso": 0.2,
    "L0 gates": 1e-2,
    "Lp decay p=0.5": 3.0,
    "DWF D=3": 5e-2,
    "BN-L1": 1.0,
    "TP GroupNorm": 5e-4,
    "targeted GL": 0.5,
}
TARGETED_RAMP_EPOCHS = 10  # TargetedGroupLasso's strength grows over the first third of training


class DigitsNet(nn.Module):
    """``widths`` = (residual stream, inside the residual block, after conv3, after conv4);
    ``width`` w alone gives (w, w, 2w, 2w)."""

    def __init__(self, width: int = 32, widths: tuple[int, int, int, int] | None = None):
        super().__init__()
        a, b, c, d = widths or (width, width, 2 * width, 2 * width)
        self.stem, self.bn0 = nn.Conv2d(1, a, 3, padding=1, bias=False), nn.BatchNorm2d(a)
        self.conv1, self.bn1 = nn.Conv2d(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b)
        self.conv2, self.bn2 = nn.Conv2d(b, a, 3, padding=1, bias=False), nn.BatchNorm2d(a)
        self.conv3, self.bn3 = nn.Conv2d(a, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv4, self.bn4 = nn.Conv2d(c, d, 3, padding=1, bias=False), nn.BatchNorm2d(d)
        self.fc = nn.Linear(d, 10)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        return self.fc(x.mean((2, 3)))


def run_all(run, work: list[tuple], jobs: int) -> list:
    """``run(*item)`` for every item of ``work``, in ``jobs`` forked processes when above 1
    (digits_capacity.py and digits_sparse.py train one model per item)."""
    if jobs <= 1:
        return [run(*item) for item in work]
    import multiprocessing as mp
    with mp.get_context("fork").Pool(jobs) as pool:
        return pool.starmap(run, work)


def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4  # roughly standardised
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=0.25, stratify=digits.target, random_state=0)
    return (x[tr], y[tr]), (x[te], y[te])


class Hooks:
    """What a method adds to the plain loop: a loss term and per-step callbacks."""

    def bind(self, opt):
        """Called once with the optimizer."""

    def penalty(self):
        return None

    def after_backward(self):
        pass

    def after_step(self):
        pass


def train(model, data, epochs, lr, seed, hooks=None, params=None, extra_groups=()):
    hooks = hooks or Hooks()
    (x, y), _ = data
    gen = torch.Generator().manual_seed(seed)
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.Adam([{"params": params}, *extra_groups], lr=lr)
    steps = epochs * math.ceil(len(y) / 64)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    hooks.bind(opt)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            pen = hooks.penalty()
            if pen is not None:
                loss = loss + pen
            opt.zero_grad(set_to_none=True)
            loss.backward()
            hooks.after_backward()
            opt.step()
            hooks.after_step()
            sched.step()
    return opt


@torch.no_grad()
def accuracy(model, data):
    _, (x, y) = data
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def zero_share(model) -> float:
    """Share of prunable channels whose producer (role="out") slices are all exactly 0,
    or, for a model with folded L0 gates, whose gate is closed (z = 0: the gate scaled
    the channel's BN affine to 0, its conv row is left as trained)."""
    if CLOSED in getattr(model, "meta", {}):
        return model.meta[CLOSED]
    graph = fxprune.analyze(model, EXAMPLE)
    chans = channel_slices_from_graph(model, graph, role="out")
    zero = sum(all(bool((s.param.detach().index_select(s.dim, s.index) == 0).all()) for s in ch)
               for ch in chans)
    return zero / max(len(chans), 1)


# ---------------------------------------------------------------- sparse training


def train_method(name, data, args, seed, k=None):
    """Train under ``name``'s regulariser; return (model to prune, fxprune score or TP tag).

    ``k`` is the FLOPs reduction the model will be pruned to: only ``targeted GL`` uses
    it (it trains toward that budget, so it trains once per k)."""
    torch.manual_seed(seed)
    model = DigitsNet()
    lam = LAM.get(name, 0.0)
    if name in ("dense", "TP magnitude"):
        train(model, data, args.epochs, args.lr, seed)
        return model, "tp-magnitude" if name == "TP magnitude" else None
    if name == "L0 gates":
        graph = fxprune.analyze(model, EXAMPLE)
        gated = insert_gates(graph, drop_rate=0.2)
        gate_ids = {id(p) for p in gated.gate_parameters()}
        weights = [p for p in gated.parameters() if id(p) not in gate_ids]

        class L0(Hooks):
            def penalty(self):
                return lam * gated.expected_l0()
        train(gated, data, args.epochs, args.lr, seed, L0(), params=weights,
              extra_groups=[{"params": gated.gate_parameters(), "lr": 0.05}])
        folded = fold_gates(gated).eval()
        z = np.concatenate(list(gated.deterministic_gates().values()))
        folded.meta[CLOSED] = float((z == 0).mean())
        return folded, "l0"
    if name == "TP GroupNorm":
        import torch_pruning as tp
        pruner = tp.pruner.GroupNormPruner(model, EXAMPLE, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                           reg=lam, ignored_layers=[model.fc])

        class GN(Hooks):
            def after_backward(self):
                pruner.regularize(model)
        train(model, data, args.epochs, args.lr, seed, GN())
        return model, "tp-groupnorm"
    if name == "targeted GL":
        steps_per_epoch = math.ceil(len(data[0][1]) / 64)

        class Targeted(Hooks):
            def bind(self, opt):
                self.reg = TargetedGroupLasso(model, target_spec(k, args.scope), lam=lam,
                                              ramp_steps=TARGETED_RAMP_EPOCHS * steps_per_epoch,
                                              update_every=steps_per_epoch, optimizer=opt)

            def after_step(self):
                self.reg.step()
        train(model, data, args.epochs, args.lr, seed, Targeted())
        return model, "bn_scale"
    graph = fxprune.analyze(model, EXAMPLE)
    chans = channel_slices_from_graph(model, graph, role="out")
    if name == "group lasso":
        class Prox(Hooks):
            def bind(self, opt):
                self.lasso = GroupLasso(chans, lam=lam, optimizer=opt)  # lr read from opt

            def after_step(self):
                self.lasso.prox_()
        train(model, data, args.epochs, args.lr, seed, Prox())
        return model, "bn_scale"
    if name == "Lp decay p=0.5":
        decay = LpDecay(chans, p=0.5, lam=lam)

        class Lp(Hooks):
            def bind(self, opt):
                decay.attach(opt)  # decoupled decay around every opt.step()
        train(model, data, args.epochs, args.lr, seed, Lp())
        return model, "bn_scale"
    if name == "DWF D=3":
        dwf = factorize(model, depth=3, lam=lam, channels=chans)

        class DWF(Hooks):
            def penalty(self):
                return dwf.l2_penalty()
        train(model, data, args.epochs, args.lr, seed, DWF())
        return collapse(model), "bn_scale"
    if name == "BN-L1":
        class Slim(Hooks):
            def bind(self, opt):
                self.slim = BNScaleL1(model, lam=lam, optimizer=opt)

            def after_step(self):
                self.slim.prox_()
        train(model, data, args.epochs, args.lr, seed, Slim())
        return model, "bn_scale"
    raise ValueError(f"unknown method {name!r}")


# ---------------------------------------------------------------- pruning to a FLOPs target


def target_spec(k, scope):
    # round_to 1: exact counts in this 16-32 channel net (8 would leave 16x unreachable)
    return {"example_inputs": (EXAMPLE,), "target": {"flops": 1.0 / k}, "scope": scope, "fuse": False,
            "round_to": 1}


def prune_fxprune(model, score, k, scope="local"):
    return fxprune.compress(model, {**target_spec(k, scope), "score": score}).model


def prune_tp(model, tag, k, base_flops):
    """Torch-Pruning, local scope, at the ratio whose FLOPs come closest to ``base / k``.

    Its local scope removes ``ratio`` of every layer, so only a few FLOPs counts are
    reachable (on this network 15.6x and then 19.3x around 16x). Ratios 0.30-0.98 are
    scanned (its FLOPs are not monotone in the ratio: GroupNormPruner at 0.9 kept conv4
    whole) and the closest model on either side wins, even one slightly over budget:
    at 16x that gives Torch-Pruning 2.7% more FLOPs than fxprune's models."""
    import torch_pruning as tp

    def attempt(ratio):
        m = copy.deepcopy(model)
        if tag == "tp-groupnorm":
            imp = tp.importance.GroupMagnitudeImportance(p=2)
            pruner = tp.pruner.GroupNormPruner(m, EXAMPLE, importance=imp, pruning_ratio=ratio,
                                               global_pruning=False, ignored_layers=[m.fc])
        else:
            imp = tp.importance.MagnitudeImportance(p=1)
            pruner = tp.pruner.MagnitudePruner(m, EXAMPLE, importance=imp, pruning_ratio=ratio,
                                               global_pruning=False, ignored_layers=[m.fc])
        pruner.step()
        return m, count_flops(m, EXAMPLE)

    target = base_flops / k
    candidates = (attempt(float(r)) for r in np.arange(0.30, 0.985, 0.01))
    return min(candidates, key=lambda mf: abs(math.log(mf[1] / target)))[0]


# ---------------------------------------------------------------- driver


METHODS = ["dense", "group lasso", "L0 gates", "Lp decay p=0.5", "DWF D=3", "BN-L1",
           "targeted GL", "TP GroupNorm", "TP magnitude"]
SHORT = {"dense": "dense", "gl": "group lasso", "l0": "L0 gates", "lp": "Lp decay p=0.5",
         "dwf": "DWF D=3", "bn": "BN-L1", "tgl": "targeted GL", "tpgn": "TP GroupNorm",
         "tpmag": "TP magnitude"}
PER_TARGET = {"targeted GL"}  # trained toward one FLOPs budget: one training per speedup


def prune_and_finetune(name, model, score, k, seed, data, args, base_flops, zeros):
    """Prune the trained ``model`` to ``k``x fewer FLOPs, fine-tune it, return its table row."""
    if score.startswith("tp-"):
        small = prune_tp(model, score, k, base_flops)
    else:
        small = prune_fxprune(model, score, k, args.scope)
    pre = accuracy(small, data)
    train(small, data, args.finetune, args.ft_lr, seed + 1000 * k)
    return dict(method=name, seed=seed, speedup=k, acc=accuracy(small, data), pre_ft=pre,
                flops=count_flops(small, EXAMPLE), params=count_params(small), zero=zeros)


def run_seed(seed, data, args, methods, rows, log):
    dense_model = None
    base_flops = count_flops(DigitsNet(), EXAMPLE)
    for name in methods:
        t0 = time.perf_counter()
        if name in PER_TARGET:  # no unpruned row: each speedup has its own trained model
            for k in args.speedups:
                model, score = train_method(name, data, args, seed, k)
                rows.append(prune_and_finetune(name, model, score, k, seed, data, args, base_flops,
                                               zero_share(model)))
        else:
            if name == "TP magnitude" and dense_model is not None:
                model, score = copy.deepcopy(dense_model), "tp-magnitude"
            else:
                model, score = train_method(name, data, args, seed)
            if name == "dense":
                dense_model = copy.deepcopy(model)
            acc0 = accuracy(model, data)
            zeros = zero_share(model) if name != "dense" else 0.0
            rows.append(dict(method=name, seed=seed, speedup=1, acc=acc0, flops=count_flops(model, EXAMPLE),
                             params=count_params(model), zero=zeros))
            if name == "dense":
                log(f"seed {seed} {name}: acc {acc0:.2f} ({time.perf_counter() - t0:.0f}s)")
                continue
            rows.extend(prune_and_finetune(name, model, score, k, seed, data, args, base_flops, zeros)
                        for k in args.speedups)
        last = rows[-len(args.speedups):]
        accs = " ".join(f"{r['speedup']}x:{r['acc']:.1f} (zero {r['zero']:.0%})" for r in last)
        log(f"seed {seed} {name}: {accs} ({time.perf_counter() - t0:.0f}s)")


def _seed_rows(seed, args, methods, start):
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    run_seed(seed, load_data(), args, methods, rows,
             lambda msg: print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--finetune", type=int, default=15)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--methods", default="all", help="comma list: " + ",".join(SHORT) + " (default all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1 is ~10x faster than 2 on a loaded 2-core box)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes")
    ap.add_argument("--speedups", default="4,8,16,32", help="FLOPs reductions to prune to (comma list)")
    ap.add_argument("--lam", action="append", default=[], metavar="SHORT=VALUE",
                    help="override a regulariser strength, e.g. --lam gl=0.5 (repeatable)")
    ap.add_argument("--scope", default="local", choices=["global", "local"],
                    help="fxprune's selection scope for the FLOPs target")
    add_json_option(ap, "digits")
    args = ap.parse_args(argv)
    args.speedups = tuple(int(k) for k in args.speedups.split(","))
    for item in args.lam:
        key, _, value = item.partition("=")
        if key not in SHORT or SHORT[key] not in LAM:
            ap.error(f"--lam {item}: expected SHORT=VALUE with SHORT one of "
                     f"{', '.join(k for k in SHORT if SHORT[k] in LAM)}")
        LAM[SHORT[key]] = float(value)
    torch.set_num_threads(args.threads)
    methods = METHODS if args.methods == "all" else [SHORT[m.strip()] for m in args.methods.split(",")]
    if "TP magnitude" in methods and "dense" not in methods:
        methods = ["dense"] + methods
    data = load_data()
    rows: list[dict] = []
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", flush=True)
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.jobs) as pool:
            for part in pool.starmap(_seed_rows, [(seed, args, methods, start) for seed in range(args.seeds)]):
                rows.extend(part)
    else:
        for seed in progress_bar(range(args.seeds), "seeds"):
            run_seed(seed, data, args, methods, rows, log)
    print(tabulate(digits_summary(rows), headers="keys", tablefmt="github"))
    print(f"\n{args.seeds} seed(s), {time.perf_counter() - start:.0f} s on {torch.get_num_threads()} thread(s)")
    if args.json:  # per-seed rows; digits_summary (the table above) and the docs' tables are built from them
        write(args.json, rows, header(args, threads=args.threads, lam=LAM))


if __name__ == "__main__":
    main()
