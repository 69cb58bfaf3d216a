"""Residual branches as regulariser groups: depth-wise sparse training (SSL, Wen et al. 2016).

A group lasso over *every* parameter of a residual branch (``branch.slices([0], "all")``:
its convs, norms, biases, layer scale) drives the whole branch to zero; the proximal step
of ``GroupLasso`` zeroes it exactly, at once. A branch whose parameters are all zero
outputs zero (its last producer's weight and bias are among them), so the join passes the
stream through unchanged and removing the branch (``units="branches"``) changes nothing:
the depth oracle holds by construction.

Each branch becomes one ``ChannelSlices`` (whole tensors, label ``("branch", id)``), so
the existing ``GroupLasso`` (``penalty()``, ``prox_()``, any optimizer, DDP) takes them as
they are, alone or after channel groups of other branches' weights.

Example:
    >>> import torch, fxprune
    >>> from fxprune.regularize import GroupLasso
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         x = x + self.a(x)
    ...         return x + self.b(x)
    >>> model = Net()
    >>> groups = branch_slices_from_graph(model, fxprune.analyze(model, torch.randn(2, 4)))
    >>> [g.label[0] for g in groups], groups[0].numel()    # labels ("branch", branch id)
    (['branch', 'branch'], 20)
    >>> lasso = GroupLasso(groups, lam=1e-3)
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from fxprune.errors import SpecError
from fxprune.regularize.channels import ChannelSlices, parameter_owners

_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def branch_slices_from_graph(model: torch.nn.Module, graph, branches: Iterable[int] | None = None) -> list[ChannelSlices]:
    """One ChannelSlices per residual branch: every trainable parameter the branch removes.

    ``branches``: the branch ids to regularise; default: every zero-invariant branch that
    holds no other branch (the innermost blocks; an outer branch would share the inner
    ones' weights, and a group lasso needs disjoint groups). A branch that is not
    zero-invariant (``x + sigmoid(fc(x))``) is left out by default: zero weights would
    not zero its output. A parameter tied to layers outside the branch is not its to
    shrink and is left out; a branch with no parameter of its own is skipped.

    Example:
        >>> import torch, fxprune
        >>> from fxprune.testing import ResidualLinear
        >>> model = ResidualLinear(4, hidden=8)
        >>> (group,) = branch_slices_from_graph(model, fxprune.analyze(model, torch.randn(2, 4)))
        >>> [tuple(s.param.shape) for s in group], group.numel()
        ([(8,), (8, 4), (4,), (4, 8)], 76)
    """
    by_id = {b.id: b for b in graph.branches}
    if branches is None:
        parents = {b.parent for b in graph.branches}
        chosen = [b for b in graph.branches if b.id not in parents and b.zero_invariant]
    else:
        ids = list(branches)
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise SpecError(f"branches: no branch with id {unknown[0]}; the graph's branches are "
                            f"{sorted(by_id) or 'none'} (graph.branches)")
        chosen = [by_id[i] for i in dict.fromkeys(ids)]
        _check_not_nested(chosen, by_id)
    params = dict(model.named_parameters(remove_duplicate=False))
    owners = parameter_owners(model)
    out = []
    for b in chosen:
        triples = [(params[key], dim, index, owners[key]) for key, entries in sorted(b.slices([0], "all").items())
                   if key in params and not key.endswith(_BUFFERS) for dim, index in entries]
        if triples:
            out.append(ChannelSlices(triples, label=("branch", b.id)))
    return out


def _check_not_nested(chosen: list, by_id: dict) -> None:
    ids = {b.id for b in chosen}
    for b in chosen:
        up = b.parent
        while up is not None:
            if up in ids:
                raise SpecError(f"branches: branch {b.id} nests in branch {up}, so their groups would "
                                "share weights; regularise either the inner or the outer one (the "
                                "default takes the innermost branches)")
            up = by_id[up].parent
