"""Group lasso (proximal) on fxprune's channel groups, then compress, on sklearn digits.

    python examples/train_group_lasso.py            # ~1 minute on one CPU thread

Every channel's producer slices (conv rows, BN affine), coupled across residual adds,
form one group; ``prox_()`` after each Adam step zeroes whole channels exactly.
``compress`` then removes the weakest channels (zeroed ones first: their BN scale is 0).
"""
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fxprune
from fxprune.measure import count_flops
from fxprune.regularize import GroupLasso, channel_slices_from_graph

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from digits import DigitsNet, accuracy, load_data, train  # noqa: E402


def main(epochs: int = 10, lam: float = 0.2):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = load_data()
    (x, y), _ = data
    model = DigitsNet()
    example = torch.zeros(1, 1, 8, 8)
    graph = fxprune.analyze(model, example)
    channels = channel_slices_from_graph(model, graph, role="out")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    lasso = GroupLasso(channels, lam=lam, optimizer=opt)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            lasso.prox_()               # block soft-thresholding: exact zeros
        zeros = int(lasso.zero_channels().sum())
        print(f"epoch {epoch}: test acc {accuracy(model, data):.1f}%, "
              f"{zeros}/{len(channels)} channels exactly zero")
    result = fxprune.compress(model, {"example_inputs": (example,), "target": {"flops": 1 / 8},
                                      "score": "bn_scale", "fuse": False})
    small = result.model
    train(small, data, epochs=5, lr=1e-3, seed=1)        # short fine-tune
    print(result.report)
    print(f"FLOPs {count_flops(model, example)} -> {count_flops(small, example)}, "
          f"test acc after fine-tune {accuracy(small, data):.1f}%")


if __name__ == "__main__":
    main()
