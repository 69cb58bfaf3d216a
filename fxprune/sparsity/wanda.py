"""Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language
Models"): N:M masks ranked by ``|W_ij| * ||X_j||_2``.

``X_j`` is input channel j over every calibration token, so a small weight reading a
loud input can outrank a large weight reading a quiet one. The score is compared within
each output row's groups of M inputs (the N:M groups of ``nm_mask``); the weights keep
their values. ``calibrated.apply_nm_calibrated`` feeds the inputs layer by layer.
"""
from __future__ import annotations

import torch
from torch import nn

from fxprune.sparsity.nm import nm_mask


class InputNorms:
    """Running sum of squares of each input channel of one layer (Linear or ConvNd).

    Example:
        >>> acc = InputNorms(nn.Linear(2, 1))
        >>> acc.add(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
        >>> acc.norms().tolist()
        [5.0, 1.0]
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.squares: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add one input batch of the layer: ``[..., in]`` for Linear, ``[B, C, *spatial]`` for a conv."""
        x = x.detach().float()
        if isinstance(self.module, nn.Linear):
            flat = x.reshape(-1, x.shape[-1])
        else:  # channels are dim 1 of a batched conv input
            flat = x.transpose(0, 1).reshape(x.shape[1], -1).T
        squares = flat.square().sum(0)
        self.squares = squares if self.squares is None else self.squares + squares

    def norms(self) -> torch.Tensor:
        """L2 norm of each input channel over everything added."""
        if self.squares is None:
            raise ValueError("no input was recorded for this layer")
        return self.squares.sqrt()


def wanda_metric(weight: torch.Tensor, norms: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """``|W| * ||X_j||`` broadcast on ``weight`` (``[O, I/groups, *k]``); ``norms`` has one
    entry per input channel of the layer (``I``), split among ``groups`` as a grouped conv reads them.

    Example:
        >>> wanda_metric(torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 1.0])).tolist()
        [[3.0, 2.0]]
    """
    out, per_group = weight.shape[0], weight.shape[1]
    per_row = norms.to(weight.device, torch.float32).reshape(groups, per_group)
    per_row = per_row.repeat_interleave(out // groups, dim=0)  # [O, I/groups]: what row o reads
    return weight.detach().abs().float() * per_row.reshape(out, per_group, *[1] * (weight.dim() - 2))


def wanda_mask(weight: torch.Tensor, norms: torch.Tensor, n: int, m: int, groups: int = 1) -> torch.Tensor:
    """Bool N:M mask keeping, in every group of M inputs of an output row, the N largest
    ``|W_ij| * ||X_j||``.

    Example:
        >>> w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
        >>> wanda_mask(w, torch.tensor([0.1, 0.1, 10.0, 10.0]), 2, 4).tolist()
        [[False, False, True, True]]
    """
    return nm_mask(wanda_metric(weight, norms, groups), n, m)


__all__ = ["InputNorms", "wanda_metric", "wanda_mask"]
