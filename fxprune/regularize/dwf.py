"""Deep weight factorization (Kolb et al., 2025).

"Deep Weight Factorization: Sparse Learning Through the Lens of Artificial
Symmetries": write a weight as a product of D factors, ``w = u_1 * ... * u_D``, and
put plain L2 decay on the factors. Since ``min sum_d u_d^2 / 2 = D/2 * |w|^(2/D)``
over all factorizations (AM-GM, attained when all ``|u_d|`` are equal), L2 with
strength ``lam`` on the factors is an ``L_{2/D}`` penalty ``lam*D/2 * sum |w|^(2/D)``
on the weights: non-convex, sparsifying, yet trained with any optimizer.

Two forms, both via ``torch.nn.utils.parametrize``:

* element-wise: every scalar of a weight gets D factors;
* grouped (``channels=``): every channel gets D-1 scalar factors multiplying all its
  slices, and the slices themselves are the D-th factor, so L2 on the factors is
  the group penalty ``lam*D/2 * sum_c ||w_c||^(2/D)``. (The channel's own weights
  must count as a factor: with L2 on D free scalar scales alone, scales could
  shrink to 0 while the weights grow, and nothing would be penalised.)

Initialisation. ``init="weights"`` (default) keeps the function: the factors are
balanced, ``|u_d| = |w|^(1/D)`` with the sign on the first factor, so the product is
the original weight (and ``l2_penalty`` starts at its minimum). Factors after the
first are kept at least ``min_magnitude`` (an exact 0 weight gets first factor 0
and the others ``min_magnitude``: still 0, but it receives gradient).
``init="random"`` (element-wise only) is a fresh init: every factor ~
``N(0, sigma^(2/D))`` with ``|u_d| >= 0.1 * sigma^(1/D)``; ``sigma`` defaults to
the std of the existing weight, so the product keeps the layer's init scale.

``factorize`` changes the model in place (as ``register_parametrization`` does);
build the optimizer afterwards. ``collapse`` turns the factors back into plain
weights. Under FSDP2 factorize before ``fully_shard``; the factors are read where the
model holds them at each call and the penalties summed over the ranks. The grouped form
shares each channel's scales across layers: shard the model as one unit
(``fully_shard(model)`` alone).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.utils import parametrize

from fxprune.errors import SpecError
from fxprune.regularize._common import check_int, check_lam
from fxprune.regularize._factors import ChannelScales, ChannelScaling, ElementwiseFactors
from fxprune.regularize.channels import ChannelSlices, ChannelTable
from fxprune.sharding import AFTER_TRAINING, check_unsharded, full, is_sharded, local, \
    sum_over_shards, total_over
from fxprune.sparsity.masks import remove_parametrization


_OURS = (ElementwiseFactors, ChannelScaling)


class DeepFactorization:
    """Handle returned by ``factorize``: the factors, their L2 penalty, collapse.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
        >>> dwf = factorize(model, depth=2, lam=1e-3)
        >>> loss = model(torch.randn(5, 4)).square().mean() + dwf.l2_penalty()
        >>> dwf.collapse()                                   # doctest: +ELLIPSIS
        Sequential(...)
    """

    def __init__(self, model, depth, lam, factors, table=None, scales=None):
        self.model, self.depth, self.lam = model, depth, lam
        self._factors = factors  # element-wise: per weight, where its D factors live
        self.table, self.scales = table, scales

    def _factor_lists(self) -> list[list[torch.nn.Parameter]]:
        """Element-wise form: each weight's D factors as the model holds them now."""
        return [[plist._parameters[name] for plist, name in owners] for owners in self._factors]

    def factor_parameters(self) -> list[torch.nn.Parameter]:
        """All factor parameters. Optimizer ``weight_decay=lam`` on exactly these
        equals adding ``l2_penalty()`` (grouped: when the channels cover whole
        parameters; else the uncovered entries are decayed too).

        Example:
            >>> dwf = factorize(torch.nn.Linear(4, 2), depth=3)
            >>> len(dwf.factor_parameters())
            3
        """
        if self.table is not None:
            return list(self.scales.factors) + list(self.table.params)
        return [u for us in self._factor_lists() for u in us]

    def l2_penalty(self) -> torch.Tensor:
        """``lam/2 * sum ||factor||^2`` (grouped: channel entries of the weights and
        the channel scales). Equal to ``equivalent_penalty()`` at balanced factors.

        Example:
            >>> lin = torch.nn.Linear(1, 1, bias=False)
            >>> with torch.no_grad(): _ = lin.weight.fill_(-4.0)
            >>> factorize(lin, depth=2, lam=1.0).l2_penalty()  # (2^2 + 2^2) / 2
            tensor(4., grad_fn=<MulBackward0>)
        """
        if self.table is not None:
            total = self.table.sq_norms().sum() + total_over(self.scales.factors,
                                                             lambda s: s.square().sum())
        else:
            total = total_over(self.factor_parameters(), lambda u: u.square().sum())
        return 0.5 * self.lam * total

    def equivalent_penalty(self) -> torch.Tensor:
        """The ``L_{2/D}`` penalty the L2 on factors amounts to, on the current product:
        ``lam*D/2 * sum |w|^(2/D)`` (grouped: ``sum_c ||w_c||^(2/D)``); the minimum of
        ``l2_penalty`` over all factorizations of the same weights.

        Example:
            >>> lin = torch.nn.Linear(1, 1, bias=False)
            >>> with torch.no_grad(): _ = lin.weight.fill_(-4.0)
            >>> factorize(lin, depth=2, lam=1.0).equivalent_penalty()
            tensor(4.)
        """
        d = self.depth
        with torch.no_grad():
            if self.table is not None:
                s = functools.reduce(torch.mul, [full(f) for f in self.scales.factors])
                norms = self.table.norms() * s.abs().to(self.table.dtype)
                return 0.5 * self.lam * d * norms.pow(2.0 / d).sum()
            total = 0.0
            for us in self._factor_lists():  # the D factors of a weight are sharded alike
                part = functools.reduce(torch.mul, [local(u) for u in us]).abs().pow(2.0 / d).sum()
                total = total + (sum_over_shards(part, us[:1]) if is_sharded(us[0]) else part)
            return 0.5 * self.lam * d * total

    def collapse(self) -> torch.nn.Module:
        """Same as ``collapse(self.model)``.

        Example:
            >>> factorize(torch.nn.Linear(2, 2), depth=2).collapse()
            Linear(in_features=2, out_features=2, bias=True)
        """
        return collapse(self.model)


def _owners(model: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    owners: dict[int, list] = {}
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, name))
    return owners


def _owner(owners, p: torch.Tensor, what: str) -> tuple[torch.nn.Module, str]:
    found = owners.get(id(p), [])
    if any(isinstance(m, parametrize.ParametrizationList) for m, _ in found):
        raise SpecError(f"{what}: a parameter of shape {tuple(p.shape)} is already "
                        "parametrized; collapse() first")
    if len(found) != 1:
        problem = "is not a plain parameter of the model" if not found else \
            "is shared by several modules (tied); untie it first"
        raise SpecError(f"{what}: a parameter of shape {tuple(p.shape)} {problem}")
    return found[0]


def factorize(model: torch.nn.Module, depth: int = 3, *, lam: float = 0.0, params=None,
              channels: list[ChannelSlices] | None = None, init: str = "weights",
              sigma: float | None = None, min_magnitude: float = 1e-3,
              generator: torch.Generator | None = None) -> DeepFactorization:
    """Reparametrise weights (or channel scales) of ``model`` in place as D factors.

    Args:
        depth: number of factors D >= 2 (penalty ``L_{2/D}``).
        lam: L2 strength on the factors, used by ``l2_penalty()``.
        params: element-wise form; parameters or their names (default: every
            parameter with >= 2 dims).
        channels: grouped form instead; one ChannelSlices per channel.
        init: ``"weights"`` (balanced, product = current weights) or ``"random"``
            (element-wise fresh init, see the module docstring).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> dwf = factorize(model, depth=3, lam=1e-4)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # sees the factors
    """
    check_int(depth, "depth", 2)
    lam = check_lam(lam)
    check_unsharded(model, "factorize")
    if init not in ("weights", "random"):
        raise SpecError(f"init: expected 'weights' or 'random', got {init!r}")
    if not min_magnitude > 0:
        raise SpecError(f"min_magnitude: expected a number > 0, got {min_magnitude!r}")
    owners = _owners(model)
    if channels is not None:
        if params is not None:
            raise SpecError("params: give params (element-wise) or channels (grouped), not both")
        if init != "weights":
            raise SpecError("init: the grouped form supports only init='weights'")
        return _factorize_channels(model, depth, lam, channels, min_magnitude, owners)

    named = dict(model.named_parameters())
    if params is None:
        targets = [p for p in named.values() if p.dim() >= 2]
    else:
        targets = []
        for p in params:
            if isinstance(p, str) and p not in named:
                raise SpecError(f"params: {p!r} is not a parameter name of the model")
            targets.append(named[p] if isinstance(p, str) else p)
    if not targets:
        raise SpecError("params: nothing to factorize")
    unique = list({id(p): p for p in targets}.values())
    located = [(p, *_owner(owners, p, "params")) for p in unique]  # check all, then change
    factors = []
    for p, module, name in located:
        std = float(p.detach().float().std()) if sigma is None and p.numel() > 1 else sigma
        parametrize.register_parametrization(module, name, ElementwiseFactors(depth, min_magnitude))
        plist = module.parametrizations[name]
        owners = [(plist, f"original{i}") for i in range(depth)]
        if init == "random":
            _random_init_([plist._parameters[n] for _, n in owners], std if std else 1.0, generator)
        factors.append(owners)
    return DeepFactorization(model, depth, lam, factors)


@torch.no_grad()
def _random_init_(factors, sigma: float, generator) -> None:
    scale = sigma ** (1.0 / len(factors))
    for u in factors:
        z = torch.randn(u.shape, generator=generator, dtype=u.dtype, device="cpu")
        z = torch.where(z >= 0, 1.0, -1.0) * z.abs().clamp_min(0.1)
        u.copy_(z * scale)


def _factorize_channels(model, depth, lam, channels, min_magnitude, owners):
    table = ChannelTable(channels)
    with torch.no_grad():
        norms = table.norms()
        init = norms.pow(1.0 / depth).clamp_min(min_magnitude)
    scales = ChannelScales(init, depth - 1)
    per_param: dict[int, list] = {}
    for k in table.keys:
        param = table.param_of(k)
        per_param.setdefault(id(param), [param, []])[1].append((k.dim, k.index, k.channel))
    located = [(param, *_owner(owners, param, "channels"), slices)
               for param, slices in per_param.values()]  # check all, then change
    for param, module, name, slices in located:
        parametrize.register_parametrization(module, name, ChannelScaling(scales, slices))
        if module.parametrizations[name].original is not param:  # identity is relied on
            raise SpecError("channels: torch replaced the parameter object on parametrization")
    return DeepFactorization(model, depth, lam, None, table=table, scales=scales)


def collapse(model: torch.nn.Module) -> torch.nn.Module:
    """Multiply fxprune's factors back into ordinary weights, in place; returns ``model``.

    Removes every parametrization ``factorize`` added; the forward is unchanged.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> _ = factorize(model, depth=2)
        >>> collapse(model)
        Linear(in_features=4, out_features=2, bias=True)
    """
    check_unsharded(model, "collapse", fix=AFTER_TRAINING)
    for module in list(model.modules()):
        if not parametrize.is_parametrized(module):
            continue
        for name in list(module.parametrizations.keys()):
            chain = list(module.parametrizations[name])
            ours = [isinstance(m, _OURS) for m in chain]
            if all(ours):
                remove_parametrization(module, name, leave_parametrized=True)
            elif any(ours):
                raise SpecError(f"model: {name!r} mixes fxprune factors with other "
                                "parametrizations; remove the others first")
    return model

