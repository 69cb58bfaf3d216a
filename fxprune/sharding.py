"""Parameters that FSDP2 (``torch.distributed.fsdp.fully_shard``) has sharded across ranks.

``fully_shard`` replaces every parameter of a module by a new ``DTensor`` parameter of
which each rank holds one piece (``Shard(0)``: a block of rows). Training-time tools
therefore (1) find a parameter again by where it lives, not by the tensor object they
were given before sharding (that one is stale: nothing updates it any more), (2) compute
on the local piece, and (3) sum what depends on a whole channel (a squared norm, a count)
over the ranks that hold its pieces. Under DDP, or in one process, parameters are plain
tensors and every function here is the identity or a no-op.

Example:
    >>> w = torch.nn.Parameter(torch.ones(4, 2))
    >>> local(w) is w, shard_offsets(w), is_sharded(w)
    (True, (0, 0), False)
    >>> sum_over_shards(torch.tensor([3.0]), [w])
    tensor([3.])
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from fxprune.errors import SpecError

try:  # torch built without distributed support has no DTensor: nothing can be sharded then
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - distributed-less builds
    dist, DTensor = None, None


def is_dtensor(t: object) -> bool:
    """True for a ``DTensor`` (what ``fully_shard`` makes of a parameter).

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(t: torch.Tensor) -> bool:
    """True when ``t`` is a DTensor split over at least one mesh dimension.

    Example:
        >>> is_sharded(torch.zeros(2))
        False
    """
    return is_dtensor(t) and any(p.is_shard() for p in t.placements)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``t`` (a view: in-place changes reach the parameter;
    differentiable: gradients reach the DTensor); ``t`` itself when it is not a DTensor.

    Example:
        >>> t = torch.ones(3)
        >>> local(t) is t
        True
    """
    return t.to_local() if is_dtensor(t) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather for a sharded DTensor; a collective,
    so every rank must call it), ``t`` itself otherwise.

    Example:
        >>> full(torch.ones(2))
        tensor([1., 1.])
    """
    return t.full_tensor() if is_dtensor(t) else t


def shard_offsets(t: torch.Tensor) -> tuple[int, ...]:
    """Where this rank's piece of ``t`` starts in each dimension of the whole tensor.

    Example:
        >>> shard_offsets(torch.zeros(2, 3))
        (0, 0)
    """
    if not is_dtensor(t):
        return (0,) * t.dim()
    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offsets)


def _shard_groups(t: torch.Tensor) -> tuple:
    """The process groups across which ``t``'s pieces are spread (one per sharded mesh dim)."""
    if not is_dtensor(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(i) for i, p in enumerate(t.placements) if p.is_shard())


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: the total is replicated, every rank
    computes the same loss from it, so each rank's partial sum gets that loss's gradient
    as is (Megatron's "reduce from the model-parallel region")."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, groups: tuple) -> torch.Tensor:
        out = x.clone()
        for group in groups:
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def sum_over_shards(partial: torch.Tensor, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """``partial`` (computed from the local pieces of ``tensors``) summed over the ranks
    that hold the other pieces; differentiable. The sharded ``tensors`` must be sharded
    alike; when none is, ``partial`` is already the total and no collective runs.

    Example:
        >>> sum_over_shards(torch.tensor(2.0), [torch.zeros(3)])
        tensor(2.)
    """
    spreads = {tuple(tuple(dist.get_process_group_ranks(g)) for g in groups): groups
               for groups in (_shard_groups(t) for t in tensors) if groups}
    if not spreads:
        return partial
    if len(spreads) > 1:
        raise SpecError("sharding: the regularised parameters are sharded over different process "
                        "groups; shard them over one device mesh (one fully_shard mesh)")
    (groups,) = spreads.values()
    return _SumOverRanks.apply(partial, groups)


def replaced_by_fully_shard(t: torch.Tensor) -> bool:
    """True for a parameter object that ``fully_shard`` has replaced by a DTensor (it is no
    longer the model's: optimizer steps do not reach it).

    Example:
        >>> replaced_by_fully_shard(torch.nn.Parameter(torch.ones(2)))
        False
    """
    return not is_dtensor(t) and hasattr(t, "_fsdp_orig_uid")  # FSDP2 tags what it replaces


AFTER_TRAINING = ("gather the whole state dict (torch.distributed.checkpoint.state_dict."
                  "get_model_state_dict with StateDictOptions(full_state_dict=True)), load it "
                  "into an unsharded copy of the model and call it there")


def check_unsharded(model: torch.nn.Module, what: str, error: type[Exception] = SpecError,
                    fix: str = "call it on the unsharded model and fully_shard afterwards") -> None:
    """Raise ``error`` naming ``what`` when ``model`` holds FSDP2-sharded parameters:
    ``what`` runs the model or changes its structure (a capture, a parametrization), which
    must happen before ``fully_shard``.

    Example:
        >>> check_unsharded(torch.nn.Linear(2, 2), "apply_nm")
    """
    if any(is_dtensor(p) for p in model.parameters()):
        raise error(f"{what}: the model's parameters are sharded (fully_shard ran first), and "
                    f"{what} changes or runs the whole model; {fix} "
                    "(docs/scale.md, 'Training under FSDP2 and DDP')")


def total_over(tensors: Iterable[torch.Tensor], fn) -> torch.Tensor:
    """``sum(fn(t))`` over whole tensors, computed as ``fn`` of each rank's pieces summed
    over the ranks (``fn`` must add up over pieces: a sum of squares, a count); differentiable.

    Example:
        >>> total_over([torch.ones(2), torch.ones(3)], lambda t: t.sum())
        tensor(5.)
    """
    tensors = list(tensors)
    sharded = [t for t in tensors if is_sharded(t)]
    parts = [fn(t) for t in tensors if not is_sharded(t)]
    if sharded:
        parts.append(sum_over_shards(sum(fn(local(t)) for t in sharded), sharded))
    return sum(parts[1:], parts[0]) if parts else torch.zeros(())


def check_rows_sharded(t: torch.Tensor, what: str) -> None:
    """Raise a SpecError unless ``t`` is whole or split by rows (``Shard(0)``, fully_shard's
    default): ``what`` works on whole rows.

    Example:
        >>> check_rows_sharded(torch.ones(2, 2), "ProxSparse")
    """
    if is_dtensor(t) and any(p.is_shard() and p.dim != 0 for p in t.placements):
        raise SpecError(f"{what}: a weight of shape {tuple(t.shape)} is sharded along a dim other "
                        f"than 0 ({t.placements}); {what} needs whole rows on each rank: keep "
                        "fully_shard's default Shard(0)")
