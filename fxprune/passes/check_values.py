"""The value check every prune runs: the pruned graph computes what the original computes
with the removed units masked.

Shapes alone do not prove a rewrite (a dropped in-place call, a wrong slice of the right
size, a constant rewritten at the wrong position all keep every shape). So, on the
example inputs, the pruned graph is run against the *analysed* graph with the plan's
units masked the way their removal equals: zeroed producer slices for a zero-invariant
group (``Group.oracle_role == "out"``), zeroed consumer slices where that is the masking
(``"in"``, query slots), a removed layer's output replaced by its input (``"identity"``,
whole layers). The largest difference over the outputs, relative to the
largest reference output, must stay under a tolerance set by the dtype. When it does
not, both graphs are run again node by node and the error names the first node whose
kept channels diverge.

Masked tensors are fresh copies of only the tensors the plan touches, swapped in with
``torch.func.functional_call``: the check costs two forward passes and no copy of the
model. A model on the meta device has no values: the check is skipped with a note.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.fx
from torch.func import functional_call

from .._util import eval_mode
from ..channels.branches import unit
from ..channels.experts import router_overrides
from ..channels.graph import DependencyGraph
from ..channels.layers import identity_overrides
from ..channels.values import TensorChannels
from ..errors import VerificationError

# relative to the largest reference output; measured oracle errors in float32 stay below
# 2e-6 on every torchvision and timm model, a wrong rewrite is off by 1e-2 or more
TOLERANCES = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
SEED = 0  # both runs draw the same random numbers, should the model draw any


@dataclass(frozen=True)
class ValueCheck:
    """What the value check found: ``error`` relative to the largest reference output
    (None when no value was checked) against ``tolerance``; ``note`` says it in words."""

    error: float | None
    tolerance: float
    note: str


def split_by_masking(graph: DependencyGraph, plan: Mapping[int, object]) -> tuple[dict, list[int]]:
    """The part of ``plan`` whose removal equals a masking, and the ids of the groups (or
    branches) without one.

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 6),
    ...                           torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> split_by_masking(graph, {1: [0], 2: [1]})
    ({2: [1]}, [1])
    """
    masked, unmasked = {}, []
    for gid, units in plan.items():
        if len(units):
            if unit(graph, gid).oracle_role is None:
                unmasked.append(gid)
            else:
                masked[gid] = units
    return masked, unmasked


def masked_tensors(graph: DependencyGraph, plan: Mapping[int, object]) -> dict[str, torch.Tensor]:
    """``{key: copy of the analysed graph's tensor with the plan's units masked}``, for the
    tensors the masking touches (every key a tied tensor is known by)."""
    tensors: dict[str, torch.Tensor] = {}
    for gid, units in plan.items():
        group = unit(graph, gid)  # a channel group, a branch or an expert set
        if group.oracle_role in ("router", "identity"):
            continue  # a masking of a node's output, not of a tensor: router/identity_overrides
        for key, cuts in group.slices(units, group.oracle_role).items():
            if key not in tensors:
                tensors[key] = _fetch(graph.gm, key).detach().clone()
            for dim, index in cuts:
                tensors[key].index_fill_(dim, torch.as_tensor(index, device=tensors[key].device), 0)
    return tensors


def has_values(gm: torch.nn.Module, inputs: list[torch.Tensor]) -> bool:
    """False when any weight or input lives on the meta device (nothing to compute with)."""
    return not any(t.is_meta for t in [*gm.parameters(), *gm.buffers(), *inputs])


def check_values(graph: DependencyGraph, plan: Mapping[int, object], pruned: torch.fx.GraphModule,
                 origin: Mapping[str, str], keep: np.ndarray) -> ValueCheck:
    """Run ``pruned`` against the analysed graph with ``plan`` masked; raise
    :class:`VerificationError` naming the first diverging node when they differ.

    ``plan`` must only hold groups with an ``oracle_role`` (see :func:`split_by_masking`);
    ``origin`` maps a pruned node's name to the analysed node it stands for, ``keep`` is
    the survival mask over channel ids (both from the prune pass).
    """
    inputs = graph.example_inputs
    if not has_values(graph.gm, inputs.tensors()):
        return ValueCheck(None, 0.0, "values not checked: the model is on the meta device (shapes were)")
    masked = masked_tensors(graph, plan)
    routers = router_overrides(graph, plan)  # removed experts: -inf on their router logits
    identities = identity_overrides(graph, plan)  # removed layers: their input as their output
    reference = _run(graph.gm, masked, inputs.clone().flat(graph.gm), overrides=routers, identities=identities)
    output = _run(pruned, {}, inputs.clone().flat(pruned))
    tolerance = max((TOLERANCES.get(t.dtype, 1e-4) for t in _leaves(reference)), default=1e-4)
    error = output_error(reference, output)
    if error > tolerance:
        raise VerificationError(
            f"the pruned model differs from the original with the removed units masked by {error:.3g} "
            f"(relative to the largest output) > {tolerance:g}; {first_divergence(graph, masked, pruned, origin, keep, plan)}. "
            "This is a bug in a rewrite; please report it with the model (verify='shapes' skips this check)")
    return ValueCheck(error, tolerance, f"values checked on the example inputs: largest difference {error:.2g} "
                                        f"relative to the output (tolerance {tolerance:g})")


def first_divergence(graph: DependencyGraph, masked: dict[str, torch.Tensor], pruned: torch.fx.GraphModule,
                     origin: Mapping[str, str], keep: np.ndarray, plan: Mapping[int, object] | None = None) -> str:
    """Where the two runs part: the first pruned node whose kept channels differ from the
    masked original's (nodes in graph order; nodes the rewrite added are not compared)."""
    reference = _run(graph.gm, masked, graph.example_inputs.clone().flat(graph.gm), record=True,
                     overrides=router_overrides(graph, plan) if plan is not None else {},
                     identities=identity_overrides(graph, plan) if plan is not None else {})
    values = _run(pruned, {}, graph.example_inputs.clone().flat(pruned), record=True)
    old_nodes = {n.name: n for n in graph.gm.graph.nodes}
    for node in pruned.graph.nodes:
        name = origin.get(node.name, node.name)
        want, got = reference.get(name), values.get(node.name)
        channels = graph.state.env.get(old_nodes.get(name))
        if not isinstance(want, torch.Tensor) or not isinstance(got, torch.Tensor) or not want.is_floating_point():
            continue
        if isinstance(channels, TensorChannels):
            for dim, dim_map in channels.dims.items():
                kept = np.where(dim_map.ids >= 0, keep[np.clip(dim_map.ids, 0, None)], True)
                want = want.index_select(dim, torch.as_tensor(np.flatnonzero(kept), device=want.device))
        if want.shape != got.shape:
            return f"first diverging node: '{node.name}' ({node.format_node()}) has shape {tuple(got.shape)}, " \
                   f"the original's kept channels {tuple(want.shape)}"
        scale = max(want.abs().max().item() if want.numel() else 0.0, 1e-6)
        if want.numel() and (want - got).abs().max().item() / scale > TOLERANCES.get(want.dtype, 1e-4):
            return f"first diverging node: '{node.name}' ({node.format_node()})"
    return "no single node diverges on its own (the outputs do)"


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, overrides: Mapping[str, torch.Tensor] | None = None,
                 identities: Mapping[str, str] | None = None):
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[str, object] = {}
        self.overrides = overrides or {}
        self.identities = identities or {}
        self.by_name = {n.name: n for n in gm.graph.nodes} if self.identities else {}

    def run_node(self, n):
        result = super().run_node(n)
        if n.name in self.overrides:  # an additive mask on this node's output (a router's)
            result = result + self.overrides[n.name].to(result.device, result.dtype)
        if n.name in self.identities:  # a layer replaced by the identity: its input is its output
            result = self.env[self.by_name[self.identities[n.name]]]
        self.values[n.name] = result
        return result


class _Recorded(torch.nn.Module):
    """Runs a graph through :class:`_Recorder` so ``functional_call`` can swap its tensors."""

    def __init__(self, gm: torch.fx.GraphModule, overrides: Mapping[str, torch.Tensor] | None = None,
                 record: bool = True, identities: Mapping[str, str] | None = None):
        super().__init__()
        self.gm = gm
        self.overrides = overrides
        self.identities = identities
        self.record = record

    def forward(self, *args):
        recorder = _Recorder(self.gm, self.overrides, self.identities)
        out = recorder.run(*args)
        return recorder.values if self.record else out


def _run(gm: torch.fx.GraphModule, tensors: dict[str, torch.Tensor], args: tuple, record: bool = False,
         overrides: Mapping[str, torch.Tensor] | None = None, identities: Mapping[str, str] | None = None):
    """``gm(*args)`` (every node's value with ``record``) with ``tensors`` swapped in, in
    eval mode, without gradients, from a fixed random seed; ``overrides`` adds a mask to
    the named nodes' outputs (removed experts' router logits), ``identities`` gives a
    node the value of another (a removed layer's exit that of its entry)."""
    if record or overrides or identities:
        module, tensors = _Recorded(gm, overrides, record, identities), {f"gm.{k}": v for k, v in tensors.items()}
    else:
        module = gm
    with eval_mode(gm), torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return functional_call(module, tensors, args, strict=False, tie_weights=False)


def output_error(a, b) -> float:
    """Largest absolute difference over all output tensors, relative to the largest output."""
    flat_a, flat_b = _leaves(a), _leaves(b)
    if len(flat_a) != len(flat_b) or any(x.shape != y.shape for x, y in zip(flat_a, flat_b)):
        raise VerificationError(
            f"output structure differs: {[tuple(x.shape) for x in flat_a]} vs {[tuple(y.shape) for y in flat_b]}")
    scale = max(max((x.abs().max().item() for x in flat_a if x.numel()), default=0.0), 1e-12)
    return max((x - y).abs().max().item() / scale for x, y in zip(flat_a, flat_b) if x.numel())


def _leaves(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _leaves(value[k])]
    return []


def _fetch(gm: torch.nn.Module, key: str) -> torch.Tensor:
    path, _, attr = key.rpartition(".")
    return getattr(gm.get_submodule(path), attr)


__all__ = ["ValueCheck", "check_values", "output_error", "split_by_masking", "masked_tensors", "first_divergence", "TOLERANCES"]
