"""Vectorised union-find over integer channel ids.

Every tracked channel index gets a global integer id. Ops unify whole arrays of ids at
once (a residual add unifies two arrays of C ids), so the structure works on numpy
arrays instead of one id at a time: the cost of a union is a handful of array
operations, whatever C is. Roots are always the smallest id of their class (a larger
root is linked under a smaller one), which makes every result independent of the
order the unions arrive in and keeps the analysis deterministic.
"""
from __future__ import annotations

import numpy as np


class ChannelUnion:
    """Union-find whose elements are the integers ``0..len-1``.

    >>> uf = ChannelUnion()
    >>> a, b = uf.new(3), uf.new(3)
    >>> uf.union(a, b)
    >>> uf.find(b).tolist()
    [0, 1, 2]
    """

    def __init__(self) -> None:
        self._parent = np.zeros(1024, dtype=np.int64)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def new(self, count: int) -> np.ndarray:
        """Allocate ``count`` fresh ids, each its own class; returns them in order."""
        start, stop = self._size, self._size + count
        if stop > len(self._parent):
            grown = np.zeros(max(stop, 2 * len(self._parent)), dtype=np.int64)
            grown[: self._size] = self._parent[: self._size]
            self._parent = grown
        self._parent[start:stop] = np.arange(start, stop)
        self._size = stop
        return np.arange(start, stop, dtype=np.int64)

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Roots of ``ids`` (same shape), compressing the paths it walks."""
        ids = np.asarray(ids, dtype=np.int64)
        parent = self._parent
        roots = parent[ids]
        while True:
            up = parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        parent[ids] = roots
        return roots

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Merge the class of ``a[i]`` with the class of ``b[i]`` for every i."""
        a = np.asarray(a, dtype=np.int64).ravel()
        b = np.asarray(b, dtype=np.int64).ravel()
        while a.size:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            hi = np.maximum(ra[differ], rb[differ])
            lo = np.minimum(ra[differ], rb[differ])
            order = np.lexsort((lo, hi))
            hi, lo = hi[order], lo[order]
            first = np.ones(hi.size, dtype=bool)
            first[1:] = hi[1:] != hi[:-1]
            # One root can meet several smaller roots in one call: link it under the
            # smallest and queue the others to be linked to that one next round.
            smallest = lo[first][np.cumsum(first) - 1]
            self._parent[hi[first]] = lo[first]
            a, b = lo[~first], smallest[~first]

    def roots(self) -> np.ndarray:
        """Root of every id, as one array (full pointer jumping)."""
        parent = self._parent[: self._size].copy()
        while True:
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up
        self._parent[: self._size] = parent
        return parent
