"""Channel shuffles are permutations: nothing is tied, the map is permuted.

The idiom ``x.view(B, g, C/g, H, W).transpose(1, 2).contiguous().view(B, C, H, W)``
(ShuffleNet) and ``nn.ChannelShuffle`` interleave g blocks of channels. Read as three
separate reshapes it would force every block to lose the same positions; read as one
permutation it forces nothing. fxprune recognises the chain, gives the final node the
permuted map of ``x`` and, at prune time, replaces the chain by one ``index_select``
with the permutation of the surviving channels (the middle nodes become dead code).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from ..values import DimMap, TensorChannels

_aten = torch.ops.aten
_TRANSPOSES = {"transpose", torch.transpose, "permute", torch.permute, "swapaxes", torch.swapaxes,
               _aten.transpose.int, _aten.permute.default}
_CONTIGUOUS = {"contiguous", "clone", _aten.contiguous.default, _aten.clone.default}
_RESHAPES = {"view", "reshape", torch.reshape, _aten.view.default, _aten.reshape.default, _aten._unsafe_view.default}


@dataclass(frozen=True)
class Shuffle:
    source: torch.fx.Node  # x, the tensor before the split
    merge: torch.fx.Node  # the final reshape
    dim: int
    perm: np.ndarray  # out[i] = x[perm[i]] along dim


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _only_user(node):
    return next(iter(node.users)) if len(node.users) == 1 else None


def match_shuffle(split: torch.fx.Node) -> Shuffle | None:
    """``split -> transpose -> [contiguous] -> merge`` with merge's shape == x's shape."""
    if split.target not in _RESHAPES or not split.args or not isinstance(split.args[0], torch.fx.Node):
        return None
    x, xs, ss = split.args[0], _shape(split.args[0]), _shape(split)
    if xs is None or ss is None or len(ss) != len(xs) + 1:
        return None
    dim = next((d for d in range(len(xs)) if xs[d] != ss[d]), None)
    if dim is None or xs[dim + 1:] != ss[dim + 2:] or ss[dim] * ss[dim + 1] != xs[dim]:
        return None
    swap = _only_user(split)
    if swap is None or swap.target not in _TRANSPOSES:
        return None
    ts = _shape(swap)
    if ts is None or ts[dim] != ss[dim + 1] or ts[dim + 1] != ss[dim] or ts[:dim] != ss[:dim] or ts[dim + 2:] != ss[dim + 2:]:
        return None
    merge = _only_user(swap)
    if merge is not None and merge.target in _CONTIGUOUS:
        merge = _only_user(merge)
    if merge is None or merge.target not in _RESHAPES or _shape(merge) != xs:
        return None
    g, k = ss[dim], ss[dim + 1]
    return Shuffle(x, merge, dim, np.arange(g * k).reshape(g, k).T.ravel())


def find_shuffle_ending_at(merge: torch.fx.Node) -> Shuffle | None:
    node = merge.args[0] if merge.args and isinstance(merge.args[0], torch.fx.Node) else None
    if node is not None and node.target in _CONTIGUOUS:
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.target not in _TRANSPOSES:
        return None
    split = node.args[0]
    found = match_shuffle(split) if isinstance(split, torch.fx.Node) else None
    return found if found is not None and found.merge is merge else None


def permuted(x: TensorChannels, dim: int, perm: np.ndarray) -> TensorChannels:
    m = x.get(dim)
    if m is None:
        return x
    return x.with_dims({**x.dims, dim: m.take(perm)})


def rewrite_as_index_select(source_name: str, dim: int, perm: np.ndarray, src_map: DimMap):
    """Prune-time: replace the node by ``index_select(source, dim, kept permutation)``."""

    def rewrite(p, node):
        kept = p.kept(src_map.ids)
        new_pos = np.cumsum(kept) - 1
        index = torch.as_tensor(new_pos[perm[kept[perm]]], dtype=torch.long)
        attr = f"_fxprune_perm_{node.name}"
        p.gm.register_buffer(attr, index)
        source = p.current(source_name)
        with node.graph.inserting_before(node):
            idx_node = node.graph.get_attr(attr)
            new = node.graph.call_function(torch.index_select, (source, dim, idx_node))
        p.replace(node, new)

    return rewrite
