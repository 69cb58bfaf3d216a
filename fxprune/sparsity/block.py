"""Block sparsity: zero whole bh x bw blocks of 2-D weights, ranked by block L2 norm.

A Linear weight is blocked as is ([out, in]); a conv weight ``[O, I, *k]`` is viewed as
``[O, I * prod(k)]``. The top ``density`` fraction of blocks (by L2 norm) is kept. Masks
are the same parametrizations as the N:M pass, so ``finalize`` bakes them.
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
    check_model,
    check_real,
    finalize,
    mask_layers,
    measure_density,
    normalize_ignore,
)

__all__ = ["BlockResult", "apply_block", "block_mask", "check_block", "finalize", "measure_density"]


def _check_block(block: object) -> tuple[int, int]:
    dims = (block, block) if isinstance(block, int) and not isinstance(block, bool) else block
    if (
        not isinstance(dims, (tuple, list))
        or len(dims) != 2
        or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in dims)
    ):
        raise SpecError(f"block must be a positive int or a (rows, cols) pair of positive ints, got {block!r}")
    return int(dims[0]), int(dims[1])


def _blocks(weight: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """``weight`` as [O/bh, bh, C/bw, bw] blocks of its [O, C] matrix view."""
    if weight.dim() < 2:
        raise SpecError(f"block sparsity needs a weight with >= 2 dims, got shape {tuple(weight.shape)}")
    rows = weight.shape[0]
    matrix = weight.reshape(rows, -1)
    cols = matrix.shape[1]
    if rows % bh or cols % bw:
        raise SpecError(f"weight shape {tuple(weight.shape)} (as {rows}x{cols}) is not divisible into {bh}x{bw} blocks")
    return matrix.reshape(rows // bh, bh, cols // bw, bw)


def kept_blocks(total: int, density: float) -> int:
    """How many of ``total`` blocks a ``density`` keeps: rounded, at least one.

    Example:
        >>> kept_blocks(10, 0.33)
        3
    """
    return max(1, min(total, round(density * total)))


def block_mask(weight: torch.Tensor, block: int | tuple[int, int], density: float) -> torch.Tensor:
    """Bool mask keeping the top ``density`` fraction of blocks of ``weight`` by L2 norm.

    Example:
        >>> w = torch.tensor([[1.0, 1.0, 9.0, 9.0], [1.0, 1.0, 9.0, 9.0]])
        >>> block_mask(w, (2, 2), 0.5)
        tensor([[False, False,  True,  True],
                [False, False,  True,  True]])
    """
    bh, bw = _check_block(block)
    density = check_real(density, "density", low=0.0, high=1.0, low_open=True)
    blocks = _blocks(weight.detach(), bh, bw).float()
    norms = blocks.pow(2).sum(dim=(1, 3)).flatten()
    keep = torch.zeros_like(norms, dtype=torch.bool)
    keep[norms.topk(kept_blocks(norms.numel(), density)).indices] = True
    grid = keep.reshape(blocks.shape[0], 1, blocks.shape[2], 1).expand_as(blocks)
    return grid.reshape(weight.shape).contiguous()


def check_block(weight: torch.Tensor, block: int | tuple[int, int], density: float) -> bool:
    """True if at most ``kept_blocks(total, density)`` blocks of ``weight`` hold a non-zero.

    Example:
        >>> check_block(torch.tensor([[0.0, 0.0, 3.0, 1.0]]), (1, 2), 0.5)
        True
    """
    bh, bw = _check_block(block)
    density = check_real(density, "density", low=0.0, high=1.0, low_open=True)
    live = (_blocks(weight.detach(), bh, bw) != 0).any(dim=3).any(dim=1)
    return int(live.sum()) <= kept_blocks(live.numel(), density)


class BlockMask(FixedMask):
    """Fixed block mask parametrization, computed once by ``apply_block``."""

    def __init__(self, mask: torch.Tensor, block: tuple[int, int], density: float):
        super().__init__(mask)
        self.block, self.density = block, density
        self.pattern = f"block {block[0]}x{block[1]} @ {density:g}"

    def check(self, weight: torch.Tensor) -> bool:
        return check_block(weight, self.block, self.density)


@dataclass
class BlockResult(MaskReport):
    """Per-layer outcome of ``apply_block``; ``print(result)`` shows a table."""

    block: tuple[int, int]
    density: float
    rows: list[LayerRow] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        return f"block {self.block[0]}x{self.block[1]} @ {self.density:g}"


def apply_block(
    model: nn.Module,
    block: int | tuple[int, int] = 4,
    density: float = 0.5,
    *,
    ignore: str | Iterable[str] = (),
) -> BlockResult:
    """Zero whole blocks of every Linear/Conv weight, keeping the top ``density`` by L2 norm, IN PLACE.

    ``block``: ``b`` for b x b, or ``(rows, cols)``. Conv weights ``[O, I, *k]`` are
    blocked as ``[O, I * prod(k)]``. Each layer keeps ``round(density * blocks)`` blocks
    (at least one), so its density is within one block of ``density``. Layers whose
    shape is not divisible by the block, that are tied to another layer, or whose
    qualified name matches a pattern in ``ignore`` are skipped with a reason. Masks are
    parametrizations that survive fine-tuning; ``finalize(model)`` bakes them. Pass a
    copy to keep the original.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> result = apply_block(net, 4, 0.5)
        >>> [(r.name, r.status, r.density) for r in result.rows]
        [('0', 'masked', 0.5), ('2', 'skipped', 1.0)]
    """
    check_model(model)
    dims = _check_block(block)
    density = check_real(density, "density", low=0.0, high=1.0, low_open=True)
    patterns = normalize_ignore(ignore)

    def plan(name: str, module: nn.Module, weight: torch.Tensor):
        rows, cols = weight.shape[0], weight[0].numel()
        if rows % dims[0] or cols % dims[1]:
            view = "" if weight.dim() == 2 else f" (viewed as {rows}x{cols})"
            return None, f"shape {tuple(weight.shape)}{view} not divisible into {dims[0]}x{dims[1]} blocks"
        return BlockMask(block_mask(weight, dims, density), dims, density), ""

    return BlockResult(dims, density, mask_layers(model, patterns, plan))
