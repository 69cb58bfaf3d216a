"""Network slimming: L1 on BatchNorm scales (Liu et al. 2017), the simplest baseline.

    python examples/train_bn_l1.py                  # ~1 minute on one CPU thread

``prox_()`` after each step soft-thresholds every BN scale by ``lr*lam`` (exact zeros);
``compress`` with ``score="bn_scale"`` removes the channels with the smallest scales,
summed over every BatchNorm of a coupled group.
"""
import torch
import torch.nn.functional as F
from digits_common import accuracy, batches, compress_and_finetune, start

from fxprune.regularize import BNScaleL1


def main(epochs: int = 10, lam: float = 1.0):
    data, model = start()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    slim = BNScaleL1(model, lam=lam, optimizer=opt)
    for epoch in range(epochs):
        model.train()
        for x, y in batches(data):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            slim.prox_()                # gamma <- sign(gamma) * max(|gamma| - lr*lam, 0)
        zero = sum(int((s == 0).sum()) for s in slim.channel_scores().values())
        total = sum(s.numel() for s in slim.channel_scores().values())
        print(f"epoch {epoch}: test acc {accuracy(model, data):.1f}%, {zero}/{total} BN scales exactly zero")
    compress_and_finetune(model, data, score="bn_scale")


if __name__ == "__main__":
    main()
