"""N:M fine-grained structured sparsity: in every M consecutive input channels keep N.

Groups run along the input dim, as sparse tensor cores read them: along
``in_features`` for nn.Linear and, for a conv weight ``[O, I, *k]``, along ``I`` at each
``(o, *k)`` position. Two ways to get there:

- ``apply_nm(model, n, m)``: a fixed mask from the current magnitudes (one-shot pruning,
  then fine-tuning keeps the zeros);
- ``apply_nm(model, n, m, sr_ste=True)``: SR-STE (Zhou et al. 2021, "Learning N:M
  Fine-grained Structured Sparse Neural Networks From Scratch"): the mask follows the
  dense weights on every forward, gradients pass straight through, and pruned weights get
  an extra decay ``lambda_W * (1 - mask) * w``.

``finalize`` bakes either into plain weights. Masks alone give no speed;
``fxprune.sparsity.semi_structured.to_semi_structured`` moves 2:4 Linear
weights to the CUDA sparse kernels where they exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from fxprune.errors import SpecError
from fxprune.sparsity.masks import (
    FixedMask,
    LayerRow,
    MaskReport,
    SparsityMask,
    check_model,
    check_real,
    finalize,
    mask_layers,
    measure_density,
    normalize_ignore,
)

__all__ = [
    "NMResult",
    "apply_nm",
    "check_nm",
    "finalize",
    "measure_density",
    "nm_mask",
]


def _check_nm_args(n: object, m: object) -> None:
    for label, value in (("n", n), ("m", m)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"N:M sparsity: {label} must be an int, got {type(value).__name__} {value!r}")
    if n <= 0:
        raise SpecError(f"N:M sparsity: n must be > 0 (got n={n}, m={m}); n=0 would zero every weight")
    if n >= m:
        raise SpecError(f"N:M sparsity: n must be smaller than m (got n={n}, m={m}); n >= m keeps every weight")


def _groups(weight: torch.Tensor, m: int) -> torch.Tensor:
    """``weight`` as rows of M consecutive input channels: [O, I, *k] -> [O*k*I/M, M]."""
    if weight.dim() < 2:
        raise SpecError(f"N:M sparsity needs a weight with an input dim (>= 2 dims), got shape {tuple(weight.shape)}")
    if weight.shape[1] % m:
        raise SpecError(f"weight input dim {weight.shape[1]} (shape {tuple(weight.shape)}) is not a multiple of m={m}")
    return weight.movedim(1, -1).reshape(-1, m)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Bool mask keeping the N largest |w| in every group of M along weight dim 1.

    Exactly N entries per group are kept (ties broken by ``torch.topk``).

    Example:
        >>> nm_mask(torch.tensor([[1.0, -4.0, 3.0, 2.0]]), 2, 4)
        tensor([[False,  True,  True, False]])
    """
    _check_nm_args(n, m)
    moved = weight.detach().movedim(1, -1)
    groups = _groups(weight.detach(), m).abs().float()
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(moved.shape).movedim(-1, 1).contiguous()


def check_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True if every group of M consecutive input channels holds at most N non-zeros.

    Example:
        >>> check_nm(torch.tensor([[0.0, 5.0, 0.0, 1.0]]), 2, 4)
        True
        >>> check_nm(torch.tensor([[3.0, 5.0, 0.0, 1.0]]), 2, 4)
        False
    """
    _check_nm_args(n, m)
    return bool(((_groups(weight.detach(), m) != 0).sum(dim=1) <= n).all())


class NMMask(FixedMask):
    """Fixed N:M mask parametrization, computed once by ``apply_nm``."""

    def __init__(self, mask: torch.Tensor, n: int, m: int):
        super().__init__(mask)
        self.n, self.m, self.pattern = n, m, f"{n}:{m}"

    def check(self, weight: torch.Tensor) -> bool:
        return check_nm(weight, self.n, self.m)


class _SparseRefinedSTE(torch.autograd.Function):
    """Forward: N:M-masked weight. Backward: straight through + decay of pruned weights."""

    @staticmethod
    def forward(ctx, weight, n, m, decay):
        mask = nm_mask(weight, n, m)
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, mask = ctx.saved_tensors
        # SR-STE eq. (5): g(W~) + lambda_W * (1 - E) * W, the STE gradient plus a decay
        # that keeps pruned weights from flipping back and forth across the mask boundary.
        return grad + ctx.decay * weight.masked_fill(mask, 0), None, None, None


class SRSTEMask(SparsityMask):
    """SR-STE parametrization: the N:M mask is recomputed from the dense weight on every forward."""

    def __init__(self, n: int, m: int, decay: float):
        super().__init__()
        self.n, self.m, self.decay, self.pattern = n, m, decay, f"{n}:{m} sr-ste"

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _SparseRefinedSTE.apply(weight, self.n, self.m, self.decay)

    def check(self, weight: torch.Tensor) -> bool:
        return check_nm(weight, self.n, self.m)

    def extra_repr(self) -> str:
        return f"n={self.n}, m={self.m}, decay={self.decay}"


@dataclass
class NMResult(MaskReport):
    """Per-layer outcome of ``apply_nm``; ``print(result)`` shows a table."""

    n: int
    m: int
    sr_ste: bool
    rows: list[LayerRow] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}" + (" sr-ste" if self.sr_ste else "")


def apply_nm(
    model: nn.Module,
    n: int,
    m: int,
    *,
    ignore: str | Iterable[str] = (),
    sr_ste: bool = False,
    sr_ste_decay: float = 2e-4,
) -> NMResult:
    """Mask every Linear/Conv1d/2d/3d weight to N:M sparsity, IN PLACE on ``model``.

    Groups of M run along the input dim (per group for grouped convs). Layers whose
    input dim is not a multiple of M, whose weight is tied to another layer, or whose
    qualified name matches an fnmatch pattern in ``ignore`` are skipped, each with a
    reason in the result. Masks are ``torch.nn.utils.parametrize`` parametrizations, so
    they survive fine-tuning (optimize ``model.parameters()`` as usual); call
    ``finalize(model)`` to bake them into plain weights. Pass a copy
    (``copy.deepcopy(model)``) to keep the original.

    ``sr_ste=True`` recomputes the mask from the dense weights on every forward and adds
    ``sr_ste_decay * (1 - mask) * w`` to the gradient of the pruned weights (SR-STE).

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6))
        >>> result = apply_nm(net, 2, 4, ignore=["2"])
        >>> [(r.name, r.status, r.density) for r in result.rows]
        [('0', 'masked', 0.5), ('2', 'skipped', 1.0)]
    """
    check_model(model)
    _check_nm_args(n, m)
    patterns = normalize_ignore(ignore)
    if not isinstance(sr_ste, bool):
        raise SpecError(f"sr_ste must be True or False, got {sr_ste!r}")
    decay = check_real(sr_ste_decay, "sr_ste_decay", low=0.0, high=float("inf"), low_open=False)

    def plan(name: str, module: nn.Module, weight: torch.Tensor):
        channels = weight.shape[1]
        if channels % m:
            per_group = " per group" if getattr(module, "groups", 1) > 1 else ""
            return None, f"input channels{per_group} ({channels}) not a multiple of m={m}"
        if sr_ste:
            return SRSTEMask(n, m, decay), ""
        return NMMask(nm_mask(weight, n, m), n, m), ""

    return NMResult(n, m, sr_ste, mask_layers(model, patterns, plan))
