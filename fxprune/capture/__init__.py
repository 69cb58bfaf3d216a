"""Capture: a model becomes a ``torch.fx.GraphModule`` with a shape on every node.

Three front ends feed one analysis: :mod:`.fx` (``torch.fx`` symbolic trace: fast,
module-level, readable), :mod:`.export` (``torch.export``: ATen graphs of what
symbolic tracing cannot take, such as Hugging Face transformers) and :mod:`.parts` (the
learnable submodules of a model whose forward branches on values, such as a detector's
backbone and heads, combined into one graph; the rest stays the model's own code).
``capture="auto"`` tries fx, then export, then parts; when all fail the error gives
every reason.
Under fx, ``nn.MultiheadAttention`` calls are traced through as functional ops
(:mod:`.mha`), written for the shapes a first trace records.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx

from .._util import eval_mode, first_line
from ..errors import AnalysisError, FxpruneError, TraceError
from .dynamic import describe_dynamic_dims
from .export import STATIC_SHAPES, drop_setting_inputs, export_graph
from .fx import trace
from .gc import gc_paused
from .identity_views import fold_identity_reshapes
from .inputs import ExampleInputs, as_example_inputs
from .mha import plan_calls
from .parts import PartCall, capture_parts, record_parts
from .shapes import ShapeRecorder, propagate_shapes

FRONT_ENDS = ("auto", "fx", "export", "parts")


@dataclass
class Captured:
    """A captured graph with shapes on its nodes, the inputs it ran on and the front end used.

    A parts capture also keeps the model's own inputs (``model_inputs``; ``inputs`` are the
    parts' recorded tensors, what ``gm`` takes) and which submodule calls it holds.
    """

    gm: torch.fx.GraphModule
    inputs: ExampleInputs
    front_end: str  # "fx", "export" or "parts"
    model_inputs: ExampleInputs | None = None
    parts: list[PartCall] | None = None
    notes: list[str] = field(default_factory=list)  # why "auto" went past fx and export; export's dynamic dims
    added: dict = field(default_factory=dict)  # keyword inputs the capture set ({"use_cache": False})


def capture(model, example_inputs, *, capture: str = "auto", leaf_modules: Iterable = (),
            concrete_args: dict | None = None) -> Captured:
    """Capture ``model`` with the chosen front end and record every node's shape.

    >>> import torch
    >>> c = capture(torch.nn.Sequential(torch.nn.Linear(4, 2)), torch.randn(1, 4))
    >>> c.front_end, c.gm.graph.find_nodes(op="output")[0].meta["tensor_meta"].shape
    ('fx', (1, 2))
    """
    if capture not in FRONT_ENDS:
        raise TraceError(f"capture must be one of {', '.join(FRONT_ENDS)}, got {capture!r}")
    inputs, added = without_cache(model, as_example_inputs(example_inputs))
    if isinstance(model, torch.export.ExportedProgram):
        capture = "export"
    fx_error = None
    if capture in ("auto", "fx"):
        try:
            gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args)
        except TraceError as exc:
            if capture == "fx":
                raise
            fx_error = exc
        else:
            try:
                propagate_shapes(gm, inputs)
                attention_calls = plan_calls(gm)
                if attention_calls:  # trace through nn.MultiheadAttention, written for the shapes seen
                    gm = trace(model, leaf_modules=leaf_modules, concrete_args=concrete_args,
                               attention_calls=attention_calls)
                    propagate_shapes(gm, inputs)
                fold_identity_reshapes(gm)
                return Captured(gm, inputs, "fx", added=added)
            except AnalysisError as exc:
                if getattr(exc, "node", None) is None:  # the inputs do not match forward's parameters
                    raise
                fx_error = _blame(model, inputs, exc)  # the inputs, or the fx graph
                if capture == "fx" or isinstance(fx_error, AnalysisError):
                    raise fx_error from exc
    export_error = None
    if capture in ("auto", "export"):
        try:
            gm = export_graph(model, inputs)
        except TraceError as exc:
            if capture == "export":
                raise
            export_error = exc
        else:
            fold_identity_reshapes(gm)
            drop_setting_inputs(gm, added)  # the graph is called with or without use_cache, as the model is
            return Captured(gm, inputs, "export", added=added, notes=[shapes_note(gm)])
    try:
        gm, part_inputs, parts = capture_parts(model, inputs, leaf_modules)
    except TraceError as exc:
        if capture == "parts":
            raise
        raise TraceError(f"no front end could capture {type(model).__name__}:\n"
                         f"[fx] {fx_error}\n[export] {export_error}\n[parts] {exc}") from exc
    propagate_shapes(gm, part_inputs)
    captured = Captured(gm, part_inputs, "parts", inputs, parts, added=added)
    if capture == "auto":  # say why the whole model was not captured
        captured.notes = [f"{name} could not capture the whole model: {first_line(error)}"
                          for name, error in (("fx", fx_error), ("export", export_error))]
    return captured


def shapes_note(gm: torch.fx.GraphModule) -> str:
    """Which input dims an exported graph takes at any size, or why it takes the example
    shapes only."""
    static = gm.meta.get(STATIC_SHAPES)
    if static is not None:
        return (f"static shapes: torch.export could not keep the batch and sequence dims dynamic "
                f"({static}); the graph, calibration batches included, takes the example shapes only")
    return f"dynamic dims (any size): {describe_dynamic_dims(gm)}"


CACHE_OFF = {"use_cache": False}


def without_cache(model, inputs: ExampleInputs) -> tuple[ExampleInputs, dict]:
    """The inputs with ``use_cache=False`` added when ``model.forward`` takes ``use_cache``
    and the caller did not pass it: a key/value cache in the output is no graph value
    (Hugging Face's default config has ``use_cache=True``), and the model's config stays
    as it is. Returns the inputs and the keywords added.

    >>> import torch
    >>> class Decoder(torch.nn.Module):
    ...     def forward(self, input_ids, use_cache=None):
    ...         return input_ids
    >>> without_cache(Decoder(), as_example_inputs(torch.zeros(1, 4)))[1]
    {'use_cache': False}
    """
    forward = getattr(model, "forward", None) if isinstance(model, torch.nn.Module) else None
    try:
        params = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):  # a builtin or C forward: nothing to read
        params = {}
    names = list(params)
    if ("use_cache" not in params or "use_cache" in inputs.kwargs
            or names.index("use_cache") < len(inputs.args)):
        return inputs, {}
    return ExampleInputs(inputs.args, {**inputs.kwargs, **CACHE_OFF}), dict(CACHE_OFF)


def _blame(model, inputs: ExampleInputs, exc: AnalysisError) -> FxpruneError:
    """The graph failed on the example inputs: if the model itself fails on them too, the
    inputs are at fault (``AnalysisError``); if it runs, the fx graph is (``TraceError``:
    a traced function that mutates a list, a value baked in at trace time), and
    ``capture="auto"`` goes on to torch.export."""
    try:
        with eval_mode(model), torch.no_grad():
            inputs.clone().call(model)
    except Exception as own:
        return AnalysisError(
            f"{str(exc).splitlines()[0]}; calling {type(model).__name__} itself raises {type(own).__name__}: "
            f"{first_line(own)}\n  fix: pass example_inputs with the shapes and dtypes the model's forward expects")
    return TraceError(
        f"the torch.fx graph of {type(model).__name__} cannot run on the example inputs although the model "
        f"does: {str(exc).splitlines()[0].removeprefix(f'example inputs {inputs.describe()} do not fit the model: ')}\n"
        "  fix: capture with torch.export (capture=\"export\", or \"auto\" which falls back to it), or mark "
        "the module that holds that call a leaf (leaf_modules=[...])")


__all__ = ["capture", "Captured", "without_cache", "capture_parts", "record_parts", "PartCall", "ExampleInputs", "as_example_inputs", "trace", "export_graph",
           "propagate_shapes", "ShapeRecorder", "gc_paused", "FRONT_ENDS"]
