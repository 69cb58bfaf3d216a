"""Shapes on every node: recorded by running the graph once, or read from export's fake values.

The analysis only needs each node's output shape (``node.meta["tensor_meta"]``). A traced
graph gets it from one run on the example inputs in eval mode under ``no_grad`` (so nothing
it runs can change the model: a BatchNorm in training mode would update its running stats).
While it runs, each function, method and parameter-free module call is also watched for the
ATen ops it executes (``node.meta["fxprune.aten"]``, :mod:`.aten_calls`): the analysis
classifies a call by what it runs, not by how it is spelled. An exported graph already carries fake tensors (``node.meta["val"]``) from the export
itself, so it needs no run at all: analysis then costs no weight memory, and a model on
the meta device works.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from .._util import eval_mode, first_line
from ..errors import AnalysisError
from .aten_calls import ATEN_CALLS, AtenCallRecorder, records_calls
from .dynamic import concrete
from .effects import input_versions, note_mutation
from .inputs import ExampleInputs


def propagate_shapes(gm: torch.fx.GraphModule, inputs: ExampleInputs) -> None:
    """Run the graph once so every node carries ``meta['tensor_meta']``; clear errors."""
    flat = inputs.flat(gm)
    prop = ShapeRecorder(gm, aten_calls=True)
    try:
        prop.record(*flat)
    except Exception as exc:
        node = prop.current
        error = AnalysisError(
            f"example inputs {inputs.describe()} do not fit the model: node '{node.name if node else '?'}' "
            f"({node.format_node() if node else ''}) failed with {type(exc).__name__}: "
            f"{first_line(exc)}\n"
            "  fix: pass example_inputs with the shapes and dtypes the model's forward expects")
        error.node = node  # the graph ran and failed there (capture tells the inputs' fault from the graph's)
        raise error from exc


def shapes_from_fake_values(gm: torch.fx.GraphModule) -> None:
    """Turn export's fake values (``meta['val']``) into ``meta['tensor_meta']`` and drop them.

    A dynamic dim's size is the example's (its symbol's hint): the analysis reads the
    shapes of the example inputs, as a recorded run would. Dropping the fake values keeps
    the graph cheap to copy (fake tensors hold a whole fake mode).
    """
    for node in gm.graph.nodes:
        val = node.meta.pop("val", None)
        _set_meta(node, val)
        node.meta.pop("example_value", None)


def _tensor_meta(value):
    if isinstance(value, torch.Tensor):
        return TensorMetadata(tuple(concrete(s) for s in value.shape), value.dtype, value.requires_grad,
                              tuple(concrete(s) for s in value.stride()), None, False, {})
    return value


def _set_meta(node: torch.fx.Node, result) -> None:
    found = []
    meta = map_aggregate(result, lambda v: found.append(1) or _tensor_meta(v)
                         if isinstance(v, torch.Tensor) else v)
    if found:
        node.meta["tensor_meta"] = meta
    else:
        node.meta.pop("tensor_meta", None)


class ShapeRecorder(torch.fx.Interpreter):
    """Like ``ShapeProp``, but records only shape, dtype and strides (several times faster)
    and remembers which node it was running when something failed."""

    current: torch.fx.Node | None = None

    def __init__(self, gm: torch.fx.GraphModule, aten_calls: bool = False):
        """``aten_calls``: also record the ATen ops each call runs (for the analysis)."""
        super().__init__(gm)
        self.aten_calls = aten_calls

    def record(self, *inputs) -> None:
        """Run once in eval mode under no_grad (nothing in the model may change), then
        put every module's training flag back."""
        with eval_mode(self.module), torch.no_grad():
            self.run(*inputs)

    def run_node(self, n):
        self.current = n
        if n.op not in ("call_function", "call_method", "call_module"):
            result = super().run_node(n)
            _set_meta(n, result)
            return result
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)  # once: the call below takes them
            before = input_versions(args, kwargs)
            module = self.module.get_submodule(n.target) if n.op == "call_module" else None
            recorder = AtenCallRecorder([t for t, _ in before]) if self.aten_calls and records_calls(n, module) \
                else None
            with recorder or contextlib.nullcontext():
                result = getattr(self, n.op)(n.target, args, kwargs)
        if recorder is not None:
            n.meta[ATEN_CALLS] = recorder.result(result)
        note_mutation(n, before)  # a rewrite must keep this call (capture/effects.py)
        _set_meta(n, result)
        return result

__all__ = ["propagate_shapes", "shapes_from_fake_values", "ShapeRecorder"]
