"""Residual branches, found from the graph alone: depth as a pruning unit.

A *branch* is the part of a graph whose output joins the stream through an add
(``x + f(x)``, ``x + gamma * f(x)``, ``proj(x) + f(x)``, through a drop path that is the
identity in eval) and that feeds nothing else. Removing it rewrites the add to its other
operand (:mod:`fxprune.passes.remove_branches`).

"Feeds nothing else" is post-dominance: node ``v`` belongs to the branch ending in the
add's operand ``o`` exactly when every path from ``v`` to the graph's output passes
through ``o``. One pass over the nodes in reverse topological order builds the
post-dominator tree (each node's immediate post-dominator is the meet of its users'),
and a branch is the subtree under its operand: a contiguous range of a depth-first
numbering, so listing and nesting are cheap and nothing enumerates paths.

Which operand is the branch: the one used only by the add, that reads the stream (a
floating-point tensor computed outside it), holds parameters, whose other operand is
computed (``x + pos_embed``, a parameter, is no residual), and whose removal leaves the other
operand with the add's shape and dtype. When both operands qualify (a projection
shortcut), the one with more parametrised layers is the branch and the other the
shortcut; an exact tie (two equal parallel paths, not a residual) gives no branch.

Zeroing equals removal: walking back from the branch's output through ops that map zero
to zero (views, dropout, ReLU/GELU/SiLU, a multiplication), the *last producer* is an op
whose output is zero once its parameters are: a conv or linear (weight and bias), an
affine norm (weight and bias), a multiplication by a parameter (a layer scale). Its
parameters are the branch's ``role="out"`` slices. A branch whose walk meets anything
else is listed with ``zero_invariant=False`` and the reason; the oracle
(:func:`fxprune.check_zero_invariance`) refuses it, as it refuses a channel group that is
not zero-invariant.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
import torch.fx

from ..errors import PlanError
from .registry import op_name

_ADDS = {"add", "add_", "iadd"}
# ops whose output is zero where their (first) tensor input is zero: a branch's output may
# pass through them after its last producer and zeroing the producer still zeroes the branch
_ZERO_PRESERVING = {
    "dropout", "dropout_", "identity", "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "flatten", "contiguous", "clone",
    "expand", "squeeze", "unsqueeze", "alias", "detach", "to", "_to_copy", "type", "float", "half",
    "bfloat16", "relu", "relu_", "ReLU", "gelu", "GELU", "silu", "silu_", "SiLU", "tanh", "Tanh",
    "hardswish", "Hardswish", "neg", "avg_pool2d", "adaptive_avg_pool2d", "AvgPool2d",
    "AdaptiveAvgPool2d", "max_pool2d", "MaxPool2d", "div", "truediv", "mul", "mul_", "getitem",
    "stochastic_depth", "StochasticDepth", "drop_path", "DropPath",  # identity in eval, a scaled mask in training
}
# ops whose output is zero once every parameter they read is zero
_PRODUCERS = {
    "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "linear", "batch_norm", "_native_batch_norm_legit_no_training",
    "native_batch_norm", "layer_norm", "native_layer_norm", "group_norm", "native_group_norm",
    "rms_norm", "mul", "mul_", "matmul", "mm", "addmm",
}
_PRODUCER_MODULES = (torch.nn.modules.conv._ConvNd, torch.nn.Linear, torch.nn.modules.batchnorm._BatchNorm,
                     torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)


@dataclass
class Branch:
    """A residual branch: one pruning unit (``size == 1``; remove it with ``{id: [0]}``).

    ``join``: the add node it feeds; ``output``: its last node (the add's operand);
    ``shortcut``: the add's other operand; ``nodes``: the names of its nodes;
    ``modules``: the modules whose parameters it holds; ``parent``: the id of the
    smallest branch it nests in (None at top level); ``zero_invariant`` and ``reason``:
    whether zeroing ``slices([0], "out")`` equals removing it.
    """

    id: int
    join: str
    output: str
    shortcut: str
    nodes: list[str] = field(repr=False)
    modules: list[str]
    parent: int | None
    zero_invariant: bool
    reason: str
    producer: str  # the node whose parameters are zeroed (empty if none)
    _out: dict[str, list[tuple[int, list[int]]]] = field(repr=False, default_factory=dict)
    _all: dict[str, list[tuple[int, list[int]]]] = field(repr=False, default_factory=dict)
    size: int = 1
    prunable: bool = True
    kind = "branch"  # a whole layer (fxprune.channels.layers.Layer) is the other depth unit

    @property
    def oracle_role(self) -> str | None:
        """Which slices, zeroed, equal the removal: ``"out"`` (the last producer), as for
        channel groups (``Group.oracle_role``), or None when no parameter zeroes it."""
        return "out" if self.zero_invariant else None

    def slices(self, units: Iterable[int] = (0,), role: str = "out") -> dict[str, list[tuple[int, list[int]]]]:
        """``{state_dict key: [(dim, [indices])]}`` of the branch (unit 0).

        ``role="out"``: the last producer's parameters; zeroing them equals removing the
        branch (when ``zero_invariant``). ``role="in"``: every other parameter the branch
        removes. ``role="all"``: every parameter and buffer that disappears with it.

        >>> import torch, fxprune
        >>> from fxprune.testing import ResidualLinear
        >>> b = fxprune.analyze(ResidualLinear(4, hidden=8), torch.randn(2, 4)).branches[0]
        >>> b.slices([0], role="out")
        {'fc2.weight': [(0, [0, 1, 2, 3])], 'fc2.bias': [(0, [0, 1, 2, 3])]}
        """
        if role not in ("out", "in", "all"):
            raise ValueError(f"role must be 'out', 'in' or 'all', got {role!r}")
        chosen = check_branch_units(self, units)
        if not chosen:
            return {}
        if role == "out":
            return {k: [(d, list(i)) for d, i in v] for k, v in self._out.items()}
        if role == "in":
            return {k: [(d, list(i)) for d, i in v] for k, v in self._all.items()
                    if k not in self._out and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
        return {k: [(d, list(i)) for d, i in v] for k, v in self._all.items()}


def check_branch_units(branch: Branch, units: Iterable[int]) -> list[int]:
    """The units of a branch plan entry: ``[]`` or ``[0]``; anything else is a PlanError."""
    try:
        chosen = sorted({int(u) for u in units})
    except (TypeError, ValueError) as exc:
        raise PlanError(f"branch {branch.id}: units must be integers, got {units!r}") from exc
    if chosen not in ([], [0]):
        raise PlanError(f"branch {branch.id} is one unit: remove it with {{{branch.id}: [0]}}, got {chosen}")
    return chosen


def find_branches(gm: torch.fx.GraphModule, first_id: int = 0, canonical: dict | None = None) -> list[Branch]:
    """Every residual branch of ``gm`` (shapes must be recorded on the nodes), ids from ``first_id``.

    ``canonical`` maps tied state_dict keys to the one the analysis binds.

    >>> import torch, torchvision, fxprune
    >>> graph = fxprune.analyze(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    >>> len(graph.branches), graph.branches[0].modules
    (8, ['layer1.0.bn1', 'layer1.0.bn2', 'layer1.0.conv1', 'layer1.0.conv2'])
    """
    canonical = canonical or {}
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    tin, tout, order = _postdominator_numbering(nodes, index)
    modules = dict(gm.named_modules())
    calls: dict[str, list] = {}
    for n in nodes:
        if n.op == "call_module":
            calls.setdefault(n.target, []).append(n)
    found: list[tuple[int, torch.fx.Node, torch.fx.Node, torch.fx.Node]] = []  # (tin, join, branch out, shortcut)
    for join in nodes:
        if join.op not in ("call_function", "call_method") or op_name(join.target) not in _ADDS:
            continue
        pair = _operands(join)
        if pair is None:
            continue
        fits = []
        for o, other in (pair, pair[::-1]):
            members = order[tin[index[o]]:tout[index[o]]]
            if len(o.users) == 1 and other.op != "get_attr" and _same_shape(other, join) and _reads_stream(members, tin, tout, index, o) \
                    and _layers(members, modules) > 0:
                fits.append((_layers(members, modules), len(members), o, other))
        if len(fits) == 2:
            if fits[0][:2] == fits[1][:2]:
                continue  # two equal parallel paths: neither is the shortcut
            fits = [max(fits, key=lambda f: f[:2])]
        if fits:
            found.append((tin[index[fits[0][2]]], join, fits[0][2], fits[0][3]))
    branches: list[Branch] = []
    spans: list[tuple[int, int]] = []
    for i, (_, join, out, other) in enumerate(found):
        members = order[tin[index[out]]:tout[index[out]]]
        span = (int(tin[index[out]]), int(tout[index[out]]))
        inside = set(members)
        producer, reason = _last_producer(out, inside, modules)
        out_keys = _param_keys(producer, gm, modules, canonical, params_only=True) if producer is not None else {}
        if producer is not None and out_keys != _param_keys(producer, gm, modules, canonical, params_only=True,
                                                            owned_by=(inside, calls)):
            producer, out_keys = None, {}  # zeroing them would change the layers outside too
            reason = f"the parameters of its last producer are also read outside the branch"
        all_keys = {}
        for n in members:
            all_keys.update(_param_keys(n, gm, modules, canonical, params_only=False, owned_by=(inside, calls)))
        branches.append(Branch(
            id=first_id + i, join=join.name, output=out.name, shortcut=other.name,
            nodes=[n.name for n in members if n.op != "placeholder"],
            modules=sorted({k.rsplit(".", 1)[0] for k in all_keys if "." in k}
                           | {n.target for n in members if n.op == "call_module" and _owned(n, inside, calls)}),
            parent=None, zero_invariant=producer is not None and bool(out_keys), reason=reason,
            producer=producer.name if producer is not None else "",
            _out={k: [(0, list(range(s)))] for k, s in out_keys.items()},
            _all={k: [(0, list(range(s)))] for k, s in all_keys.items()},
        ))
        spans.append(span)
    _nest(branches, spans)
    return branches


def _nest(branches: list[Branch], spans: list[tuple[int, int]]) -> None:
    """Set each branch's ``parent``: the innermost branch whose span holds its span
    (spans of a tree numbering nest or are disjoint: one sweep with a stack)."""
    stack: list[int] = []
    for i in sorted(range(len(spans)), key=lambda i: (spans[i][0], -spans[i][1])):
        while stack and spans[stack[-1]][1] <= spans[i][0]:
            stack.pop()
        branches[i].parent = branches[stack[-1]].id if stack else None
        stack.append(i)


def _postdominator_numbering(nodes: list, index: dict) -> tuple[np.ndarray, np.ndarray, list]:
    """Depth-first entry/exit numbers of the post-dominator tree, and the nodes in entry order.

    The subtree of ``v`` (every node all of whose paths to the output pass through ``v``)
    is ``order[tin[v]:tout[v]]``. Nodes that reach no output (asserts in exported graphs)
    hang from a virtual root above the output, so what feeds them belongs to no branch.
    """
    n = len(nodes)
    root = n  # virtual root
    ipdom = np.full(n + 1, root, dtype=np.int64)
    for i in range(n - 1, -1, -1):  # users come later in topological order: their ipdom is known
        users = [index[u] for u in nodes[i].users]
        if not users or nodes[i].op == "output":
            continue
        a = users[0]
        for b in users[1:]:
            while a != b:  # meet in the tree: the finger with the smaller index moves up
                while a < b:
                    a = ipdom[a]
                while b < a:
                    b = ipdom[b]
        ipdom[i] = a
    children: list[list[int]] = [[] for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        children[ipdom[i]].append(i)
    tin = np.zeros(n + 1, dtype=np.int64)
    tout = np.zeros(n + 1, dtype=np.int64)
    order: list = []
    stack = [(root, False)]
    while stack:
        v, leaving = stack.pop()
        if leaving:
            tout[v] = len(order)
            continue
        tin[v] = len(order)
        if v != root:
            order.append(nodes[v])
        stack.append((v, True))
        stack.extend((c, False) for c in children[v])
    return tin, tout, order


def _operands(join: torch.fx.Node):
    """The two tensor operands of a binary add (None for anything else: alpha scaling an
    operand is fine, a constant or a repeated operand is not)."""
    args = list(join.args[:2])
    if len(args) < 2:
        args += [join.kwargs.get("other")]
    a, b = args[0], args[1]
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or a is b:
        return None
    if not (_shape(a) and _shape(b) and _shape(join)):
        return None
    return a, b


def _shape(node: torch.fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _same_shape(other: torch.fx.Node, join: torch.fx.Node) -> bool:
    a, b = other.meta.get("tensor_meta"), join.meta.get("tensor_meta")
    return tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype


def _reads_stream(members: list, tin, tout, index, out) -> bool:
    """Some member reads a floating-point tensor computed outside the branch: the stream
    (a parameter is not, nor are integer indices: an embedding of token types or
    positions added to the word embeddings is not a branch)."""
    lo, hi = tin[index[out]], tout[index[out]]
    for n in members:
        for src in n.all_input_nodes:
            meta = src.meta.get("tensor_meta")
            if not lo <= tin[index[src]] < hi and src.op != "get_attr" and hasattr(meta, "dtype") \
                    and meta.dtype.is_floating_point:
                return True
    return False


def _layers(members: list, modules: dict) -> int:
    """Parametrised layers among the members (modules with parameters, get_attr parameters)."""
    count = 0
    for n in members:
        if n.op == "call_module" and any(True for _ in modules[n.target].parameters(recurse=False)):
            count += 1
        elif n.op == "call_function" and any(a.op == "get_attr" for a in n.all_input_nodes):
            count += 1
    return count


def _owned(node: torch.fx.Node, members: set, calls: dict) -> bool:
    """Every call of this module is in the branch (a shared module stays)."""
    return all(c in members for c in calls[node.target])


def _last_producer(out: torch.fx.Node, members: set, modules: dict):
    """The op whose parameters zero the branch, walking back through zero-preserving ops."""
    node = out
    for _ in range(len(members) + 1):
        name = type(modules[node.target]).__name__ if node.op == "call_module" else op_name(node.target)
        if _is_producer(node, modules):
            return node, ""
        if name not in _ZERO_PRESERVING or node.op == "get_attr":
            return None, (f"the branch ends in node '{node.name}' ({name}), which does not map zero to "
                          "zero and holds no parameter to zero")
        if name == "getitem" and node.args[1] != 0:
            return None, f"the branch ends in node '{node.name}', an item other than the first of a tuple"
        inputs = [a for a in node.all_input_nodes if a in members and a.op != "get_attr"]
        if name in ("div", "truediv"):
            inputs = inputs[:1] if node.args and node.args[0] in members else []
        if not inputs:
            break
        node = inputs[0]
    return None, f"no op with parameters before node '{out.name}' can zero the branch"


def _is_producer(node: torch.fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, _PRODUCER_MODULES) and getattr(m, "weight", None) is not None
    if node.op in ("call_function", "call_method") and op_name(node.target) in _PRODUCERS:
        params = [a for a in node.all_input_nodes if a.op == "get_attr"]
        if op_name(node.target) in ("mul", "mul_", "matmul", "mm"):
            return len(params) == 1  # a layer scale (a parameter times the branch)
        return bool(params)
    return False


def _param_keys(node: torch.fx.Node, gm, modules: dict, canonical: dict, *, params_only: bool,
                owned_by: tuple | None = None) -> dict[str, int]:
    """``{state_dict key: size of dim 0}`` of the parameters (and buffers) a node reads."""
    out: dict[str, int] = {}
    if node.op == "call_module":
        if owned_by is not None and not _owned(node, *owned_by):
            return out
        m = modules[node.target]
        tensors = list(m.named_parameters(recurse=False))
        if not params_only:
            tensors += list(m.named_buffers(recurse=False))
        for name, t in tensors:
            if t is not None and t.ndim:
                key = f"{node.target}.{name}"
                out[canonical.get(key, key)] = t.shape[0]
        return out
    for a in ([node] if node.op == "get_attr" else [a for a in node.all_input_nodes if a.op == "get_attr"]):
        if owned_by is not None and not all(u in owned_by[0] for u in a.users):
            continue
        t = _fetch(gm, a.target)
        if isinstance(t, torch.Tensor) and t.ndim and (not params_only or isinstance(t, torch.nn.Parameter)):
            out[canonical.get(a.target, a.target)] = t.shape[0]
    return out


def _fetch(gm, target: str):
    path, _, attr = target.rpartition(".")
    try:
        return getattr(gm.get_submodule(path), attr)
    except AttributeError:
        return None


def unit(graph, unit_id: int):
    """The channel group or the branch that plan key ``unit_id`` names.

    >>> import torch, fxprune
    >>> from fxprune.testing import ResidualLinear
    >>> graph = fxprune.analyze(ResidualLinear(4), torch.randn(2, 4))
    >>> type(fxprune.unit(graph, graph.branches[0].id)).__name__, type(fxprune.unit(graph, 0)).__name__
    ('Branch', 'Group')
    """
    n = len(graph.groups)
    if isinstance(unit_id, (int, np.integer)) and not isinstance(unit_id, bool) and n <= unit_id < n + len(graph.branches):
        return graph.branches[int(unit_id) - n]
    if isinstance(unit_id, (int, np.integer)) and 0 <= unit_id < n:
        return graph.groups[int(unit_id)]
    from .experts import expert_set  # experts are the third kind of unit, after the branches

    if unit_id is not None and (experts := expert_set(graph, unit_id)) is not None:
        return experts
    layers = graph.layers  # the fourth kind, after the experts
    if isinstance(unit_id, (int, np.integer)) and not isinstance(unit_id, bool) and layers \
            and layers[0].id <= unit_id <= layers[-1].id:
        return layers[int(unit_id) - layers[0].id]
    last = f"; branches {n}..{n + len(graph.branches) - 1}" if graph.branches else ""
    if graph.experts:
        last += f"; expert sets {graph.experts[0].id}..{graph.experts[-1].id}"
    if layers:
        last += f"; layers {layers[0].id}..{layers[-1].id}"
    raise PlanError(f"no unit {unit_id!r}: this graph has channel groups 0..{n - 1}{last}")


def split_plan(graph, plan) -> tuple[dict, list[Branch]]:
    """``plan`` as its channel part ``{group id: units}`` and the branches and layers it
    removes (expert sets are in neither: see ``fxprune.channels.experts.removed_experts``).

    >>> import torch, fxprune
    >>> graph = fxprune.analyze(torch.nn.Linear(2, 2), torch.randn(1, 2))
    >>> split_plan(graph, {0: []})
    ({0: []}, [])
    """
    channels: dict = {}
    removed: list[Branch] = []
    n = len(graph.groups)
    for key, units in plan.items():
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool) and key >= n \
                and (graph.branches or graph.experts or graph.layers):
            branch = unit(graph, key)
            if not isinstance(branch, Branch):
                continue  # an expert set (fxprune.channels.experts.removed_experts)
            if check_branch_units(branch, units):
                removed.append(branch)
        else:
            channels[key] = units
    return channels, removed


__all__ = ["Branch", "find_branches", "unit", "split_plan", "check_branch_units"]
