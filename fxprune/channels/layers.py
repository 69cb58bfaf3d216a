"""Whole layers, found from the graph: depth units that need no residual add to remove.

A *layer* is an entry of an ``nn.Sequential`` or ``nn.ModuleList`` (a ``BertLayer``, a
``LlamaDecoderLayer``, a torchvision ``Bottleneck``, a timm ``Block``; a module of modules,
not a lone conv, linear or norm) whose nodes form a
single-entry single-exit region of the graph: the nodes run inside it (read from
``node.meta["nn_module_stack"]``, which both front ends record) feed nothing outside but
one node, the *exit*, whose shape and dtype are those of one input of the region, the
*entry* (the stream; the attention mask or the rotary tables it also reads are not).
Removing the layer rewrites every use of the exit to the entry and erases the region:
the layer becomes the identity, which is also what deleting it from its list does in
the user's own class.

A post-norm layer (BERT: ``LayerNorm(x + f(x))``) is no residual branch, yet it is a
layer; a pre-norm layer (Llama) is a layer and its two branches, and removing it equals
removing both (:func:`covered_by_branches`).

Oracle: removing a layer equals running the original with that module's forward
replaced by the identity (``oracle_role == "identity"``): :func:`identity_layers` does it
with forward hooks on the user's model, :func:`identity_overrides` on the analysed graph
(the value check every prune runs).

Ids follow the expert sets' (after the channel groups and the branches), so one plan
names every kind: ``{layer.id: [0]}``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.fx

from .branches import Branch, _layers, _param_keys, check_branch_units
from .registry import op_name

_CASTS = {"to", "_to_copy", "type", "float", "contiguous", "clone", "alias", "detach"}


@dataclass
class Layer(Branch):
    """A whole layer (``kind == "layer"``): one unit, removed with ``{id: [0]}``.

    As a :class:`Branch` whose ``join`` is the layer's exit node and ``shortcut`` its entry
    (removal rewrites one to the other); ``path``: the module (``"encoder.layer.3"``);
    ``parent``: the id of the innermost layer it nests in. ``slices([0], "all")`` are
    every parameter and buffer that leaves with it; no zeroing equals the removal, so
    ``slices([0], "out")`` is empty and ``oracle_role`` is ``"identity"``.
    """

    path: str = ""
    kind = "layer"

    @property
    def oracle_role(self) -> str:
        return "identity"

    @property
    def zero_invariance_reason(self) -> str:
        return "removing a layer equals replacing its forward by the identity, not zeroing a tensor"


def stack_paths(node: torch.fx.Node) -> list[str]:
    """The module paths a node runs in, outermost first (``nn_module_stack``)."""
    return [value[0] for value in (node.meta.get("nn_module_stack") or {}).values()]


def is_assert(node: torch.fx.Node) -> bool:
    """An exported graph's checks (``aten._assert_tensor_metadata``): they compute nothing."""
    return not node.users and node.op == "call_function" and \
        getattr(node.target, "__name__", "").split(".")[0].startswith("_assert")


def is_identity_cast(node: torch.fx.Node) -> bool:
    """A cast or copy to the dtype and shape its input already has (RMSNorm's
    ``x.to(float32)`` on a float32 stream): it computes its input."""
    if node.op not in ("call_function", "call_method") or op_name(node.target) not in _CASTS \
            or not node.all_input_nodes:
        return False
    return _meta(node.all_input_nodes[0]) == _meta(node) != (None, None)


def find_layers(gm: torch.fx.GraphModule, model: torch.nn.Module | None, first_id: int = 0,
                canonical: dict | None = None) -> list[Layer]:
    """Every layer of ``gm`` (shapes recorded on its nodes), ids from ``first_id``;
    ``model`` (the user's, else ``gm``) says which modules are list entries.

    >>> import torch, fxprune
    >>> class Block(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         return torch.relu(x + self.fc(x))
    >>> graph = fxprune.analyze(torch.nn.Sequential(Block(), Block(), torch.nn.Linear(4, 2)), torch.randn(2, 4))
    >>> [(l.path, l.shortcut, l.join) for l in graph.layers]
    [('0', 'input_1', 'relu'), ('1', 'relu', 'relu_1')]
    """
    canonical = canonical or {}
    root = model if model is not None else gm
    nodes = list(gm.graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    regions: dict[str, list[torch.fx.Node]] = {}
    for n in nodes:
        if n.op in ("call_function", "call_method", "call_module"):
            for p in dict.fromkeys(stack_paths(n)):
                regions.setdefault(p, []).append(n)
    modules = dict(gm.named_modules())
    calls: dict[str, list] = {}
    for n in nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    found: list[Layer] = []
    for path, region in regions.items():
        if not _is_list_entry(root, path):
            continue
        layer = _layer(path, region, gm, modules, calls, canonical, first_id + len(found), position)
        if layer is not None:
            found.append(layer)
    by_name = {n.name: n for n in nodes}
    found.sort(key=lambda l: position[by_name[l.join]])
    for i, layer in enumerate(found):
        layer.id = first_id + i
    by_path = {l.path: l for l in found}
    for layer in found:  # the innermost enclosing layer
        outer = [p for p in by_path if layer.path.startswith(f"{p}.")]
        layer.parent = by_path[max(outer, key=len)].id if outer else None
    return found


def _is_list_entry(root: torch.nn.Module, path: str) -> bool:
    """An entry of an ``nn.Sequential`` (named or numbered: torchvision's ViT names its
    ``encoder_layer_0``) or ``nn.ModuleList``, built of modules: a lone conv, linear or norm
    in a list (a projection's BatchNorm) is an op, not a layer."""
    parent, _, name = path.rpartition(".")
    try:
        container = root.get_submodule(parent)
        return (isinstance(container, torch.nn.Sequential) or isinstance(container, torch.nn.ModuleList)
                and name.isdigit()) and next(root.get_submodule(path).children(), None) is not None
    except AttributeError:
        return False


def _layer(path: str, region: list, gm, modules: dict, calls: dict, canonical: dict, lid: int,
           position: dict) -> Layer | None:
    """The layer at ``path`` when its region has one exit and one entry of the exit's
    shape and dtype, writes into nothing it does not own and holds parameters."""
    inside = set(region)
    for n in region:  # parameters only this region reads (exported graphs read them with get_attr)
        for a in n.all_input_nodes:
            if a.op == "get_attr" and all(u in inside for u in a.users):
                inside.add(a)
    exits = [n for n in region if any(u not in inside for u in n.users)]
    if len(exits) != 1 or _meta(exits[0]) == (None, None):
        return None
    exit_ = exits[0]
    reads = [a for n in region for a in n.all_input_nodes if a not in inside and a.op != "get_attr"]
    entries = list(dict.fromkeys(a for a in reads if _meta(a) == _meta(exit_)))
    if len(entries) != 1:
        return None  # none (a downsampling block) or several tensors the stream could be
    for n in region:  # an in-place write into a tensor computed outside (x += f(x) on the input)
        name = op_name(n.target) if n.op != "call_module" else ""
        target = n.args[0] if n.args else None
        if (name.endswith("_") or name.startswith("i") and name[1:] in ("add", "mul", "sub")) \
                and isinstance(target, torch.fx.Node) and target not in inside:
            return None
    if _layers(region, modules) == 0:
        return None
    all_keys: dict[str, int] = {}
    for n in inside:
        all_keys.update(_param_keys(n, gm, modules, canonical, params_only=False, owned_by=(inside, calls)))
    members = sorted(inside - {exit_}, key=position.__getitem__)
    return Layer(id=lid, join=exit_.name, output="", shortcut=entries[0].name, nodes=[n.name for n in members],
                 modules=sorted({k.rsplit(".", 1)[0] for k in all_keys if "." in k}
                                | {n.target for n in region if n.op == "call_module"}),
                 parent=None, zero_invariant=False, reason="", producer="",
                 _all={k: [(0, list(range(s)))] for k, s in all_keys.items()}, path=path)


def _meta(node: torch.fx.Node) -> tuple:
    meta = node.meta.get("tensor_meta")
    return (tuple(meta.shape), meta.dtype) if hasattr(meta, "shape") else (None, None)


def covered_by_branches(graph, layer: Layer) -> list[Branch]:
    """The branches whose removal together removes ``layer`` (a pre-norm layer: attention
    and MLP), or [] when it computes more than its branches (a post-norm layer's norms).

    >>> import torch, fxprune
    >>> from fxprune.testing import ResidualLinear
    >>> graph = fxprune.analyze(torch.nn.Sequential(ResidualLinear(4), ResidualLinear(4)), torch.randn(2, 4))
    >>> [b.id for b in covered_by_branches(graph, graph.layers[0])] == [graph.branches[0].id]
    True
    """
    inner = [b for b in graph.branches if covers(layer, b)]
    gone = {name for b in inner for name in (*b.nodes, b.join)}
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    for name in reversed((*layer.nodes, layer.join)):  # users before what they use
        node = nodes[name]
        if name in gone or node.op == "get_attr" or is_assert(node) or is_identity_cast(node):
            continue
        if node.users and all(u.name in gone or is_assert(u) for u in node.users):
            gone.add(name)  # it fed only the branches (and an export check, which no branch holds)
            continue
        return []
    return inner


def covers(outer: Branch, inner: Branch) -> bool:
    """``outer``'s removal takes ``inner`` with it (its join is among ``outer``'s nodes, or
    both end at the same node and ``outer`` is the layer)."""
    if outer is inner:
        return False
    return inner.join in set(outer.nodes) or (inner.join == outer.join and isinstance(outer, Layer)
                                              and not isinstance(inner, Layer))


def identity_overrides(graph, plan: Mapping) -> dict[str, str]:
    """``{exit node: entry node}`` of the plan's layers: the analysed graph run with each
    removed layer's output replaced by its input (the layer oracle, for graph runs)."""
    out = {}
    for key, units in plan.items():
        layer = _layer_of(graph, key)
        if layer is not None and check_branch_units(layer, units):
            out[layer.join] = layer.shortcut
    return out


def _layer_of(graph, key) -> Layer | None:
    if not isinstance(key, int) or isinstance(key, bool) or not graph.layers or key < graph.layers[0].id:
        return None
    i = key - graph.layers[0].id
    return graph.layers[i] if i < len(graph.layers) else None


@contextlib.contextmanager
def identity_layers(model: torch.nn.Module, graph, plan: Mapping):
    """A context in which ``model`` (the original, or a copy with the same module names)
    runs with the plan's layers replaced by the identity: a forward hook returns the
    module's input (the tensor argument of the output's shape and dtype) as its output."""
    handles = []
    try:
        for key, units in plan.items():
            layer = _layer_of(graph, key)
            if layer is not None and check_branch_units(layer, units):
                handles.append(model.get_submodule(layer.path).register_forward_hook(_identity_hook, with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()


def _identity_hook(module, args, kwargs, output):
    first = output[0] if isinstance(output, (tuple, list)) else output
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.shape == first.shape and value.dtype == first.dtype:
            return (value, *output[1:]) if isinstance(output, tuple) else value
    raise ValueError(f"{type(module).__name__}: no input of its output's shape {tuple(first.shape)} to return")


__all__ = ["Layer", "find_layers", "covered_by_branches", "covers", "identity_overrides", "identity_layers",
           "stack_paths", "is_assert", "is_identity_cast"]
