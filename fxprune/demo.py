"""The first-run demo: train a small CNN on scikit-learn's digits with a sparsity
regulariser (L1 on BatchNorm scales, network slimming), compress it to a quarter of its FLOPs and print the before/after report.

No download (the digits ship with scikit-learn), no GPU; about a minute on 2 cores.

Example:
    >>> from fxprune.demo import run_demo
    >>> outcome = run_demo(epochs=2, print_fn=lambda *a: None)
    >>> outcome["accuracy_after"] > 0.1
    True
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

import fxprune
from fxprune.regularize import BNScaleL1


class DigitsNet(nn.Module):
    """conv 1->16 (8x8) -> conv 16->32 stride 2 (4x4) -> residual block (32) -> pool -> linear 32->10."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                   nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.stem(x))
        x = torch.relu(x + self.block(x))
        return self.head(torch.flatten(self.pool(x), 1))


def digits_data(seed: int = 0):
    """(x_train, y_train, x_test, y_test): 8x8 digits scaled to [0, 1], 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def _train(model, x, y, epochs, lr, seed, lam=0.0):
    """Adam; with ``lam`` > 0 an L1 proximal step on BatchNorm scales (network slimming)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    slim = BNScaleL1(model, lam=lam, optimizer=optimizer) if lam else None
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
            if slim is not None:
                slim.prox_()
    return slim


def run_demo(epochs: int = 20, flops: float = 0.5, finetune: int = 5, lam: float = 0.3,
             threads: int = 1, seed: int = 0, print_fn: Callable[..., None] = print) -> dict:
    """Train, compress, fine-tune and report; returns the numbers it printed.

    Example:
        >>> run_demo(epochs=1, finetune=0, flops=0.25, print_fn=lambda *a: None)["flops_ratio"] <= 0.26
        True
    """
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        x_train, y_train, x_test, y_test = digits_data(seed)
        model = DigitsNet()
        example = (x_test[:1],)
        print_fn(f"[1/3] training DigitsNet on sklearn digits ({len(x_train)} images, 8x8) for "
                 f"{epochs} epochs: Adam + L1 proximal step on BatchNorm scales (lam={lam:g}) ...")
        slim = _train(model, x_train, y_train, epochs, 3e-3, seed, lam)
        acc_before = accuracy(model, x_test, y_test)
        scales = torch.cat([w.detach().abs() for w in slim.scales]) if slim else torch.ones(1)
        print_fn(f"      test accuracy {acc_before:.3f}; {int((scales < 1e-3).sum())} of {scales.numel()} "
                 f"BatchNorm scales are ~0 ({time.perf_counter() - start:.1f} s)")
        print_fn(f"[2/3] compressing to {flops:g} of the FLOPs (score=bn_scale) ...")
        # network slimming: the L1 drives scales to zero anywhere, so channels compete
        # across layers (global) and counts stay exact (round_to 1) in this 16-32 channel net
        spec = {"target": {"flops": flops}, "score": "bn_scale", "scope": "global", "round_to": 1,
                "latency": {"threads": threads, "repeats": 50}}
        result = fxprune.compress(model, spec, example_inputs=example)
        small = result.model
        acc_pruned = accuracy(small, x_test, y_test)
        print_fn(f"      test accuracy right after pruning {acc_pruned:.3f}")
        acc_after = acc_pruned
        if finetune:
            print_fn(f"[3/3] fine-tuning the compressed model for {finetune} epochs ...")
            _train(small, x_train, y_train, finetune, 3e-3, seed + 1)
            acc_after = accuracy(small, x_test, y_test)
        else:
            print_fn("[3/3] fine-tuning skipped (--finetune 0)")
        report = result.report
        print_fn("")
        print_fn(report)
        print_fn("")
        print_fn(f"test accuracy: {acc_before:.3f} before, {acc_after:.3f} after "
                 f"({report.ratios()['flops']:.2f} of the FLOPs, "
                 f"{report.ratios()['params']:.2f} of the parameters); "
                 f"{time.perf_counter() - start:.1f} s in all")
        return {"accuracy_before": acc_before, "accuracy_pruned": acc_pruned,
                "accuracy_after": acc_after, "flops_ratio": report.ratios()["flops"],
                "params_ratio": report.ratios()["params"], "seconds": time.perf_counter() - start}
    finally:
        torch.set_num_threads(previous_threads)
