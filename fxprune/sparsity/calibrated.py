"""Calibrated one-shot N:M masks: Wanda (``score="activation"``) and SparseGPT
(``score="sparsegpt"``), layer after layer; block masks ranked by Wanda's score.

``apply_nm_calibrated`` first registers a placeholder N:M mask (all ones) on every
eligible layer, then visits the layers in the order a forward pass calls them. For each
layer it runs the calibration batches through the model, whose earlier layers already
carry their final masks (and, for SparseGPT, compensated weights), records the inputs
the layer receives, and sets its mask from them. So each layer is fitted to the inputs
its pruned predecessors produce, as both papers prescribe. Layers that read the same
input tensor (a transformer's query, key and value) are fitted from one pass, and a pass
stops at the last layer it needs when no layer is called twice per forward.

Under ``torch.distributed`` each rank records its share of the batches and the
statistics are added over ranks before a layer is fitted, so every rank fits the masks
one process would (``fxprune.select.distributed``).

Tokens whose ``attention_mask`` (a keyword input of shape [batch, sequence]) is 0 are
left out of the statistics: padding would otherwise count as data.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from fxprune._util import eval_mode
from fxprune.capture.inputs import ExampleInputs
from fxprune.errors import SpecError
from fxprune.select.calibration import as_calibration
from fxprune.select.distributed import all_reduce_sums, rank_and_world, rank_share
from fxprune.sparsity.block import BlockMask, BlockResult, _check_block, block_mask
from fxprune.sparsity.masks import (FixedMask, LayerRow, check_model, check_real, density, mask_layers,
                                    normalize_ignore, remove_parametrization)
from fxprune.sparsity.nm import NMMask, NMResult, _check_nm_args, apply_nm
from fxprune.sparsity.sparsegpt import InputHessian, sparsegpt_prune
from fxprune.sparsity.wanda import InputNorms, wanda_mask, wanda_metric

MASK_SCORES = ("magnitude", "activation", "sparsegpt")
CALIBRATED = ("activation", "sparsegpt")


class _Stop(Exception):
    """Raised by a hook once the layers of a pass have seen their inputs: the rest of the
    forward is not needed."""


def apply_nm_calibrated(model: nn.Module, n: int, m: int, *, score: str = "activation",
                        calibration: Any = None, ignore: str | Iterable[str] = ()) -> NMResult:
    """N:M masks chosen on calibration inputs, IN PLACE on ``model`` (like ``apply_nm``).

    ``score``: "activation" (Wanda: ``|W_ij| * ||X_j||_2``; weights keep their values;
    Linear and convolutions), "sparsegpt" (inverse-Hessian mask and error compensation;
    Linear layers only, convolutions are skipped with a reason) or "magnitude"
    (``apply_nm``, no data). ``calibration``: input batches as ``spec.calibration``
    takes them (a list of tensors, tuples or dicts of keyword inputs, or ``ExampleInputs``).

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> result = apply_nm_calibrated(net, 2, 4, score="sparsegpt", calibration=[torch.randn(64, 8)])
        >>> [(r.name, r.density) for r in result.masked]
        [('0', 0.5), ('2', 0.5)]
    """
    check_model(model)
    _check_nm_args(n, m)
    if score not in MASK_SCORES:
        raise SpecError(f"N:M mask score must be one of {', '.join(MASK_SCORES)}, got {score!r}")
    if score == "magnitude":
        return apply_nm(model, n, m, ignore=ignore)
    batches = _batches(calibration, score)

    def plan(name: str, module: nn.Module, weight: torch.Tensor):
        if weight.shape[1] % m:
            return None, f"input channels ({weight.shape[1]}) not a multiple of m={m}"
        if score == "sparsegpt" and not isinstance(module, nn.Linear):
            return None, ("score='sparsegpt' handles nn.Linear only; use score='activation' (Wanda) "
                          "for convolutions")
        return NMMask(torch.ones_like(weight, dtype=torch.bool), n, m), ""

    def fit(module: nn.Module, weight: torch.Tensor, stats):
        if score == "sparsegpt":
            return sparsegpt_prune(weight, stats.hessian(), n, m)
        return None, wanda_mask(weight, stats.norms(), n, m, getattr(module, "groups", 1))

    rows = _layer_by_layer(model, normalize_ignore(ignore), plan, fit, batches,
                           InputHessian if score == "sparsegpt" else InputNorms)
    return NMResult(n, m, False, rows)


def apply_block_calibrated(model: nn.Module, block: int | tuple[int, int] = 4, density: float = 0.5, *,
                           calibration: Any = None, ignore: str | Iterable[str] = ()) -> BlockResult:
    """Block masks ranked by Wanda's ``|W_ij| * ||X_j||_2`` (the L2 norm of each block of it),
    IN PLACE, layer after layer like ``apply_nm_calibrated``; otherwise as ``apply_block``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> result = apply_block_calibrated(net, 4, 0.5, calibration=[torch.randn(64, 8)])
        >>> [(r.name, r.density) for r in result.masked]
        [('0', 0.5), ('2', 0.5)]
    """
    check_model(model)
    dims = _check_block(block)
    density = check_real(density, "density", low=0.0, high=1.0, low_open=True)
    batches = _batches(calibration, "activation")

    def plan(name: str, module: nn.Module, weight: torch.Tensor):
        rows, cols = weight.shape[0], weight[0].numel()
        if rows % dims[0] or cols % dims[1]:
            return None, f"shape {tuple(weight.shape)} not divisible into {dims[0]}x{dims[1]} blocks"
        return BlockMask(torch.ones_like(weight, dtype=torch.bool), dims, density), ""

    def fit(module: nn.Module, weight: torch.Tensor, stats):
        metric = wanda_metric(weight, stats.norms(), getattr(module, "groups", 1))
        return None, block_mask(metric, dims, density)

    rows = _layer_by_layer(model, normalize_ignore(ignore), plan, fit, batches, InputNorms)
    return BlockResult(dims, density, rows)


def _layer_by_layer(model: nn.Module, patterns: tuple[str, ...], plan, fit, batches: list[ExampleInputs],
                    stats_type) -> list[LayerRow]:
    """Register ``plan``'s placeholder masks, then fit each layer in call order on the inputs
    the model, masked so far, gives it: ``fit(module, weight, stats) -> (new weight or None, keep mask)``."""
    rows = mask_layers(model, patterns, plan)
    layers = {r.name: model.get_submodule(r.name) for r in rows if r.status == "masked"}
    order, stop_early = _call_order(model, layers, batches[0])
    for name in set(layers) - {name for group in order for name in group}:
        remove_parametrization(layers[name], "weight", leave_parametrized=False)
    for group in order:
        stats = _record(model, {name: layers[name] for name in group}, batches, stats_type, stop_early)
        for name in group:
            holder = layers[name].parametrizations["weight"]
            weight, keep = fit(layers[name], holder.original.detach(), stats[name])
            if weight is not None:
                with torch.no_grad():
                    holder.original.copy_(weight)
            next(p for p in holder if isinstance(p, FixedMask)).mask.copy_(keep)
    out = []
    for row in rows:
        if row.status != "masked":
            out.append(row)
        elif not parametrize.is_parametrized(layers[row.name], "weight"):
            out.append(replace(row, status="skipped", reason="not called by the calibration batches"))
        else:
            out.append(replace(row, density=density(layers[row.name].weight.detach())))
    return out


def _batches(calibration: Any, score: str) -> list[ExampleInputs]:
    if calibration is None:
        raise SpecError(f"score={score!r} N:M masks need calibration batches: calibration=[x1, x2, ...] "
                        "(inputs the model takes), or score='magnitude', which needs none")
    if isinstance(calibration, (list, tuple)) and calibration and all(isinstance(b, ExampleInputs) for b in calibration):
        return list(calibration)
    return list(as_calibration(calibration).batches())


def _layer_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["input"]


def _call_order(model: nn.Module, layers: dict[str, nn.Module], batch: ExampleInputs
                ) -> tuple[list[list[str]], bool]:
    """The masked layers in call order, grouped when consecutive ones read the same tensor,
    and whether a pass may stop early (no layer is called twice per forward)."""
    calls: list[tuple[str, torch.Tensor]] = []  # the tensors are kept alive: ``is`` stays meaningful
    hooks = [module.register_forward_pre_hook(
        lambda mod, args, kwargs, name=name: calls.append((name, _layer_input(mod, args, kwargs))),
        with_kwargs=True) for name, module in layers.items()]
    try:
        with eval_mode(model), torch.no_grad():
            batch.to(_device(model)).call(model)
    finally:
        for h in hooks:
            h.remove()
    names = [name for name, _ in calls]
    groups: list[list[str]] = []
    seen: set[str] = set()
    last_input = None
    for name, x in calls:
        if name in seen:
            continue
        if groups and x is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        seen.add(name)
        last_input = x
    return groups, len(names) == len(set(names))


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _record(model: nn.Module, group: dict[str, nn.Module], batches: list[ExampleInputs], stats_type,
            stop_early: bool) -> dict[str, InputNorms | InputHessian]:
    """Each layer of ``group``'s input statistics over every batch, through the model as it is now."""
    stats = {name: stats_type(module) for name, module in group.items()}
    last = list(group)[-1]
    tokens: list[torch.Tensor | None] = [None]

    def hook(module, args, kwargs, name):
        x = _layer_input(module, args, kwargs)
        mask = tokens[0]
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask]  # real tokens only: [tokens, features]
        stats[name].add(x)
        if stop_early and name == last:
            raise _Stop

    hooks = [module.register_forward_pre_hook(lambda mod, a, k, name=name: hook(mod, a, k, name), with_kwargs=True)
             for name, module in group.items()]
    try:
        with eval_mode(model), torch.no_grad():
            for batch in rank_share(batches):  # under torch.distributed: this rank's share
                batch = batch.to(_device(model))
                mask = batch.kwargs.get("attention_mask")
                tokens[0] = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                try:
                    batch.call(model)
                except _Stop:
                    pass
    finally:
        for h in hooks:
            h.remove()
    _add_over_ranks(stats)
    return stats


def _add_over_ranks(stats: dict[str, InputNorms | InputHessian]) -> None:
    """Each rank recorded its share of the batches: add the statistics over ranks, so
    every rank fits the same masks (a no-op in one process)."""
    if rank_and_world()[1] == 1:
        return
    fields = {(name, f): getattr(acc, f) for name, acc in stats.items() for f in ("squares", "gram")
              if getattr(acc, f, None) is not None}
    fields.update({(name, "tokens"): torch.tensor(float(acc.tokens)) for name, acc in stats.items()
                   if isinstance(acc, InputHessian)})
    for (name, f), total in all_reduce_sums(fields).items():
        setattr(stats[name], f, int(total.item()) if f == "tokens" else total)


__all__ = ["apply_nm_calibrated", "apply_block_calibrated", "MASK_SCORES", "CALIBRATED"]
