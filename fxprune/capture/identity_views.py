"""Fold a parameter reshaped back to its own shape into the parameter itself.

Hugging Face's Mamba passes its depthwise conv weight ``[C, 1, k]`` to ``aten.conv1d``
as ``weight.squeeze(1).unsqueeze(1)`` (its causal-conv fallback takes a ``[C, k]``
weight). Reshapes keep the row-major order of the elements, so a chain of them that ends
at the shape it started from is the identity; the layer rules, which bind a parameter
read with ``get_attr``, then see the parameter itself.
"""
from __future__ import annotations

import torch
import torch.fx

aten = torch.ops.aten

# Ops that only reinterpret the shape of a contiguous tensor (no permutation, no copy of values).
RESHAPES = {aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
            aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
            torch.squeeze, torch.unsqueeze, torch.reshape, torch.flatten, "squeeze", "unsqueeze",
            "view", "reshape", "flatten"}


def _shape(node: torch.fx.Node):
    """Shape and dtype (``x.view(torch.float16)`` reinterprets bytes: not a reshape)."""
    meta = node.meta.get("tensor_meta")
    return (tuple(meta.shape), meta.dtype) if hasattr(meta, "shape") else None


def fold_identity_reshapes(gm: torch.fx.GraphModule) -> int:
    """Replace each chain of reshapes of a ``get_attr`` tensor that ends at the tensor's own
    shape by the tensor; returns how many chains were folded (``node.meta["tensor_meta"]``
    must be set).

    >>> import torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.randn(4, 1, 3))
    ...     def forward(self, x):
    ...         return torch.nn.functional.conv1d(x, self.w.squeeze(1).unsqueeze(1), groups=4)
    >>> from fxprune.capture import capture
    >>> gm = capture(M(), torch.randn(1, 4, 8), capture="fx").gm
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'get_attr', 'call_function', 'output']
    """
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "get_attr" or _shape(node) is None:
            continue
        start, chain = _shape(node), [node]
        while len(chain[-1].users) == 1:
            (user,) = chain[-1].users
            if user.op not in ("call_function", "call_method") or user.target not in RESHAPES \
                    or user.args[0] is not chain[-1] or _shape(user) is None:
                break
            chain.append(user)
            if _shape(user) == start:
                user.replace_all_uses_with(node)
                for step in reversed(chain[1:]):  # each had one user: the next step
                    gm.graph.erase_node(step)
                folded += 1
                break
    if folded:
        gm.recompile()
    return folded


__all__ = ["fold_identity_reshapes"]
