"""What the analysis knows about one value flowing through the graph.

A tensor's channel-carrying dims each hold a :class:`DimMap`: for every index along
that dim, the global id of the channel that owns it (``-1``: a fixed position that no
channel owns) and whether it is *zero-invariant* (zeroing the owning channel's
producers makes this entry exactly zero). Dims without a map carry no channels.

Non-tensor values matter too: ``x.size(1)`` reads a channel count, and if that number
ends up somewhere the pruner cannot rewrite, the channels must be frozen. Such values
are :class:`SizeValue` (an int derived from channel dims) or tuples of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FIXED = -1  # id of a position that belongs to no channel


@dataclass(frozen=True)
class DimMap:
    """Owner id and zero-invariance of every index along one tensor dim."""

    ids: np.ndarray
    zi: np.ndarray

    @staticmethod
    def of(ids: np.ndarray, zi: bool | np.ndarray = True) -> "DimMap":
        ids = np.asarray(ids, dtype=np.int64)
        if isinstance(zi, (bool, np.bool_)):
            return DimMap(ids, np.full(ids.shape, bool(zi)))
        return DimMap(ids, np.broadcast_to(np.asarray(zi, dtype=bool), ids.shape).copy())

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index) -> "DimMap":
        return DimMap(self.ids[index], self.zi[index])

    def with_zi(self, zi: bool | np.ndarray) -> "DimMap":
        return DimMap.of(self.ids, zi)

    @staticmethod
    def concat(parts: list["DimMap"]) -> "DimMap":
        return DimMap(np.concatenate([p.ids for p in parts]), np.concatenate([p.zi for p in parts]))

    @property
    def tracked(self) -> np.ndarray:
        return self.ids[self.ids >= 0]


@dataclass(frozen=True)
class TensorChannels:
    """The channel maps of one tensor value: ``dims[d]`` for each channel-carrying dim."""

    shape: tuple[int, ...]
    dims: dict[int, DimMap] = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def get(self, dim: int) -> DimMap | None:
        return self.dims.get(dim % self.ndim if self.ndim else dim)

    def all_ids(self) -> np.ndarray:
        if not self.dims:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([m.tracked for m in self.dims.values()])

    def with_dims(self, dims: dict[int, DimMap], shape: tuple[int, ...] | None = None) -> "TensorChannels":
        return TensorChannels(tuple(self.shape if shape is None else shape), dims)

    def map_zi(self, zi: bool) -> "TensorChannels":
        """The same maps with every entry's zero-invariance set to ``zi``."""
        return self.with_dims({d: m.with_zi(zi) for d, m in self.dims.items()})


@dataclass(frozen=True)
class SizeValue:
    """A Python number computed from the sizes of channel dims (``x.size(1) // 4``)."""

    ids: np.ndarray  # the channel ids whose count it depends on

    @staticmethod
    def merge(values) -> "SizeValue | None":
        parts = [v.ids for v in values if isinstance(v, SizeValue)]
        if not parts:
            return None
        return SizeValue(np.concatenate(parts))


def flatten_values(value) -> list:
    """Every TensorChannels / SizeValue inside a (nested) tuple, list or dict."""
    if isinstance(value, (TensorChannels, SizeValue)):
        return [value]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in flatten_values(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in flatten_values(item)]
    return []
