"""Turn 2:4-masked nn.Linear weights into speed where a kernel exists: CUDA sparse tensor cores.

``torch.sparse.to_sparse_semi_structured`` compresses a 2:4 weight to half its values
plus metadata and routes ``F.linear`` to cuSPARSELt (default) or CUTLASS. Its
constraints, as checked in ``torch/sparse/semi_structured.py``
(``_validate_device_dim_dtype_shape``): a CUDA tensor, 2-D, contiguous, a dtype with an
entry in the backend's ``_DTYPE_SHAPE_CONSTRAINTS``, and both dims multiples of (and at
least) the backend's minimum sparse block: (16, 16) for float16/bfloat16 on cuSPARSELt,
(32, 64) on CUTLASS. The sparse tensor cores need compute capability 8.0 (Ampere) or
newer. Activations are padded by torch at run time, so only the weight is checked here.

Every other layer keeps its dense, masked weight, and the row says why. On CPU nothing
changes: zeros in a dense weight cost the same time as any other value.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from fxprune.passes.masks import check_model, input_dim_of

CPU_REASON = "no sparse kernel, masks give no speed"
SPARSE_DTYPES = (torch.float16, torch.bfloat16)
# Fallback if torch's private constraint tables move: backend -> (min rows, min cols).
_MIN_BLOCK = {"cusparselt": (16, 16), "cutlass": (32, 64)}
# Parents that read a child Linear's weight into a fused op instead of calling the child:
# nn.MultiheadAttention hands out_proj.weight to torch._native_multi_head_attention in
# eval mode, which has no sparse path (SparseSemiStructuredTensor raises on it).
FUSED_READERS: dict[type[nn.Module], tuple[str, ...]] = {nn.MultiheadAttention: ("out_proj",)}


@dataclass(frozen=True)
class KernelRow:
    """Whether one layer now runs a sparse kernel (``status="sparse"``) or stays dense, and why."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    status: str  # "sparse" | "dense" | "eligible" (convert=False)
    reason: str = ""


def _sparse_class(backend: str):
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    return {"cusparselt": SparseSemiStructuredTensorCUSPARSELT, "cutlass": SparseSemiStructuredTensorCUTLASS}[backend]


def default_backend() -> str:
    """``"cusparselt"`` if this torch build has it, else ``"cutlass"``.

    Example:
        >>> default_backend() in ("cusparselt", "cutlass")
        True
    """
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def min_block(backend: str, dtype: torch.dtype) -> tuple[int, int]:
    """Minimum (rows, cols) multiple a ``dtype`` weight needs on ``backend``.

    Example:
        >>> min_block("cutlass", torch.float16)
        (32, 64)
    """
    table = getattr(_sparse_class(backend), "_DTYPE_SHAPE_CONSTRAINTS", {})
    cfg = table.get(dtype)
    if cfg is None:
        return _MIN_BLOCK[backend]
    return cfg.sparse_min_rows, cfg.sparse_min_cols


def _fused_children(model: nn.Module) -> dict[str, str]:
    """Qualified names of Linear children read by a fused parent op -> the parent's type."""
    found = {}
    for name, module in model.named_modules():
        for cls in type(module).__mro__:
            for child in FUSED_READERS.get(cls, ()):
                found[f"{name}.{child}" if name else child] = cls.__name__
    return found


def _dense_reason(module: nn.Module, weight: torch.Tensor, *, capability, backend: str, fused_by: str = "") -> str:
    """Why ``module`` must stay dense; "" if it can be converted. ``capability``: (major, minor) or None."""
    from fxprune.passes.nm import check_nm  # nm re-exports this module's entry point

    if weight.device.type != "cuda":
        return f"{weight.device.type}: {CPU_REASON}"
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__.removeprefix('Parametrized')}: sparse kernels cover nn.Linear (2-D matmul) only"
    if fused_by:
        return f"weight read by {fused_by}'s fused kernel, which has no sparse path"
    if capability is None or tuple(capability) < (8, 0):
        return f"compute capability {capability} < (8, 0): no sparse tensor cores"
    if weight.dtype not in SPARSE_DTYPES:
        return f"dtype {str(weight.dtype).removeprefix('torch.')} not supported (needs float16 or bfloat16)"
    rows, cols = weight.shape
    if cols % 4 or not check_nm(weight, 2, 4):
        return "weight is not 2:4 sparse (run apply_nm(model, 2, 4) first)"
    min_rows, min_cols = min_block(backend, weight.dtype)
    if rows % min_rows or cols % min_cols:
        return f"shape {rows}x{cols} not a multiple of ({min_rows}, {min_cols}) ({backend})"
    return ""


def to_semi_structured(model: nn.Module, *, backend: str | None = None, convert: bool = True) -> list[KernelRow]:
    """Move eligible 2:4 nn.Linear weights to CUDA semi-structured sparse kernels, in place.

    A layer is converted when its weight is on CUDA (compute capability >= 8.0),
    float16/bfloat16, 2-D, 2:4 sparse (e.g. after ``apply_nm(model, 2, 4)``), and its
    shape is a multiple of the backend's block (16x16 cuSPARSELt, 32x64 CUTLASS), and
    no parent reads it into a fused op (``nn.MultiheadAttention.out_proj``). A
    converted layer's mask is baked in (its parametrization removed) and its weight
    becomes a frozen ``SparseSemiStructuredTensor``: inference only, and the model can
    no longer be saved with ``torch.save(model)`` (save the dense ``state_dict`` before).
    Every other Linear/Conv layer keeps its dense masked weight and its row gives the
    reason; on CPU that is every layer, and nothing changes.

    ``backend``: ``"cusparselt"`` or ``"cutlass"``; default: cuSPARSELt if available.
    ``convert=False`` only reports: eligible layers get ``status="eligible"`` and the
    model is left as it is (what ``compress`` puts in its report).

    Example:
        >>> from fxprune.passes.nm import apply_nm
        >>> net = nn.Sequential(nn.Linear(64, 64))
        >>> _ = apply_nm(net, 2, 4)
        >>> [(r.status, r.reason) for r in to_semi_structured(net)]
        [('dense', 'cpu: no sparse kernel, masks give no speed')]
    """
    check_model(model)
    backend = backend or default_backend()
    if backend not in _MIN_BLOCK:
        from fxprune.errors import SpecError

        raise SpecError(f"backend must be 'cusparselt' or 'cutlass', got {backend!r}")
    fused = _fused_children(model)
    rows = []
    for name, module in model.named_modules():
        if input_dim_of(module) is None:
            continue
        weight = module.weight.detach()
        capability = torch.cuda.get_device_capability(weight.device) if weight.is_cuda else None
        reason = _dense_reason(module, weight, capability=capability, backend=backend, fused_by=fused.get(name, ""))
        if not reason and convert:
            reason = _convert(module, backend)
        rows.append(
            KernelRow(
                name=name,
                kind=type(module).__name__.removeprefix("Parametrized"),
                shape=tuple(weight.shape),
                dtype=str(weight.dtype).removeprefix("torch."),
                device=str(weight.device),
                status="dense" if reason else ("sparse" if convert else "eligible"),
                reason=reason,
            )
        )
    return rows


def _convert(module: nn.Module, backend: str) -> str:
    """Replace ``module.weight`` by its compressed form; "" on success, else torch's refusal."""
    dense = module.weight.detach().contiguous()
    try:
        sparse = _sparse_class(backend).from_dense(dense)
    except (RuntimeError, NotImplementedError) as err:
        return f"to_sparse_semi_structured refused ({backend}): {err}"
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return ""
