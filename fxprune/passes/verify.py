"""The zero-invariance oracle: pruning a channel must equal zeroing its producers.

For a zero-invariant group, zeroing the ``role="out"`` slices of the chosen channels in
a copy of the original model makes those channels identically zero everywhere, so
removing them must not change the output. This needs no knowledge of the
architecture, which makes it the universal correctness check of a plan. Units whose
removal is a masking run the original with that masking instead: experts with their
router logits at -inf, whole layers with their forward replaced by the identity
(``fxprune.channels.layers.identity_layers``).
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
import torch.fx

from .._util import eval_mode
from ..capture.parts import record_parts
from ..channels.branches import unit
from ..channels.experts import mask_routers
from ..channels.graph import DependencyGraph
from ..channels.layers import identity_layers
from ..errors import PlanError, VerificationError
from .check_values import output_error


def zeroed_copy(model: torch.nn.Module, graph: DependencyGraph, plan: Mapping[int, object]) -> torch.nn.Module:
    """A deep copy of ``model`` with the ``role="out"`` slices of the plan's channels zeroed."""
    ref = copy.deepcopy(model)
    # named tensors rather than state_dict: non-persistent buffers (rotary tables) are bound too
    state = dict(ref.named_parameters(remove_duplicate=False)) | dict(ref.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for gid, channels in plan.items():
            if unit(graph, gid).oracle_role in ("router", "identity"):
                continue  # masked while the reference runs (mask_routers, identity_layers)
            for key, cuts in unit(graph, gid).slices(channels, "out").items():
                for dim, index in cuts:
                    state[key].index_fill_(dim, torch.as_tensor(index, device=state[key].device), 0)
    return ref


def check_zero_invariance(model: torch.nn.Module, graph: DependencyGraph, plan: Mapping[int, object],
                          pruned: torch.nn.Module | None = None, *, tolerance: float = 1e-4) -> float:
    """Prune (or take ``pruned``), compare with the zeroed original; return the relative error.

    Under ``capture="parts"`` the outputs compared are the parts' (a detector's head
    outputs before post-processing): the zeroed model runs its own forward on the model's
    inputs, and the pruned graph takes the inputs its parts saw there.

    Raises :class:`VerificationError` when the error exceeds ``tolerance`` and
    :class:`PlanError` when the plan touches a group that is not zero-invariant.

    >>> import torch, fxprune
    >>> from fxprune.passes.verify import check_zero_invariance
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)).eval()
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> check_zero_invariance(net, graph, {1: [0, 3]}) < 1e-6
    True
    """
    for gid in plan:
        group = unit(graph, gid)  # a channel group or a branch (zeroing its last producer = removing it)
        if not group.zero_invariant and group.oracle_role not in ("router", "identity"):
            why = getattr(group, "zero_invariance_reason", None) or getattr(group, "reason", "")
            raise PlanError(f"{type(group).__name__.lower()} {gid} is not zero-invariant ({why}); "
                            "the oracle does not apply to it")
    from .prune import prune_graph

    small = pruned if pruned is not None else prune_graph(graph, plan)
    ref = zeroed_copy(model, graph, plan).eval()
    with torch.no_grad(), eval_mode(small), mask_routers(ref, graph, plan), identity_layers(ref, graph, plan):
        if graph.parts is not None and not isinstance(small, torch.fx.GraphModule):
            # a pruned copy of the model (emit="module"): both run their own forward; the
            # parts' outputs are compared (the post-processing's need not be continuous)
            _, want, _ = record_parts(ref, graph.model_inputs, graph.parts)
            _, got, _ = record_parts(small, graph.model_inputs, graph.parts)
        elif graph.parts is not None:
            # the pruned parts graph on the inputs the zeroed model's parts saw, against
            # the outputs they gave: the model's own forward is the reference
            inputs, want, _ = record_parts(ref, graph.model_inputs, graph.parts)
            got = small(*inputs)
        else:
            want, got = graph.example_inputs.call(ref), graph.example_inputs.call(small)
        error = output_error(want, got)
    if error > tolerance:
        raise VerificationError(f"pruned model differs from the zeroed original by {error:.3g} (relative) "
                                f"> {tolerance:g}: a channel rule is wrong for this model")
    return error
