"""Write removed experts back into the user's class (``emit="module"``).

The stacked expert weights and the router rows are cut at dim 0 like any other cut;
what remains is the expert count the class and its config hold: modules on the path of
a routed layer that store it (``num_experts``, ``num_local_experts``) and the config's
``num_local_experts`` / ``num_experts`` / ``n_routed_experts``. One config field holds
one count for every layer, so a plan that leaves layers with different counts is a
:class:`~fxprune.errors.WriteBackError` (``emit="graph"`` carries any count).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..channels.experts import removed_experts
from ..errors import WriteBackError
from .hf_config import hf_config

COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# config fields of expert widths, and what names the groups they size: the routed experts'
# stacked weights, or a shared expert's modules (Qwen2-MoE)
WIDTH_FIELDS = {"moe_intermediate_size": "experts.", "shared_expert_intermediate_size": "shared_expert."}


def expert_cuts(graph, plan: Mapping, cuts: dict) -> dict:
    """``cuts`` (``{key: [(dim, kept)]}``) with the kept experts added at dim 0."""
    out = {k: list(v) for k, v in cuts.items()}
    for s, chosen in removed_experts(graph, plan):
        kept = np.array([e for e in range(s.size) if e not in set(chosen)])
        rows = np.concatenate([kept, np.arange(s.size, s.size + s.router_extra)])  # shared experts' gates stay
        for key, dim in [(k, 0) for k in s.router_keys + s.stacked] + list(s.biases):
            out[key] = sorted(out.get(key, []) + [(dim, rows if key in s.router_keys else kept)], key=lambda c: c[0])
    return out


def sync_expert_counts(model: torch.nn.Module, graph, plan: Mapping) -> list[str]:
    """Set the expert counts of the routed layers' modules and of the config; return the
    config changes as ``field=value`` strings.

    >>> sync_expert_counts(torch.nn.Linear(2, 2), None, {})
    []
    """
    removed = removed_experts(graph, plan) if plan else []
    if not removed:
        return []
    left: dict[str, int] = {}
    untouched = {s.id for s in graph.experts} - {s.id for s, _ in removed}
    for s, chosen in removed:
        layer = _layer_path(s.router_keys + s.stacked + [k for k, _ in s.biases])
        left[layer] = s.size - len(chosen)
        for path, module in model.named_modules():
            if path == layer or path.startswith(layer + ".") if layer else True:
                for attr in ("num_experts", "num_local_experts"):
                    if getattr(module, attr, None) == s.size:
                        setattr(module, attr, left[layer])
    config = hf_config(model)
    if config is None:
        return []
    counts = set(left.values()) | {graph.experts[i - graph.experts[0].id].size for i in untouched}
    field = next((f for f in COUNT_FIELDS if isinstance(getattr(config, f, None), int)), None)
    if field is None:
        return []
    if len(counts) > 1:
        raise WriteBackError(f"config.{field} holds one expert count for every layer, but the plan leaves "
                             f"layers with {sorted(counts)} experts; remove as many experts in every routed "
                             "layer, or write the graph instead (emit='graph')")
    config.__setattr__(field, counts.pop())
    return [f"{field}={getattr(config, field)}"]


def sync_expert_widths(model: torch.nn.Module, graph, plan: Mapping) -> list[str]:
    """Set the config's expert widths (``moe_intermediate_size``,
    ``shared_expert_intermediate_size``) and the experts' ``intermediate_dim`` from the
    plan; one value holds for every expert of every layer (a stacked weight gives all
    experts of a layer one width), else a :class:`~fxprune.errors.WriteBackError`.

    >>> sync_expert_widths(torch.nn.Linear(2, 2), None, {})
    []
    """
    config = hf_config(model)
    if config is None or graph is None:
        return []
    changed = []
    for name, marker in WIDTH_FIELDS.items():
        old = getattr(config, name, None)
        if not isinstance(old, int):
            continue
        new = {g.id: g.size - len(set(plan.get(g.id, ()))) for g in graph.prunable_groups
               if g.size == old and any(marker in p for p in g.producers)}
        widths = set(new.values()) or {old}
        if len(widths) > 1:
            raise WriteBackError(f"config.{name} holds one width for every expert, but the plan leaves "
                                 f"{sorted(widths)}; remove as many neurons in every expert layer "
                                 "(scope='local'), or write the graph instead (emit='graph')")
        width = widths.pop()
        if width != old:
            setattr(config, name, width)
            changed.append(f"{name}={width}")
            if marker == "experts.":
                for module in model.modules():
                    if getattr(module, "intermediate_dim", None) == old and hasattr(module, "num_experts"):
                        module.intermediate_dim = width
    return changed


def _layer_path(keys: list[str]) -> str:
    """The longest module path every key lies under (the routed layer)."""
    parts = [k.split(".")[:-1] for k in keys]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


__all__ = ["expert_cuts", "sync_expert_counts", "sync_expert_widths"]
