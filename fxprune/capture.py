"""Capture: turn a model into a ``torch.fx.GraphModule`` with shapes on every node.

The default front end is ``torch.fx.symbolic_trace`` (fast, module-level, readable).
A ``GraphModule`` the user traced some other way is accepted as it is. The caller's
model is never touched: the captured GraphModule shares its submodules (copying a large
model would cost more than the whole analysis) but owns its graph, and shape
propagation runs with every module in eval mode under ``no_grad``, so that nothing it
runs can change the model (a BatchNorm in training mode would update its running stats).
Passes that change weights work on copies.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import os
import traceback
from typing import Iterable, Sequence

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata

from .errors import AnalysisError, TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(__file__)


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer plus user leaf modules and a record of where it is."""

    def __init__(self, leaf_modules: Sequence = ()):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.fx_module_path: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None  # the innermost module that raised

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.fx_module_path.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.fx_module_path[-1]
            raise
        finally:
            self.fx_module_path.pop()


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector (restoring its state afterwards).

    Capture, analysis and pruning allocate hundreds of thousands of short-lived,
    acyclic objects; on a large graph the collector's repeated full scans of the heap
    cost a quarter of the analysis time and grow faster than linearly with the graph.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def as_input_tuple(example_inputs) -> tuple:
    """Normalise example inputs to a tuple; a single tensor is wrapped."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise AnalysisError(
        f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}; "
        "pass e.g. (torch.randn(1, 3, 224, 224),)"
    )


def _user_frame(tb) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is the user's code, not torch's or ours."""
    frames = [f for f in traceback.extract_tb(tb)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_OWN_DIR)]
    return frames[-1] if frames else None


def trace(model: torch.nn.Module, *, leaf_modules: Iterable = (), concrete_args: dict | None = None
          ) -> torch.fx.GraphModule:
    """Trace a deep copy of ``model`` with ``torch.fx``; raise :class:`TraceError` if it can't.

    ``leaf_modules``: module classes or qualified names to keep as single calls (give
    them a rule with :func:`fxprune.register_rule`). ``concrete_args``: values to bake
    in for arguments that control flow depends on.

    >>> import torch, fxprune.capture as capture
    >>> gm = capture.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, torch.fx.GraphModule):
        gm = torch.fx.GraphModule(model, copy.deepcopy(model.graph), model.__class__.__name__)
        gm.training = model.training
        return gm
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tracer = _Tracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises many types; all mean "cannot trace"
        raise _trace_error(model, tracer, exc) from exc
    gm = torch.fx.GraphModule(model, graph, model.__class__.__name__)
    gm.training = model.training
    return gm


def _trace_error(model, tracer: _Tracer, exc: Exception) -> TraceError:
    where = tracer.failed_in or ("", type(model).__name__)
    path = where[0] or "<root>"
    frame = _user_frame(exc.__traceback__)
    line = f"{frame.filename}:{frame.lineno}: {frame.line}" if frame else "(no user source line found)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TraceError(
        f"cannot trace {type(model).__name__} with torch.fx: {first}\n"
        f"  in module '{path}' ({where[1]})\n"
        f"  at {line}\n"
        "  fix: mark that module a leaf (leaf_modules=[...]) and register a channel rule for it, "
        "or pass concrete_args={...} for the argument the control flow depends on"
    )


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs) -> tuple:
    """Run ``ShapeProp`` so every node carries ``meta['tensor_meta']``; clear errors.

    Returns the example inputs as a tuple.
    """
    inputs = as_input_tuple(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # args hold a default value
    if not len(required) <= len(inputs) <= len(placeholders):
        raise AnalysisError(
            f"the model takes {len(placeholders)} input(s) ({', '.join(n.name for n in placeholders)}) "
            f"but {len(inputs)} example input(s) were given"
        )
    prop = ShapeRecorder(gm)
    try:
        prop.record(*inputs)
    except Exception as exc:
        shapes = ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else repr(t) for t in inputs)
        node = prop.current
        raise AnalysisError(
            f"example inputs of shape {shapes} do not fit the model: node '{node.name if node else '?'}' "
            f"({node.format_node() if node else ''}) failed with {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}\n"
            "  fix: pass example_inputs with the shapes and dtypes the model's forward expects"
        ) from exc
    return inputs


def _tensor_meta(value):
    if isinstance(value, torch.Tensor):
        return TensorMetadata(tuple(value.shape), value.dtype, value.requires_grad, value.stride(),
                              None, False, {})
    return value


class ShapeRecorder(torch.fx.Interpreter):
    """Like ``ShapeProp``, but records only shape, dtype and strides (several times faster)
    and remembers which node it was running when something failed."""

    current: torch.fx.Node | None = None

    def record(self, *inputs) -> None:
        """Run once in eval mode under no_grad (nothing in the model may change), then
        put every module's training flag back."""
        modes = {m: m.training for m in self.module.modules()}
        try:
            self.module.eval()
            with torch.no_grad():
                self.run(*inputs)
        finally:
            for m, training in modes.items():
                m.training = training

    def run_node(self, n):
        self.current = n
        result = super().run_node(n)
        found = []
        meta = map_aggregate(result, lambda v: found.append(1) or _tensor_meta(v)
                             if isinstance(v, torch.Tensor) else v)
        if found:
            n.meta["tensor_meta"] = meta
        else:
            n.meta.pop("tensor_meta", None)
        return result
