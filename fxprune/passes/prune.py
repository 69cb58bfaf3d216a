"""The prune pass: physically remove channels and rewrite the graph around them.

Works on a deep copy of the analysed GraphModule: every parameter and buffer bound to
a removed channel is sliced, module attributes (``out_channels``, ``groups``,
``num_features``...) and graph constants (reshape sizes, split sizes, slice bounds)
are rewritten by the hooks the op rules registered, residual branches the plan names
are cut out (``fxprune.passes.remove_branches``), and the result is verified by
propagating shapes again: every node must have exactly the shape the analysis
predicts, and the outputs the original shapes.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict
from typing import Mapping

import numpy as np
import torch
import torch.fx

from .._util import first_line
from ..capture import ShapeRecorder, gc_paused
from ..capture.effects import eliminate_dead_code
from ..channels.branches import split_plan
from ..channels.experts import removed_experts
from ..channels.graph import DependencyGraph, _check_units
from ..channels.values import DimMap, TensorChannels
from ..errors import PlanError, VerificationError
from .check_values import ValueCheck, check_values, split_by_masking
from .remove_branches import remove_branches
from .remove_experts import expected_shape, remove_experts


class PruneContext:
    """What a rule's rewrite hook sees: the new graph and which channel ids survive."""

    def __init__(self, graph: DependencyGraph, gm: torch.fx.GraphModule, keep: np.ndarray):
        self.graph = graph
        self.gm = gm
        self.keep = keep
        self.renamed: dict[str, str] = {}  # new node name -> the analysed node it replaces
        self.replacement: dict[str, torch.fx.Node] = {}  # analysed node name -> node now standing for it
        self._old_nodes = {n.name: n for n in graph.gm.graph.nodes}

    def module(self, target: str) -> torch.nn.Module:
        return self.gm.get_submodule(target)

    def current(self, name: str) -> torch.fx.Node:
        """The node of the new graph that computes what analysed node ``name`` did."""
        if name in self.replacement:
            return self.replacement[name]
        for node in self.gm.graph.nodes:
            if node.name == name:
                return node
        raise VerificationError(f"node '{name}' vanished from the pruned graph before its rewrite ran")

    def replace(self, node: torch.fx.Node, new: torch.fx.Node) -> None:
        """Swap ``node`` for ``new`` everywhere, keeping the analysis' view of it."""
        old_name = self.renamed.get(node.name, node.name)
        node.replace_all_uses_with(new)
        new.meta = dict(node.meta)
        node.graph.erase_node(node)
        self.renamed[new.name] = old_name
        self.replacement[old_name] = new

    def kept(self, ids: np.ndarray) -> np.ndarray:
        """Mask of surviving positions; fixed positions (id -1) always survive."""
        return np.where(ids >= 0, self.keep[np.clip(ids, 0, None)], True)

    def count(self, dim_map: DimMap) -> int:
        return int(self.kept(dim_map.ids).sum())

    def _value(self, node_or_name) -> TensorChannels:
        name = node_or_name.name if isinstance(node_or_name, torch.fx.Node) else node_or_name
        name = self.renamed.get(name, name)
        value = self.graph.state.env.get(self._old_nodes[name])
        if not isinstance(value, TensorChannels):
            raise VerificationError(f"node '{name}' has no tensor channel map")
        return value

    def new_shape(self, node_or_name) -> tuple[int, ...]:
        """The shape a node's output has after pruning, as the analysis predicts it."""
        value = self._value(node_or_name)
        return tuple(self.count(value.dims[d]) if d in value.dims else s for d, s in enumerate(value.shape))

    def is_channel_dim(self, node_or_name, dim: int) -> bool:
        m = self._value(node_or_name).dims.get(dim)
        return m is not None and bool((m.ids >= 0).any())

    def old_ndim(self, node_or_name) -> int:
        return len(self._value(node_or_name).shape)


def resolve_plan(graph: DependencyGraph, plan: Mapping[int, object]) -> np.ndarray:
    """Validate ``{group id: channels to remove}``; return the removed class roots."""
    if not isinstance(plan, Mapping):
        raise PlanError(f"a plan is a dict {{group id: [channels to remove]}}, got {type(plan).__name__}")
    plan = split_plan(graph, plan)[0]  # branch ids are depth units (passes.remove_branches)
    removed = []
    for gid, channels in plan.items():
        group = graph.group(gid)
        units = _check_units(group, channels)
        if not units.size:
            continue
        if not group.prunable:
            raise PlanError(f"group {gid} is frozen and cannot be pruned: {group.reason}")
        if units.size >= group.size:
            raise PlanError(
                f"the plan removes all {group.size} channels of group {gid}; keep at least one")
        removed.append(group.classes[units])
    removed = np.concatenate(removed) if removed else np.zeros(0, dtype=np.int64)
    keep = ~np.isin(graph.roots, removed)
    for ids, what in graph.state.nonempty:
        if not keep[ids].any():
            gid = graph.group_of_id(int(ids[0]))
            raise PlanError(
                f"the plan removes every channel of {what} (group {gid}); PyTorch layers cannot have "
                "zero width, so keep at least one of them (fxprune.feasible_plan builds plans that do)")
    return removed


VERIFY = ("values", "shapes")
VALUE_CHECK = "fxprune.value_check"  # GraphModule.meta key: the ValueCheck of the result
ORIGIN = "fxprune.origin"  # GraphModule.meta key: {pruned node name: analysed node name}


def prune_graph(graph: DependencyGraph, plan: Mapping[int, object], *,
                verify: str = "values") -> torch.fx.GraphModule:
    """Return a new GraphModule with the planned channels removed (``fxprune.prune``'s
    ``emit="graph"``).

    ``plan`` maps group ids to the channel units to remove (see ``Group.slices``).
    The analysed graph and the original model are not modified. Shapes are always
    verified; ``verify="values"`` (default) also runs :func:`verify_values`, whose
    result is in ``gm.meta["fxprune.value_check"]`` (a dict: error, tolerance, note).

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> small = prune_graph(graph, {1: [0, 1, 2]})
    >>> small.get_submodule("0").weight.shape
    torch.Size([3, 4])
    """
    if verify not in VERIFY:
        raise ValueError(f"verify must be one of {', '.join(map(repr, VERIFY))}, got {verify!r}")
    with gc_paused():
        gm = _prune(graph, plan)
        if verify == "values":
            verify_values(graph, plan, gm)
        return gm


def verify_values(graph: DependencyGraph, plan: Mapping[int, object], gm: torch.fx.GraphModule) -> ValueCheck:
    """Check ``gm`` (``prune_graph(graph, plan)``) by values; raise :class:`VerificationError`
    on a mismatch (see :mod:`fxprune.passes.check_values`), record the result in
    ``gm.meta["fxprune.value_check"]`` (as a dict) and return it.

    Groups whose removal equals no masking (a LayerNorm'd stream) cannot be checked by
    values: the rest of the plan is pruned again on its own and checked, and the note
    names the groups verified by shape only.

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> small = prune_graph(graph, {1: [0, 1, 2]}, verify="shapes")
    >>> verify_values(graph, {1: [0, 1, 2]}, small).error < 1e-6
    True
    """
    masked, unmasked = split_by_masking(graph, plan)
    if not unmasked:
        result = check_values(graph, masked, gm, gm.meta.get(ORIGIN, {}), kept_ids(graph, plan))
    elif not masked:
        result = ValueCheck(None, 0.0, f"values not checked: no group of the plan ({_ids(unmasked)}) has a "
                                       "masking its removal equals (shapes were checked)")
    else:
        part = _prune(graph, masked)
        checked = check_values(graph, masked, part, part.meta.get(ORIGIN, {}), kept_ids(graph, masked))
        result = ValueCheck(checked.error, checked.tolerance,
                            f"{checked.note}, for the groups whose removal equals a masking; groups "
                            f"{_ids(unmasked)} have none and were checked by shape")
    gm.meta[VALUE_CHECK] = dataclasses.asdict(result)  # plain data: the graph pickles without fxprune
    return result


def _ids(gids: list[int]) -> str:
    return ", ".join(map(str, gids[:8])) + (f" and {len(gids) - 8} more" if len(gids) > 8 else "")


def _prune(graph: DependencyGraph, plan: Mapping[int, object]) -> torch.fx.GraphModule:
    keep = kept_ids(graph, plan)
    gm = clone_graph_module(graph.gm)
    ctx = PruneContext(graph, gm, keep)
    _slice_tensors(graph, gm, ctx)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, rewrite in graph.state.rewrites:
        rewrite(ctx, nodes[name])
    remove_branches(ctx, split_plan(graph, plan)[1])
    remove_experts(ctx, removed_experts(graph, plan))
    eliminate_dead_code(gm)  # keeps in-place and other mutating calls (invariant 8)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    verify_shapes(graph, gm, ctx)
    gm.meta[ORIGIN] = dict(ctx.renamed)
    return gm


def clone_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """An independent copy: its own graph and copies of the modules and tensors it uses.

    Cheaper than ``copy.deepcopy(gm)`` (which also copies every intermediate container
    module and recompiles twice); one memo keeps tied weights tied in the copy.
    """
    memo: dict[int, object] = {}
    owned = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in owned:
            owned[node.target] = _clone(_fetch(gm, node.target), memo)
    new = torch.fx.GraphModule(owned, copy.deepcopy(gm.graph), gm.__class__.__name__)
    new.training = gm.training
    for spec in ("_in_spec", "_out_spec"):  # an exported graph's call signature and output structure
        if hasattr(gm, spec):
            setattr(new, spec, getattr(gm, spec))
    return new


def _clone(obj, memo: dict[int, object]):
    """Copy a module (own dicts, own tensors) without deepcopy's generic machinery."""
    if id(obj) in memo:
        return memo[id(obj)]
    if type(obj) in (torch.nn.Parameter, torch.Tensor):
        new = obj.detach().clone()
        new = torch.nn.Parameter(new, requires_grad=obj.requires_grad) if type(obj) is torch.nn.Parameter else new
    elif isinstance(obj, torch.nn.Module):
        new = obj.__class__.__new__(obj.__class__)
        memo[id(obj)] = new
        state = {}
        for key, value in obj.__dict__.items():
            if key in ("_parameters", "_buffers", "_modules"):
                state[key] = {k: None if v is None else _clone(v, memo) for k, v in value.items()}
            elif isinstance(value, (dict, list, set)):
                state[key] = copy.copy(value)  # hooks and other containers: own copies
            elif isinstance(value, torch.Tensor):
                state[key] = _clone(value, memo)
            else:
                state[key] = value  # numbers, strings, tuples: immutable
        new.__dict__ = state
        return new
    else:
        new = copy.deepcopy(obj, memo)
    memo[id(obj)] = new
    return new


def _fetch(gm: torch.nn.Module, target: str):
    path, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(path), attr)


def tensor_cuts(graph: DependencyGraph, keep: np.ndarray) -> dict[str, list[tuple[int, np.ndarray]]]:
    """``{state_dict key: [(dim, kept indices), ...]}`` for every tensor the plan shrinks.

    ``keep`` is the survival mask over channel ids (see :func:`kept_ids`). Dims come in
    ascending order; a key absent from the result keeps its full shape. Tied tensors
    appear once, under the key the analysis bound (``graph.state.aliases`` lists the rest).
    """
    by_key: dict[str, list] = defaultdict(list)
    for b in graph.state.bindings.values():
        mask = np.where(b.ids >= 0, keep[np.clip(b.ids, 0, None)], True)
        if not mask.all():
            by_key[b.key].append((b.dim, np.flatnonzero(mask)))
    return {key: sorted(cuts, key=lambda c: c[0]) for key, cuts in by_key.items()}


def kept_ids(graph: DependencyGraph, plan: Mapping[int, object]) -> np.ndarray:
    """Validate ``plan`` and return the survival mask over the graph's channel ids."""
    return ~np.isin(graph.roots, resolve_plan(graph, plan))


def cut_tensor(tensor: torch.Tensor, cuts: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """``tensor`` with only the kept indices along each cut dim (a new tensor; a
    ``Parameter`` stays a ``Parameter`` with the same ``requires_grad``)."""
    new = tensor.detach()
    for dim, index in cuts:
        new = new.index_select(dim, torch.as_tensor(index, device=new.device))
    new = new.clone()
    if isinstance(tensor, torch.nn.Parameter):
        new = torch.nn.Parameter(new, requires_grad=tensor.requires_grad)
    return new


def set_tensor(root: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` at ``key`` (a parameter, buffer or plain attribute) under ``root``."""
    path, _, attr = key.rpartition(".")
    module = root.get_submodule(path)
    if attr in module._parameters:
        module._parameters[attr] = value
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        setattr(module, attr, value)


def _slice_tensors(graph: DependencyGraph, gm: torch.fx.GraphModule, ctx: PruneContext) -> None:
    for key, cuts in tensor_cuts(graph, ctx.keep).items():
        new = cut_tensor(_fetch(gm, key), cuts)
        for alias in graph.state.aliases.get(key, [key]):
            set_tensor(gm, alias, new)


def verify_shapes(graph: DependencyGraph, gm: torch.fx.GraphModule, ctx: PruneContext) -> None:
    """Re-propagate shapes; every node must match the analysis' prediction."""
    inputs = graph.example_inputs.clone().flat(gm)
    try:
        ShapeRecorder(gm).record(*inputs)
    except Exception as exc:
        raise VerificationError(
            f"the pruned graph does not run: {type(exc).__name__}: {first_line(exc)}. "
            "This is a bug in a channel rule; please report it with the model."
        ) from exc
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op == "output" or not hasattr(meta, "shape"):
            continue
        value = graph.state.env.get(ctx._old_nodes.get(ctx.renamed.get(node.name, node.name)))
        if isinstance(value, TensorChannels):
            want = expected_shape(ctx, node.name, ctx.new_shape(node.name))
            if tuple(meta.shape) != want:
                raise VerificationError(
                    f"node '{node.name}' has shape {tuple(meta.shape)} after pruning, the analysis "
                    f"predicted {want}. This is a bug in a channel rule; please report it with the model.")
