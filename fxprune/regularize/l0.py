"""L0 regularisation with hard-concrete gates (Louizos, Welling & Kingma 2018).

A gate ``z`` in [0, 1] multiplies each channel. In training ``z`` is a sample of the
hard-concrete distribution (a stretched, clamped binary concrete), so it is exactly 0
or 1 with positive probability, and ``P(z != 0)`` is differentiable in ``log_alpha``:
adding ``lam * expected_l0()`` to the loss is a relaxed L0 penalty on the number of
open channels. In eval the gate is deterministic.

Where the gates go in a model is fxprune's job: ``fxprune.passes.gates.insert_gates``
puts one gate per unit of every prunable group, shared by all coupled producers;
``l0_gate(model, example_inputs)`` here does analyze + insert in one call.

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

import math

import torch

from fxprune.errors import SpecError


class L0Gate(torch.nn.Module):
    """Hard-concrete gates (Louizos, Welling & Kingma 2018), one per pruning unit.

    ``forward()`` returns the gate vector ``z`` (size ``n``): a stochastic sample in
    training, the deterministic ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``
    in eval.

    Example:
        >>> gate = L0Gate(4, drop_rate=0.5)
        >>> gate.eval()().tolist()
        [0.5, 0.5, 0.5, 0.5]
        >>> round(gate.expected_l0().item(), 4)  # 4 * sigmoid(0 - beta * log(-gamma / zeta))
        3.3273
    """

    def __init__(self, n: int, *, drop_rate: float = 0.5, beta: float = 2 / 3,
                 gamma: float = -0.1, zeta: float = 1.1):
        super().__init__()
        if not 0.0 < drop_rate < 1.0:
            raise SpecError(f"drop_rate: must be in (0, 1), got {drop_rate}")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise SpecError(f"gates: need gamma < 0 < 1 < zeta and beta > 0, got "
                            f"gamma={gamma}, zeta={zeta}, beta={beta}")
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        init = math.log(1.0 - drop_rate) - math.log(drop_rate)
        self.log_alpha = torch.nn.Parameter(torch.full((n,), init))

    def extra_repr(self) -> str:
        return f"n={self.log_alpha.numel()}, beta={self.beta:.3g}, gamma={self.gamma}, zeta={self.zeta}"

    def forward(self) -> torch.Tensor:
        if not self.training:
            return self.deterministic()
        eps = 1e-6
        u = torch.rand_like(self.log_alpha).clamp(eps, 1.0 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The eval-mode gate: ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``."""
        s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` per unit."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def expected_l0(self) -> torch.Tensor:
        """The L0 penalty: expected number of non-zero gates (differentiable)."""
        return self.prob_nonzero().sum()


def l0_gate(model: torch.nn.Module, example_inputs, *, drop_rate: float = 0.5, beta: float = 2 / 3,
            gamma: float = -0.1, zeta: float = 1.1, notes: list[str] | None = None):
    """``insert_gates(fxprune.analyze(model, example_inputs), ...)``: a gated copy of ``model``.

    Example:
        >>> gated = l0_gate(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                                     torch.nn.Linear(8, 2)), torch.randn(1, 4))
        >>> sorted(gated.gates())
        [1]
    """
    from fxprune.channels import analyze
    from fxprune.passes.gates import insert_gates
    return insert_gates(analyze(model, example_inputs), drop_rate=drop_rate, beta=beta,
                        gamma=gamma, zeta=zeta, notes=notes)
