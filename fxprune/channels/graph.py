"""The result of channel analysis: groups of channels that must be pruned together."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import networkx as nx
import numpy as np
import torch.fx
from tabulate import tabulate

from ..capture.inputs import ExampleInputs
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
    # which slices, zeroed in the original, equal removing units: "out" (producers, a
    # zero-invariant group), "in" (consumers, e.g. query slots) or None (no such masking)
    oracle_role: str | None = None
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
        return [s.origin for s in self.spaces if s.produces]

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
                 roots: np.ndarray, example_inputs: ExampleInputs, capture: str = "fx"):
        self.gm = gm
        self.model = None  # the user's model (a reference, never modified); emit="module" copies it
        self.capture = capture  # the front end that captured gm: "fx", "export" or "parts"
        # the model's own inputs; under "parts" example_inputs are the parts' tensors (what gm takes)
        self.model_inputs = example_inputs
        self.parts = None  # under "parts": the submodule calls gm holds (capture.parts.PartCall)
        self.capture_notes: list[str] = []  # under "auto" -> "parts": why fx and export could not
        self.groups = groups
        self.state = state
        self.roots = roots
        self.example_inputs = example_inputs
        self.capture_kwargs: dict = {}  # keyword inputs the capture added ({"use_cache": False})
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
    def branches(self) -> list:
        """Residual branches (depth units, ``fxprune.channels.branches``), found on first use;
        their ids follow the last group id, so one plan can name groups and branches."""
        if getattr(self, "_branches", None) is None:
            from .branches import find_branches  # branches reads graphs; graph must not import it first

            self._branches = find_branches(self.gm, len(self.groups), self.state.canonical)
        return self._branches

    @property
    def experts(self) -> list:
        """Expert sets of routed layers (``fxprune.channels.experts``), found on first use;
        their ids follow the last branch id."""
        if getattr(self, "_experts", None) is None:
            from .experts import find_experts  # experts reads graphs; graph must not import it first

            self._experts = find_experts(self.gm, len(self.groups) + len(self.branches), self.state.canonical)
        return self._experts

    @property
    def layers(self) -> list:
        """Whole layers (depth units, ``fxprune.channels.layers``), found on first use; their
        ids follow the last expert set's."""
        if getattr(self, "_layers", None) is None:
            from .layers import find_layers  # layers reads graphs; graph must not import it first

            first = len(self.groups) + len(self.branches) + len(self.experts)
            self._layers = find_layers(self.gm, self.model, first, self.state.canonical)
        return self._layers

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
        head = (f"{len(self.groups)} channel groups, {n_prunable} prunable, {len(self.groups) - n_prunable} frozen "
                f"(captured with {self.capture})")
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


def build_groups(state: AnalysisState, example_inputs: ExampleInputs, capture: str = "fx") -> DependencyGraph:
    """Connected components of spaces (linked by shared channels) become the groups.

    Every channel id belongs to exactly one space (spaces are consecutive id ranges),
    so all of this is a handful of vectorised passes over the ids.
    """
    roots = state.uf.roots()
    spaces = [s for s in state.spaces if s.size]
    sizes = np.array([s.size for s in spaces], dtype=np.int64)
    space_of = np.repeat(np.arange(len(spaces)), sizes)
    # Spaces sharing a channel are one group: link each id's space to its root's space.
    linked = ChannelUnion()
    linked.new(len(spaces))
    linked.union(space_of, space_of[roots])
    comp_of_space = linked.roots() if len(spaces) else np.zeros(0, dtype=np.int64)
    comp_of_id = comp_of_space[space_of]

    first_frozen = _first_record_per_root(state.frozen, roots)
    first_broken = _first_record_per_root(state.zi_breaks, roots)
    # a class is named by its root, the one id that is its own root: no sort of all ids
    class_roots = np.flatnonzero(roots == np.arange(len(roots)))
    comp_of_class = comp_of_id[class_roots]
    order = np.argsort(comp_of_class, kind="stable")  # stable: each group's roots stay ascending
    cuts = np.flatnonzero(np.diff(comp_of_class[order])) + 1
    classes_by_comp = {int(comp_of_class[part[0]]): class_roots[part] for part in np.split(order, cuts)
                       if len(part)}
    spaces_by_comp: dict[int, list[Space]] = {}
    for index, space in enumerate(spaces):
        spaces_by_comp.setdefault(int(comp_of_space[index]), []).append(space)
    bindings = list(state.bindings.values())
    binding_ids = [b.ids[b.ids >= 0] for b in bindings]
    which = np.repeat(np.arange(len(bindings)), [len(t) for t in binding_ids])
    pairs = _split_by(comp_of_id[np.concatenate(binding_ids)] if bindings else np.zeros(0, np.int64), which)

    breaks_of: dict[int, set[int]] = {}  # component -> indices of the zi_breaks touching it
    for index, (ids, _) in enumerate(state.zi_breaks):
        for comp in np.unique(comp_of_id[ids]).tolist():
            breaks_of.setdefault(comp, set()).add(index)
    groups: list[Group] = []
    for comp in sorted(spaces_by_comp):
        if all(s.dropped for s in spaces_by_comp[comp]):
            continue  # parameter dims that carry no channels
        classes = classes_by_comp[comp]
        reason = _earliest(first_frozen, classes, state.frozen)
        if not reason and classes.size < 2:
            reason = "only one channel: a group keeps at least one"
        broken = _earliest(first_broken, classes, state.zi_breaks)
        oracle_role = "out" if not broken else ("in" if breaks_of.get(comp, {-1}) <= state.consumer_oracle else None)
        groups.append(Group(
            id=len(groups), size=int(classes.size), prunable=not reason, reason=reason,
            zero_invariant=not broken, zero_invariance_reason=broken, spaces=spaces_by_comp[comp],
            classes=classes, bindings=[bindings[i] for i in pairs.get(comp, ())], oracle_role=oracle_role,
            _roots=roots, _aliases=state.aliases,
        ))
    return DependencyGraph(state.gm, groups, state, roots, example_inputs, capture)


_NEVER = np.iinfo(np.int64).max


def _first_record_per_root(records: list[tuple[np.ndarray, str]], roots: np.ndarray) -> np.ndarray:
    """For every class root, the index of the earliest record touching it (or _NEVER)."""
    first = np.full(len(roots), _NEVER, dtype=np.int64)
    if records:
        ids = np.concatenate([ids for ids, _ in records])
        order = np.repeat(np.arange(len(records)), [len(ids) for ids, _ in records])
        np.minimum.at(first, roots[ids], order)
    return first


def _earliest(first: np.ndarray, classes: np.ndarray, records: list[tuple[np.ndarray, str]]) -> str:
    index = first[classes].min() if classes.size else _NEVER
    return records[index][1] if index != _NEVER else ""


def _split_by(keys: np.ndarray, values: np.ndarray) -> dict[int, np.ndarray]:
    """{key: sorted unique values paired with it}."""
    if not len(keys):
        return {}
    span = int(values.max()) + 1  # one int64 key per pair: a 1-D unique is fast
    combined = keys.astype(np.int64) * span + values
    runs = np.flatnonzero(np.diff(combined)) + 1  # consecutive repeats (a binding's ids in one group)
    combined = np.unique(combined[np.concatenate(([0], runs))] if len(combined) else combined)
    keys, values = combined // span, combined % span
    cuts = np.flatnonzero(np.diff(keys)) + 1
    return {int(k[0]): v for k, v in zip(np.split(keys, cuts), np.split(values, cuts))}
