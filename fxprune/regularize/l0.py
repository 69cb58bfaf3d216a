"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma 2018).

A gate ``z`` in [0, 1] multiplies each channel. In training ``z`` is a sample of the
hard-concrete distribution (a stretched, clamped binary concrete), so it is exactly 0
or 1 with positive probability, and ``P(z != 0)`` is differentiable in ``log_alpha``:
adding ``lam * expected_l0()`` to the loss is a relaxed L0 penalty on the number of
open channels. In eval the gate is deterministic.

Where the gates go in a model is fxprune's job: ``fxprune.passes.gates.insert_gates``
puts one gate per unit of every prunable group, shared by all coupled producers;
``l0_gate(model, example_inputs)`` here does analyze + insert in one call. The gate
module itself, ``L0Gate``, is defined with that pass and re-exported here.

Example:
    >>> from fxprune.regularize.l0 import l0_gate
    >>> from fxprune.passes.gates import fold_gates
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    >>> gated = l0_gate(model, x)                       # a GatedModel (GraphModule)
    >>> opt = torch.optim.Adam(gated.parameters(), lr=1e-3)
    >>> loss = torch.nn.functional.cross_entropy(gated(x), y) + 1e-3 * gated.expected_l0()
    >>> loss.backward(); opt.step()
    >>> folded = fold_gates(gated)                      # then compress(folded, {..., "score": "l0"})
    >>> folded(x).shape
    torch.Size([8, 3])
"""
from __future__ import annotations

import torch

from fxprune.channels import analyze
from fxprune.passes.gates import L0Gate, insert_gates

__all__ = ["L0Gate", "l0_gate"]  # L0Gate lives with the pass that inserts it


def l0_gate(model: torch.nn.Module, example_inputs, *, drop_rate: float = 0.5, beta: float = 2 / 3,
            gamma: float = -0.1, zeta: float = 1.1, notes: list[str] | None = None):
    """``insert_gates(fxprune.analyze(model, example_inputs), ...)``: a gated copy of ``model``.

    Example:
        >>> gated = l0_gate(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                                     torch.nn.Linear(8, 2)), torch.randn(1, 4))
        >>> sorted(gated.gates())
        [1]
    """
    return insert_gates(analyze(model, example_inputs), drop_rate=drop_rate, beta=beta,
                        gamma=gamma, zeta=zeta, notes=notes)
