"""The result of channel analysis: groups of channels that must be pruned together."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx
import numpy as np
import torch.fx
from tabulate import tabulate

from ..errors import PlanError
from .context import AnalysisState, Binding, Space
from .unionfind import ChannelUnion


@dataclass
class Group:
    """Channels that must shrink together: its pruning units are ``0..size-1``.

    Any subset of ``range(size)`` that leaves at least one channel is a valid plan
    (constraints such as grouped convs or shuffles are already folded into the units).
    """

    id: int
    size: int
    prunable: bool
    reason: str
    zero_invariant: bool
    zero_invariance_reason: str
    spaces: list[Space]
    classes: np.ndarray = field(repr=False)  # root id of every unit, in unit order
    bindings: list[Binding] = field(repr=False, default_factory=list)
    _roots: np.ndarray = field(repr=False, default=None)
    _aliases: dict = field(repr=False, default_factory=dict)

    def slices(self, channels: Iterable[int], role: str = "out") -> dict[str, list[tuple[int, list[int]]]]:
        """``{state_dict key: [(dim, [indices])]}`` of the given units.

        ``role="out"``: entries that produce the channels (weight rows, bias, norm
        affine); zeroing them makes the channels zero in a zero-invariant group.
        ``role="in"``: entries that consume them (input columns of the next layers).
        ``role="all"``: both, plus buffers such as BatchNorm running statistics.

        >>> import torch, fxprune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> g = fxprune.analyze(net, torch.randn(2, 4)).groups[1]
        >>> g.slices([0, 5], role="in")
        {'2.weight': [(1, [0, 5])]}
        """
        if role not in ("out", "in", "all"):
            raise ValueError(f"role must be 'out', 'in' or 'all', got {role!r}")
        units = _check_units(self, channels)
        chosen = self.classes[units]
        result: dict[str, list[tuple[int, list[int]]]] = {}
        for b in self.bindings:
            if role != "all" and b.role != role:
                continue
            roots = np.where(b.ids >= 0, self._roots[np.clip(b.ids, 0, None)], -1)
            idx = np.flatnonzero(np.isin(roots, chosen))
            if idx.size:
                for key in self._aliases.get(b.key, [b.key]):
                    result.setdefault(key, []).append((b.dim, idx.tolist()))
        return result

    @property
    def producers(self) -> list[str]:
        return [s.origin for s in self.spaces]

    @property
    def consumers(self) -> list[str]:
        return sorted({f"{b.key}[{b.dim}]" for b in self.bindings if b.role == "in"})


def _check_units(group: Group, channels: Iterable[int]) -> np.ndarray:
    try:
        units = np.unique(np.asarray(list(channels), dtype=np.int64))
    except (TypeError, ValueError) as exc:
        raise PlanError(f"group {group.id}: channels must be integers, got {channels!r}") from exc
    if units.size and (units.min() < 0 or units.max() >= group.size):
        bad = units[(units < 0) | (units >= group.size)].tolist()
        raise PlanError(f"group {group.id} has channels 0..{group.size - 1}; {bad} are out of range")
    return units


class DependencyGraph:
    """Channel groups of a traced model. ``str(graph)`` is a readable table."""

    def __init__(self, gm: torch.fx.GraphModule, groups: list[Group], state: AnalysisState,
                 roots: np.ndarray, example_inputs: tuple):
        self.gm = gm
        self.groups = groups
        self.state = state
        self.roots = roots
        self.example_inputs = example_inputs
        self._group_of_root = np.full(len(roots), -1, dtype=np.int64)
        for g in groups:
            self._group_of_root[g.classes] = g.id

    def group_of_id(self, channel_id: int) -> int:
        """The group that owns a global channel id (internal ids, see ``state``)."""
        return int(self._group_of_root[self.roots[channel_id]])

    def group(self, group_id: int) -> Group:
        if not isinstance(group_id, (int, np.integer)) or not 0 <= group_id < len(self.groups):
            raise PlanError(f"no group {group_id!r}: this graph has groups 0..{len(self.groups) - 1}")
        return self.groups[group_id]

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def rows(self) -> list[dict]:
        """One dict per group: id, channels, prunable, zero-invariant, producers, consumers, reason."""
        return [
            {
                "id": g.id, "channels": g.size, "prunable": g.prunable, "zero_invariant": g.zero_invariant,
                "producers": g.producers, "consumers": g.consumers,
                "reason": g.reason or ("" if g.zero_invariant else g.zero_invariance_reason),
            }
            for g in self.groups
        ]

    def __str__(self) -> str:
        table = []
        for row in self.rows():
            producers = ", ".join(row["producers"][:3]) + (f" +{len(row['producers']) - 3}" if len(row["producers"]) > 3 else "")
            table.append([row["id"], row["channels"], "yes" if row["prunable"] else "frozen",
                          "yes" if row["zero_invariant"] else "no", producers, len(row["consumers"]),
                          _short(row["reason"])])
        n_prunable = len(self.prunable_groups)
        head = f"{len(self.groups)} channel groups, {n_prunable} prunable, {len(self.groups) - n_prunable} frozen"
        return head + "\n" + tabulate(
            table, headers=["group", "channels", "prunable", "zero-inv", "producers", "consumers", "reason"])

    def __repr__(self) -> str:
        return f"<DependencyGraph: {len(self.groups)} groups, {len(self.prunable_groups)} prunable>"

    def to_networkx(self) -> nx.MultiDiGraph:
        """Groups and parameter tensors as nodes; an edge says which dim of a tensor a group indexes."""
        g = nx.MultiDiGraph()
        for grp in self.groups:
            g.add_node(f"group:{grp.id}", kind="group", channels=grp.size, prunable=grp.prunable,
                       zero_invariant=grp.zero_invariant, reason=grp.reason)
            for b in grp.bindings:
                g.add_node(b.key, kind="tensor")
                g.add_edge(f"group:{grp.id}", b.key, dim=b.dim, role=b.role)
        return g


def _short(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_groups(state: AnalysisState, example_inputs: tuple) -> DependencyGraph:
    """Connected components of spaces (linked by shared channels) become the groups."""
    roots = state.uf.roots()
    n = len(roots)
    # Spaces sharing any channel belong to one group: union each space's classes.
    spaces_uf = ChannelUnion()
    spaces_uf.new(n)
    for s in state.spaces:
        if s.size > 1:
            r = roots[s.start:s.start + s.size]
            spaces_uf.union(np.full(s.size, r[0]), r)
    component = spaces_uf.roots()[roots] if n else roots

    frozen_reason = _first_reason_per_root(state.frozen, roots)
    zi_reason = _first_reason_per_root(state.zi_breaks, roots)

    by_component: dict[int, list[Space]] = {}
    for s in state.spaces:
        if s.size:
            by_component.setdefault(int(component[s.start]), []).append(s)
    bindings_by_component: dict[int, list[Binding]] = {}
    for b in state.bindings.values():
        tracked = b.ids[b.ids >= 0]
        for c in np.unique(component[tracked]):
            bindings_by_component.setdefault(int(c), []).append(b)

    groups: list[Group] = []
    for comp in sorted(by_component):
        member_ids = np.concatenate([np.arange(s.start, s.start + s.size) for s in by_component[comp]])
        classes = np.unique(roots[member_ids])
        frozen = [frozen_reason[c] for c in classes if c in frozen_reason]
        broken = [zi_reason[c] for c in classes if c in zi_reason]
        reason = min(frozen, key=lambda r: r[0])[1] if frozen else ""
        if not frozen and classes.size < 2:
            reason = "only one channel: a group keeps at least one"
        groups.append(Group(
            id=len(groups), size=int(classes.size), prunable=not reason, reason=reason,
            zero_invariant=not broken, zero_invariance_reason=min(broken, key=lambda r: r[0])[1] if broken else "",
            spaces=by_component[comp], classes=classes, bindings=bindings_by_component.get(comp, []),
            _roots=roots, _aliases=state.aliases,
        ))
    return DependencyGraph(state.gm, groups, state, roots, example_inputs)


def _first_reason_per_root(records: list[tuple[np.ndarray, str]], roots: np.ndarray) -> dict[int, tuple[int, str]]:
    """For every class root, the earliest recorded (order, reason) touching it."""
    out: dict[int, tuple[int, str]] = {}
    for order, (ids, reason) in enumerate(records):
        for r in np.unique(roots[ids]).tolist():
            out.setdefault(r, (order, reason))
    return out
