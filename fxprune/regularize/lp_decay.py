"""Decoupled Lp weight decay for any p > 0 (Outmezguine & Levi, 2024).

"Decoupled Weight Decay for Any p Norm": the penalty ``lam * sum |w|^p`` is applied
as a reweighted L2 decay after the optimizer's own step (whatever the optimizer),
in the implicit form

    w <- w_hat * |w_old|^(2-p) / (|w_old|^(2-p) + p*lr*lam)

where ``w_hat`` is the optimizer's update and ``w_old`` the weights before it.
For p < 2 this never forms ``|w|^(p-1)``, so it is stable for 0 < p < 1, and a
weight at exactly 0 stays 0: exact zeros appear. For p > 2 the equivalent
``w_hat / (1 + p*lr*lam*|w_old|^(p-2))`` is used. p = 2 is a plain (implicit)
decay for ``lam*||w||^2``, i.e. AdamW's ``weight_decay = 2*lam``.

The group form takes ChannelSlices: the channel's L2 norm replaces ``|w|`` and the
factor multiplies all the channel's entries (penalty ``lam * sum_c ||w_c||^p``),
so whole channels reach zero.

Turn the optimizer's own weight decay off for these parameters (a warning says so).
The decay is applied whether or not a parameter got a gradient this step.

Under FSDP2 the parameters are found where the model holds them at each step (given as
a module or as ChannelSlices from the graph: built before or after ``fully_shard``;
given as bare tensors: after), each rank decays its piece, and channel norms are summed
over the ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from fxprune.errors import SpecError
from fxprune.regularize._common import check_lam, check_positive, lr_of, warn_on_weight_decay
from fxprune.regularize.channels import ChannelSlices, ChannelTable, current_param, parameter_owners
from fxprune.sharding import local, total_over


class LpDecay:
    """Decoupled Lp decay, element-wise (parameters) or per channel (ChannelSlices).

    Args:
        targets: a module (all its parameters), an iterable of parameters, or an
            iterable of ChannelSlices (group form).
        p: exponent, > 0 (p < 1 is the sparsifying regime).
        lam: strength, >= 0.
        optimizer: optional; gives the lr when ``after_step`` gets none, and
            ``attach`` hooks onto it.

    Example:
        >>> model = torch.nn.Linear(8, 2)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> decay = LpDecay(model, p=0.5, lam=1e-3, optimizer=opt)
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> with decay.step():
        ...     opt.step()
    """

    def __init__(self, targets, p: float, lam: float,
                 optimizer: torch.optim.Optimizer | None = None):
        self.p = check_positive(p, "p")
        self.lam = check_lam(lam)
        self.optimizer = optimizer
        owners: dict[int, tuple] = {}
        if isinstance(targets, torch.nn.Module):
            named = dict(targets.named_parameters(remove_duplicate=False))
            owners = {id(named[key]): owner for key, owner in parameter_owners(targets).items()}
            targets = targets.parameters()
        items = list(targets)
        if not items:
            raise SpecError("targets: expected parameters or ChannelSlices, got nothing")
        self.table: ChannelTable | None = None
        self._refs: list[tuple[torch.Tensor, tuple | None]] = []
        if all(isinstance(t, ChannelSlices) for t in items):
            self.table = ChannelTable(items)
        elif all(isinstance(t, torch.Tensor) for t in items):
            self._refs = [(t, owners.get(id(t))) for t in {id(t): t for t in items}.values()]
        else:
            raise SpecError("targets: expected only parameters or only ChannelSlices")
        self._old: list[torch.Tensor] | torch.Tensor | None = None
        warn_on_weight_decay(self.params, optimizer, "LpDecay")

    @property
    def params(self) -> list[torch.Tensor]:
        """The decayed parameters as the model holds them now (sharded DTensors under FSDP2).

        Example:
            >>> w = torch.nn.Parameter(torch.ones(2))
            >>> LpDecay([w], p=0.5, lam=0.1).params[0] is w
            True
        """
        if self.table is not None:
            return self.table.params
        return [current_param(t, owner) for t, owner in self._refs]

    @property
    def grouped(self) -> bool:
        """True for the group (per-channel) form.

        Example:
            >>> LpDecay([torch.nn.Parameter(torch.ones(2))], p=0.5, lam=0.1).grouped
            False
        """
        return self.table is not None

    def _power(self, magnitude: torch.Tensor) -> torch.Tensor:
        # |w|^(2-p) for p <= 2 and |w|^(p-2) for p > 2: both finite at 0.
        return magnitude.pow(abs(2.0 - self.p))

    @torch.no_grad()
    def before_step(self) -> None:
        """Record ``|w_old|`` (as ``|w_old|^|2-p|``); call right before ``optimizer.step()``.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(3))
            >>> decay = LpDecay([w], p=0.5, lam=0.1); decay.before_step()
        """
        if self.table is not None:
            self._old = self._power(self.table.norms())
        else:
            self._old = [self._power(local(w).detach().abs().to(_acc(w))) for w in self.params]

    @torch.no_grad()
    def after_step(self, lr: float | None = None) -> None:
        """Apply the decay to the optimizer's update; call right after ``optimizer.step()``.

        ``lr`` defaults to each parameter's current lr in the optimizer.

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
            >>> decay = LpDecay([w], p=0.5, lam=1.0)
            >>> decay.before_step(); decay.after_step(lr=0.5)
            >>> w.detach()
            tensor([0.8000, 0.0000])
        """
        if self._old is None:
            raise RuntimeError("LpDecay.after_step: call before_step() before optimizer.step()")
        old, self._old = self._old, None
        lrs = lr_of(self.params, lr, self.optimizer)
        if self.table is not None:
            lr_c = self.table.channel_lr({id(q): v for q, v in zip(self.params, lrs)})
            self.table.scale_(self._factor(old, self.p * lr_c * self.lam))
            return
        for w, a, lr_w in zip(self.params, old, lrs):
            strength = self.p * lr_w * self.lam
            if strength != 0:  # 0/0 at w_old = 0 otherwise
                piece = local(w)  # elementwise: each rank decays its own piece
                piece.copy_(piece * self._factor(a, strength))

    def _factor(self, a: torch.Tensor, strength) -> torch.Tensor:
        if self.p <= 2:
            factor = a / (a + strength)
        else:
            factor = 1 / (1 + strength * a)
        if isinstance(strength, torch.Tensor):  # per channel; lr or lam may be 0
            factor = torch.where(strength == 0, torch.ones_like(factor), factor)
        return factor

    @contextlib.contextmanager
    def step(self, lr: float | None = None) -> Iterator[None]:
        """Context manager around ``optimizer.step()``.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(3)); opt = torch.optim.SGD([w], lr=0.1)
            >>> decay = LpDecay([w], p=0.5, lam=1e-3, optimizer=opt)
            >>> w.sum().backward()
            >>> with decay.step():
            ...     opt.step()
        """
        self.before_step()
        yield
        self.after_step(lr)

    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> tuple:
        """Hook the decay onto ``optimizer.step()`` (pre and post step hooks).

        Returns the two hook handles; ``handle.remove()`` detaches. The lr is read
        from the optimizer at each step.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(3)); opt = torch.optim.SGD([w], lr=0.1)
            >>> handles = LpDecay([w], p=0.5, lam=1e-3).attach(opt)
            >>> w.sum().backward(); opt.step()
        """
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            raise SpecError("optimizer: attach() needs an optimizer")
        self.optimizer = optimizer
        warn_on_weight_decay(self.params, optimizer, "LpDecay")
        pre = optimizer.register_step_pre_hook(lambda *_: self.before_step())
        post = optimizer.register_step_post_hook(lambda *_: self.after_step())
        return pre, post

    def penalty(self) -> torch.Tensor:
        """The value being minimised, ``lam * sum |w|^p`` (per channel: ``||w_c||^p``).

        For logging: its gradient is unstable for p < 1 at 0, which is why the
        decay is applied in the implicit form instead.

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([4.0, -9.0]))
            >>> LpDecay([w], p=0.5, lam=2.0).penalty()
            tensor(10.)
        """
        with torch.no_grad():
            if self.table is not None:
                return self.lam * self.table.norms().pow(self.p).sum()
            return self.lam * total_over([w.detach() for w in self.params],
                                         lambda w: w.abs().to(_acc(w)).pow(self.p).sum())

    def zero_fraction(self) -> float:
        """Fraction of exact zeros: entries (element-wise) or channels (group form).

        Example:
            >>> LpDecay([torch.nn.Parameter(torch.tensor([0.0, 1.0]))], 0.5, 1.0).zero_fraction()
            0.5
        """
        with torch.no_grad():
            if self.table is not None:
                return float((self.table.norms() == 0).float().mean())
            zeros = int(total_over([w.detach() for w in self.params], lambda w: (w == 0).sum()))
            return zeros / max(sum(w.numel() for w in self.params), 1)


def _acc(w: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: at least float32 (half weights underflow |w|^(2-p))."""
    return torch.promote_types(w.dtype, torch.float32)


def lp_decay_params(module: torch.nn.Module, min_dim: int = 2) -> Iterable[torch.nn.Parameter]:
    """The parameters one usually decays: those with at least ``min_dim`` dims
    (weights, not biases or norm affines).

    Example:
        >>> len(list(lp_decay_params(torch.nn.Linear(3, 2))))
        1
    """
    return [q for q in module.parameters() if q.dim() >= min_dim]
