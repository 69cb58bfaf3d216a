"""The report's per-layer sparsity table: pattern, measured density, and the kernel that
would run each layer (``fxprune.sparsity.semi_structured``)."""
from __future__ import annotations

import torch
from torch import nn

from fxprune.sparsity.nm import NMResult
from fxprune.sparsity.semi_structured import to_semi_structured


def sparsity_rows(model: nn.Module, result: NMResult) -> list[dict]:
    """The report's per-layer sparsity table for ``model`` after ``apply_nm`` (and fusion).

    One row per layer ``apply_nm`` saw: its pattern (``"-"`` when skipped), the density
    measured on ``model`` now (non-zeros / entries of the weight), whether a sparse
    kernel would run it (``to_semi_structured(model, convert=False)``: on CPU never) and
    the reason a layer was skipped or stays dense.

    Example:
        >>> from fxprune.sparsity.nm import apply_nm
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 6))
        >>> result = apply_nm(net, 2, 4, ignore=["2"])
        >>> [(r["layer"], r["pattern"], r["density"], r["kernel"]) for r in sparsity_rows(net, result)]
        [('0', '2:4', 0.5, 'dense'), ('2', '-', 1.0, 'dense')]
    """
    kernels = {row.name: row for row in to_semi_structured(model, convert=False)}
    rows = []
    for layer in result.rows:
        weight = model.get_submodule(layer.name).weight.detach()
        kernel = kernels.get(layer.name)
        rows.append({
            "layer": layer.name,
            "pattern": f"{result.n}:{result.m}" if layer.status == "masked" else "-",
            "density": round(int(torch.count_nonzero(weight)) / weight.numel(), 6),
            "kernel": kernel.status if kernel else "dense",
            "reason": layer.reason or (kernel.reason if kernel else ""),
        })
    return rows
