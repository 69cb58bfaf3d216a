"""Matrix products and attention.

``matmul``/``bmm``/``einsum`` tie the contracted dims of their operands and carry the
free dims to the output; batch dims are aligned like an element-wise op. A product is
zero where either factor is, so zero-invariance survives when either side has it.
The fx front end traces ``nn.MultiheadAttention`` through as functional ops
(:mod:`fxprune.capture.mha`); a call it keeps whole needs its inner width to equal
``embed_dim``, so the spaces that call touches are frozen, with the option that kept it.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...capture.mha import LEAF_REASON
from ..registry import register_rule
from ..values import DimMap, TensorChannels
from .elementwise import broadcast_combine
from .fallback import unknown_rule
from .query_slots import tie_query_slots


def _letters(n: int, start: int) -> str:
    return "".join(chr(ord("a") + start + i) for i in range(n))


def einsum_maps(ctx, equation: str, operands: list[TensorChannels], shape: tuple | None = None):
    """Channel maps of an einsum: same letter, same channels; products keep zeros.

    ``shape``: the result's shape when it is not the node's output (a vector matmul
    is analysed as a matrix product first)."""
    lhs, rhs = equation.replace(" ", "").split("->")
    specs = lhs.split(",")
    letter_maps: dict[str, DimMap] = {}
    for spec, op in zip(specs, operands):
        if "." in spec:
            raise NotImplementedError("ellipsis in einsum")
        for d, letter in enumerate(spec):
            if op.shape[d] == 1:
                continue  # broadcast
            m = op.get(d)
            if letter in letter_maps:
                prev = letter_maps[letter]
                if prev is None and m is None:
                    continue
                merged = ctx.unify(prev, m, " (einsum operands)")
                zi = (prev.zi if prev is not None else False) | (m.zi if m is not None else False)
                letter_maps[letter] = DimMap.of(merged.ids, zi)
            else:
                letter_maps[letter] = m
    for letter, m in letter_maps.items():
        if letter not in rhs and m is not None:
            ctx.break_zi(m, "a contracted channel is non-zero on both sides")
    dims = {d: letter_maps[c] for d, c in enumerate(rhs) if letter_maps.get(c) is not None}
    return TensorChannels(tuple(shape), dims) if shape is not None else ctx.out(dims)


aten = torch.ops.aten


@register_rule(torch.matmul, operator.matmul, "matmul", torch.bmm, "bmm", "__matmul__", torch.mm, "mm",
               aten.matmul.default, aten.bmm.default, aten.mm.default)
def matmul_rule(ctx):
    a, b = ctx.tensor(0, "input"), ctx.tensor(1, "other")
    if a is None or b is None or a.ndim < 1 or b.ndim < 1:
        return unknown_rule(ctx)
    out_nd = len(ctx.out_shape())
    if a.ndim == 1 or b.ndim == 1:
        # vector products: promote to matrices the way torch.matmul does
        a2 = a if a.ndim > 1 else TensorChannels((1,) + a.shape, {d + 1: m for d, m in a.dims.items()})
        b2 = b if b.ndim > 1 else TensorChannels(b.shape + (1,), dict(b.dims))
        batch = max(a2.ndim, b2.ndim) - 2
        eq = _matmul_equation(a2.ndim, b2.ndim, batch)
        full = einsum_maps(ctx, eq, [a2, b2], _einsum_shape(eq, [a2, b2]))
        drop = [batch] if a.ndim == 1 else []
        drop += [batch + 1] if b.ndim == 1 else []
        dims, shift = {}, 0
        for d in range(batch + 2):
            if d in drop:
                shift += 1
            elif d in full.dims:
                dims[d - shift] = full.dims[d]
        return ctx.out(dims)
    batch = out_nd - 2
    out = einsum_maps(ctx, _matmul_equation(a.ndim, b.ndim, batch), [a, b])
    weight = _weight_operand(ctx.arg(1, "other"), b.shape)
    if weight is not None:
        _consume_like_linear(ctx, a.get(-1), *weight)
    return out


@register_rule(torch.baddbmm, "baddbmm", aten.baddbmm.default)
def baddbmm_rule(ctx):
    """``beta * input + alpha * (batch1 @ batch2)`` (GPT-NeoX-Japanese's and RecurrentGemma's
    attention scores): a batched product, then an element-wise add of ``input`` (whose
    values do not count when ``beta`` is 0: torch then ignores them, NaNs included)."""
    inp, b1, b2 = ctx.tensor(0, "input"), ctx.tensor(1, "batch1"), ctx.tensor(2, "batch2")
    beta, alpha = ctx.arg(None, "beta", 1), ctx.arg(None, "alpha", 1)
    shape = ctx.out_shape()
    if b1 is None or b2 is None or b1.ndim != 3 or b2.ndim != 3 or shape is None or not all(
            isinstance(s, (int, float)) for s in (beta, alpha)):
        return unknown_rule(ctx)
    product = einsum_maps(ctx, "bij,bjk->bik", [b1, b2], shape)
    out = broadcast_combine(ctx, [inp, product], "all")  # input broadcasts to the scores even at beta 0
    if beta != 0:
        return out
    return out.with_dims({d: m.with_zi(product.get(d).zi if product.get(d) is not None else False)
                          for d, m in out.dims.items()})


# ``w.T`` and friends on a 2-D tensor: the op, and which dim of w becomes dim 0 of the result.
_TRANSPOSES = {aten.numpy_T.default: 1, aten.t.default: 1, aten.mT.default: 1, aten.adjoint.default: 1,
               aten.mH.default: 1, torch.t: 1, "t": 1}


def _weight_operand(raw, shape) -> tuple[torch.fx.Node, int] | None:
    """A 2-D parameter as the right operand of ``x @ w`` / ``x @ w.T`` (Falcon's linear
    layers): the ``get_attr`` node and its dim that the product contracts, else None."""
    if not isinstance(raw, torch.fx.Node) or len(shape) != 2:
        return None
    if raw.op == "get_attr":
        return raw, 0
    src = raw.args[0] if raw.args else None
    if not isinstance(src, torch.fx.Node) or src.op != "get_attr":
        return None
    if raw.op == "call_function" and raw.target is getattr and raw.args[1] in ("T", "mT", "H", "mH"):
        return src, 1
    if raw.op in ("call_function", "call_method") and raw.target in _TRANSPOSES:
        return src, _TRANSPOSES[raw.target]
    if raw.target in (aten.transpose.int, torch.transpose, "transpose") and \
            {d % 2 for d in raw.args[1:3]} == {0, 1}:
        return src, 1
    return None


def _consume_like_linear(ctx, x_map: DimMap | None, raw_w: torch.fx.Node, dim: int) -> None:
    """The contracted dim of a weight consumes the input's channels, as a linear layer's
    input dim does (role "in"): a channel that is not zero-invariant ends zero-invariance
    there, and zeroing a channel's producers does not zero the weight's columns."""
    if x_map is None:
        return
    ctx.set_role(raw_w, dim, "in")
    ctx.break_zi(x_map, "a channel that is non-zero when zeroed is consumed by a matmul with a weight")
    ctx.require_nonempty(x_map, "the input of a matmul with a weight")


def _einsum_shape(eq: str, operands: list[TensorChannels]) -> tuple:
    """Output shape of an einsum from its operands (each letter's largest size: broadcast)."""
    lhs, rhs = eq.split("->")
    size: dict[str, int] = {}
    for spec, op in zip(lhs.split(","), operands):
        for letter, n in zip(spec, op.shape):
            size[letter] = max(size.get(letter, 1), n)
    return tuple(size[letter] for letter in rhs)


def _matmul_equation(a_nd: int, b_nd: int, batch: int) -> str:
    batch_letters = _letters(batch, 0)
    i, k, j = "x", "y", "z"
    a_spec = batch_letters[batch - (a_nd - 2):] + i + k
    b_spec = batch_letters[batch - (b_nd - 2):] + k + j
    return f"{a_spec},{b_spec}->{batch_letters}{i}{j}"


@register_rule(torch.einsum, torch.functional.einsum, aten.einsum.default)
def einsum_rule(ctx):
    equation = ctx.arg(0)
    raw = ctx.node.args[1:]
    if raw and isinstance(raw[0], (tuple, list)):  # one list of operands (aten: then the path)
        raw = raw[0]
    operands = [ctx.value(r) for r in raw]
    if not isinstance(equation, str) or "->" not in equation or "." in equation or not all(
        isinstance(o, TensorChannels) for o in operands
    ):
        return unknown_rule(ctx)
    return einsum_maps(ctx, equation, operands)


@register_rule(F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default)
def sdpa_rule(ctx):
    """softmax(q k^T * scale) v: q and k contract their last dim; v's last dim is the output's.

    The default scale reads the head dim, which pruning changes: q/k channels are then
    prunable but not zero-invariant.
    """
    q, k, v = (ctx.tensor(i, n) for i, n in enumerate(("query", "key", "value")))
    if q is None or k is None or v is None:
        return unknown_rule(ctx)
    mask = ctx.tensor(3, "attn_mask")
    qk = ctx.unify(q.get(q.ndim - 1), k.get(k.ndim - 1), " (attention query/key)")
    if ctx.arg(6, "scale") is None:
        ctx.break_zi(qk, "attention scale is computed from the head dim", only_non_zi=False)
    for t in (q, k, v):  # sequence dims are mixed by the softmax
        ctx.break_zi(t.get(t.ndim - 2), "attention mixes positions", only_non_zi=False)
    # The mask is added to the scores [..., Lq, Lk]: its dims align with them from the right.
    lead = q.ndim - 2
    mask_dims = {}
    if mask is not None:
        for d, m in mask.dims.items():
            mask_dims[d + q.ndim - mask.ndim] = m
    dims = {}
    # enable_gqa pruned by query slot: the head dim (the last batch dim) holds more queries than keys
    slots = ctx.state.attention_units == "query_slots" and bool(ctx.arg(7, "enable_gqa", False))
    for d in range(lead):  # batch and head dims align like an element-wise op
        masks = []  # the mask's dim, where it does not broadcast
        if mask is not None and d - (q.ndim - mask.ndim) >= 0 and mask.shape[d - (q.ndim - mask.ndim)] > 1:
            masks.append(mask_dims.get(d))
        if slots and d == lead - 1 and k.shape[d] < q.shape[d]:
            q_map = tie_query_slots(ctx, q.get(d), k.shape[d], [k.get(d), v.get(d)])
            merged = ctx.unify_all([q_map, *masks], " (attention batch dims)")
            if merged is not None:
                dims[d] = merged.with_zi(False)
            continue
        # grouped-query attention (enable_gqa): key/value head g serves query heads
        # g*r .. g*r+r-1, so its channels stand for r consecutive query heads
        k_map, v_map = (_repeated(t.get(d), q.shape[d] // t.shape[d]) for t in (k, v))
        maps = [m for t, m in ((q, q.get(d)), (k, k_map), (v, v_map)) if t.shape[d] > 1] + masks
        merged = ctx.unify_all(maps, " (attention batch dims)")
        if merged is not None:
            # a head's output is softmax(...) @ v: zero exactly when its values are
            dims[d] = DimMap(merged.ids, v_map.zi if v_map is not None else np.zeros(len(merged), bool))
    if lead in mask_dims:
        ctx.unify(mask_dims[lead], q.get(lead))
    if lead + 1 in mask_dims:
        ctx.unify(mask_dims[lead + 1], k.get(k.ndim - 2))
    if q.get(q.ndim - 2) is not None:
        dims[q.ndim - 2] = q.get(q.ndim - 2).with_zi(False)
    if v.get(v.ndim - 1) is not None:
        dims[v.ndim - 1] = v.get(v.ndim - 1)
    return ctx.out(dims)


def _repeated(m: DimMap | None, times: int) -> DimMap | None:
    if m is None or times <= 1:
        return m
    return DimMap(np.repeat(m.ids, times), np.repeat(m.zi, times))


@register_rule(nn.MultiheadAttention)
def multihead_attention_rule(ctx):
    """An ``nn.MultiheadAttention`` left whole (the fx front end traces the others through):
    a whole one needs its inner width equal to embed_dim, so what it touches is frozen."""
    why = ctx.node.meta.get(LEAF_REASON, "it is a leaf module")
    reason = (
        f"nn.MultiheadAttention '{ctx.node.target}' is kept whole under fx: {why}; a whole one "
        "needs its inner width equal to embed_dim, so its heads and embedding cannot shrink"
    )
    ctx.freeze_value(ctx.inputs(), reason)
    meta = ctx.node.meta.get("tensor_meta")
    shapes = [tuple(m.shape) if m is not None and hasattr(m, "shape") else None for m in meta]
    return tuple(TensorChannels(s, {}) if s is not None else None for s in shapes)
