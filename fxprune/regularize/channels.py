"""Channels as the regularisers see them: the parameter slices one channel owns.

A channel of a prunable group owns slices of several parameters (a conv's output
rows, the BN affine entries of the same channel, ...). ``ChannelSlices`` is that
list; ``ChannelTable`` compiles many of them into per-(parameter, dim) index
arrays so that norms and in-place rescaling cost a few tensor ops per parameter
instead of a Python loop per channel.

Under FSDP2 a parameter is found again where it lives (``owner``: the module and
attribute name, recorded by ``channel_slices_from_graph``) each time it is used, so
channels built before ``fully_shard`` act on the sharded parameters; norms are computed
on each rank's piece and summed over the ranks (``fxprune.sharding``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.utils import parametrize

from fxprune.errors import SpecError
from fxprune.select.score import unit_entries
from fxprune.sharding import full, is_sharded, local, replaced_by_fully_shard, shard_offsets, sum_over_shards


class ParamSlice:
    """Entries ``index`` along dimension ``dim`` of a parameter; ``owner`` (optional) is
    ``(module, attribute name)``, where the parameter lives. ``param`` is the parameter
    as the model holds it now: with an owner it is looked up there each time (and the
    tensor given at construction is not kept, so the one ``fully_shard`` replaces can be
    freed). Unpacks as ``param, dim, index``.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> s = ChannelSlices([(lin.weight, 0, [1], (lin, "weight"))]).slices[0]
        >>> s.param is lin.weight, s.index
        (True, tensor([1]))
    """

    __slots__ = ("_param", "dim", "index", "owner")

    def __init__(self, param: torch.Tensor, dim: int, index: torch.Tensor,
                 owner: tuple[torch.nn.Module, str] | None = None):
        self._param = None if owner is not None else param
        self.dim, self.index, self.owner = dim, index, owner

    @property
    def param(self) -> torch.Tensor:
        return current_param(self._param, self.owner)

    def __iter__(self) -> Iterator:
        return iter((self.param, self.dim, self.index))

    def __repr__(self) -> str:
        return f"ParamSlice(shape={tuple(self.param.shape)}, dim={self.dim}, index={self.index.tolist()})"


def current_param(param: torch.Tensor, owner: tuple[torch.nn.Module, str] | None) -> torch.Tensor:
    """The parameter ``owner`` holds now (``fully_shard`` replaces parameters by sharded
    DTensors), or ``param`` when there is no owner; a SpecError when ``param`` was
    replaced by ``fully_shard`` and there is no owner to find the new one.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> current_param(lin.weight, None) is lin.weight
        True
    """
    if owner is not None:
        module, name = owner
        if name not in module._parameters and parametrize.is_parametrized(module, name):
            return module.parametrizations[name].original  # factorize moved it there
        return module._parameters[name]  # not getattr: a parametrized module computes `weight`
    if replaced_by_fully_shard(param):
        raise SpecError(f"channels: a parameter of shape {tuple(param.shape)} was replaced by "
                        "fully_shard after these channels were built, so updating it would change "
                        "nothing; build the channels from the graph (channel_slices_from_graph "
                        "records where each parameter lives), or by hand after fully_shard")
    return param


class ChannelSlices:
    """The parameter slices one channel owns, across all the layers it touches.

    Built from ``(param, dim, indices)`` triples; ``indices`` may be a list or a
    LongTensor. A fourth item ``(module, name)`` says where the parameter lives, so that
    it is found again after ``fully_shard`` replaces it (``channel_slices_from_graph``
    records it). ``label`` is free-form (``channel_slices_from_graph`` stores
    ``(group_id, channel)``).

    Example:
        >>> conv, bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)
        >>> ch = ChannelSlices([(conv.weight, 0, [5]), (conv.bias, 0, [5]),
        ...                     (bn.weight, 0, [5]), (bn.bias, 0, [5])])
        >>> ch.numel()
        30
    """

    __slots__ = ("slices", "label")

    def __init__(self, slices: Iterable[Sequence], label: object = None):
        out = []
        for item in slices:
            if len(item) not in (3, 4):
                raise SpecError(f"channels: expected (param, dim, indices) triples, got {item!r}")
            param, dim, index, owner = (*item, None)[:4]
            if not isinstance(param, torch.Tensor):
                raise SpecError("channels: expected a parameter tensor, got "
                                f"{type(param).__name__}")
            dim = int(dim)
            if not -param.dim() <= dim < max(param.dim(), 1):
                raise SpecError(f"channels: dim {dim} out of range for a parameter of shape "
                                f"{tuple(param.shape)}")
            dim %= max(param.dim(), 1)
            if not isinstance(index, torch.Tensor):  # range-check in numpy: ~5x faster than
                index = np.asarray(index, dtype=np.int64).reshape(-1)  # torch on tiny arrays
                bad = index.size and (index.min() < 0 or index.max() >= param.shape[dim])
                index = torch.from_numpy(index.copy()).to(param.device)  # not the caller's array
            else:
                index = index.to(dtype=torch.long, device=param.device).reshape(-1)
                bad = index.numel() and (index.min() < 0 or index.max() >= param.shape[dim])
            if bad:
                raise SpecError(f"channels: index out of range for dim {dim} of a parameter "
                                f"of shape {tuple(param.shape)}")
            out.append(ParamSlice(param, dim, index, owner))
        self.slices: tuple[ParamSlice, ...] = tuple(out)
        self.label = label

    def __iter__(self) -> Iterator[ParamSlice]:
        return iter(self.slices)

    def __len__(self) -> int:
        return len(self.slices)

    def __repr__(self) -> str:
        parts = ", ".join(f"{tuple(s.param.shape)}[dim {s.dim}: {s.index.tolist()}]"
                          for s in self.slices)
        return f"ChannelSlices({parts}, label={self.label!r})"

    def numel(self) -> int:
        """Number of scalar entries the channel owns.

        Example:
            >>> ChannelSlices([(torch.zeros(4, 3), 0, [1, 2])]).numel()
            6
        """
        return sum(_slice_numel(s) for s in self.slices)

    def values(self) -> torch.Tensor:
        """All the channel's entries, flattened and concatenated (differentiable).

        Example:
            >>> ChannelSlices([(torch.arange(6.).view(3, 2), 0, [2])]).values()
            tensor([4., 5.])
        """
        return torch.cat([full(s.param).index_select(s.dim, s.index).reshape(-1)
                          for s in self.slices])


def _slice_numel(s: ParamSlice) -> int:
    per_index = s.param.numel() // max(s.param.shape[s.dim], 1) if s.param.dim() else 1
    return per_index * s.index.numel()


class _Key(NamedTuple):
    param: torch.Tensor | None  # as given when there is no owner to look it up in
    dim: int
    index: torch.Tensor  # positions along dim, in the whole parameter
    channel: torch.Tensor  # channel id of each position
    owner: tuple[torch.nn.Module, str] | None


class _Local(NamedTuple):
    """One key on this rank: the piece of the parameter it holds and the positions in it."""

    param: torch.Tensor  # the parameter now (a DTensor under FSDP2)
    piece: torch.Tensor  # this rank's piece (a view of it)
    index: torch.Tensor
    channel: torch.Tensor


class ChannelTable:
    """Many channels compiled for vectorised norms and in-place rescaling.

    Channels must not share entries (the channels of analysis groups never do);
    an overlap raises SpecError, since rescaling shared entries twice would be
    wrong. Parameters sharded by FSDP2 are read and rescaled piece by piece on each
    rank; norms are summed over the ranks, so every rank gets the whole channel's norm.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([[3., 4.], [0., 1.]]))
        >>> table = ChannelTable([ChannelSlices([(w, 0, [0])]), ChannelSlices([(w, 0, [1])])])
        >>> table.norms().detach()
        tensor([5., 1.])
    """

    def __init__(self, channels: Iterable[ChannelSlices]):
        self.channels: list[ChannelSlices] = list(channels)
        if not self.channels:
            raise SpecError("channels: expected at least one ChannelSlices")
        for ch in self.channels:
            if not isinstance(ch, ChannelSlices):
                raise SpecError(f"channels: expected ChannelSlices, got {type(ch).__name__}")
        grouped: dict[tuple[int, int], list] = {}
        for c, ch in enumerate(self.channels):
            for s in ch:
                entry = grouped.setdefault((id(s.param), s.dim), [s._param, s.owner, [], []])
                entry[2].append(s.index)
                entry[3].append(torch.full_like(s.index, c))
        self.keys = [_Key(param, dim, torch.cat(idx), torch.cat(chan), owner)
                     for (_, dim), (param, owner, idx, chan) in grouped.items()]
        params = self.params
        self.device = params[0].device
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) \
            else torch.float32
        self.numel = torch.tensor([float(ch.numel()) for ch in self.channels],
                                  dtype=self.dtype, device=self.device)
        self._pieces: dict[int, tuple] = {}
        self._check_disjoint(params)

    def __len__(self) -> int:
        return len(self.channels)

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters the channels live in, as the model holds them now (the sharded
        DTensors after ``fully_shard``), each once.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(2, 2))
            >>> ChannelTable([ChannelSlices([(w, 0, [1])])]).params[0] is w
            True
        """
        return list({id(p): p for p in map(self.param_of, self.keys)}.values())

    def param_of(self, key: _Key) -> torch.Tensor:
        """The parameter of one of ``keys`` as the model holds it now.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(2, 2))
            >>> table = ChannelTable([ChannelSlices([(w, 0, [1])])])
            >>> table.param_of(table.keys[0]) is w
            True
        """
        return current_param(key.param, key.owner)

    def _local_keys(self) -> list[_Local]:
        """Every key as this rank holds it; recomputed only when a parameter was replaced."""
        out = []
        for i, k in enumerate(self.keys):
            param = self.param_of(k)
            cached = self._pieces.get(i)
            if cached is None or cached[0] is not param:
                index, channel = k.index, k.channel.to(self.device)
                if is_sharded(param):  # keep the positions this rank holds, made local
                    start, piece = shard_offsets(param)[k.dim], local(param)
                    mine = (index >= start) & (index < start + piece.shape[k.dim])
                    index, channel = index[mine] - start, channel[mine]
                cached = self._pieces[i] = (param, index, channel)
            param, index, channel = cached
            out.append(_Local(param, local(param), index, channel))
        return out

    def _check_disjoint(self, params: list[torch.Tensor]) -> None:
        for param in params:
            count = torch.zeros(param.shape, dtype=torch.int16, device=param.device)
            for k in self.keys:
                if self.param_of(k) is param:
                    ones = torch.ones_like(count.index_select(k.dim, k.index))
                    count.index_add_(k.dim, k.index, ones)
            if count.numel() and int(count.max()) > 1:
                raise SpecError("channels: two channels (or one channel twice) own the same "
                                f"entries of a parameter of shape {tuple(param.shape)}")

    def sq_norms(self) -> torch.Tensor:
        """Squared L2 norm of every channel, shape ``[C]`` (differentiable); under FSDP2 the
        sum over the ranks of the pieces each holds.

        Example:
            >>> w = torch.nn.Parameter(torch.tensor([[3., 4.]]))
            >>> ChannelTable([ChannelSlices([(w, 0, [0])])]).sq_norms()
            tensor([25.], grad_fn=<IndexAddBackward0>)
        """
        whole = torch.zeros(len(self.channels), dtype=self.dtype, device=self.device)
        pieces, sharded = torch.zeros_like(whole), []
        for k, loc in zip(self.keys, self._local_keys()):
            x = loc.piece.index_select(k.dim, loc.index).to(self.dtype)
            per_pos = x.square().movedim(k.dim, 0).reshape(x.shape[k.dim], -1).sum(1)
            if is_sharded(loc.param):
                pieces = pieces.index_add(0, loc.channel, per_pos.to(self.device))
                sharded.append(loc.param)
            else:
                whole = whole.index_add(0, loc.channel, per_pos.to(self.device))
        return whole + sum_over_shards(pieces, sharded) if sharded else whole

    def norms(self) -> torch.Tensor:
        """L2 norm of every channel; the gradient at a zero channel is 0.

        Example:
            >>> w = torch.nn.Parameter(torch.zeros(2, 2))
            >>> ChannelTable([ChannelSlices([(w, 0, [0])])]).norms().sum().backward()
            >>> w.grad.abs().sum()
            tensor(0.)
        """
        sq = self.sq_norms()
        positive = sq > 0
        safe = torch.where(positive, sq, torch.ones_like(sq))
        return torch.where(positive, safe.sqrt(), torch.zeros_like(sq))

    @torch.no_grad()
    def scale_(self, factors: torch.Tensor) -> None:
        """Multiply every entry of channel ``c`` by ``factors[c]``, in place.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(2, 2))
            >>> ChannelTable([ChannelSlices([(w, 0, [1])])]).scale_(torch.tensor([0.]))
            >>> w
            Parameter containing:
            tensor([[1., 1.],
                    [0., 0.]], requires_grad=True)
        """
        for k, loc in zip(self.keys, self._local_keys()):
            piece = loc.piece
            f = factors.to(piece.device)[loc.channel.to(piece.device)].to(piece.dtype)
            shape = [1] * piece.dim()
            shape[k.dim] = -1
            index = loc.index.to(piece.device)
            piece.index_copy_(k.dim, index, piece.index_select(k.dim, index) * f.view(shape))

    def channel_lr(self, lrs: dict[int, float]) -> torch.Tensor:
        """One learning rate per channel from ``{id(param): lr}`` (the parameters as
        ``params`` lists them); all of a channel's parameters must share it.

        Example:
            >>> w = torch.nn.Parameter(torch.ones(2, 2))
            >>> ChannelTable([ChannelSlices([(w, 0, [1])])]).channel_lr({id(w): 0.1})
            tensor([0.1000])
        """
        lo = torch.full((len(self),), float("inf"), dtype=self.dtype, device=self.device)
        hi = torch.full((len(self),), float("-inf"), dtype=self.dtype, device=self.device)
        for k in self.keys:
            v = torch.full(k.channel.shape, lrs[id(self.param_of(k))],
                           dtype=self.dtype, device=self.device)
            chan = k.channel.to(self.device)
            lo = lo.scatter_reduce(0, chan, v, "amin")
            hi = hi.scatter_reduce(0, chan, v, "amax")
        if not torch.equal(lo, hi):
            bad = int((lo != hi).nonzero()[0])
            raise SpecError(f"lr: channel {bad} spans parameters with different learning "
                            "rates; pass lr=... explicitly")
        return lo


def channel_slices_from_graph(model: torch.nn.Module, graph, role: str = "out",
                              include_frozen: bool = False) -> list[ChannelSlices]:
    """Build one ChannelSlices per channel of the graph's prunable groups.

    The same entries as ``g.slices([c], role)`` for every channel ``c`` of every group,
    read in one pass over each group's bindings (resnet50's 11k channels one at a time
    took 35 s); state_dict keys are mapped to ``model``'s parameters (buffers such as
    BN running stats are skipped), and a tied parameter is kept once. ``label`` is
    ``(g.id, c)``.

    Example:
        >>> import fxprune
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                             torch.nn.Conv2d(8, 4, 3))
        >>> graph = fxprune.analyze(model, (torch.randn(1, 3, 8, 8),))
        >>> channels = channel_slices_from_graph(model, graph)
        >>> len(channels), [s.param.shape for s in channels[0].slices]   # conv 0 and BN 1 own channel 0
        (8, [torch.Size([8, 3, 3, 3]), torch.Size([8]), torch.Size([8]), torch.Size([8])])
    """

    if role not in ("out", "in", "all"):
        raise SpecError(f"role must be 'out', 'in' or 'all', got {role!r}")
    params = dict(model.named_parameters(remove_duplicate=False))
    owners = parameter_owners(model)
    out = []
    for gi, g in enumerate(graph.groups):
        if not (g.prunable or include_frozen):
            continue
        gid = getattr(g, "id", gi)
        roles = tuple({b.role for b in g.bindings}) if role == "all" else (role,)
        per_unit: list[dict[tuple[int, int], tuple[torch.Tensor, int, list]]] = \
            [{} for _ in range(int(g.size))]
        for key, dim, idx, units in unit_entries(g, roles):
            if key not in params:  # a buffer (running stats...): not trained
                continue
            p = params[key]
            order = np.argsort(units, kind="stable")
            units, idx = units[order], idx[order]
            starts = np.flatnonzero(np.r_[True, units[1:] != units[:-1]])
            for u, chunk in zip(units[starts], np.split(idx, starts[1:])):
                per_unit[u].setdefault((id(p), dim), (p, dim, [], owners[key]))[2].append(chunk)
        for c, merged in enumerate(per_unit):
            triples = [(p, dim, np.unique(np.concatenate(chunks)), owner)
                       for p, dim, chunks, owner in merged.values()]
            if triples:
                out.append(ChannelSlices(triples, label=(gid, c)))
    return out


def parameter_owners(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """``{parameter name: (module, attribute name)}``: where each parameter lives, so
    that it can be found again after ``fully_shard`` replaces it. Tied parameters are
    listed under every name.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> parameter_owners(torch.nn.Sequential(lin))["0.bias"] == (lin, "bias")
        True
    """
    return {f"{prefix}.{name}" if prefix else name: (module, name)
            for prefix, module in model.named_modules(remove_duplicate=False)
            for name, p in module._parameters.items() if p is not None}
