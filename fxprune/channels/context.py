"""Analysis state and the context a rule sees.

A rule receives a :class:`RuleContext` for one node. Through it the rule reads its
inputs' channel maps, opens new channel spaces, unifies channels that must be pruned
together, binds parameter slices to channels, freezes what it cannot handle (with a
reason) and registers rewrites that the prune pass runs on the new graph.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.fx
from torch.fx.passes.shape_prop import TensorMetadata

from .registry import describe_target, op_name
from .unionfind import ChannelUnion
from .values import FIXED, DimMap, TensorChannels, flatten_values

@dataclass
class Space:
    """A run of consecutive channel ids opened by one producer (a layer's output dim)."""

    start: int
    size: int
    origin: str  # e.g. "layer1.0.conv1.weight[0]" or "input 'x' dim 1"
    node: str
    dropped: bool = False  # a parameter dim that carries no channels (a kernel dim, a vocabulary)
    produces: bool = True  # False for a get_attr weight's input dim: it consumes channels


@dataclass
class Binding:
    """Parameter ``key`` along ``dim`` is indexed by channel ids ``ids``."""

    key: str
    dim: int
    ids: np.ndarray
    role: str
    node: str = ""  # the graph node whose rule bound it (the first one, for shared tensors)


@dataclass
class AnalysisState:
    gm: torch.fx.GraphModule
    uf: ChannelUnion = field(default_factory=ChannelUnion)
    spaces: list[Space] = field(default_factory=list)
    bindings: dict[tuple[str, int], Binding] = field(default_factory=dict)
    frozen: list[tuple[np.ndarray, str]] = field(default_factory=list)
    zi_breaks: list[tuple[np.ndarray, str]] = field(default_factory=list)
    # indices into zi_breaks after which removing the channels still equals zeroing their
    # consumers' input slices (query slots: a slot's only consumer is the output projection)
    consumer_oracle: set[int] = field(default_factory=set)
    rewrites: list[tuple[str, Callable]] = field(default_factory=list)
    nonempty: list[tuple[np.ndarray, str]] = field(default_factory=list)  # must keep >= 1 channel
    env: dict[torch.fx.Node, object] = field(default_factory=dict)
    canonical: dict[str, str] = field(default_factory=dict)  # state_dict key -> first alias
    aliases: dict[str, list[str]] = field(default_factory=dict)  # canonical -> all keys
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    spaces_at: dict[tuple[str, str], list[Space]] = field(default_factory=dict)  # (node, origin) -> spaces
    head_reshapes: dict[str, set[int]] = field(default_factory=dict)  # reshape -> head_dim sizes (heads.py)
    attention_units: str = "heads"  # analyze()'s choice: "heads", "query_slots" or "head_dim"
    kv_repeats: dict[str, int] = field(default_factory=dict)  # repeat_kv expand -> its slot dim (query_slots)
    kv_merges: dict[str, int] = field(default_factory=dict)  # repeat_kv reshape -> its input's kv head dim

    def __post_init__(self) -> None:
        self.modules = dict(self.gm.named_modules())
        # Tied weights share one tensor under several state_dict keys; bind them once.
        seen: dict[int, str] = {}
        named = list(self.gm.named_parameters(remove_duplicate=False)) + list(
            self.gm.named_buffers(remove_duplicate=False)
        )
        for key, tensor in named:
            first = seen.setdefault(id(tensor), key)
            self.canonical[key] = first
            self.aliases.setdefault(first, []).append(key)

    def new_space(self, size: int, origin: str, node: str) -> np.ndarray:
        ids = self.uf.new(size)
        self.nonempty.append((ids, origin))
        space = Space(int(ids[0]) if size else len(self.uf), size, origin, node)
        self.spaces.append(space)
        self.spaces_at.setdefault((node, origin), []).append(space)
        return ids


class RuleContext:
    """What a rule sees of one node. See :func:`fxprune.register_rule`."""

    def __init__(self, state: AnalysisState, node: torch.fx.Node):
        self.state = state
        self.node = node
        self.gm = state.gm

    # ---- reading the node -------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.state.modules[self.node.target]

    @property
    def target_name(self) -> str:
        return describe_target(self.node, self.state.modules)

    def where(self) -> str:
        """'node `name` (target)' — used in every reason a rule records."""
        return f"node '{self.node.name}' ({self.target_name})"

    def arg(self, index: int, name: str | None = None, default=None):
        """The raw argument (a Node or a constant) by position or keyword."""
        if index is not None and index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def value(self, raw):
        """The analysis value of a raw argument (containers are mapped element-wise)."""
        if isinstance(raw, torch.fx.Node):
            return self.state.env.get(raw)
        if isinstance(raw, (tuple, list)):
            return type(raw)(self.value(r) for r in raw)
        if isinstance(raw, dict):
            return {k: self.value(v) for k, v in raw.items()}
        return raw

    def tensor(self, index: int = 0, name: str | None = None) -> TensorChannels | None:
        v = self.value(self.arg(index, name))
        return v if isinstance(v, TensorChannels) else None

    def inputs(self) -> list:
        """Every analysis value among the node's args and kwargs (flattened)."""
        return flatten_values(self.value(list(self.node.args))) + flatten_values(
            self.value(dict(self.node.kwargs))
        )

    def out_shape(self) -> tuple[int, ...] | None:
        meta = self.node.meta.get("tensor_meta")
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    def out(self, dims: dict[int, DimMap] | None = None) -> TensorChannels:
        """A TensorChannels for this node's (tensor) output with the given maps."""
        shape = self.out_shape()
        if shape is None:
            raise RuntimeError(f"{self.where()}: output is not a tensor")
        return TensorChannels(shape, {d: m for d, m in (dims or {}).items() if m is not None})

    def param_key(self, name: str) -> str:
        prefix = f"{self.node.target}." if self.node.op == "call_module" and self.node.target else ""
        return prefix + name

    def attr_key(self, raw) -> str | None:
        """The state_dict key of a parameter or buffer argument read with ``get_attr``."""
        if isinstance(raw, torch.fx.Node) and raw.op == "get_attr":
            return self.state.canonical.get(raw.target, raw.target)
        return None

    # ---- parameters read with get_attr (functional and ATen forms) -------------------
    def set_role(self, raw, dim: int, role: str) -> None:
        """A ``get_attr`` parameter's dim ``dim`` consumes channels (``"in"``) or is a
        statistic (``"buffer"``) rather than producing them (get_attr binds ``"out"``)."""
        raw = self._piece_of(raw, dim)
        binding = self.state.bindings.get((self.attr_key(raw), dim))
        if binding is not None:
            binding.role = role
            if role != "out":
                for space in self._spaces_of(raw, dim):
                    space.produces = False

    def adopt(self, raw, dim: int, dim_map: DimMap | None, role: str) -> DimMap | None:
        """Parameter ``raw`` (read by get_attr) has dim ``dim`` indexed by ``dim_map``'s channels.

        A parameter read only here is bound straight to those channels, as a module's own
        parameter is, and the space get_attr opened for that dim is dropped: a batch norm
        after a concat, or a layer consuming one, must not link the producers it meets
        into one group. A parameter read elsewhere too keeps its space, tied to the map.
        Returns the channels of the result."""
        key = self.attr_key(raw)
        binding = self.state.bindings.get((key, dim))
        param = self.value(raw)
        own = (binding is not None and binding.node == raw.name and len(raw.users) == 1
               and dim_map is not None and len(dim_map) == len(binding.ids))
        if not own:
            merged = self.unify(dim_map, param.get(dim) if isinstance(param, TensorChannels) else None,
                                " (parameter)")
            self.set_role(raw, dim, role)
            return merged
        binding.ids, binding.role = dim_map.ids.copy(), role
        for space in self._spaces_of(raw, dim):
            space.dropped = True
        self.state.env[raw] = param.with_dims({**param.dims, dim: dim_map})  # what pruning predicts
        return dim_map

    def _piece_of(self, raw, dim: int):
        """The get_attr parameter that ``raw`` is a piece of, when it was cut along another
        dim than ``dim`` (a fused q/k/v weight's ``w.chunk(3)[0]``): that dim is the
        parameter's own. Anything else is returned as it is."""
        if not (isinstance(raw, torch.fx.Node) and raw.target is operator.getitem):
            return raw
        cut = raw.args[0]
        if not (isinstance(cut, torch.fx.Node) and cut.op in ("call_method", "call_function")
                and op_name(cut.target) in _CUTS and cut.args and self.attr_key(cut.args[0])):
            return raw
        meta = cut.args[0].meta.get("tensor_meta")
        cut_dim = cut.kwargs.get("dim", cut.args[2] if len(cut.args) > 2 else 0)
        if not hasattr(meta, "shape") or not isinstance(cut_dim, int):
            return raw
        return cut.args[0] if cut_dim % len(meta.shape) != dim else raw

    def _spaces_of(self, raw, dim: int) -> list[Space]:
        """The space(s) that get_attr node ``raw`` opened for its dim ``dim``."""
        return self.state.spaces_at.get((raw.name, f"{raw.target}[{dim}]"), [])

    def not_channels(self, raw, dims) -> None:
        """Dims of a ``get_attr`` parameter that carry no channels (a conv kernel's spatial
        dims, an embedding's vocabulary): their spaces leave the group list and nothing
        binds them, so no plan can slice them."""
        key = self.attr_key(raw)
        for dim in dims:
            binding = self.state.bindings.get((key, dim))
            if binding is None or binding.node != raw.name:
                continue  # bound by another use too: leave it to the groups
            del self.state.bindings[(key, dim)]
            for space in self._spaces_of(raw, dim):
                space.dropped = True

    # ---- channel bookkeeping --------------------------------------------------------
    def new_space(self, size: int, origin: str) -> np.ndarray:
        return self.state.new_space(size, origin, self.node.name)

    def freeze(self, ids, reason: str) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[ids >= 0]
        if ids.size:
            self.state.frozen.append((ids, reason))

    def freeze_value(self, value, reason: str) -> None:
        for leaf in flatten_values(value):
            self.freeze(leaf.all_ids() if isinstance(leaf, TensorChannels) else leaf.ids, reason)

    def break_zi(self, dim_map: DimMap | None, reason: str, only_non_zi: bool = True,
                 consumers_equal_removal: bool = False) -> None:
        """Record that pruning these channels changes the function (not zero-invariant).

        ``consumers_equal_removal``: removing them still equals zeroing the input slices of
        the layers that consume them (``Group.oracle_role == "in"``), as for query slots."""
        if dim_map is None:
            return
        ids = dim_map.ids[~dim_map.zi] if only_non_zi else dim_map.ids
        ids = ids[ids >= 0]
        if ids.size:
            if consumers_equal_removal:
                self.state.consumer_oracle.add(len(self.state.zi_breaks))
            self.state.zi_breaks.append((ids, f"{reason} at {self.where()}"))

    def unify(self, a: DimMap | None, b: DimMap | None, why: str = "") -> DimMap | None:
        """Tie a[i] to b[i]. A tracked entry facing an untracked one is frozen."""
        if a is None and b is None:
            return None
        if a is None or b is None:
            tracked = a if a is not None else b
            self.freeze(tracked.ids, f"meets a dim that carries no channels{why} at {self.where()}")
            return tracked
        if len(a) != len(b):
            raise RuntimeError(f"{self.where()}: cannot align dims of sizes {len(a)} and {len(b)}")
        both = (a.ids >= 0) & (b.ids >= 0)
        self.state.uf.union(a.ids[both], b.ids[both])
        lone = (a.ids >= 0) ^ (b.ids >= 0)
        if lone.any():
            self.freeze(np.where(a.ids >= 0, a.ids, b.ids)[lone], f"channels meet fixed positions at {self.where()}")
        return DimMap(np.where(a.ids >= 0, a.ids, b.ids), a.zi & b.zi)

    def unify_all(self, maps: list[DimMap | None], why: str = "") -> DimMap | None:
        """Tie several aligned maps (element-wise operands, concat inputs, batch dims)."""
        tracked = [m for m in maps if m is not None]
        if not tracked:
            return None
        merged = tracked[0]
        for m in maps:
            if m is not tracked[0]:
                merged = self.unify(merged, m, why)
        return merged

    def tie_blocks(self, dim_map: DimMap, blocks: int, across: bool) -> DimMap:
        """Split a map into ``blocks`` equal blocks and tie them.

        ``across=True`` ties position p of every block (a shuffle or a split into
        (blocks, k)); the result is the k-long map of block 0. ``across=False`` ties
        every position inside a block (a grouped conv drops whole groups); the result
        is the ``blocks``-long map of each block's first entry.
        """
        grid = dim_map.ids.reshape(blocks, -1)
        zi = dim_map.zi.reshape(blocks, -1)
        if not across:
            grid, zi = grid.T, zi.T
        rows = grid.shape[0]
        if rows > 1:
            self.unify(DimMap.of(np.tile(grid[0], rows - 1)), DimMap.of(grid[1:].ravel()))
        return DimMap(grid[0].copy(), zi.all(axis=0))

    def bind(self, key: str, dim: int, dim_map: DimMap | np.ndarray | None, role: str) -> None:
        """Parameter/buffer ``key`` (a state_dict key) is indexed along ``dim`` by channels."""
        if dim_map is None:
            return
        ids = dim_map.ids if isinstance(dim_map, DimMap) else np.asarray(dim_map, dtype=np.int64)
        key = self.state.canonical.get(key, key)
        slot = (key, dim)
        existing = self.state.bindings.get(slot)
        if existing is None:
            self.state.bindings[slot] = Binding(key, dim, ids.copy(), role, self.node.name)
            return
        # The same tensor bound twice (module called twice, tied weights): one channel.
        self.unify(DimMap.of(existing.ids), DimMap.of(ids), " (shared parameter)")
        if role == "out":
            existing.role = "out"

    def require_nonempty(self, dim_map: DimMap | None, what: str) -> None:
        """PyTorch layers cannot have zero width: a plan must leave one of these channels."""
        if dim_map is not None and (dim_map.ids >= 0).any() and not (dim_map.ids < 0).any():
            self.state.nonempty.append((dim_map.ids, f"{what} at {self.where()}"))

    def on_prune(self, rewrite: Callable) -> None:
        """Run ``rewrite(pctx, node)`` on the pruned graph (module attrs, constants)."""
        self.state.rewrites.append((self.node.name, rewrite))


_CUTS = {"chunk", "split", "split_with_sizes", "tensor_split"}  # pieces along one dim


def fixed_map(size: int) -> DimMap:
    return DimMap.of(np.full(size, FIXED, dtype=np.int64))


__all__ = ["AnalysisState", "RuleContext", "Space", "Binding", "fixed_map"]
