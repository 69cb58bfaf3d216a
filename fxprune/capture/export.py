"""The torch.export front end: ATen graphs of what symbolic tracing cannot take.

``torch.export.export(model, args, kwargs, strict=False)`` captures Hugging Face
transformers, timm models that branch on shapes, and models on the meta device. Its graph
is an fx graph too: ATen ops (``aten.linear``, ``aten.conv2d``, ``aten.view`` ...) whose
parameters are read with ``get_attr`` under their ``state_dict`` keys, so the same
analysis runs on it. The result is made a plain ``GraphModule`` (``ep.module()``'s own
class cannot be pickled or switched to eval mode) that takes the model's own call
signature (keywords included) and returns its own output structure.

The batch and sequence dims are exported dynamic where the model allows
(:mod:`.dynamic`): sizes read off them stay symbolic (``view(x, [sym_size(x, 0), 8, -1,
8])``), so the captured (and pruned) graph takes other batch sizes and lengths. Where
export cannot keep them dynamic, the graph is exported again specialised to the example
shapes, and ``gm.meta["fxprune.static_shapes"]`` says why.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from .._util import eval_mode, first_line
from ..errors import TraceError
from .dynamic import batch_and_sequence, record_dynamic_dims, sizes_oblivious, wants_static
from .effects import has_effect
from .grad_regions import inline_grad_regions
from .inputs import ExampleInputs
from .shapes import shapes_from_fake_values

STATIC_SHAPES = "fxprune.static_shapes"  # GraphModule.meta: why export could not keep dims dynamic


class _StaticAsked(Exception):
    """static_shapes() is in effect: export with fixed shapes, and say so."""


def export_graph(model, inputs: ExampleInputs) -> torch.fx.GraphModule:
    """Export ``model`` (or take an ``ExportedProgram``) and return a plain GraphModule.

    >>> import torch, fxprune
    >>> from fxprune.capture.inputs import as_example_inputs
    >>> gm = export_graph(torch.nn.Linear(4, 2), as_example_inputs(torch.randn(1, 4)))
    >>> [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    ['aten.linear.default']
    """
    static_reason = None
    if isinstance(model, torch.export.ExportedProgram):
        program = model
        name = "ExportedProgram"
    else:
        if not isinstance(model, torch.nn.Module):
            raise TraceError(f"expected a torch.nn.Module or ExportedProgram, got {type(model).__name__}")
        name = type(model).__name__
        try:
            if wants_static():
                raise _StaticAsked("static_shapes() was in effect")
            program = _export(model, inputs, dynamic=True)
        except Exception as dynamic_exc:  # export raises many types; all mean "cannot capture"
            try:
                program = _export(model, inputs, dynamic=False)
            except Exception as exc:
                raise export_error(model, exc) from exc
            static_reason = (str(dynamic_exc) if isinstance(dynamic_exc, _StaticAsked)
                             else f"{type(dynamic_exc).__name__}: {first_line(dynamic_exc, FIRST_LINE)}")
    unlifted = program.module()
    graph = unlifted.graph
    for node in list(graph.nodes):
        # ep.module() checks input shapes in a local class that cannot be pickled; the
        # analysis and every rewrite are verified on inputs of these shapes anyway.
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    inline_grad_regions(unlifted)  # no_grad()/enable_grad() blocks: their ops, not one opaque call
    graph.eliminate_dead_code(is_impure_node=has_effect)
    # torch.load rebuilds a GraphModule by tracing its code with the recorded tracer class;
    # export's own tracer needs arguments it cannot be given there, the default one does not.
    graph._tracer_cls, graph._tracer_extras = None, None
    gm = torch.fx.GraphModule(unlifted, graph, name)
    gm._in_spec, gm._out_spec = unlifted._in_spec, unlifted._out_spec
    gm.eval()
    gm.delete_all_unused_submodules()
    record_dynamic_dims(gm)
    shapes_from_fake_values(gm)
    if static_reason is not None:
        gm.meta[STATIC_SHAPES] = static_reason
    return gm


def _export(model: torch.nn.Module, inputs: ExampleInputs, dynamic: bool) -> torch.export.ExportedProgram:
    """Export what inference runs (dropout off, BatchNorm statistics fixed), with the batch
    and sequence dims dynamic where the model allows (``dynamic``) or every dim static.

    Export runs on aliases of the input tensors: a dynamic export that fails leaves its
    dim markings on the tensors it was given, and the next export would read them."""
    inputs = tree_map_only(torch.Tensor, lambda t: t.detach().requires_grad_(t.requires_grad), inputs)
    with eval_mode(model), (sizes_oblivious() if dynamic else contextlib.nullcontext()):
        return torch.export.export(model, inputs.args, inputs.kwargs, strict=False,
                                   dynamic_shapes=batch_and_sequence(inputs) if dynamic else None)


def drop_setting_inputs(gm: torch.fx.GraphModule, settings: dict) -> None:
    """Turn keyword inputs the capture added (``use_cache=False``), which export
    specialised away, into defaults of ``forward``: the graph is then called as the
    model is, with or without them.

    Each setting whose placeholder has no user leaves the graph and the input spec; the
    generated signature gets ``name=value`` after the other inputs. A setting the graph
    still reads stays an input.

    >>> from fxprune.capture.inputs import as_example_inputs
    >>> class Net(torch.nn.Module):
    ...     def forward(self, x, use_cache=None):
    ...         return x * 2
    >>> gm = export_graph(Net(), as_example_inputs({"x": torch.ones(2), "use_cache": False}))
    >>> drop_setting_inputs(gm, {"use_cache": False})
    >>> gm(x=torch.ones(2)), gm(x=torch.ones(2), use_cache=False)
    (tensor([2., 2.]), tensor([2., 2.]))
    """
    codegen = gm.graph._codegen
    info = getattr(codegen, "pytree_info", None)
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    unused = {k: v for k, v in settings.items() if k in placeholders and not placeholders[k].users}
    if info is None or info.in_spec is None or not unused:
        return
    args, kwargs = tree_unflatten([n.target for n in placeholders.values()], info.in_spec)
    for name in unused:
        kwargs.pop(name, None)
        gm.graph.erase_node(placeholders[name])
    in_spec = tree_flatten((args, kwargs))[1]
    orig_args = [a for a in info.orig_args if a not in unused] + [f"{k}={v!r}" for k, v in unused.items()]
    codegen.pytree_info = info._replace(orig_args=orig_args, in_spec=in_spec)
    gm.recompile()


FIRST_LINE = 200  # characters of the front end's own message kept in ours


def export_error(model, exc: Exception) -> TraceError:
    """A short TraceError for a failed export: the first line of its message (cut to
    ``FIRST_LINE`` characters) and the fix; the full text is on ``error.details``.

    >>> error = export_error(torch.nn.Identity(), RuntimeError("bad\\n" + "graph dump " * 500))
    >>> len(str(error)) < 400, len(error.details) > 5000
    (True, True)
    """
    text = str(exc).strip()
    first = first_line(exc, FIRST_LINE)
    hint = ""
    if "Cache" in text and "pytree" in text:
        hint = "the model returns a key/value cache: pass use_cache=False (in the inputs or the config); "
    error = TraceError(
        f"cannot capture {type(model).__name__} with torch.export: {type(exc).__name__}: {first}\n"
        f"  fix: {hint}make forward() run on the example inputs without data-dependent Python control "
        "flow, pass an ExportedProgram you exported yourself, or capture its learnable parts "
        "(capture=\"parts\"); the full message is on this error's .details"
    )
    error.details = text
    return error


__all__ = ["export_graph", "export_error", "drop_setting_inputs", "STATIC_SHAPES"]
