"""Dynamic batch and sequence dims for the torch.export front end.

An exported graph is specialised to its example inputs unless export is told which dims
may vary. fxprune asks for the first two dims of every input tensor (batch, and sequence
for token ids, masks and ``[B, S, C]`` features) with ``Dim.AUTO``: export keeps a dim
dynamic where the model allows it and specialises it where the model fixes it (an image's
channel dim meets a conv's weight, a learned position table fixes the length). Sizes
then stay symbolic in the graph (``view(x, [sym_size(ids, 0), sym_size(ids, 1), 4, 8])``),
so calibration batches of any batch size and length run through it, and so does a pruned
graph: the prune pass rewrites only the channel sizes, which are numbers.

Export specialises a dim whose example size is 0 or 1 unless it reasons about sizes
"obliviously" (``backed_size_oblivious``): example inputs of batch 1 are common, so the
capture turns that on. The analysis reads the example sizes (the symbols' hints), as
under static shapes. Which dims stayed dynamic, and their allowed range, is kept on the
graph's placeholders (``node.meta["fxprune.dynamic_dims"]``): :func:`shape_mismatch`
checks a batch against it before the graph runs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.fx
from torch.export import Dim, ShapesCollection
from torch.fx.experimental.symbolic_shapes import is_concrete_int, optimization_hint
from torch.utils._sympy.numbers import int_oo

from .inputs import ExampleInputs

DYNAMIC_DIMS = "fxprune.dynamic_dims"  # placeholder meta: {dim: DynamicDim}
VARYING = 2  # the leading dims export is asked to keep dynamic: batch, then sequence
_STATIC = [False]  # set by static_shapes(): export specialises every dim


@contextlib.contextmanager
def static_shapes():
    """Within it, torch.export captures with every dim specialised to the example inputs.

    Dynamic dims cost capture time (a 2-layer Llama: 1.6 s against 0.45 s on 2 cores):
    callers that only ever run the example shapes (the project's own test suite outside
    the dynamic-shape tests) can skip them. Calibration batches must then have the
    example's shapes.

    >>> import torch, fxprune
    >>> with static_shapes():
    ...     graph = fxprune.analyze(torch.nn.Linear(4, 2), torch.randn(3, 4), capture="export")
    >>> graph.gm.meta["fxprune.static_shapes"]
    'static_shapes() was in effect'
    """
    before = _STATIC[0]
    _STATIC[0] = True
    try:
        yield
    finally:
        _STATIC[0] = before


def wants_static() -> bool:
    return _STATIC[0]


@dataclass(frozen=True)
class DynamicDim:
    """One dynamic dim of a graph input: its symbol (dims that share one must be equal)
    and the sizes export allows (``high`` None: unbounded)."""

    symbol: str
    low: int
    high: int | None

    def allows(self, size: int) -> bool:
        return size >= self.low and (self.high is None or size <= self.high)

    def describe(self) -> str:
        return f"{self.low}..{self.high if self.high is not None else ''}"


def batch_and_sequence(inputs: ExampleInputs) -> ShapesCollection:
    """``dynamic_shapes`` for export: the first two dims of every input tensor are
    ``Dim.AUTO`` (dynamic where the model allows, specialised where it does not).

    >>> import torch
    >>> from fxprune.capture.inputs import as_example_inputs
    >>> ids = torch.zeros(2, 8, dtype=torch.long)
    >>> batch_and_sequence(as_example_inputs({"input_ids": ids}))[ids]
    {0: DimHint(AUTO), 1: DimHint(AUTO)}
    """
    shapes = ShapesCollection()
    for tensor in inputs.tensors():
        if tensor.ndim:
            shapes[tensor] = {d: Dim.AUTO for d in range(min(tensor.ndim, VARYING))}
    return shapes


@contextlib.contextmanager
def sizes_oblivious():
    """Let export keep a dim of example size 1 dynamic (a batch of one) rather than
    specialise it: sizes 0 and 1 are reasoned about like any other."""
    from torch.fx.experimental import _config

    with _config.patch(backed_size_oblivious=True):
        yield


def concrete(size) -> int:
    """The example's size for a dim export made symbolic (its hint), or the number itself."""
    return int(size) if is_concrete_int(size) else optimization_hint(size)


def record_dynamic_dims(gm: torch.fx.GraphModule) -> None:
    """Keep on each placeholder which dims export left symbolic (read from its fake value,
    before the fake values are dropped) and the range of sizes each allows."""
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            continue
        dims = {d: _dynamic_dim(size) for d, size in enumerate(value.shape) if not is_concrete_int(size)}
        if dims:
            node.meta[DYNAMIC_DIMS] = dims


def _dynamic_dim(size: torch.SymInt) -> DynamicDim:
    symbolic = size.node
    ranges = symbolic.shape_env.bound_sympy(symbolic.expr)
    low = 0 if ranges.lower == -int_oo else int(ranges.lower)
    high = None if ranges.upper == int_oo else int(ranges.upper)
    return DynamicDim(str(symbolic.expr), low, high)


def dynamic_dims(gm: torch.fx.GraphModule) -> dict[str, dict[int, DynamicDim]]:
    """``{input name: {dim: DynamicDim}}`` for the graph's inputs that have dynamic dims.

    >>> import torch
    >>> from fxprune.capture import capture
    >>> gm = capture(torch.nn.Linear(4, 2), torch.randn(3, 4), capture="export").gm
    >>> {name: sorted(dims) for name, dims in dynamic_dims(gm).items()}
    {'input': [0]}
    """
    return {node.target: node.meta[DYNAMIC_DIMS] for node in gm.graph.find_nodes(op="placeholder")
            if DYNAMIC_DIMS in node.meta}


def describe_dynamic_dims(gm: torch.fx.GraphModule) -> str:
    """``input_ids[0, 1], attention_mask[0, 1]`` (or ``none``), for notes.

    >>> import torch
    >>> from fxprune.capture import capture
    >>> describe_dynamic_dims(capture(torch.nn.Linear(4, 2), torch.randn(3, 4), capture="export").gm)
    'input[0]'
    """
    found = dynamic_dims(gm)
    return ", ".join(f"{name}[{', '.join(map(str, dims))}]" for name, dims in found.items()) or "none"


def shape_mismatch(gm: torch.fx.GraphModule, inputs: ExampleInputs) -> str | None:
    """Why ``gm`` (an exported graph) cannot take ``inputs``, or None when it can: a
    static dim whose size differs from the example's, a dynamic dim outside its range, or
    two dims that share a symbol with different sizes.

    >>> import torch
    >>> from fxprune.capture import capture
    >>> from fxprune.capture.inputs import as_example_inputs
    >>> gm = capture(torch.nn.Linear(4, 2), torch.randn(3, 4), capture="export").gm
    >>> shape_mismatch(gm, as_example_inputs(torch.randn(7, 4))) is None
    True
    >>> shape_mismatch(gm, as_example_inputs(torch.randn(7, 5)))
    'input dim 1 is 5, the graph takes 4 (a static dim)'
    """
    seen: dict[str, tuple[str, int, int]] = {}
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node, value in zip(placeholders, inputs.flat(gm)):
        meta = node.meta.get("tensor_meta")
        if not isinstance(value, torch.Tensor) or not hasattr(meta, "shape"):
            continue
        if value.ndim != len(meta.shape):
            return f"{node.target} has {value.ndim} dims, the graph takes {len(meta.shape)}"
        dims = node.meta.get(DYNAMIC_DIMS, {})
        for d, (size, example) in enumerate(zip(value.shape, meta.shape)):
            dynamic = dims.get(d)
            if dynamic is None:
                if size != example:
                    return f"{node.target} dim {d} is {size}, the graph takes {example} (a static dim)"
                continue
            if not dynamic.allows(size):
                return f"{node.target} dim {d} is {size}, outside the sizes {dynamic.describe()} it allows"
            other = seen.setdefault(dynamic.symbol, (node.target, d, size))
            if other[2] != size:
                return (f"{node.target} dim {d} is {size} but {other[0]} dim {other[1]} is {other[2]}; "
                        "the graph takes them equal")
    return None


__all__ = ["DYNAMIC_DIMS", "DynamicDim", "batch_and_sequence", "sizes_oblivious", "concrete",
           "record_dynamic_dims", "dynamic_dims", "describe_dynamic_dims", "shape_mismatch"]
