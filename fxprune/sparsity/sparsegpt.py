"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be
Accurately Pruned in One-Shot"): N:M masks chosen on the layer's inputs, with the
pruned weights' error moved onto the weights still to come.

For a Linear layer ``y = W x`` the calibration inputs give the Hessian of the layer's
reconstruction error, ``H = 2 X X^T / tokens``. Columns are visited left to right in
blocks of 128. At the first column of each group of M, every row drops the M - N
columns with the lowest ``w_j^2 / [H^-1]_jj^2`` (``[H^-1]`` here is the upper Cholesky
factor of the inverse Hessian, whose diagonal squared is the inverse Hessian of the
columns not yet visited). Visiting column j sets the dropped weights to zero and moves
their error ``e = w_j / [H^-1]_jj`` onto the columns to its right,
``W[:, j:] -= e [H^-1]_{j, j:}``: for a single dropped weight q this is the optimal
(OBS) update ``-w_q / [H^-1]_qq * H^-1_{:, q}`` of the columns after q.

``calibrated.apply_nm_calibrated`` runs it layer after layer on the inputs the
already-pruned layers produce.
"""
from __future__ import annotations

import torch
from torch import nn

BLOCK = 128  # columns updated together, as in the paper
DAMP = 0.01  # dampening: this fraction of the mean diagonal is added to H's diagonal


class InputHessian:
    """Running ``X^T X`` of one Linear layer's inputs; ``hessian()`` is ``2 X^T X / tokens``.

    Example:
        >>> acc = InputHessian(nn.Linear(2, 1))
        >>> acc.add(torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
        >>> acc.hessian().tolist()
        [[10.0, 2.0], [2.0, 4.0]]
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Linear):
            raise TypeError(f"InputHessian takes an nn.Linear, got {type(module).__name__}")
        self.module = module
        self.gram: torch.Tensor | None = None
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add one input batch ``[..., in_features]``."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        gram = flat.T @ flat
        self.gram = gram if self.gram is None else self.gram + gram
        self.tokens += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.gram is None:
            raise ValueError("no input was recorded for this layer")
        return 2 * self.gram / self.tokens


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, *,
                    block: int = BLOCK, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """The N:M-pruned and compensated weight ``[out, in]`` and its bool keep-mask.

    ``hessian`` is ``[in, in]`` (``InputHessian.hessian()``); computed in float32 (float64
    if either input is), the weight returned in ``weight``'s dtype. Input channels that never fired (zero diagonal)
    carry no information: their weights are dropped first.

    Example:
        >>> w = torch.tensor([[1.0, 0.5, 2.0, -3.0]])
        >>> new, keep = sparsegpt_prune(w, torch.eye(4), 2, 4)
        >>> keep.tolist(), new.tolist()
        ([[False, False, True, True]], [[0.0, 0.0, 2.0, -3.0]])
    """
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"input features {cols} are not a multiple of m={m}")
    block = m * -(-block // m)  # a group of M never straddles two blocks
    work = torch.promote_types(torch.promote_types(hessian.dtype, weight.dtype), torch.float32)
    h = hessian.detach().to(work).clone()
    w = weight.detach().to(work).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    # upper Cholesky factor of H^-1: its row j is the OBS update for column j given that
    # the columns left of j are fixed
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        part, upart = w[:, start:stop].clone(), u[start:stop, start:stop]
        errors = torch.zeros_like(part)
        diag = upart.diagonal()
        for i in range(stop - start):
            if i % m == 0:
                saliency = part[:, i:i + m].square() / diag[i:i + m].square()
                drop = saliency.topk(m - n, dim=1, largest=False).indices
                keep[:, start + i:start + i + m].scatter_(1, drop, False)
            column = part[:, i]
            error = (column * ~keep[:, start + i]) / diag[i]
            part[:, i:] -= error[:, None] * upart[i, i:][None, :]  # sets column i to its pruned value
            errors[:, i] = error
        w[:, start:stop] = part
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return (w * keep).to(weight.dtype), keep


__all__ = ["InputHessian", "sparsegpt_prune", "BLOCK", "DAMP"]
