"""The parts front end: capture the learnable parts of a model whose whole forward cannot be.

A detector's forward resizes images, draws anchors, decodes boxes and runs NMS: code that
branches on values, which neither torch.fx nor torch.export can capture. Its learnable
parts (backbone, FPN, heads) are plain tensor programs. ``capture="parts"`` (and
``capture="auto"`` after fx and export both fail) runs the model once on the example
inputs with forward hooks on its submodules, then takes, top-down, every submodule that

* has parameters or buffers and ran,
* took and returned only tensors (nested in tuples, lists and dicts, numbers among them),
* traces with torch.fx, and whose traced graph computes what the module returned,

and builds ONE GraphModule rooted at the user's model (its ``get_attr`` and
``call_module`` targets are the model's own ``state_dict`` paths, e.g.
``backbone.body.layer1.0.conv1``): its placeholders are the parts' recorded input tensors,
its output the tuple of their output tensors, one instance per call. The analysis runs on
it unchanged; the parts' interfaces are graph inputs and outputs, so their channels stay
(post-processing code that fxprune never saw reads them). The model's own ``forward``
keeps running everything else, so ``emit="module"`` (a pruned copy of the user's class)
is how a parts capture is used: :func:`record_parts` re-records the parts of such a copy
to check it, and the zero-invariance oracle compares a pruned graph with the zeroed
model's recorded part outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx
from torch.fx.node import map_arg
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._util import eval_mode
from ..errors import TraceError
from .fx import trace
from .inputs import ExampleInputs, bad_leaf

_ROOT = "part"  # the attribute under which a part sits while it is traced


@dataclass(frozen=True)
class PartCall:
    """One captured call of a submodule: where its tensors sit in the combined graph.

    ``path``: the submodule's name in the model; ``call``: which of its calls (0 = first)
    in one forward; ``inputs``/``outputs``: how many tensors of the combined graph's
    placeholders / output tuple are its (in order, after the previous parts').
    """

    path: str
    call: int
    inputs: int
    outputs: int


def _wrapper(part: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[torch.nn.Module, list]:
    """A module whose ``forward(t0, t1, ...)`` rebuilds ``part``'s call from its tensors
    (numbers and None baked in) and returns what ``part`` returns; and the tensors."""
    leaves, spec = tree_flatten((args, kwargs))
    tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    names = [f"t{i}" for i in range(len(tensors))]
    slots = ", ".join(names[tensors.index(i)] if i in tensors else f"self._consts[{i}]" for i in range(len(leaves)))
    source = (f"def forward(self, {', '.join(names)}):\n"
              f"    args, kwargs = self._unflatten([{slots}], self._spec)\n"
              f"    return self.{_ROOT}(*args, **kwargs)\n")
    scope: dict[str, Any] = {}
    exec(compile(source, f"<fxprune part {type(part).__name__}>", "exec"), scope)  # noqa: S102 - our own code
    cls = type(f"Part_{type(part).__name__}", (torch.nn.Module,), {"forward": scope["forward"]})
    wrapper = cls()
    setattr(wrapper, _ROOT, part)
    wrapper._consts, wrapper._spec, wrapper._unflatten = list(leaves), spec, tree_unflatten
    return wrapper, [leaves[i] for i in tensors]


def _tensors_only(value: Any) -> bool:
    leaves = tree_flatten(value)[0]
    return bad_leaf(value) is None and any(isinstance(v, torch.Tensor) for v in leaves)


def record_calls(model: torch.nn.Module, inputs: ExampleInputs, paths: Iterable[str] | None = None) -> dict:
    """``{path: [(args, kwargs, output), ...]}``: every call of the named submodules (all
    when ``paths`` is None) in one eager forward of ``model`` on ``inputs`` (eval mode, no
    grad), tensors cloned when they are recorded (a later in-place op cannot change them).
    """
    wanted = None if paths is None else set(paths)
    calls: dict[str, list] = {}
    handles = []

    def hook(path):
        def record(module, args, kwargs, output):
            clone = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            leaves, spec = tree_flatten((args, kwargs, output))
            calls.setdefault(path, []).append(tree_unflatten([clone(v) for v in leaves], spec))
        return record

    for path, module in model.named_modules():
        if path and (wanted is None or path in wanted):
            handles.append(module.register_forward_hook(hook(path), with_kwargs=True))
    try:
        with eval_mode(model), torch.no_grad():
            output = inputs.clone().call(model)
    finally:
        for handle in handles:
            handle.remove()
    calls[""] = [((), {}, output)]
    return calls


def _trace_call(part: torch.nn.Module, args: tuple, kwargs: dict, output: Any,
                leaf_modules: Iterable) -> tuple[torch.fx.GraphModule, list, list] | str:
    """The traced call, its input tensors and which of its output values are tensors, or
    why it cannot be a part."""
    if not _tensors_only((args, kwargs)):
        return "its inputs are not tensors in tuples, lists and dicts"
    if not _tensors_only(output):
        return "its output is not tensors in tuples, lists and dicts"
    wrapper, tensors = _wrapper(part, args, kwargs)
    try:
        gm = trace(wrapper, leaf_modules=leaf_modules)
    except TraceError as exc:
        return str(exc).splitlines()[0]
    # fx bakes in the branches the trace took: the graph must compute what the module did
    try:
        with torch.no_grad():
            got = gm(*tensors)
    except Exception as exc:  # noqa: BLE001 - any failure means "not this part"
        return f"its traced graph fails ({type(exc).__name__})"
    got_leaves, want_leaves = tree_flatten(got)[0], tree_flatten(output)[0]
    if len(got_leaves) != len(want_leaves) or not all(
            _same(a, b) for a, b in zip(got_leaves, want_leaves)):
        return "its traced graph computes something else than the module (value-dependent code)"
    returned = tree_flatten(next(iter(gm.graph.find_nodes(op="output"))).args[0])[0]
    tensor_out = [isinstance(v, torch.Tensor) for v in want_leaves]
    if len(returned) != len(want_leaves) or any(t and not isinstance(n, torch.fx.Node)
                                                  for n, t in zip(returned, tensor_out)):
        return "its traced graph returns a tensor constant"
    return gm, tensors, tensor_out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return False
    if not isinstance(a, torch.Tensor):
        return a == b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return not a.is_floating_point() or torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def select_parts(model: torch.nn.Module, calls: dict, leaf_modules: Iterable = ()) -> tuple[list, dict]:
    """The top-most submodules that can be parts, with their traced calls; and why the
    others (the top-most ones that have parameters) could not."""
    chosen: list[tuple[str, list]] = []
    refused: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path or any(path.startswith(f"{p}.") for p, _ in chosen):
            continue
        if next(module.parameters(), None) is None and next(module.buffers(), None) is None:
            continue
        if path not in calls:
            continue
        traced, why = [], None
        for args, kwargs, output in calls[path]:
            one = _trace_call(module, args, kwargs, output, leaf_modules)
            if isinstance(one, str):
                why = one
                break
            traced.append(one)
        if why is None:
            chosen.append((path, traced))
        elif not any(path.startswith(f"{p}.") for p in refused):
            refused[path] = why
    return chosen, refused


def _retarget(target: str, path: str) -> str | None:
    if target == _ROOT:
        return path
    if target.startswith(f"{_ROOT}."):
        return f"{path}.{target[len(_ROOT) + 1:]}"
    return None


def combine(model: torch.nn.Module, chosen: list) -> tuple[torch.fx.GraphModule, list[torch.Tensor], list[PartCall]]:
    """One GraphModule over every chosen call, rooted at ``model``'s own paths."""
    graph = torch.fx.Graph()
    owners: dict[str, Any] = {}
    flat_inputs: list[torch.Tensor] = []
    outputs: list[torch.fx.Node] = []
    parts: list[PartCall] = []
    for path, traced in chosen:
        stem = path.replace(".", "_")
        for call, (gm, tensors, tensor_out) in enumerate(traced):
            env: dict[torch.fx.Node, Any] = {}
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            for node in placeholders:
                env[node] = graph.placeholder(f"{stem}_{call}_{node.name}" if len(traced) > 1 else f"{stem}_{node.name}")
            result = None
            for node in gm.graph.nodes:
                if node.op == "placeholder":
                    continue
                if node.op == "output":
                    result = map_arg(node.args[0], lambda n: env[n])
                    break
                new = graph.node_copy(node, lambda n: env[n])
                if node.op in ("get_attr", "call_module"):
                    target = _retarget(node.target, path)
                    if target is None:  # a constant the tracer put on the wrapper
                        target = f"_{stem}_{call}_{node.target}"
                        owners[target] = getattr(gm, node.target)
                    else:
                        owners[target] = _resolve(model, target)
                    new.target = target
                _retarget_meta(new, path)
                env[node] = new
            mine = [n for n, t in zip(tree_flatten(result)[0], tensor_out) if t]
            outputs += mine
            flat_inputs += tensors
            parts.append(PartCall(path, call, len(tensors), len(mine)))
    graph.output(tuple(outputs))
    combined = torch.fx.GraphModule(owners, graph, type(model).__name__)
    combined.eval()
    return combined, flat_inputs, parts


def _resolve(model: torch.nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, name) if name else model


def _retarget_meta(node: torch.fx.Node, path: str) -> None:
    stack = node.meta.get("nn_module_stack")
    if stack:
        node.meta["nn_module_stack"] = {
            (_retarget(k, path) or k) if isinstance(k, str) else k: ((_retarget(v[0], path) or v[0]), *v[1:])
            for k, v in stack.items() if not (isinstance(v, tuple) and v[0] == "")}


def capture_parts(model: torch.nn.Module, inputs: ExampleInputs,
                  leaf_modules: Iterable = ()) -> tuple[torch.fx.GraphModule, ExampleInputs, list[PartCall]]:
    """Record, select and combine (see the module docstring); raise :class:`TraceError` when
    no submodule can be a part.

    >>> import torch
    >>> class Det(torch.nn.Module):  # a learnable body, then value-dependent filtering
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 1))
    ...     def forward(self, images):
    ...         scores = self.body(torch.stack(images)).flatten(1)
    ...         return [s[s > 0] for s in scores]
    >>> from fxprune.capture.inputs import as_example_inputs
    >>> gm, flat, parts = capture_parts(Det(), as_example_inputs(([torch.randn(3, 8, 8)],)))
    >>> [p.path for p in parts], [n.target for n in gm.graph.nodes if n.op == "call_module"]
    (['body'], ['body.0', 'body.1', 'body.2'])
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"capture='parts' needs a torch.nn.Module, got {type(model).__name__}")
    try:
        calls = record_calls(model, inputs)
    except Exception as exc:  # noqa: BLE001 - the model itself fails on the inputs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise TraceError(f"{type(model).__name__} fails on the example inputs {inputs.describe()}: "
                         f"{type(exc).__name__}: {first[:200]}\n  fix: pass example_inputs the "
                         "model's forward runs on") from exc
    chosen, refused = select_parts(model, calls, leaf_modules)
    if not chosen:
        why = "; ".join(f"'{p}': {w}" for p, w in list(refused.items())[:3]) or "it has no submodule with weights"
        raise TraceError(f"no submodule of {type(model).__name__} could be captured as a part ({why})\n"
                         "  fix: make the submodules that hold the weights take and return tensors, "
                         "or mark the blocking module a leaf (leaf_modules=[...])")
    gm, flat, parts = combine(model, chosen)
    return gm, ExampleInputs(tuple(flat)), parts


def record_parts(model: torch.nn.Module, inputs: ExampleInputs, parts: list[PartCall]) -> tuple[tuple, tuple, Any]:
    """Run ``model`` (a pruned copy, a zeroed copy) eagerly on the user's ``inputs``: the
    combined graph's inputs and outputs as this model's parts saw them, and its output.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> ins, outs, _ = record_parts(net, ExampleInputs((torch.randn(2, 4),)), [PartCall("0", 0, 1, 1)])
    >>> [tuple(t.shape) for t in ins + outs]
    [(2, 4), (2, 3)]
    """
    calls = record_calls(model, inputs, {p.path for p in parts})
    flat_in: list[torch.Tensor] = []
    flat_out: list[torch.Tensor] = []
    for part in parts:
        mine = calls.get(part.path, [])
        if part.call >= len(mine):
            raise TraceError(f"'{part.path}' ran {len(mine)} time(s) on the inputs, the captured graph "
                             f"has its call {part.call}; pass the inputs the model was analysed with")
        args, kwargs, output = mine[part.call]
        ins = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)]
        outs = [v for v in tree_flatten(output)[0] if isinstance(v, torch.Tensor)]
        if len(ins) != part.inputs or len(outs) != part.outputs:
            raise TraceError(f"'{part.path}' took {len(ins)} and returned {len(outs)} tensors, the captured "
                             f"graph has {part.inputs} and {part.outputs}")
        flat_in += ins
        flat_out += outs
    return tuple(flat_in), tuple(flat_out), calls[""][0][2]


__all__ = ["capture_parts", "record_parts", "record_calls", "select_parts", "combine", "PartCall"]
