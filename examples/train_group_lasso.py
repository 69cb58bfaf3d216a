"""Group lasso (proximal) on fxprune's channel groups, then compress, on sklearn digits.

    python examples/train_group_lasso.py            # ~1 minute on one CPU thread

Every channel's producer slices (conv rows, BN affine), coupled across residual adds,
form one group; ``prox_()`` after each Adam step zeroes whole channels exactly
(block soft-thresholding). ``compress`` then removes the weakest channels (zeroed ones
first: their BN scale is 0).
"""
import torch
import torch.nn.functional as F
from digits_common import EXAMPLE, accuracy, batches, compress_and_finetune, start

import fxprune
from fxprune.regularize import GroupLasso, channel_slices_from_graph


def main(epochs: int = 10, lam: float = 0.2):
    data, model = start()
    channels = channel_slices_from_graph(model, fxprune.analyze(model, EXAMPLE), role="out")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    lasso = GroupLasso(channels, lam=lam, optimizer=opt)
    for epoch in range(epochs):
        model.train()
        for x, y in batches(data):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            lasso.prox_()               # w_c <- max(0, 1 - lr*lam*sqrt(n_c)/||w_c||) * w_c
        zeros = int(lasso.zero_channels().sum())
        print(f"epoch {epoch}: test acc {accuracy(model, data):.1f}%, "
              f"{zeros}/{len(channels)} channels exactly zero")
    compress_and_finetune(model, data, score="bn_scale")


if __name__ == "__main__":
    main()
