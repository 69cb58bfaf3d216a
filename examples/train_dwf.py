"""Deep weight factorization (Kolb et al. 2025), grouped, D = 3, on digits.

    python examples/train_dwf.py                    # ~1 minute on one CPU thread

``factorize(..., channels=...)`` reparametrises every channel (through
``torch.nn.utils.parametrize``) as its weights times D - 1 scalar scales; plain L2 on
the D factors is then an L_{2/D} (here L_{2/3}) penalty on the channel norms, which
drives whole channels towards zero with ordinary gradient descent. ``collapse``
multiplies the factors back into plain weights before compressing.
"""
import torch
import torch.nn.functional as F
from digits_common import EXAMPLE, accuracy, batches, compress_and_finetune, start

import fxprune
from fxprune.regularize import channel_slices_from_graph, collapse, factorize


def main(epochs: int = 10, lam: float = 5e-2, depth: int = 3):
    data, model = start()
    channels = channel_slices_from_graph(model, fxprune.analyze(model, EXAMPLE), role="out")
    dwf = factorize(model, depth=depth, lam=lam, channels=channels)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)   # sees the factors
    for epoch in range(epochs):
        model.train()
        for x, y in batches(data):
            opt.zero_grad()
            (F.cross_entropy(model(x), y) + dwf.l2_penalty()).backward()
            opt.step()
        print(f"epoch {epoch}: test acc {accuracy(model, data):.1f}%, "
              f"equivalent L_2/{depth} penalty {dwf.equivalent_penalty().item():.3f}")
    collapse(model)                                       # ordinary weights again
    compress_and_finetune(model, data, score="bn_scale")


if __name__ == "__main__":
    main()
