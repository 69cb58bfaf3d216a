"""The masking mechanism shared by the N:M and block sparsity passes.

A pass computes a mask per weight and registers it with
``torch.nn.utils.parametrize``: the module's ``weight`` becomes ``original * mask``.
An optimizer keeps training ``parametrizations.weight.original`` while the effective
weight keeps its zeros, so masks survive fine-tuning. ``finalize`` bakes the masks into
plain weights, after which the model has its original ``state_dict`` keys again and
nothing extra to carry around.

Masks only zero values: the tensors keep their shapes and a dense kernel computes with
them at the same speed. Only ``semi_structured.to_semi_structured`` (CUDA, 2:4) turns them into speed.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch
from tabulate import tabulate
from torch import nn
from torch.nn.parameter import UninitializedParameter
from torch.nn.utils import parametrize

from fxprune.errors import SpecError
from fxprune.sharding import AFTER_TRAINING, check_unsharded

# Layer types whose ``weight`` the masking passes handle, with the weight dim that
# holds the input channels. Looked up along the MRO, so subclasses are covered (the
# NonDynamicallyQuantizableLinear inside nn.MultiheadAttention, parametrized classes).
INPUT_DIM: dict[type[nn.Module], int] = {
    nn.Linear: 1,
    nn.Conv1d: 1,
    nn.Conv2d: 1,
    nn.Conv3d: 1,
}


def input_dim_of(module: nn.Module) -> int | None:
    """The weight dim holding input channels, or None if the masking passes skip the type.

    Example:
        >>> input_dim_of(nn.Conv2d(8, 16, 3))
        1
    """
    for cls in type(module).__mro__:
        if cls in INPUT_DIM:
            return INPUT_DIM[cls]
    return None


class SparsityMask(nn.Module):
    """Base of fxprune's weight parametrizations; ``finalize`` removes only these.

    Subclasses set ``pattern`` (e.g. ``"2:4"``) and implement ``check(weight)``, which
    says whether an effective weight satisfies the pattern.
    """

    pattern: str = "mask"
    param_order: tuple[str, ...] = ()  # the module's parameter names before masking

    def check(self, weight: torch.Tensor) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError


class FixedMask(SparsityMask):
    """``forward(w) = w * mask`` with a mask computed once and kept as a bool buffer.

    The buffer moves with ``model.to(device)`` and stays bool under ``model.half()``.
    """

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).contiguous())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


@dataclass(frozen=True)
class LayerRow:
    """What a masking pass did to one layer."""

    name: str
    kind: str
    shape: tuple[int, ...]
    density: float  # fraction of non-zeros in the effective weight, measured afterwards
    status: str  # "masked" | "skipped"
    reason: str = ""


class MaskReport:
    """Row helpers shared by ``NMResult`` and ``BlockResult`` (needs ``rows``, ``pattern``)."""

    rows: list[LayerRow]
    pattern: str

    @property
    def masked(self) -> list[LayerRow]:
        return [r for r in self.rows if r.status == "masked"]

    @property
    def skipped(self) -> list[LayerRow]:
        return [r for r in self.rows if r.status == "skipped"]

    def row(self, name: str) -> LayerRow:
        """The row of the layer with qualified name ``name`` (KeyError if absent)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer named {name!r} in this result")

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        body = [
            (r.name, r.kind, "x".join(map(str, r.shape)), f"{r.density:.3f}", r.status, r.reason)
            for r in self.rows
        ]
        head = ("layer", "type", "shape", "density", "status", "reason")
        summary = f"{self.pattern}: {len(self.masked)} masked, {len(self.skipped)} skipped"
        return summary + "\n" + tabulate(body, headers=head)

    def __str__(self) -> str:
        return self.table()


def density(weight: torch.Tensor) -> float:
    """Fraction of non-zero entries.

    Example:
        >>> density(torch.tensor([1.0, 0.0, 2.0, 0.0]))
        0.5
    """
    return torch.count_nonzero(weight).item() / max(weight.numel(), 1)


def normalize_ignore(ignore: str | Iterable[str]) -> tuple[str, ...]:
    """``ignore`` as a tuple of fnmatch patterns; a bare string is one pattern."""
    if isinstance(ignore, str):
        return (ignore,)
    try:
        patterns = tuple(ignore)
    except TypeError:
        raise SpecError(
            f"ignore must be an fnmatch pattern or a list of them, got {type(ignore).__name__}"
        ) from None
    bad = [p for p in patterns if not isinstance(p, str)]
    if bad:
        raise SpecError(f"ignore patterns must be strings, got {bad!r}")
    return patterns


def check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise SpecError(f"model must be a torch.nn.Module, got {type(model).__name__}")


# plan(name, module, weight) -> (parametrization, "") or (None, reason to skip)
Planner = Callable[[str, nn.Module, torch.Tensor], "tuple[SparsityMask | None, str]"]


def mask_layers(model: nn.Module, ignore: tuple[str, ...], plan: Planner) -> list[LayerRow]:
    """Register the parametrization ``plan`` gives for each supported layer, in place
    (before ``fully_shard``: FSDP2 then shards the parametrized weights)."""
    check_unsharded(model, "masking (apply_nm, apply_block, Spartan, SRigL)")
    layers = [(n, mod) for n, mod in model.named_modules() if input_dim_of(mod) is not None]
    owners: dict[int, list[str]] = defaultdict(list)
    for name, module in layers:
        owners[id(_raw_weight(module))].append(name)

    rows = []
    for name, module in layers:
        weight = module.weight
        kind = type(module).__name__.removeprefix("Parametrized")
        reason = _skip_reason(name, weight, ignore, owners[id(_raw_weight(module))])
        if not reason:
            param, reason = plan(name, module, weight.detach())
            if param is not None:
                # remember where `weight` sat, so finalize restores the state_dict order
                param.param_order = tuple(module._parameters)
                parametrize.register_parametrization(module, "weight", param)
        shape = () if isinstance(weight, UninitializedParameter) else tuple(weight.shape)
        dens = 1.0 if not shape else density(module.weight.detach())
        status = "skipped" if reason else "masked"
        rows.append(LayerRow(name, kind, shape, dens, status, reason))
    return rows


def _raw_weight(module: nn.Module) -> torch.Tensor:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def _skip_reason(name: str, weight: torch.Tensor, ignore: tuple[str, ...], owners: list[str]) -> str:
    if isinstance(weight, UninitializedParameter):
        return "lazy weight not initialized yet (run a forward first)"
    for pattern in ignore:
        if fnmatch.fnmatchcase(name, pattern):
            return f"ignored by pattern {pattern!r}"
    if len(owners) > 1:
        others = ", ".join(o for o in owners if o != name)
        return f"weight tied with {others}: masking one copy would untie them"
    return ""


def remove_parametrization(module: nn.Module, tensor_name: str, *, leave_parametrized: bool) -> None:
    """``parametrize.remove_parametrizations`` that leaves every other module alone.

    torch deletes the tensor's property from the module's parametrized class, and that
    class is shared by every ``copy.deepcopy`` of the module: baking the masks of a copy
    would strip ``weight`` from the original. The module first gets a class of its own
    (same bases, same attributes), so only it loses the property.

    Example:
        >>> import copy
        >>> from fxprune.sparsity.nm import apply_nm
        >>> net = nn.Sequential(nn.Linear(8, 4))
        >>> _ = apply_nm(net, 2, 4)
        >>> twin = copy.deepcopy(net)
        >>> remove_parametrization(twin[0], "weight", leave_parametrized=True)
        >>> net[0].weight.shape   # the original keeps its masked weight
        torch.Size([4, 8])
    """
    cls = type(module)
    own = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, own)
    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=leave_parametrized)


def finalize(model: nn.Module) -> list[str]:
    """Bake fxprune masks into plain weights, in place; returns the tensors baked.

    Each tensor carrying an fxprune mask gets ``remove_parametrization(...,
    leave_parametrized=True)``: its value becomes the masked weight and the parameter
    object stays the same (an optimizer holding it keeps working); copies of ``model``
    keep their masks. Parametrizations stacked on the same tensor by others
    are baked too; tensors without an fxprune mask are left alone.

    Example:
        >>> from fxprune.sparsity.nm import apply_nm
        >>> net = nn.Sequential(nn.Linear(8, 4))
        >>> _ = apply_nm(net, 2, 4)
        >>> finalize(net)
        ['0.weight']
        >>> parametrize.is_parametrized(net[0])
        False
    """
    check_model(model)
    check_unsharded(model, "finalize", fix=AFTER_TRAINING)
    baked = []
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module):
            continue
        for tensor_name in list(module.parametrizations.keys()):
            chain = module.parametrizations[tensor_name]
            masks = [p for p in chain if isinstance(p, SparsityMask)]
            if masks:
                order = next((p.param_order for p in masks if p.param_order), ())
                remove_parametrization(module, tensor_name, leave_parametrized=True)
                _restore_order(module._parameters, order)
                baked.append(f"{name}.{tensor_name}" if name else tensor_name)
    return baked


def _restore_order(params: dict, order: tuple[str, ...]) -> None:
    """Reorder ``params`` in place: names in ``order`` first, in that order, then the rest."""
    for key in [k for k in order if k in params] + [k for k in params if k not in order]:
        params[key] = params.pop(key)


@dataclass(frozen=True)
class DensityRow:
    """Measured sparsity of one weight; ``valid`` says whether its mask pattern holds."""

    name: str
    shape: tuple[int, ...]
    nonzero: int
    numel: int
    density: float
    pattern: str
    valid: bool | None  # None: no fxprune mask to check against


def measure_density(model: nn.Module, *, all_layers: bool = False) -> list[DensityRow]:
    """Non-zero fraction of every masked weight, and whether its pattern (N:M, block) holds.

    With ``all_layers=True`` the unmasked Linear/Conv layers are listed too (pattern
    ``"dense"``, ``valid=None``), which also measures a model after ``finalize``.

    Example:
        >>> from fxprune.sparsity.nm import apply_nm
        >>> net = nn.Sequential(nn.Linear(8, 4))
        >>> _ = apply_nm(net, 1, 4)
        >>> [(r.name, r.density, r.valid) for r in measure_density(net)]
        [('0.weight', 0.25, True)]
    """
    check_model(model)
    rows = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        masked = set()
        if parametrize.is_parametrized(module):
            for tensor_name, chain in module.parametrizations.items():
                masks = [p for p in chain if isinstance(p, SparsityMask)]
                if masks:
                    masked.add(tensor_name)
                    rows.append(_density_row(prefix + tensor_name, getattr(module, tensor_name), masks))
        if all_layers and "weight" not in masked and input_dim_of(module) is not None:
            if not isinstance(module.weight, UninitializedParameter):
                rows.append(_density_row(prefix + "weight", module.weight, []))
    return rows


def _density_row(name: str, weight: torch.Tensor, masks: list[SparsityMask]) -> DensityRow:
    w = weight.detach()
    nonzero = int(torch.count_nonzero(w).item())
    pattern = "+".join(m.pattern for m in masks) or "dense"
    valid = all(m.check(w) for m in masks) if masks else None
    return DensityRow(name, tuple(w.shape), nonzero, w.numel(), nonzero / max(w.numel(), 1), pattern, valid)


def check_real(value: object, what: str, *, low: float, high: float, low_open: bool) -> float:
    """``value`` as a float in (low, high] or [low, high]; SpecError naming ``what`` if not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{what} must be a finite number, got {value!r}")
    below = value <= low if low_open else value < low
    if below or value > high:
        lo = "(" if low_open else "["
        raise SpecError(f"{what} must be in {lo}{low}, {high}], got {value!r}")
    return float(value)
