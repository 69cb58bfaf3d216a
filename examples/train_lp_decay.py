"""Decoupled Lp weight decay, p = 0.5, per channel (Outmezguine & Levi 2024), on digits.

    python examples/train_lp_decay.py               # ~1 minute on one CPU thread

After each optimizer step (weight decay off in the optimizer) every channel is scaled
by ``a / (a + p*lr*lam)`` with ``a = ||w_c_old||^(2-p)``: no ``|w|^(p-1)`` gradient is
ever formed, so p < 1 is stable, and a channel whose norm reaches 0 stays exactly 0.
``attach`` hooks the decay onto ``opt.step()``; ``with decay.step(): opt.step()`` is
the explicit form.
"""
import torch
import torch.nn.functional as F
from digits_common import EXAMPLE, accuracy, batches, compress_and_finetune, start

import fxprune
from fxprune.regularize import LpDecay, channel_slices_from_graph


def main(epochs: int = 10, lam: float = 3.0, p: float = 0.5):
    data, model = start()
    channels = channel_slices_from_graph(model, fxprune.analyze(model, EXAMPLE), role="out")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)   # weight_decay=0: the decay is ours
    decay = LpDecay(channels, p=p, lam=lam)
    decay.attach(opt)                                     # before/after every opt.step()
    for epoch in range(epochs):
        model.train()
        for x, y in batches(data):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        print(f"epoch {epoch}: test acc {accuracy(model, data):.1f}%, "
              f"{decay.zero_fraction():.0%} of channels exactly zero")
    compress_and_finetune(model, data, score="bn_scale")


if __name__ == "__main__":
    main()
