"""Targeted group lasso: train toward the budget you will compress to, then prune losslessly.

    python examples/train_targeted.py            # ~1 minute on one CPU thread

``TargetedGroupLasso`` gets the same spec as ``compress``. Every epoch it runs
fxprune's select pass on the channels' current norms, picks the channels that budget
removes, and shrinks only those (proximal group lasso whose strength grows from 0 to
``lam`` over the first epochs). They reach exact zeros, so ``compress`` with
``score="bn_scale"`` removes exactly them: the pruned model scores what the trained one
does before any fine-tuning.
"""
import torch
import torch.nn.functional as F
from digits_common import accuracy, batches, compress_and_finetune, start, target_spec

from fxprune.regularize import TargetedGroupLasso


def main(epochs: int = 10, lam: float = 0.5, speedup: int = 8):
    data, model = start()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps_per_epoch = sum(1 for _ in batches(data))
    targeted = TargetedGroupLasso(model, target_spec(speedup), lam=lam, optimizer=opt,
                                  ramp_steps=max(1, epochs // 3) * steps_per_epoch,
                                  update_every=steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        for x, y in batches(data):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            targeted.step()              # prox on the chosen channels only, strength ramping up
        print(f"epoch {epoch}: test acc {accuracy(model, data):.1f}%, "
              f"{len(targeted.zero_channels())}/{len(targeted.chosen())} chosen channels exactly "
              f"zero (strength {targeted.strength:.2f})")
    compress_and_finetune(model, data, score="bn_scale", speedup=speedup)


if __name__ == "__main__":
    main()
