"""Group lasso aimed at the channels a compress spec will remove (budget-aware training).

Plain sparse regularisers do not know the budget: under a strength that zeroes 16x
worth of FLOPs they usually kill the network, and under one that does not, pruning
to the budget removes live channels and accuracy falls to chance until fine-tuning.
``TargetedGroupLasso`` takes the same spec you will give ``fxprune.compress`` (its
``target`` or ``ratio``, ``scope``, ``round_to``, ``max_ratio``, ``ignore``) and:

1. every ``update_every`` steps, runs fxprune's select pass on the channels' current
   norms: the weakest channels that the budget removes are *chosen*;
2. applies proximal group lasso (block soft-thresholding, see ``GroupLasso``) to the
   chosen channels only, with a strength that grows linearly from 0 to ``lam`` over
   ``ramp_steps`` (the "growing regularisation" schedule), so the network moves their
   work to the channels it keeps instead of collapsing;
3. leaves every other channel alone.

The chosen channels reach exact zeros in all their producer slices (conv rows, BN
affine, biases), so ``compress`` with ``score="bn_scale"`` removes exactly them and
the pruned model computes what the trained one does (for activations with f(0) = 0).

Under FSDP2 build it before ``fully_shard`` (it analyses the model, which runs it), and set
``optimizer`` once the optimizer exists; it analyses a copy, so its re-selections never
run the sharded model, and the channel norms it ranks are summed over the ranks, so every
rank chooses the same channels.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8),
    ...                             torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> spec = {"example_inputs": (torch.randn(1, 1, 8, 8),), "target": {"flops": 0.5}, "round_to": 1}
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> reg = TargetedGroupLasso(model, spec, lam=1.0, ramp_steps=1, optimizer=opt)
    >>> _ = model(torch.randn(2, 1, 8, 8)).square().mean().backward()
    >>> opt.step(); reg.step()
    >>> len(reg.chosen()) > 0
    True
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from fxprune.channels import analyze
from fxprune.errors import AnalysisError, SpecError
from fxprune.select.plan import Plan, select
from fxprune.regularize._common import check_int, check_lam
from fxprune.regularize.channels import channel_slices_from_graph
from fxprune.regularize.group_lasso import GroupLasso
from fxprune.sharding import check_unsharded
from fxprune.spec import Spec


class TargetedGroupLasso:
    """Proximal group lasso on the channels ``spec``'s budget removes, growing over time.

    Args:
        model: the model being trained (its parameters are shrunk in place).
        spec: the compress spec (Spec, dict, or TOML/JSON path) with a ``target`` or a
            ``ratio``; only the selection fields are used here (``score`` is not: the
            channels are ranked by their current norm, the quantity being shrunk).
        lam: final strength, > 0 (the prox threshold is ``lr * lam_t * sqrt(n_c)``).
        ramp_steps: steps over which the strength grows linearly from 0 to ``lam``.
        update_every: re-run the selection every this many steps (each run prunes a
            copy of the graph up to ``MAX_TRIES`` times to land the target; a
            ``latency`` target also times every try).
        optimizer: the optimizer whose per-parameter lr the prox step uses.
        overrides: Spec fields a file cannot hold (``example_inputs``).

    Call ``step()`` after every ``optimizer.step()``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 10, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> x = torch.randn(1, 3, 16, 16)
        >>> reg = TargetedGroupLasso(model, {"example_inputs": (x,), "target": {"flops": 1 / 4}},
        ...                          lam=0.5, ramp_steps=200, optimizer=opt)
        >>> len(reg.chosen())    # 48 of conv 0's 64 channels are shrunk toward zero
        48
    """

    def __init__(self, model: torch.nn.Module, spec, *, lam: float, ramp_steps: int,
                 update_every: int = 50, optimizer: torch.optim.Optimizer | None = None,
                 **overrides):
        check_unsharded(model, "TargetedGroupLasso", AnalysisError)  # before copying it
        self.spec = Spec.load(spec, **overrides)  # requires a target or a ratio
        self.lam = check_lam(lam)
        if self.lam == 0:
            raise SpecError("lam: expected a number > 0 (0 would never zero a channel)")
        self.ramp_steps = check_int(ramp_steps, "ramp_steps", 1)
        self.update_every = check_int(update_every, "update_every", 1)
        # a copy: selecting runs the graph, which must not share modules that fully_shard
        # later changes (the channels below point at the model's own parameters)
        self.graph = analyze(copy.deepcopy(model), self.spec.make_example_inputs())
        channels = channel_slices_from_graph(model, self.graph, role="out")
        if not channels:
            raise SpecError("model: no prunable channel to regularise (every group is frozen)")
        self.lasso = GroupLasso(channels, lam=0.0, optimizer=optimizer)
        self._labels = [ch.label for ch in channels]
        self.steps = 0
        self.plan: Plan = {}
        self.reselect()  # an impossible target fails here, before any training

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose learning rates the prox step uses (settable: under FSDP2 the
        optimizer is built after ``fully_shard``, so after this regulariser).

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
            >>> reg = TargetedGroupLasso(model, {"input_shape": [1, 1, 8, 8], "ratio": 0.5}, lam=1.0,
            ...                          ramp_steps=400)
            >>> reg.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        """
        return self.lasso.optimizer

    @optimizer.setter
    def optimizer(self, value: torch.optim.Optimizer | None) -> None:
        self.lasso.optimizer = value

    @property
    def strength(self) -> float:
        """The strength the next ``step()`` applies: ``lam * min(1, (steps + 1) / ramp_steps)``.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> reg = TargetedGroupLasso(model, {"input_shape": [1, 1, 8, 8], "ratio": 0.5}, lam=1.0,
            ...                          ramp_steps=400, optimizer=opt)
            >>> reg.strength
            0.0025
        """
        return self.lam * min(1.0, (self.steps + 1) / self.ramp_steps)

    def reselect(self) -> Plan:
        """Rank channels by their current norm and choose those the budget removes.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> reg = TargetedGroupLasso(model, {"input_shape": [1, 1, 8, 8], "ratio": 0.5}, lam=1.0,
            ...                          ramp_steps=400, optimizer=opt)
            >>> plan = reg.reselect()    # the 8 channels of conv 0 with the smallest norms
            >>> {gid: len(units) for gid, units in plan.items()}
            {0: 8}
        """
        norms = self.lasso.channel_norms().cpu().numpy()
        scores = {g.id: np.zeros(g.size) for g in self.graph.prunable_groups}
        for (gid, c), n in zip(self._labels, norms):
            scores[gid][c] = n
        self.plan = select(self.graph, scores, self.spec)
        chosen = {(gid, int(c)) for gid, units in self.plan.items() for c in units}
        self.lasso.weights = torch.tensor([label in chosen for label in self._labels],
                                          dtype=torch.float64)
        return self.plan

    @torch.no_grad()
    def step(self, lr: float | None = None) -> None:
        """Re-select when due, then shrink the chosen channels (call after ``optimizer.step()``).

        ``lr`` defaults to each parameter's lr in the optimizer given at construction.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> reg = TargetedGroupLasso(model, {"input_shape": [1, 1, 8, 8], "ratio": 0.5}, lam=1.0,
            ...                          ramp_steps=400, optimizer=opt)
            >>> model(torch.randn(2, 1, 8, 8)).square().mean().backward()
            >>> opt.step(); reg.step()
            >>> reg.steps
            1
        """
        if self.steps and self.steps % self.update_every == 0:
            self.reselect()
        self.lasso.lam = self.strength
        self.lasso.prox_(lr)
        self.steps += 1

    def chosen(self) -> list[tuple[int, int]]:
        """``(group id, channel)`` of the channels being shrunk, in channel order.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> reg = TargetedGroupLasso(model, {"input_shape": [1, 1, 8, 8], "ratio": 0.5}, lam=1.0,
            ...                          ramp_steps=400, optimizer=opt)
            >>> len(reg.chosen()), reg.chosen()[0][0]
            (8, 0)
        """
        return [label for label, w in zip(self._labels, self.lasso.weights.tolist()) if w > 0]

    def zero_channels(self) -> list[tuple[int, int]]:
        """``(group id, channel)`` of every channel whose producer slices are all exactly 0.

        Example:
            >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))
            >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
            >>> reg = TargetedGroupLasso(model, {"input_shape": [1, 1, 8, 8], "ratio": 0.5}, lam=100.0,
            ...                          ramp_steps=1, optimizer=opt)
            >>> reg.step()        # a strong prox step zeroes the chosen channels at once
            >>> reg.zero_channels() == reg.chosen()
            True
        """
        zero = self.lasso.zero_channels().tolist()
        return [label for label, z in zip(self._labels, zero) if z]

