"""Group lasso over channels, with a proximal step that produces exact zeros.

Penalty: ``lam * sum_c a_c * sqrt(n_c) * ||w_c||_2``, where ``w_c`` are all the entries
channel ``c`` owns (every slice, every layer), ``n_c`` their number and ``a_c`` an
optional per-channel weight (default 1; ``TargetedGroupLasso`` sets it to 1 on the
channels a budget removes and 0 elsewhere).

Two ways to use it, pick one per run:

* subgradient: ``loss = task_loss + lasso.penalty()``; channels get small, rarely 0;
* proximal gradient: leave the penalty out of the loss and call
  ``lasso.prox_()`` after every ``optimizer.step()``: block soft-thresholding
  sets whole channels to exact zeros. Works after any optimizer (with Adam it is
  the usual heuristic, not an exact proximal method).
"""

from __future__ import annotations

import torch

from fxprune.errors import SpecError
from fxprune.regularize._common import check_lam, lr_of
from fxprune.regularize.channels import ChannelSlices, ChannelTable


class GroupLasso:
    """Channel-wise group lasso on plain parameters.

    Args:
        channels: one ChannelSlices per channel (e.g. from
            ``channel_slices_from_graph``). Channels must not share entries.
        lam: strength, >= 0.
        optimizer: optional; ``prox_()`` reads each parameter's lr from it when no
            lr is given.
        weights: optional per-channel multipliers ``a_c`` of ``lam``, shape ``[C]``,
            each >= 0 (default: all 1). Settable later through ``.weights``.

    Example:
        >>> conv = torch.nn.Conv2d(3, 4, 3)
        >>> chans = [ChannelSlices([(conv.weight, 0, [c]), (conv.bias, 0, [c])])
        ...          for c in range(4)]
        >>> opt = torch.optim.SGD(conv.parameters(), lr=0.1)
        >>> lasso = GroupLasso(chans, lam=1e-3, optimizer=opt)
        >>> loss = conv(torch.randn(2, 3, 8, 8)).square().mean()
        >>> loss.backward(); opt.step(); _ = lasso.prox_()
    """

    def __init__(self, channels: list[ChannelSlices], lam: float,
                 optimizer: torch.optim.Optimizer | None = None,
                 weights: torch.Tensor | None = None):
        self.lam = check_lam(lam)
        self.table = ChannelTable(channels)
        self.optimizer = optimizer
        self.weights = weights

    @property
    def weights(self) -> torch.Tensor:
        """Per-channel multipliers of ``lam``, shape ``[C]`` (all 1 unless set).

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([[3., 4.], [1., 0.]]))
            >>> lasso = GroupLasso([ChannelSlices([(w, 0, [c])]) for c in range(2)], lam=1.0)
            >>> lasso.weights = torch.tensor([0., 1.])
            >>> lasso.penalty()
            tensor(1.4142, grad_fn=<MulBackward0>)
        """
        return self._weights

    @weights.setter
    def weights(self, value: torch.Tensor | None) -> None:
        table = self.table
        if value is None:
            self._weights = torch.ones(len(table), dtype=table.dtype, device=table.device)
            return
        value = torch.as_tensor(value, dtype=table.dtype, device=table.device)
        if value.shape != (len(table),):
            raise SpecError(f"weights: expected one weight per channel, shape ({len(table)},), "
                            f"got {tuple(value.shape)}")
        if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
            raise SpecError("weights: expected finite numbers >= 0")
        self._weights = value

    @property
    def channels(self) -> list[ChannelSlices]:
        """The regularised channels, in order (index ``c`` of every per-channel tensor).

        Example:
            >>> w = torch.nn.Parameter(torch.ones(2, 2))
            >>> len(GroupLasso([ChannelSlices([(w, 0, [0])])], lam=0.1).channels)
            1
        """
        return self.table.channels

    def penalty(self) -> torch.Tensor:
        """``lam * sum_c a_c * sqrt(n_c) * ||w_c||_2``, differentiable (0 subgradient at 0).

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([[3., 4.]]))
            >>> GroupLasso([ChannelSlices([(w, 0, [0])])], lam=0.5).penalty()
            tensor(3.5355, grad_fn=<MulBackward0>)
        """
        return self.lam * (self._weights * self.table.numel.sqrt() * self.table.norms()).sum()

    def channel_norms(self) -> torch.Tensor:
        """L2 norm of every channel, detached, shape ``[C]`` (a pruning score).

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([[3., 4.], [0., 0.]]))
            >>> chans = [ChannelSlices([(w, 0, [c])]) for c in range(2)]
            >>> GroupLasso(chans, lam=0.1).channel_norms()
            tensor([5., 0.])
        """
        with torch.no_grad():
            return self.table.norms()

    def zero_channels(self) -> torch.Tensor:
        """Boolean mask, shape ``[C]``: channels whose entries are all exactly 0.

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([[3., 4.], [0., 0.]]))
            >>> chans = [ChannelSlices([(w, 0, [c])]) for c in range(2)]
            >>> GroupLasso(chans, lam=0.1).zero_channels()
            tensor([False,  True])
        """
        return self.channel_norms() == 0

    @torch.no_grad()
    def prox_(self, lr: float | None = None) -> torch.Tensor:
        """Block soft-thresholding in place:
        ``w_c <- max(0, 1 - lr*lam*a_c*sqrt(n_c) / ||w_c||) * w_c``.

        Call after ``optimizer.step()``. ``lr`` defaults to each parameter's lr in
        the optimizer given at construction. Returns the factor applied per channel.

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([[3., 4.], [0.06, 0.08]]))
            >>> chans = [ChannelSlices([(w, 0, [c])]) for c in range(2)]
            >>> GroupLasso(chans, lam=1.0).prox_(lr=0.5 / 2 ** 0.5)
            tensor([0.9000, 0.0000])
        """
        table = self.table
        if lr is None:
            lrs = lr_of(table.params, None, self.optimizer)
            lr_c = table.channel_lr({id(p): v for p, v in zip(table.params, lrs)})
        else:
            lr_c = torch.full((len(table),), check_lam(lr, "lr"),
                              dtype=table.dtype, device=table.device)
        norms = table.norms()
        threshold = lr_c * self.lam * self._weights * table.numel.sqrt()
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        factor = torch.where(norms > threshold, 1 - threshold / safe, torch.zeros_like(norms))
        table.scale_(factor)
        return factor
