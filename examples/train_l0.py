"""L0 hard-concrete gates (Louizos et al. 2018) with fxprune, on sklearn digits.

    python examples/train_l0.py                     # ~1 minute on one CPU thread

1. ``insert_gates`` puts one gate per channel of every prunable group (one gate shared
   by all producers of a residual group) into a copy of the model;
2. train with ``loss + lam * gated.expected_l0()`` (gates get their own, larger lr);
3. ``fold_gates`` bakes the deterministic gates into the BN/conv parameters and keeps
   P(z != 0) per channel; closed gates are exact zeros;
4. ``compress(folded, {..., "score": "l0"})`` prunes closed gates first, then the least
   probable ones, until the FLOPs target is met.
"""
import numpy as np
import torch
import torch.nn.functional as F
from digits_common import EXAMPLE, accuracy, batches, compress_and_finetune, start

import fxprune
from fxprune.passes.gates import fold_gates, insert_gates


def main(epochs: int = 10, lam: float = 1e-2):
    data, model = start()
    gated = insert_gates(fxprune.analyze(model, EXAMPLE), drop_rate=0.2)
    gate_params = gated.gate_parameters()
    gate_ids = {id(p) for p in gate_params}
    opt = torch.optim.Adam([{"params": [p for p in gated.parameters() if id(p) not in gate_ids]},
                            {"params": gate_params, "lr": 5e-2}], lr=2e-3)
    for epoch in range(epochs):
        gated.train()
        for x, y in batches(data):
            opt.zero_grad()
            loss = F.cross_entropy(gated(x), y) + lam * gated.expected_l0()
            loss.backward()
            opt.step()
        closed = {gid: int((z == 0).sum()) for gid, z in gated.deterministic_gates().items()}
        print(f"epoch {epoch}: test acc {accuracy(gated, data):.1f}%, "
              f"E[L0] {gated.expected_l0().item():.1f}, closed gates per group {closed}")
    folded = fold_gates(gated)
    x = data[1][0][:64]
    assert torch.allclose(folded.eval()(x), gated.eval()(x), atol=1e-5)
    probs = gated.gate_probabilities()
    print("P(z != 0) quartiles per group:",
          {gid: np.round(np.quantile(p, [0.25, 0.5, 0.75]), 2).tolist() for gid, p in probs.items()})
    compress_and_finetune(folded, data, score="l0")


if __name__ == "__main__":
    main()
