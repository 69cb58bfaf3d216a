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
``backbone.body.layer1.0.conv1``), one instance per call, in the order they ran. A tensor
one part returns and another takes (the same object, e.g. the FPN's maps into the heads)
is an edge, so channels flow across; every other tensor a part takes is a placeholder,
and every tensor it returns that other code reads (a torch op outside the parts, or the
model's output; reading only sizes, as anchor generators do, does not count) is an
output, so its channels stay. The analysis runs on it unchanged. Were the linked graph
to compute anything else than the parts did, the parts are left unlinked. The model's own ``forward``
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
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .._util import eval_mode, first_line
from ..errors import TraceError
from .fx import trace
from .inputs import ExampleInputs, bad_leaf

_ROOT = "part"  # the attribute under which a part sits while it is traced


@dataclass(frozen=True)
class PartCall:
    """One captured call of a submodule: which of its tensors the combined graph holds.

    ``path``: the submodule's name in the model; ``call``: which of its calls (0 = first)
    in one forward; ``inputs``/``outputs``: the positions, among the tensors the call
    took / returned, of those that are the combined graph's placeholders / outputs (in
    order, after the previous calls'). A tensor that one part returns and only other parts
    take is an edge inside the graph instead.
    """

    path: str
    call: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


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


def _record_calls(model: torch.nn.Module, inputs: ExampleInputs, paths: Iterable[str] | None = None) -> dict:
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


def _select_parts(model: torch.nn.Module, calls: dict, leaf_modules: Iterable = ()) -> tuple[list, dict]:
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


# Reading these off a tensor outside the parts does not tie its channels to that code: a
# detector's anchor generator reads the feature maps' sizes. The assumption (documented):
# such code reads spatial sizes. A channel count read there and used on other tensors is
# not seen; where it reaches a reshape or a part's weights, the pruned copy fails its check.
_SHAPE_READS = {torch.Tensor.shape, torch.Tensor.dtype, torch.Tensor.device, torch.Tensor.ndim,
                torch.Tensor.is_cuda, torch.Tensor.layout}
_SHAPE_CALLS = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.__len__, torch.Tensor.get_device,
                torch.Tensor.is_floating_point}


def _shape_only(func) -> bool:
    return func in _SHAPE_CALLS or getattr(func, "__self__", None) in _SHAPE_READS


class _OutsideUses(TorchFunctionMode):
    """Marks the watched tensors (the parts' outputs) and the parts whose weights a torch
    op reads while no part is running."""

    def __init__(self, watched: dict[int, tuple], weights: dict[int, str], depth: list[int]):
        super().__init__()
        self.watched, self.weights, self.depth = watched, weights, depth
        self.used: set[tuple] = set()
        self.touched: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.depth[0] and not _shape_only(func):
            for leaf in tree_flatten((args, kwargs))[0]:
                if isinstance(leaf, torch.Tensor):
                    if id(leaf) in self.watched:
                        self.used.add(self.watched[id(leaf)])
                    if id(leaf) in self.weights:
                        self.touched.add(self.weights[id(leaf)])
        return func(*args, **kwargs)


def _find_links(model: torch.nn.Module, inputs: ExampleInputs, paths: list[str]) -> tuple[list, dict, set, set]:
    """Run ``model`` once and see how the parts' tensors flow: the calls in the order they
    ran, ``{(path, call, input position): (path, call, output position)}`` for every
    tensor a part took that an earlier part returned (the same object), the part outputs
    that other code reads (a torch op outside the parts, or the model's output), and the
    parts whose parameters or buffers code outside the parts reads (they cannot be parts:
    pruning them would change that code's input unseen).
    """
    order: list[tuple[str, int]] = []
    produced: dict[int, tuple] = {}  # id of a part's output tensor -> (path, call, position)
    keep_alive: list[torch.Tensor] = []  # no id is reused while we watch
    links: dict[tuple, tuple] = {}
    depth = [0]
    seen: dict[str, int] = {}

    def before(path):
        def hook(module, args, kwargs):
            if depth[0] == 0:
                call = seen[path] = seen.get(path, -1) + 1
                order.append((path, call))
                tensors = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)]
                for i, t in enumerate(tensors):
                    if id(t) in produced:
                        links[(path, call, i)] = produced[id(t)]
            depth[0] += 1
        return hook

    def after(path):
        def hook(module, args, kwargs, output):
            depth[0] -= 1
            if depth[0] == 0:
                tensors = [v for v in tree_flatten(output)[0] if isinstance(v, torch.Tensor)]
                for j, t in enumerate(tensors):
                    produced[id(t)] = (path, seen[path], j)
                    keep_alive.append(t)
        return hook

    handles = []
    for path in paths:
        module = model.get_submodule(path)
        handles.append(module.register_forward_pre_hook(before(path), with_kwargs=True))
        handles.append(module.register_forward_hook(after(path), with_kwargs=True))
    weights = {id(t): path for path in paths for t in (*model.get_submodule(path).parameters(),
                                                          *model.get_submodule(path).buffers())}
    mode = _OutsideUses(produced, weights, depth)
    try:
        with eval_mode(model), torch.no_grad(), mode:
            output = inputs.clone().call(model)
    finally:
        for handle in handles:
            handle.remove()
    used = set(mode.used)
    used.update(produced[id(t)] for t in tree_flatten(output)[0] if id(t) in produced)
    return order, links, used, mode.touched


def _retarget(target: str, path: str) -> str | None:
    if target == _ROOT:
        return path
    if target.startswith(f"{_ROOT}."):
        return f"{path}.{target[len(_ROOT) + 1:]}"
    return None


def _combine(model: torch.nn.Module, traced: dict, order: list, links: dict,
            used: set) -> tuple[torch.fx.GraphModule, list[torch.Tensor], list[PartCall]]:
    """One GraphModule over every chosen call (``traced[(path, call)]``, in ``order``),
    rooted at ``model``'s own paths; a tensor in ``links`` is an edge from the part that
    returned it, and a linked output that no other code reads (``used``) is no output."""
    graph = torch.fx.Graph()
    owners: dict[str, Any] = {}
    flat_inputs: list[torch.Tensor] = []
    outputs: list[torch.fx.Node] = []
    returned: dict[tuple, torch.fx.Node] = {}  # (path, call, position) -> node in the combined graph
    consumed = set(links.values())
    parts: list[PartCall] = []
    calls_of = {}
    for path, call in order:
        calls_of[path] = calls_of.get(path, 0) + 1
    for path, call in order:
        gm, tensors, tensor_out = traced[(path, call)]
        stem = path.replace(".", "_") + (f"_{call}" if calls_of[path] > 1 else "")
        env: dict[torch.fx.Node, Any] = {}
        kept_in = []
        for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            source = links.get((path, call, i))
            if source in returned:
                env[node] = returned[source]
            else:
                env[node] = graph.placeholder(f"{stem}_{node.name}")
                kept_in.append(i)
                flat_inputs.append(tensors[i])
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
                    target = f"_{stem}_{node.target}"
                    owners[target] = getattr(gm, node.target)
                else:
                    owners[target] = _resolve(model, target)
                new.target = target
            _retarget_meta(new, path)
            env[node] = new
        mine = [n for n, t in zip(tree_flatten(result)[0], tensor_out) if t]
        kept_out = []
        for j, node in enumerate(mine):
            returned[(path, call, j)] = node
            if (path, call, j) not in consumed or (path, call, j) in used:
                kept_out.append(j)
                outputs.append(node)
        parts.append(PartCall(path, call, tuple(kept_in), tuple(kept_out)))
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
        calls = _record_calls(model, inputs)
    except Exception as exc:  # noqa: BLE001 - the model itself fails on the inputs
        raise TraceError(f"{type(model).__name__} fails on the example inputs {inputs.describe()}: "
                         f"{type(exc).__name__}: {first_line(exc, 200)}\n  fix: pass example_inputs the "
                         "model's forward runs on") from exc
    chosen, refused = _select_parts(model, calls, leaf_modules)
    if not chosen:
        why = "; ".join(f"'{p}': {w}" for p, w in list(refused.items())[:3]) or "it has no submodule with weights"
        raise TraceError(f"no submodule of {type(model).__name__} could be captured as a part ({why})\n"
                         "  fix: make the submodules that hold the weights take and return tensors, "
                         "or mark the blocking module a leaf (leaf_modules=[...])")
    traced = {(path, call): one for path, calls_ in chosen for call, one in enumerate(calls_)}
    while True:
        order, links, used, touched = _find_links(model, inputs, [path for path, _ in chosen])
        if not touched:
            break
        chosen = [(path, calls_) for path, calls_ in chosen if path not in touched]
        if not chosen:
            raise TraceError(f"no submodule of {type(model).__name__} could be captured as a part: code "
                             f"outside them reads the weights of {', '.join(sorted(touched))}\n  fix: read "
                             "those weights only inside their module's forward")
    gm, flat, parts = _combine(model, traced, order, links, used)
    if links and not _reproduces(gm, flat, parts, calls):  # correctness first: parts stay apart
        gm, flat, parts = _combine(model, traced, order, {}, set())
    return gm, ExampleInputs(tuple(flat)), parts


def _reproduces(gm: torch.fx.GraphModule, flat: list, parts: list[PartCall], calls: dict) -> bool:
    """The combined graph returns what the parts returned in the eager run."""
    want = []
    for part in parts:
        output = calls[part.path][part.call][2]
        tensors = [v for v in tree_flatten(output)[0] if isinstance(v, torch.Tensor)]
        want += [tensors[j] for j in part.outputs]
    try:
        with torch.no_grad():
            got = gm(*flat)
    except Exception:  # noqa: BLE001 - any failure means "do not link"
        return False
    return len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))


def record_parts(model: torch.nn.Module, inputs: ExampleInputs, parts: list[PartCall]) -> tuple[tuple, tuple, Any]:
    """Run ``model`` (a pruned copy, a zeroed copy) eagerly on the user's ``inputs``: the
    combined graph's inputs and outputs as this model's parts saw them, and its output.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    >>> ins, outs, _ = record_parts(net, ExampleInputs((torch.randn(2, 4),)), [PartCall("0", 0, (0,), (0,))])
    >>> [tuple(t.shape) for t in ins + outs]
    [(2, 4), (2, 3)]
    """
    calls = _record_calls(model, inputs, {p.path for p in parts})
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
        if max(part.inputs, default=-1) >= len(ins) or max(part.outputs, default=-1) >= len(outs):
            raise TraceError(f"'{part.path}' took {len(ins)} and returned {len(outs)} tensors, fewer than "
                             "when it was captured; pass the inputs the model was analysed with")
        flat_in += [ins[i] for i in part.inputs]
        flat_out += [outs[j] for j in part.outputs]
    return tuple(flat_in), tuple(flat_out), calls[""][0][2]


__all__ = ["capture_parts", "record_parts", "PartCall"]
