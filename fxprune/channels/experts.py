"""Experts of a mixture of experts, found from the graph: the third kind of unit.

Where a router (a linear layer with E outputs) feeds a top-k, possibly through a
softmax and dtype casts, and stacked expert weights ([E, ...] parameters) are used by
grouped products (``aten._grouped_mm``, ``transformers.grouped_mm_fallback``) whose group
offsets are computed from that top-k's indices, the layer's E experts are one
:class:`ExpertSet`; its units ``0..E-1`` are the experts. Removing expert ``e`` cuts row
``e`` of the router and index ``e`` of every stacked weight, and shrinks the counts the
graph bakes in (``histc`` bins over the expert ids).

Oracle: removing experts equals forcing their router logits to ``-inf`` in the original
(the softmax and top-k then never pick them, and the other experts' indices keep their
order). That is a masking, not a zeroing: ``oracle_role == "router"`` and
:meth:`ExpertSet.router_mask` gives the additive mask; the value check and
:func:`fxprune.check_zero_invariance` apply it to the router's output.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import PlanError
from .expert_routing import (_TO_ROUTER, _ancestors, _bias_reads, _descendants, _expert_dim, _groups, _k,
                             _last_dim, _nearest_topk, _router, _scoring, _shape, _size_arg, dense_dispatch,
                             router_slices)
from .registry import op_name
from .rules.experts import stacked_weight

_GROUPED = {"_grouped_mm", "grouped_mm_fallback"}


@dataclass
class ExpertSet:
    """The experts of one routed layer: units ``0..size-1`` (remove experts 1 and 3 with
    ``{id: [1, 3]}``). ``router``: the router node's name, ``router_keys``: its weight (and
    bias) key; ``stacked``: the expert weights, indexed by expert along dim 0; ``top_k``:
    how many experts each token takes (a plan must leave at least that many);
    ``counts``: nodes whose arguments hold the expert count (rewritten on removal)."""

    id: int
    size: int
    router: str
    router_keys: list[str]
    stacked: list[str]
    top_k: int
    counts: list[str] = field(repr=False, default_factory=list)
    # per-expert code (an fx loop over an nn.ModuleList): for expert e, the comparison
    # ``indices == e`` that selects its tokens, the add that joins its output to the sum,
    # and that add's other operand (what the sum is without expert e)
    switches: list[str] = field(repr=False, default_factory=list)
    joins: list[tuple[str, str]] = field(repr=False, default_factory=list)
    owned: list[dict[str, int]] = field(repr=False, default_factory=list)  # per expert: {key: dim-0 size}
    topk: str = ""  # the top-k node (its indices say which experts each token takes)
    # nodes holding the routing-weighted expert outputs: one per expert (a loop), or one
    # whose rows are sorted by expert with counts[0] holding the rows per expert (grouped)
    weighted: list[str] = field(repr=False, default_factory=list)
    # per-expert selection biases added to the scores the top-k ranks (DeepSeek-V3's
    # ``e_score_correction_bias``): (key, expert dim) and the get_attr nodes that read them
    biases: list[tuple[str, int]] = field(repr=False, default_factory=list)
    bias_nodes: list[str] = field(repr=False, default_factory=list)
    min_left: int = 0  # other top-k's over the experts (a group's top-2) need this many left
    router_extra: int = 0  # router outputs after the experts' (shared experts' gates): they stay
    logit_slices: list[str] = field(repr=False, default_factory=list)  # slices of the router's outputs
    # nodes whose shape counts experts, as (name, dim, size per expert): that dim is
    # ``size per expert x experts left`` after removal (the shape check's prediction); and
    # (name, argument, position) of the size lists holding the count (``view(-1, 1, E)``, rewritten)
    marks: list[tuple[str, int, int]] = field(repr=False, default_factory=list)
    sizes: list[tuple[str, int, int]] = field(repr=False, default_factory=list)
    prunable: bool = True
    zero_invariant: bool = False  # removal is a masking of the router, not a zeroing
    reason: str = ""
    oracle_role: str = "router"

    @property
    def removable(self) -> int:
        """How many experts a plan may remove: 0 when frozen, else all but ``top_k`` (or
        the ``min_left`` another top-k over them needs)."""
        return self.size - max(self.top_k, self.min_left) if self.prunable else 0

    @property
    def zero_invariance_reason(self) -> str:
        return "removing an expert equals masking its router logit with -inf, not zeroing a tensor"

    def check(self, units: Iterable[int]) -> list[int]:
        """The sorted experts a plan entry removes; a PlanError when they are out of range
        or leave fewer than ``top_k`` experts."""
        try:
            chosen = sorted({int(u) for u in units})
        except (TypeError, ValueError) as exc:
            raise PlanError(f"expert set {self.id}: units must be integers, got {units!r}") from exc
        bad = [u for u in chosen if not 0 <= u < self.size]
        if bad:
            raise PlanError(f"expert set {self.id} has experts 0..{self.size - 1}; {bad} are out of range")
        if not self.prunable and chosen:
            raise PlanError(f"expert set {self.id} is frozen: {self.reason}")
        need = max(self.top_k, self.min_left)
        if chosen and self.size - len(chosen) < need:
            also = f" (and ranks them with a top-{self.min_left})" if self.min_left > self.top_k else ""
            raise PlanError(f"expert set {self.id} routes each token to top_k={self.top_k} experts{also}; removing "
                            f"{len(chosen)} of {self.size} leaves {self.size - len(chosen)}. Remove at most "
                            f"{self.size - need} (or lower num_experts_per_tok first)")
        return chosen

    def slices(self, units: Iterable[int], role: str = "out") -> dict[str, list[tuple[int, list[int]]]]:
        """``{key: [(dim, [indices])]}``: ``"out"``/``"router"``, the router rows (where
        the masking applies); ``"in"``, the experts' slices of the stacked weights;
        ``"all"``: both.

        >>> s = ExpertSet(0, 4, "linear", ["gate.weight"], ["w1"], top_k=2)
        >>> s.slices([1], role="all")
        {'gate.weight': [(0, [1])], 'w1': [(0, [1])]}
        """
        if role not in ("out", "in", "all", "router"):
            raise ValueError(f"role must be 'out', 'in', 'all' or 'router', got {role!r}")
        chosen = self.check(units)
        if not chosen:
            return {}
        keys = (self.router_keys if role in ("out", "router", "all") else []) + \
               (self.stacked if role in ("in", "all") else [])
        out = {k: [(0, list(chosen))] for k in keys}
        if role in ("out", "router", "all"):  # selection biases are masked with the router
            out.update({k: [(dim, list(chosen))] for k, dim in self.biases})
        if role in ("in", "all"):  # experts of their own modules go whole
            for e in chosen:
                out.update({k: [(0, list(range(n)))] for k, n in (self.owned[e] if self.owned else {}).items()})
        return out

    def router_mask(self, units: Iterable[int], dtype=torch.float32, device=None) -> torch.Tensor:
        """The additive mask on the router's logits that equals removing ``units``.

        >>> ExpertSet(0, 3, "r", ["r.weight"], [], top_k=1).router_mask([1])
        tensor([0., -inf, 0.])
        """
        mask = torch.zeros(self.size + self.router_extra, dtype=dtype, device=device)
        mask[self.check(units)] = float("-inf")
        return mask

    def bias_mask(self, units: Iterable[int], shape: tuple, dim: int, dtype=torch.float32, device=None) -> torch.Tensor:
        """The additive mask (``-inf`` at the removed experts along ``dim``) on a selection
        bias of ``shape``: the top-k then never ranks them first, whatever their bias."""
        mask = torch.zeros(shape, dtype=dtype, device=device)
        mask.index_fill_(dim, torch.as_tensor(self.check(units), device=device), float("-inf"))
        return mask

    def overrides(self, units: Iterable[int], gm: torch.fx.GraphModule | None = None) -> dict[str, torch.Tensor]:
        """``{node name: additive mask}`` that equals removing ``units`` in a run of the
        analysed graph: the router's logits and, where the top-k ranks biased scores,
        the selection biases (read through ``gm``'s get_attr nodes)."""
        out = {self.router: self.router_mask(units)}
        if self.bias_nodes and gm is not None:
            nodes = {n.name: n for n in gm.graph.nodes}
            for name, (_, dim) in zip(self.bias_nodes, self.biases):
                out[name] = self.bias_mask(units, tuple(_shape(nodes[name])), dim)
        return out


def find_experts(gm: torch.fx.GraphModule, first_id: int = 0, canonical: Mapping | None = None) -> list[ExpertSet]:
    """The routed layers of ``gm`` (shapes must be on its nodes), ids from ``first_id``."""
    canonical = canonical or {}
    modules = dict(gm.named_modules())
    found = []
    owned: dict[torch.fx.Node, tuple[list, list]] = {}  # top-k -> (stacked keys, count nodes)
    grouped: dict[torch.fx.Node, list] = {}  # top-k -> its grouped products, in graph order
    for node in gm.graph.nodes:
        name = op_name(node.target) if node.op in ("call_function", "call_method") else ""
        if name in _GROUPED and len(node.args) > 2:
            topk, weight = _nearest_topk(node.args[2]), stacked_weight(node.args[1])
            if topk is not None and weight is not None:
                owned.setdefault(topk, ([], []))[0].append(weight)
                grouped.setdefault(topk, []).append(node)
        elif name in ("histc", "one_hot", "bincount") and node.args:
            topk = _nearest_topk(node.args[0])
            if topk is not None:
                owned.setdefault(topk, ([], []))[1].append(node)
    for node in gm.graph.nodes:  # per-expert biases gathered by the routed expert ids (GPT-OSS)
        if op_name(node.target) == "index" and node.op == "call_function" and len(node.args) > 1 \
                and node.args[1] and isinstance(node.args[1][0], torch.fx.Node):
            topk, weight = _nearest_topk(node.args[1][0]), stacked_weight(node.args[0])
            if topk in grouped and weight is not None:
                owned[topk][0].append(weight)
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and op_name(node.target) == "topk" and node not in owned:
            owned[node] = ([], [])
    for topk, (weights, count_nodes) in owned.items():
        bias_reads: list[torch.fx.Node] = []
        sliced: list[torch.fx.Node] = []
        router, keys = _router(topk.args[0], modules, canonical, bias_reads, sliced)
        if router is None:
            continue  # a top-k over something that is no router
        size = _last_dim(topk.args[0])  # the top-k ranks the experts
        extra = _last_dim(router) - size  # router outputs after them (shared experts' gates)
        if extra < 0 or (extra and not sliced):
            continue
        biases = [(b, _expert_dim(b, size)) for b in bias_reads]
        if any(dim is None for _, dim in biases):
            continue  # an added tensor that is not one value per expert: not a selection bias
        stacked = [canonical.get(w.target, w.target) for w in weights if _shape(w)[:1] == (size,)]
        counts = [n.name for n in count_nodes if size in _ints(n)]
        scores = _scoring(router, topk, size)
        scores += [n for n in _bias_reads(scores, size) if n not in scores]
        marks = [(n.name, -1, 1) for n in scores]
        marks += [(u.name, -1, 1) for u in router.users if extra and u not in scores and op_name(u.target) == "slice"
                  and _last_dim(u) == size]  # the routed experts' logits read again (for their weights)
        sizes = [(n.name, *at) for n in scores for at in [_size_arg(n, size)] if at is not None]
        if not stacked and not biases:  # every expert on every token (Llama 4)
            dense = dense_dispatch(router, topk, size)
            if dense is not None:
                stacked = [canonical.get(w.target, w.target) for w in dense[0]]
                marks += [m for m in dense[1] if m[0] not in {x[0] for x in marks}]
                sizes += dense[2]
        switches, joins, per_expert = ([], [], []) if stacked else _loop_experts(gm, topk, size, modules, canonical)
        if not stacked and not switches:
            continue
        k = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
        if topk in grouped:
            weighted = _weighted_rows(grouped[topk][-1])
        else:
            weighted = [] if stacked else _terms(gm, joins)
        found.append(ExpertSet(first_id + len(found), size, router.name, keys, list(dict.fromkeys(stacked)),
                               int(k), counts, switches, joins, per_expert, topk.name, weighted,
                               biases=[(canonical.get(b.target, b.target), d) for b, d in biases],
                               bias_nodes=[b.name for b, _ in biases], marks=marks, sizes=sizes, router_extra=extra,
                               logit_slices=[n.name for n in router_slices(router)] if extra else [],
                               min_left=max([_k(n) for n in scores if op_name(n.target) == "topk"] + [0])))
        groups = _groups(scores, size)
        if groups > 1:
            found[-1].prunable = False
            found[-1].reason = (f"the router ranks {groups} fixed groups of {size // groups} experts "
                                "(grouped top-k, as in DeepSeek-V3): removing an expert leaves groups of "
                                "unequal size, which the router's [tokens, groups, experts per group] view "
                                "cannot hold, so its experts stay (their neurons can still be pruned)")
    return found


def _loop_experts(gm, topk, size, modules, canonical):
    """Experts written as a loop over modules: ``indices == e`` for every e in 0..E-1,
    each feeding one add into the running sum. Returns (switches, joins, parameter keys)
    or empty lists when the code is not of that form."""
    indices = [u for u in topk.users if u.target is operator.getitem and u.args[1] == 1]
    switch = {}
    for idx in indices:
        for user in idx.users:
            if op_name(user.target) in ("eq", "__eq__") and isinstance(user.args[1], int) and user.args[0] is idx:
                switch.setdefault(user.args[1], user)
    if sorted(switch) != list(range(size)):
        return [], [], []
    upstream = _ancestors(topk) | {topk, *indices}
    joins, per_expert = [], []
    for e in range(size):
        join = _join_of(switch[e])
        if join is None:
            return [], [], []
        term, other = (join.args[1], join.args[0]) if _ancestors(join.args[1]) >= {switch[e]} or \
            join.args[1] is switch[e] or switch[e] in _ancestors(join.args[1]) else (join.args[0], join.args[1])
        if switch[e] not in _ancestors(term):
            return [], [], []
        own = _ancestors(term) - _ancestors(other) - upstream
        if any(switch[j] in own for j in range(size) if j != e):
            return [], [], []
        joins.append((join.name, other.name))
        per_expert.append({canonical.get(f"{n.target}.{k}", f"{n.target}.{k}"): p.shape[0] if p.ndim else 1
                           for n in own | {term} if n.op == "call_module"
                           for k, p in modules[n.target].named_parameters()})
    return [switch[e].name for e in range(size)], joins, per_expert


def _weighted_rows(last: torch.fx.Node) -> list[str]:
    """The product of the last grouped product's rows with the routing weights."""
    node = last
    while len(node.users) == 1:
        (node,) = node.users
        if op_name(node.target) == "mul":
            return [node.name]
        if op_name(node.target) not in _TO_ROUTER:
            break
    return []


def _terms(gm, joins) -> list[str]:
    """Each expert's operand of its join (the other operand is the sum without it)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for join, other in joins:
        a, b = nodes[join].args
        out.append((b if a.name == other else a).name)
    return out


def _join_of(switch: torch.fx.Node):
    """The first add below ``switch`` whose other operand does not depend on it."""
    for node in _descendants(switch):
        if op_name(node.target) in ("add", "__add__", "iadd") and len(node.args) == 2 \
                and all(isinstance(a, torch.fx.Node) for a in node.args):
            inside = [switch in _ancestors(a) or a is switch for a in node.args]
            if inside.count(True) == 1:
                return node
    return None


def _ints(node: torch.fx.Node) -> list:
    return [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, (int, float))]


def removed_experts(graph, plan: Mapping) -> list[tuple[ExpertSet, list[int]]]:
    """The expert sets ``plan`` names, with the experts it removes (checked)."""
    out = []
    for key, units in plan.items():
        s = expert_set(graph, key)
        if s is not None:
            chosen = s.check(units)
            if chosen:
                out.append((s, chosen))
    return out


def expert_set(graph, key):
    """The ExpertSet that plan key ``key`` names, or None when it names another unit."""
    if not isinstance(key, (int, np.integer)) or isinstance(key, bool) or not graph.experts:
        return None
    first = graph.experts[0].id
    if first <= key < first + len(graph.experts):
        return graph.experts[int(key) - first]
    return None


class _MaskRouters(TorchFunctionMode):
    """Adds each router's mask to what ``F.linear`` returns for that router's weight, and
    hands every op that reads a selection bias the bias with its removed experts at -inf."""

    def __init__(self, masks: dict[int, torch.Tensor], biases: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.masks = masks
        self.biases = biases or {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.biases:
            args = tuple(self.biases.get(id(a), a) for a in args)
        out = func(*args, **(kwargs or {}))
        if func in (F.linear, torch._C._nn.linear) and len(args) > 1 and id(args[1]) in self.masks:
            out = out + self.masks[id(args[1])].to(out.dtype)
        return out


def mask_routers(model: torch.nn.Module, graph, plan: Mapping):
    """A context in which ``model`` (the original, or a copy with the same keys) runs with
    the plan's experts masked at their routers: the expert oracle's reference."""
    masks, biases = {}, {}
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    for s, chosen in removed_experts(graph, plan):
        weight = named[s.router_keys[0]]
        masks[id(weight)] = s.router_mask(chosen, device=weight.device)
        for key, dim in s.biases:  # a masked copy; the model's own tensor is never written
            bias = named[key]
            biases[id(bias)] = bias.detach() + s.bias_mask(chosen, tuple(bias.shape), dim, bias.dtype, bias.device)
    return _MaskRouters(masks, biases) if masks else contextlib.nullcontext()


def router_overrides(graph, plan: Mapping) -> dict[str, torch.Tensor]:
    """``{router node name: additive mask}`` of the plan's expert sets (for graph runs)."""
    out = {}
    for s, chosen in removed_experts(graph, plan):
        out.update(s.overrides(chosen, graph.gm))
    return out


__all__ = ["ExpertSet", "find_experts", "removed_experts", "expert_set", "mask_routers", "router_overrides"]
