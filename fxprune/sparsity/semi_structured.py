"""Turn 2:4-masked nn.Linear weights into speed where a kernel exists: CUDA sparse tensor cores.

``torch.sparse.to_sparse_semi_structured`` compresses a 2:4 weight to half its values
plus metadata and routes ``F.linear`` to cuSPARSELt (default) or CUTLASS. Its
constraints, as checked in ``torch/sparse/semi_structured.py``
(``_validate_device_dim_dtype_shape``): a CUDA tensor, 2-D, contiguous, a dtype with an
entry in the backend's ``_DTYPE_SHAPE_CONSTRAINTS``, and both dims multiples of (and at
least) the backend's minimum sparse block: (16, 16) for float16/bfloat16 on cuSPARSELt,
(32, 64) on CUTLASS. The sparse tensor cores need compute capability 8.0 (Ampere) or
newer, and the CUTLASS kernels only 8.x (on a Hopper GPU they raise at the first
matmul, so only cuSPARSELt is eligible there). Activations are padded by torch at run
time, so only the weight is checked here.

cuSPARSELt has several algorithms per matmul (21 with cuSPARSELt 0.8 on an H100) and
torch runs algorithm 0 unless told otherwise. Passing ``example_inputs`` times each of
them through the converted layer itself, on the activations it really sees, and keeps
the fastest. Through the layer and on the converted model's own activations, because the
bias epilogue and the memory layout of the input (which the previous sparse layer
produces) change which algorithm wins: algorithm 3, the fastest for the 16384 -> 4096
layer at 8192 tokens on its real input, took 2.01 ms against algorithm 0's 1.35 ms when
the same layer was fed the dense model's activations. Measured on an H100 (torch 2.11,
bf16, the 4096 -> 16384 -> 4096 MLP at 1024 tokens, CUDA graphs): algorithm 0 ran
the two layers at 0.165 and 0.230 ms, the tuned algorithms (20 and 6) at 0.137 and 0.125
ms, dense 0.187 and 0.177 ms (``benchmarks/nm_gpu.py``).

Every other layer keeps its dense, masked weight, and the row says why. On CPU nothing
changes: zeros in a dense weight cost the same time as any other value.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.utils import parametrize

from fxprune.errors import SpecError
from fxprune.measure import cuda_graph, device_timer, module_calls
from fxprune.sparsity.masks import check_model, input_dim_of, remove_parametrization
from fxprune.sparsity.nm import check_nm

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
    alg_id: int | None = None  # cuSPARSELt algorithm set by fastest_algorithm; None: torch's default (0)


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
    if weight.device.type != "cuda":
        return f"{weight.device.type}: {CPU_REASON}"
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__.removeprefix('Parametrized')}: sparse kernels cover nn.Linear (2-D matmul) only"
    if fused_by:
        return f"weight read by {fused_by}'s fused kernel, which has no sparse path"
    if capability is None or tuple(capability) < (8, 0):
        return f"compute capability {capability} < (8, 0): no sparse tensor cores"
    if backend == "cutlass" and capability[0] != 8:
        return (f"compute capability {tuple(capability)}: torch's CUTLASS 2:4 kernels run on 8.x only; "
                "use backend='cusparselt'")
    if weight.dtype not in SPARSE_DTYPES:
        return f"dtype {str(weight.dtype).removeprefix('torch.')} not supported (needs float16 or bfloat16)"
    rows, cols = weight.shape
    if cols % 4 or not check_nm(weight, 2, 4):
        return "weight is not 2:4 sparse (run apply_nm(model, 2, 4) first)"
    min_rows, min_cols = min_block(backend, weight.dtype)
    if rows % min_rows or cols % min_cols:
        return f"shape {rows}x{cols} not a multiple of ({min_rows}, {min_cols}) ({backend})"
    return ""


def to_semi_structured(
    model: nn.Module,
    *,
    backend: str | None = None,
    convert: bool = True,
    example_inputs: tuple | torch.Tensor | None = None,
) -> list[KernelRow]:
    """Move eligible 2:4 nn.Linear weights to CUDA semi-structured sparse kernels, in place.

    A layer is converted when its weight is on CUDA (compute capability >= 8.0; 8.x for
    CUTLASS), float16/bfloat16, 2-D, 2:4 sparse (e.g. after ``apply_nm(model, 2, 4)``),
    its shape is a multiple of the backend's block (16x16 cuSPARSELt, 32x64 CUTLASS), and
    no parent reads it into a fused op (``nn.MultiheadAttention.out_proj``). A
    converted layer's mask is baked in (its parametrization removed) and its weight
    becomes a frozen ``SparseSemiStructuredTensor``: inference only, and the model can
    no longer be saved with ``torch.save(model)`` (save the dense ``state_dict`` before).
    Every other Linear/Conv layer keeps its dense masked weight and its row gives the
    reason; on CPU that is every layer, and nothing changes.

    ``backend``: ``"cusparselt"`` or ``"cutlass"``; default: cuSPARSELt if available.
    ``convert=False`` only reports: eligible layers get ``status="eligible"`` and the
    model is left as it is (what ``compress`` puts in its report).
    ``example_inputs``: the model's inputs (a tensor or a tuple of them, on the model's
    device). With cuSPARSELt, the model runs once on them and each converted layer gets
    the cuSPARSELt algorithm that runs fastest on the activations it saw
    (``KernelRow.alg_id``; see ``fastest_algorithm``); without them torch uses
    algorithm 0. Tune with the token count you will deploy with: the best algorithm
    depends on the shape.

    Example:
        >>> from fxprune.sparsity.nm import apply_nm
        >>> net = nn.Sequential(nn.Linear(64, 64))
        >>> _ = apply_nm(net, 2, 4)
        >>> [(r.status, r.reason) for r in to_semi_structured(net)]
        [('dense', 'cpu: no sparse kernel, masks give no speed')]
    """
    check_model(model)
    backend = backend or default_backend()
    if backend not in _MIN_BLOCK:
        raise SpecError(f"backend must be 'cusparselt' or 'cutlass', got {backend!r}")
    if example_inputs is not None and (backend != "cusparselt" or not convert):
        why = "backend='cutlass' has a single kernel" if backend != "cusparselt" else "convert=False converts nothing"
        raise SpecError(f"example_inputs tunes cuSPARSELt's algorithm per converted layer, but {why}; "
                        "drop example_inputs")
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
    if example_inputs is not None:
        rows = _tune_algorithms(model, rows, example_inputs)
    return rows


def _tune_algorithms(model: nn.Module, rows: list[KernelRow], example_inputs) -> list[KernelRow]:
    """Give every converted layer the cuSPARSELt algorithm that is fastest on its real activations."""
    sparse = {r.name for r in rows if r.status == "sparse"}
    if not sparse:
        return rows
    seen = layer_inputs(model, sparse, example_inputs)
    tuned = []
    for row in rows:
        inp = seen.get(row.name)
        if row.status != "sparse":
            tuned.append(row)
        elif inp is None:
            tuned.append(replace(row, reason="not called as a module on example_inputs: algorithm 0 (torch's default)"))
        else:
            tuned.append(replace(row, alg_id=fastest_algorithm(model.get_submodule(row.name), inp)))
    return tuned


def fastest_algorithm(layer: nn.Linear, inp: torch.Tensor, *, repeats: int = 10, margin: float = 0.03) -> int:
    """Set ``layer`` (a converted cuSPARSELt Linear) to its fastest algorithm on ``inp``; return the id.

    Each algorithm id in turn, until cuSPARSELt rejects one, runs the layer itself (so
    the bias epilogue and transposes are the ones torch really uses), captured in a CUDA
    graph so that the time is the GPU's alone, not torch's per-call CPU set-up: the
    median of ``repeats`` replays, timed with CUDA events. Algorithm 0 (torch's default)
    is kept unless another is at least ``margin`` faster, so timing noise cannot pick an
    arbitrary one."""
    weight = layer.weight
    times: dict[int, float] = {}
    with torch.inference_mode():
        for alg_id in range(64):
            weight.alg_id_cusparselt = alg_id
            try:
                layer(inp)  # raises past the last algorithm id
            except RuntimeError:
                break
            times[alg_id] = _graph_median_ms(lambda: layer(inp), repeats)
    best = min(times, key=times.get) if times else 0
    weight.alg_id_cusparselt = best if times and times[best] < (1 - margin) * times[0] else 0
    return weight.alg_id_cusparselt


def _graph_median_ms(fn, repeats: int) -> float:
    """Median milliseconds of replaying ``fn`` captured once in a CUDA graph."""
    replay = cuda_graph(fn, warmup=1)
    replay()
    timer = device_timer(torch.device("cuda", torch.cuda.current_device()))
    return statistics.median(timer(replay) for _ in range(repeats))


def layer_inputs(model: nn.Module, names: set[str], example_inputs) -> dict[str, torch.Tensor]:
    """The first input each named module receives when ``model`` runs on ``example_inputs``
    (a tensor or a tuple). A module that is never called as a module (e.g. a weight read by
    a parent's fused op) is missing from the result."""
    calls = module_calls(model, names, example_inputs)
    return {name: recorded[0][0][0] for name, recorded in calls.items() if recorded}


def _convert(module: nn.Module, backend: str) -> str:
    """Replace ``module.weight`` by its compressed form; "" on success, else torch's refusal."""
    dense = module.weight.detach().contiguous()
    try:
        sparse = _sparse_class(backend).from_dense(dense)
    except (RuntimeError, NotImplementedError) as err:
        return f"to_sparse_semi_structured refused ({backend}): {err}"
    if parametrize.is_parametrized(module, "weight"):
        remove_parametrization(module, "weight", leave_parametrized=True)
    module.weight = nn.Parameter(sparse, requires_grad=False)
    return ""
