"""Spartan (Tai et al. 2022, "Spartan: Differentiable Sparsity via Regularized
Transportation"): N:M masks learned through a soft top-k.

Each group of M inputs (the N:M groups of ``nm_mask``) keeps a budget of k of its M
weights. The soft mask of a group is

    m_i = sigmoid(beta * |w_i| / c + mu)

with ``c`` the layer's largest ``|w|`` and ``mu`` set by Sinkhorn iterations so that
``sum_i m_i = k``: the entropy-regularised transport of the M entries onto two bins,
"kept" (capacity k) and "dropped" (M - k), alternately normalising each entry's mass to
1 (the sigmoid) and each bin's total to its capacity (``mu += log(k / sum m) -
log((M - k) / sum (1 - m))``). As beta grows the soft mask tends to the hard top-k.

Forward passes use the hard top-k mask; gradients are those of ``w * m(w)`` (the soft
mask's), so pruned weights still learn and can re-enter. ``Spartan.step()`` follows the
schedule: k goes from M to N over the first 20% of training, beta from ``beta_start``
to ``beta_end`` (geometrically) over the first 80%, and the mask is frozen for the last
20%. ``finish()`` swaps in fixed N:M masks that ``finalize`` bakes. Everything is
deterministic in the weights, so DDP replicas stay identical. Under FSDP2 (built before
``fully_shard``) the forward pass sees whole weights; the frozen masks are computed from
the whole weights (gathered once) on every rank.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from fxprune.errors import SpecError
from fxprune.sharding import AFTER_TRAINING, check_unsharded, full
from fxprune.sparsity.masks import SparsityMask, density, normalize_ignore, remove_parametrization
from fxprune.sparsity.nm import NMMask, NMResult, _check_nm_args, apply_nm, check_nm, nm_mask

SINKHORN_ITERS = 50
SINKHORN_TOL = 1e-6


def sinkhorn_topk(scores: torch.Tensor, k: float, beta: float, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """Soft top-k of each row of ``scores``: ``sigmoid(beta * s + mu)`` with ``mu`` (one per
    row) found by Sinkhorn so that every row sums to ``k`` (0 < k < row length).

    Example:
        >>> m = sinkhorn_topk(torch.tensor([[1.0, 0.0]]), 1, beta=2.0)   # mu = -beta (a + b) / 2
        >>> [round(v, 4) for v in m[0].tolist()]
        [0.7311, 0.2689]
    """
    size = scores.shape[-1]
    if not 0 < k < size:
        raise SpecError(f"sinkhorn_topk: the budget k must be in (0, {size}), got {k}")
    # float32 unless the scores are wider: in float64 the masks of a transformer's millions of
    # groups cost several seconds a step, and the budget holds to 1e-6 either way
    logits = beta * scores.to(torch.promote_types(scores.dtype, torch.float32))
    with torch.no_grad():
        mu = _sinkhorn_mu(logits.detach(), k, iters)
    # the gradient through mu by the implicit function theorem at the fixed point
    # (sum_i sigmoid(l_i + mu) = k): d mu / d l_j = -s'_j / sum_i s'_i, s' the sigmoid's
    # slope. Backpropagating through the Sinkhorn loop instead gives the same at convergence
    # and cost most of a training step (50 iterations kept for autograd)
    slope = torch.sigmoid(logits.detach() + mu)
    slope = slope * (1 - slope)
    shift = (slope * (logits - logits.detach())).sum(-1, keepdim=True) / slope.sum(-1, keepdim=True).clamp_min(1e-30)
    return torch.sigmoid(logits + mu - shift).to(scores.dtype)


def _sinkhorn_mu(logits: torch.Tensor, k: float, iters: int) -> torch.Tensor:
    """mu of every row, ``[..., 1]``: Sinkhorn's alternate normalisations of ``sigmoid(logits + mu)``."""
    size = logits.shape[-1]
    # start between the k-th and (k+1)-th largest logits, the answer as beta grows (Sinkhorn's
    # multiplicative steps crawl once the sigmoids saturate); the iterations refine it
    ranked = logits.sort(-1, descending=True).values
    mu = -(ranked[..., math.ceil(k) - 1:math.ceil(k)] + ranked[..., math.floor(k):math.floor(k) + 1]) / 2
    flat_logits, flat_mu = logits.reshape(-1, size), mu.reshape(-1, 1).clone()
    # each row stops at its own fixed point (held by a `where`); the rows still moving are
    # gathered into a smaller working set only once at least half are done (a transformer
    # has millions of groups, most settled after a few steps, and gathering every iteration
    # cost more than the iterations)
    moving = torch.arange(flat_mu.shape[0], device=logits.device)
    rows, row_mu = flat_logits, flat_mu.clone()
    alive = torch.ones_like(row_mu, dtype=torch.bool)
    for _ in range(iters):
        soft = torch.sigmoid(rows + row_mu)
        kept, dropped = soft.sum(-1, keepdim=True), (1 - soft).sum(-1, keepdim=True)
        step = torch.log(k / kept.clamp_min(1e-30)) - torch.log((size - k) / dropped.clamp_min(1e-30))
        row_mu = torch.where(alive, row_mu + step, row_mu)
        alive &= step.abs() > SINKHORN_TOL
        left = int(alive.sum())
        if left == 0:
            break
        if 2 * left <= alive.numel():
            flat_mu[moving] = row_mu
            keep = alive.squeeze(-1)
            moving, rows, row_mu, alive = moving[keep], rows[keep], row_mu[keep], alive[keep]
    flat_mu[moving] = row_mu
    return flat_mu.reshape(mu.shape)


def _groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    return weight.movedim(1, -1).reshape(-1, m)


def _ungroup(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return groups.reshape(like.movedim(1, -1).shape).movedim(-1, 1)


class SpartanMask(SparsityMask):
    """Parametrization: hard top-``keep`` of every M in the forward, soft-mask gradients.

    ``keep`` (int), ``budget`` (float k of the soft mask) and ``beta`` are set by ``Spartan``;
    ``frozen`` (a bool mask or None) fixes the mask for the end of training.
    """

    def __init__(self, n: int, m: int):
        super().__init__()
        self.n, self.m, self.pattern = n, m, f"{n}:{m} spartan"
        self.keep, self.budget, self.beta = m, float(m), 1.0
        self.frozen: torch.Tensor | None = None

    def hard(self, weight: torch.Tensor) -> torch.Tensor:
        if self.frozen is not None:
            return self.frozen
        if self.keep >= self.m:
            return torch.ones_like(weight, dtype=torch.bool)
        return nm_mask(weight, self.keep, self.m)

    def soft(self, weight: torch.Tensor) -> torch.Tensor:
        if self.budget >= self.m:
            return torch.ones_like(weight)
        scale = weight.detach().abs().max().clamp_min(1e-12)  # c: scores in [0, 1]
        groups = _groups(weight.abs() / scale, self.m)
        return _ungroup(sinkhorn_topk(groups, self.budget, self.beta), weight).to(weight.dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        hard = weight * self.hard(weight)
        if self.frozen is not None or not torch.is_grad_enabled():
            return hard
        soft = weight * self.soft(weight)
        return soft + (hard - soft).detach()  # value: hard mask; gradient: soft mask's

    def check(self, weight: torch.Tensor) -> bool:
        return check_nm(weight, self.n, self.m)


class Spartan:
    """Spartan's schedule over the ``SpartanMask`` of every eligible layer of ``model``.

    Args:
        model: its Linear/Conv weights whose input dim is a multiple of M get a mask.
        n, m: the final pattern, N of every M.
        total_steps: the training length the schedule spans (call ``step()`` once per
            optimizer step).
        beta_start, beta_end: the soft mask's sharpness, grown over the first 80%.
        ignore: fnmatch patterns of module names left dense.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4))
        >>> sched = Spartan(net, 2, 4, total_steps=10)
        >>> for _ in range(10): sched.step()
        >>> (sched.budget, sched.frozen)
        (2.0, True)
        >>> [r.density for r in sched.finish().masked]
        [0.5]
    """

    def __init__(self, model: nn.Module, n: int, m: int, total_steps: int, *, beta_start: float = 1.0,
                 beta_end: float = 100.0, ignore: str | Iterable[str] = ()):
        _check_nm_args(n, m)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise SpecError(f"Spartan: total_steps must be an int >= 1, got {total_steps!r}")
        if not 0 < beta_start <= beta_end:
            raise SpecError(f"Spartan: need 0 < beta_start <= beta_end, got {beta_start}, {beta_end}")
        self.model, self.n, self.m, self.total = model, n, m, total_steps
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.t = 0
        self.result = apply_nm(model, n, m, ignore=normalize_ignore(ignore))  # eligibility and rows
        self.masks: dict[str, SpartanMask] = {}
        for row in self.result.masked:  # swap the magnitude mask for a Spartan one
            module = model.get_submodule(row.name)
            order = module.parametrizations["weight"][0].param_order
            remove_parametrization(module, "weight", leave_parametrized=False)
            mask = SpartanMask(n, m)
            mask.param_order = order
            parametrize.register_parametrization(module, "weight", mask)
            self.masks[row.name] = mask
        self._apply()

    @property
    def budget(self) -> float:
        """k of the soft masks now: M -> N linearly over the first 20% of the steps."""
        share = min(1.0, self.t / (0.2 * self.total))
        return self.m - (self.m - self.n) * share

    @property
    def beta(self) -> float:
        """beta now: ``beta_start`` -> ``beta_end`` geometrically over the first 80%."""
        share = min(1.0, self.t / (0.8 * self.total))
        return self.beta_start * (self.beta_end / self.beta_start) ** share

    @property
    def frozen(self) -> bool:
        """True for the last 20% of the steps: the hard masks no longer change."""
        return self.t >= 0.8 * self.total

    def step(self) -> None:
        """Advance the schedule by one optimizer step."""
        self.t += 1
        self._apply()

    def _apply(self) -> None:
        budget = self.budget
        for name, mask in self.masks.items():
            mask.budget, mask.beta = budget, self.beta
            mask.keep = max(self.n, min(self.m, int(math.floor(budget + 0.5))))
            if self.frozen and mask.frozen is None:
                weight = full(self.model.get_submodule(name).parametrizations["weight"].original.detach())
                mask.keep = self.n
                mask.frozen = nm_mask(weight, self.n, self.m)

    def finish(self) -> NMResult:
        """Replace every Spartan mask by a fixed N:M mask (the frozen one, or the top N of
        the weights now); ``finalize`` then bakes them."""
        check_unsharded(self.model, "Spartan.finish", fix=AFTER_TRAINING)
        rows = []
        for row in self.result.rows:
            if row.name in self.masks:
                module = self.model.get_submodule(row.name)
                spartan = self.masks[row.name]
                weight = module.parametrizations["weight"].original.detach()
                keep = spartan.frozen if spartan.frozen is not None else nm_mask(weight, self.n, self.m)
                remove_parametrization(module, "weight", leave_parametrized=False)
                fixed = NMMask(keep, self.n, self.m)
                fixed.param_order = spartan.param_order
                parametrize.register_parametrization(module, "weight", fixed)
                row = replace(row, density=density(module.weight.detach()))
            rows.append(row)
        self.masks = {}
        return NMResult(self.n, self.m, False, rows)


__all__ = ["Spartan", "SpartanMask", "sinkhorn_topk"]
