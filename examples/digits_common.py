"""What the sparse-training examples share: the digits data and model, and the last step.

Each ``train_*.py`` example shows its own training loop; this module only loads
scikit-learn's digits (through ``benchmarks/digits.py``, the benchmark these examples
shorten), and compresses + fine-tunes the trained model at the end.
"""
import sys
from pathlib import Path

import torch

import fxprune
from fxprune.measure import count_flops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import digits  # noqa: E402
from digits import EXAMPLE, DigitsNet, accuracy, load_data, train  # noqa: E402,F401  (re-exported)


def start(seed: int = 0):
    """Seeded, single-threaded (fastest for this tiny model): (data, fresh DigitsNet)."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    return load_data(), DigitsNet()


def batches(data, size: int = 64):
    """One epoch of shuffled training mini-batches ``(x, y)``."""
    (x, y), _ = data
    for idx in torch.randperm(len(y)).split(size):
        yield x[idx], y[idx]


def target_spec(speedup: int = 8) -> dict:
    """The compress spec of these examples: ``1/speedup`` of the FLOPs, same share of
    every group (``scope="local"``), BatchNorms kept (the model is fine-tuned after)."""
    return digits.target_spec(speedup, "local")


def compress_and_finetune(model, data, score: str, speedup: int = 8, epochs: int = 5):
    """Prune ``model`` to ``1/speedup`` of its FLOPs ranked by ``score``, fine-tune, report.

    ``scope="local"``: every group keeps the same share of its channels, the lowest
    scores (the zeroed channels first) removed; it fine-tunes back better here than the
    global ranking (see the digits benchmark in the README)."""
    result = fxprune.compress(model, {**target_spec(speedup), "score": score})
    small = result.model
    before = accuracy(small, data)
    train(small, data, epochs=epochs, lr=1e-3, seed=1)
    print(result.report)
    print(f"FLOPs {count_flops(model, EXAMPLE)} -> {count_flops(small, EXAMPLE)}; test accuracy "
          f"{accuracy(model, data):.1f}% trained, {before:.1f}% pruned, "
          f"{accuracy(small, data):.1f}% after {epochs} fine-tuning epochs")
    return small
