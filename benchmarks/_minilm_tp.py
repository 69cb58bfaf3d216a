"""Torch-Pruning's BERT recipe on MiniLM, landed on a given number of encoder parameters.

The recipe is the one of Torch-Pruning's ``examples/transformers/prune_hf_bert.py``
(1.6.1): every ``BertSelfAttention``'s query, key and value Linear is listed in
``num_heads`` with the layer's head count, ``prune_num_heads=True`` and
``prune_head_dims=False`` so whole heads go, ``head_pruning_ratio`` for heads and
``pruning_ratio`` for the other channels (here the MLP neurons), and afterwards each
attention module's ``num_attention_heads`` / ``attention_head_size`` / ``all_head_size``
are set from the pruned widths. Unlike the example, the embeddings are in
``ignored_layers`` (with the pooler), so the hidden size stays, as it does for fxprune.

Torch-Pruning takes ratios, not a parameter target, so ``land`` bisects them: first one
ratio for heads and neurons together, then the neuron ratio alone at the head ratio
found (a head is ~2.8% of MiniLM's encoder, a step a tied ratio cannot always bridge).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch

TP_IMPORTANCES = ("magnitude", "taylor")
TOLERANCE = 0.01  # relative error on the encoder parameters the bisection stops at
STEPS = 18  # bisection steps per ratio: 2**-18 of the ratio range, far below one neuron


def _importance(score: str):
    import torch_pruning as tp

    if score == "magnitude":
        return tp.importance.MagnitudeImportance(p=2, group_reduction="mean")
    return tp.importance.TaylorImportance(group_reduction="mean")


def prune(encoder: torch.nn.Module, inputs: dict, score: str, global_pruning: bool, head_ratio: float,
          mlp_ratio: float, grads: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """A pruned copy of ``encoder`` (a ``SentenceEncoder``); ``grads`` (name -> gradient) feed Taylor."""
    import torch_pruning as tp
    from transformers.models.bert.modeling_bert import BertSelfAttention

    model = copy.deepcopy(encoder)
    if grads is not None:  # deepcopy drops .grad; Taylor reads it
        for name, p in model.named_parameters():
            p.grad = grads[name].clone() if name in grads else None
    attention = [m for m in model.modules() if isinstance(m, BertSelfAttention)]
    heads = {lin: m.num_attention_heads for m in attention for lin in (m.query, m.key, m.value)}
    pruner = tp.pruner.MetaPruner(
        model, inputs, importance=_importance(score), global_pruning=global_pruning,
        pruning_ratio=mlp_ratio, num_heads=heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=head_ratio, output_transform=lambda out: out[0].sum(),
        ignored_layers=[model.bert.embeddings, model.bert.pooler])
    pruner.step()
    for m in attention:
        m.num_attention_heads = pruner.num_heads[m.query]
        m.attention_head_size = m.query.out_features // m.num_attention_heads
        m.all_head_size = m.query.out_features
    return model.eval()


def land(encoder: torch.nn.Module, inputs: dict, score: str, global_pruning: bool, target: int,
         count: Callable[[torch.nn.Module], int], grads: dict[str, torch.Tensor] | None
         ) -> tuple[torch.nn.Module, dict]:
    """The pruned model whose ``count`` (encoder parameters) is closest to ``target``, and the
    ratios it took: a tied bisection, then the MLP ratio alone at the head ratio found."""
    tried: dict[tuple[float, float], int] = {}
    best: dict = {}  # only the closest model is kept: each copy holds the 47 MB embedding table

    def at(head: float, mlp: float) -> int:
        if (head, mlp) not in tried:
            model = prune(encoder, inputs, score, global_pruning, head, mlp, grads)
            tried[(head, mlp)] = n = count(model)
            if not best or abs(n - target) < abs(best["n"] - target):
                best.update(n=n, model=model, ratios=(head, mlp))
        return tried[(head, mlp)]

    def close(n: int) -> bool:
        return abs(n - target) <= TOLERANCE * target

    def bisect(make: Callable[[float], tuple[float, float]]) -> None:
        lo, hi = 0.0, 0.95  # ratio: lo keeps more than target, hi keeps less (or as close as it gets)
        for _ in range(STEPS):
            mid = (lo + hi) / 2
            n = at(*make(mid))
            if close(n):
                return
            lo, hi = (mid, hi) if n > target else (lo, mid)

    bisect(lambda r: (r, r))
    if not close(best["n"]):
        head = best["ratios"][0]
        bisect(lambda r: (head, r))
    head, mlp = best["ratios"]
    return best["model"], {"tp_head_ratio": round(head, 4), "tp_mlp_ratio": round(mlp, 4), "tp_prunes": len(tried)}
