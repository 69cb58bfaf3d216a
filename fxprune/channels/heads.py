"""Which reshapes split a channel dim into attention heads.

``x.view(B, N, H, D)`` (or ``(B, N, 3, H, D)`` for a fused qkv projection) in front of an
attention product splits a channel dim into heads x head_dim. Attention treats heads as
batch entries and contracts head_dim, so a whole head (its head_dim rows of q, k and v and
the output projection's columns) is the natural pruning unit (Michel et al. 2019). This
module finds those reshapes from the graph alone: a reshape whose output reaches an
attention product (SDPA, matmul, bmm, einsum) through ops that only move, copy, scale,
slice or repeat it (transposes, rotary embeddings, ``repeat_kv``'s expand + reshape).

Under ``attention_units="query_slots"`` it also finds ``repeat_kv``'s expand + reshape
(:func:`kv_repeats`): the dim the expand broadcasts is the slot of a query head inside its
key/value group, which then carries channels of its own.
"""
from __future__ import annotations

import torch.fx

from .registry import op_name

ATTENTION = {"scaled_dot_product_attention", "matmul", "bmm", "einsum", "baddbmm", "__matmul__"}
RESHAPES = {"view", "reshape", "_unsafe_view", "unflatten"}
# Ops a head split may pass through on its way to the product.
CARRY = {
    "transpose", "permute", "contiguous", "clone", "to", "_to_copy", "type_as", "float", "half",
    "bfloat16", "alias", "detach", "mul", "add", "sub", "neg", "div", "cat", "slice", "narrow",
    "unsqueeze", "squeeze", "expand", "getitem", "unbind", "chunk", "split", "split_with_sizes",
    "select", "__mul__", "__add__", "__sub__", "__neg__", "__rmul__", "__radd__", "__truediv__",
    "dropout", "repeat", "repeat_interleave", "layer_norm", "rms_norm", *RESHAPES,
}
MAX_STEPS = 24  # a rotary embedding plus repeat_kv is about a dozen ops


def _name(node: torch.fx.Node, modules: dict) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__.lower()
    return op_name(node.target)


def head_reshapes(gm: torch.fx.GraphModule) -> dict[str, set[int]]:
    """Reshape nodes whose output reaches an attention product, each with the last-dim sizes
    of the product's operands: a split whose innermost factor is one of them (head_dim)
    splits heads; one that separates q, k and v of a fused projection does not.

    >>> import torch, torch.nn.functional as F
    >>> class Attn(torch.nn.Module):
    ...     def forward(self, x):
    ...         q = x.view(2, 5, 4, 8).transpose(1, 2)
    ...         return F.scaled_dot_product_attention(q, q, q)
    >>> from fxprune.capture import capture
    >>> head_reshapes(capture(Attn(), torch.randn(2, 5, 32)).gm)
    {'view': {8}}
    """
    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method") and _name(node, modules) in RESHAPES:
            sizes = _attention_dims(node, modules)
            if sizes:
                found[node.name] = sizes
    return found


def _attention_dims(start: torch.fx.Node, modules: dict) -> set[int]:
    """Last-dim sizes of the operands of every attention product ``start`` reaches."""
    frontier, seen, sizes = [(start, 0)], {start}, set()
    while frontier:
        node, steps = frontier.pop()
        for user in node.users:
            name = _name(user, modules)
            if name in ATTENTION:
                sizes.update(_last_dims(user))
            elif name in CARRY and steps < MAX_STEPS and user not in seen:
                seen.add(user)
                frontier.append((user, steps + 1))
    return sizes


def _last_dims(node: torch.fx.Node) -> set[int]:
    metas = [a.meta.get("tensor_meta") for a in node.all_input_nodes]
    return {int(m.shape[-1]) for m in metas if hasattr(m, "shape") and len(m.shape)}


def kv_repeats(gm: torch.fx.GraphModule, splits: dict[str, set[int]]) -> dict[str, tuple[int, str]]:
    """Grouped-query attention's ``repeat_kv``: ``x[:, :, None].expand(B, kv, r, S, D)``
    followed by ``.reshape(B, kv * r, S, D)`` in front of an attention product (``splits``:
    :func:`head_reshapes`). Returns ``{expand node: (the dim it broadcasts, the reshape)}``;
    query head ``g * r + j`` meets key/value head g at slot j of that dim.

    >>> import torch, torch.nn.functional as F
    >>> class Gqa(torch.nn.Module):
    ...     def forward(self, q, k):
    ...         k = k[:, :, None].expand(1, 2, 3, 5, 4).reshape(1, 6, 5, 4)
    ...         return F.scaled_dot_product_attention(q, k, k)
    >>> from fxprune.capture import capture
    >>> gm = capture(Gqa(), (torch.randn(1, 6, 5, 4), torch.randn(1, 2, 5, 4))).gm
    >>> kv_repeats(gm, head_reshapes(gm))
    {'expand': (2, 'reshape')}
    """
    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or _name(node, modules) != "expand":
            continue
        before, after = _shape(node.args[0]), _shape(node)
        if before is None or after is None or len(before) != len(after):
            continue
        grown = [d for d in range(len(after)) if before[d] != after[d]]
        if len(grown) != 1 or grown[0] == 0 or before[grown[0]] != 1:
            continue
        slot = grown[0]
        users = [u for n in [node, *[u for u in node.users if _name(u, modules) in ("contiguous", "clone")]]
                 for u in n.users]
        for user in users:
            merged = _shape(user)
            if user.name in splits and merged == after[:slot - 1] + (after[slot - 1] * after[slot],) + after[slot + 1:]:
                found[node.name] = (slot, user.name)
    return found


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(int(s) for s in meta.shape) if hasattr(meta, "shape") else None


__all__ = ["head_reshapes", "kv_repeats"]
