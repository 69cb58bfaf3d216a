"""Network slimming (Liu et al., 2017): L1 on BatchNorm scales.

``lam * sum |gamma|`` over every BatchNorm weight drives channel scales towards 0;
small ``|gamma|`` then ranks channels for pruning. ``prox_`` soft-thresholds the
scales after the optimizer's step to reach exact zeros. Under FSDP2 the scales are read
where the modules hold them at each call (built before or after ``fully_shard``), each
rank updates its piece and the penalty is summed over the ranks.
"""

from __future__ import annotations

import torch

from fxprune.regularize._common import check_lam, lr_of
from fxprune.sharding import full, local, total_over

# _BatchNorm covers BatchNorm1d/2d/3d, their lazy variants and SyncBatchNorm.
_BATCHNORM = torch.nn.modules.batchnorm._BatchNorm


class BNScaleL1:
    """L1 penalty (and proximal step) on the affine scales of all BatchNorm layers.

    The model is not modified by the constructor; ``prox_`` updates BN weights in
    place.

    Args:
        model: any module; BatchNorm layers without affine weights are skipped.
        lam: strength, >= 0.
        optimizer: optional; ``prox_()`` reads the lr from it when none is given.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        >>> slim = BNScaleL1(model, lam=1e-4)
        >>> loss = model(torch.randn(2, 3, 8, 8)).mean() + slim.penalty()
    """

    def __init__(self, model: torch.nn.Module, lam: float,
                 optimizer: torch.optim.Optimizer | None = None):
        self.lam = check_lam(lam)
        self.optimizer = optimizer
        found = {}
        for name, module in model.named_modules():
            if isinstance(module, _BATCHNORM) and isinstance(module.weight, torch.nn.Parameter):
                found.setdefault(id(module.weight), (name, module))
        self.names: list[str] = [name for name, _ in found.values()]
        self._modules = [module for _, module in found.values()]

    @property
    def scales(self) -> list[torch.nn.Parameter]:
        """The BatchNorm weights as the modules hold them now (sharded DTensors under FSDP2).

        Example:
            >>> bn = torch.nn.BatchNorm1d(2)
            >>> BNScaleL1(bn, lam=0.1).scales[0] is bn.weight
            True
        """
        return [module.weight for module in self._modules]

    def penalty(self) -> torch.Tensor:
        """``lam * sum |gamma|``, differentiable.

        Example:
            >>> bn = torch.nn.BatchNorm1d(3)
            >>> with torch.no_grad(): _ = bn.weight.copy_(torch.tensor([1., -2., 0.5]))
            >>> BNScaleL1(bn, lam=0.1).penalty()
            tensor(0.3500, grad_fn=<MulBackward0>)
        """
        if not self.scales:
            return torch.zeros(())
        return self.lam * total_over(self.scales, lambda w: w.abs().sum())

    def channel_scores(self) -> dict[str, torch.Tensor]:
        """``|gamma|`` per BatchNorm layer, detached, keyed by module name.

        Example:
            >>> BNScaleL1(torch.nn.BatchNorm1d(2), lam=0.1).channel_scores()
            {'': tensor([1., 1.])}
        """
        return {n: full(w.detach()).abs().clone() for n, w in zip(self.names, self.scales)}

    @torch.no_grad()
    def prox_(self, lr: float | None = None) -> None:
        """Soft-threshold in place: ``gamma <- sign(gamma) * max(|gamma| - lr*lam, 0)``.

        Call after ``optimizer.step()`` (and leave ``penalty()`` out of the loss).

        Example:
            >>> bn = torch.nn.BatchNorm1d(2)
            >>> with torch.no_grad(): _ = bn.weight.copy_(torch.tensor([0.05, -1.0]))
            >>> BNScaleL1(bn, lam=1.0).prox_(lr=0.1); bn.weight.detach()
            tensor([ 0.0000, -0.9000])
        """
        for w, lr_w in zip(self.scales, lr_of(self.scales, lr, self.optimizer)):
            piece = local(w)  # elementwise: each rank thresholds its own piece
            piece.copy_(piece.sign() * (piece.abs() - lr_w * self.lam).clamp_min(0))
