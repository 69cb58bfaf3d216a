"""``nn.MultiheadAttention`` traced through under fx, as functional ops on its own parameters.

Kept whole (one ``call_module``), an ``nn.MultiheadAttention`` hides its heads, and no
smaller one can exist: its head_dim is ``embed_dim // num_heads`` and its q width is
``embed_dim``. Traced through, the graph reads ``in_proj_weight``, ``out_proj.weight``, ...
with ``get_attr`` under their ``state_dict`` keys and splits q, k and v into heads with a
reshape, so the linear, reshape and attention rules make heads and the embedding
prunable, and a pruned graph simply holds smaller tensors.

Symbolic tracing sees no shapes or dtypes, but the module's math depends on them (batched
or not, bool or float masks, a 2-D or per-head 3-D ``attn_mask``). So the fx front end
traces twice: first with the module whole; the shapes recorded for each call then say how
its functional form is written (:class:`MhaCall`), or why that call stays whole (options
with no exact functional form, such as dropout in training mode; the MHA rule reports it).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_FLAGS = ("need_weights", "average_attn_weights", "is_causal")
LEAF_REASON = "fxprune.mha_leaf_reason"  # node.meta key: why a call stays one module


@dataclass(frozen=True)
class MhaCall:
    """How one call of an ``nn.MultiheadAttention`` is written as functional ops."""

    batched: bool  # False: query is (L, E), one sequence
    self_attention: bool  # query, key and value are one tensor: one fused projection
    need_weights: bool
    average_weights: bool
    causal: bool  # SDPA's is_causal replaces attn_mask (as the module does)
    key_padding_bool: bool | None  # None: no key_padding_mask
    attn_mask_bool: bool | None  # None: no attn_mask
    attn_mask_ndim: int
    dtype: torch.dtype  # the query's: bool masks become its -inf


def plan_calls(gm: torch.fx.GraphModule) -> dict[tuple[str, int], MhaCall | str]:
    """For each ``nn.MultiheadAttention`` call of a graph traced with it whole (and shapes
    recorded), keyed by (module path, call index): its :class:`MhaCall`, or the reason it
    stays one module.

    >>> import torch
    >>> from fxprune.capture import capture
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = torch.nn.MultiheadAttention(8, 2, add_zero_attn=True)
    ...     def forward(self, x):
    ...         return self.attn(x, x, x)[0]
    >>> plan_calls(capture(Net(), torch.randn(3, 1, 8)).gm)
    {('attn', 0): 'add_zero_attn=True has no exact functional form here'}
    """
    modules = dict(gm.named_modules())
    counts: dict[str, int] = {}
    plans = {}
    for node in gm.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.MultiheadAttention):
            index = counts[node.target] = counts.get(node.target, -1) + 1
            plans[(node.target, index)] = _plan(module, node)
    return plans


def _shape(value) -> tuple | None:
    meta = value.meta.get("tensor_meta") if isinstance(value, torch.fx.Node) else None
    return meta if hasattr(meta, "shape") else None


def _plan(m: nn.MultiheadAttention, node: torch.fx.Node) -> MhaCall | str:
    if type(m).forward is not nn.MultiheadAttention.forward:
        return f"its class {type(m).__name__} overrides forward"
    if m.training and m.dropout > 0:
        return f"dropout={m.dropout} in training mode has no exact functional form here"
    if m.bias_k is not None:
        return "add_bias_kv=True has no exact functional form here"
    if m.add_zero_attn:
        return "add_zero_attn=True has no exact functional form here"
    try:
        bound = _SIGNATURE.bind(m, *node.args, **node.kwargs)
    except TypeError as exc:
        return f"its call does not match nn.MultiheadAttention.forward ({exc})"
    bound.apply_defaults()
    a = bound.arguments
    for flag in _FLAGS:
        if not isinstance(a[flag], bool):
            return f"{flag} is not a constant True/False"
    metas = [_shape(a[k]) for k in ("query", "key", "value")]
    if any(meta is None for meta in metas):
        return "its query, key or value is not a tensor with a recorded shape"
    masks = {}
    for name in ("key_padding_mask", "attn_mask"):
        if a[name] is None:
            masks[name] = None
            continue
        meta = _shape(a[name])
        if meta is None and getattr(a[name], "op", None) == "placeholder":
            # a forward argument that defaults to None: baking "no mask" into the graph
            # would silently drop a mask passed later
            return (f"its {name} is graph input '{a[name].target}', which the example inputs leave "
                    f"None; pass concrete_args={{'{a[name].target}': None}} to trace it through")
        if meta is None or not (meta.dtype == torch.bool or meta.dtype.is_floating_point):
            return f"its {name} is not a bool or float tensor"
        masks[name] = meta
    if a["is_causal"] and masks["attn_mask"] is None:
        return "is_causal=True without attn_mask (the module itself rejects it)"
    query, key, value = a["query"], a["key"], a["value"]
    kpm, mask = masks["key_padding_mask"], masks["attn_mask"]
    return MhaCall(
        batched=len(metas[0].shape) == 3,
        self_attention=query is key and key is value and m._qkv_same_embed_dim,
        need_weights=a["need_weights"], average_weights=a["average_attn_weights"],
        # the module drops attn_mask for SDPA's causal mask only in this case
        causal=a["is_causal"] and kpm is None and not a["need_weights"],
        key_padding_bool=None if kpm is None else kpm.dtype == torch.bool,
        attn_mask_bool=None if mask is None else mask.dtype == torch.bool,
        attn_mask_ndim=0 if mask is None else len(mask.shape),
        dtype=metas[0].dtype,
    )


def _additive(mask, is_bool: bool, dtype: torch.dtype):
    """A mask to add to the scores: True (a bool mask's "not allowed") becomes -inf."""
    if not is_bool:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


def mha_forward(m: nn.MultiheadAttention, call: MhaCall, query, key, value, key_padding_mask=None,
                need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
    """``m(query, key, value, ...)`` as functional ops on ``m``'s parameters (traced by fx).

    Batch-first inside: q, k, v are projected, split into heads with
    ``reshape(B, L, H, head_dim)`` (a fused ``(B, L, 3, H, head_dim)`` for self-attention),
    attended with SDPA (or softmax(q k^T) v when the weights are returned, averaged over
    heads as the module does), merged and projected by ``out_proj``. Returns the module's
    ``(output, weights or None)``.

    >>> import torch
    >>> m = torch.nn.MultiheadAttention(8, 2).eval()
    >>> x = torch.randn(3, 1, 8)
    >>> call = MhaCall(True, True, False, True, False, None, None, 0, torch.float32)
    >>> torch.allclose(mha_forward(m, call, x, x, x)[0], m(x, x, x)[0], atol=1e-6)
    True
    """
    heads, head_dim = m.num_heads, m.head_dim
    if not call.batched:  # one sequence: a batch of one, batch first
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not m.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    batch, q_len = query.shape[0], query.shape[1]
    if call.self_attention:
        qkv = F.linear(query, m.in_proj_weight, m.in_proj_bias)
        q, k, v = qkv.reshape(batch, q_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        # (a traced tensor unpacks only straight into names, so no loops over chunks here)
        if m._qkv_same_embed_dim:
            w_q, w_k, w_v = m.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        b_q = b_k = b_v = None
        if m.in_proj_bias is not None:
            b_q, b_k, b_v = m.in_proj_bias.chunk(3)
        q, k, v = (F.linear(x, w, b).reshape(batch, x.shape[1], heads, head_dim).transpose(1, 2)
                   for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
    mask = None
    if call.attn_mask_bool is not None and not call.causal:
        mask = _additive(attn_mask, call.attn_mask_bool, call.dtype)
        if call.attn_mask_ndim == 3:  # (B * H, L, S): one mask per head
            mask = mask.reshape(batch, heads, q_len, mask.shape[-1])
    if call.key_padding_bool is not None:
        padding = _additive(key_padding_mask, call.key_padding_bool, call.dtype)
        padding = padding.reshape(batch, 1, 1, padding.shape[-1])
        mask = padding if mask is None else mask + padding
    weights = None
    if call.need_weights:
        scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        out = attn @ v
        weights = attn.mean(dim=1) if call.average_weights else attn
        if not call.batched:
            weights = weights.squeeze(0)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=call.causal)
    out = out.transpose(1, 2).reshape(batch, q_len, heads * head_dim)
    out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
    if not call.batched:
        out = out.squeeze(0)
    elif not m.batch_first:
        out = out.transpose(0, 1)
    return out, weights


__all__ = ["MhaCall", "plan_calls", "mha_forward", "LEAF_REASON"]
