"""Calibration across processes: under ``torchrun`` (``torch.distributed`` initialised), each
rank runs its share of the calibration batches and the sums the scores are built from are
added over ranks, so every rank ends with the scores one process would compute.

Every rank is given the same calibration batches; rank ``r`` of ``w`` runs batches
``r, r + w, r + 2w, ...`` (``rank_share``). What the scores accumulate is a sum over batches
(squared activations, gradients, Gram matrices, counts), so the sum over ranks of the
ranks' sums is the one-process sum, up to the order of float additions.
``all_reduce_sums`` adds named tensors over ranks in one collective, also when a rank saw
no batch for a name (fewer batches than ranks, a layer a batch never reaches).
Measurements that must not be repeated or averaged (``scope="latency"`` timings) run on
rank 0 alone and are broadcast (``on_rank_zero``). Without an initialised process group
every function is the identity.
"""
from __future__ import annotations

from typing import Callable, Hashable, Iterable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one.

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_share(items: Iterable[T]) -> Iterator[T]:
    """This rank's items: those at positions ``rank, rank + world, ...`` (all of them in one process).

    Example:
        >>> list(rank_share(["a", "b", "c"]))
        ['a', 'b', 'c']
    """
    rank, world = rank_and_world()
    for i, item in enumerate(items):
        if i % world == rank:
            yield item


def all_reduce_sums(sums: dict[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
    """``sums`` added over every rank, keyed by the union of the ranks' keys (a key a rank
    lacks counts as zeros there). Values keep their shape and dtype (they are added in
    float64); one process gets its own dict back unchanged.

    Keys must be picklable and sortable by ``repr`` order (strings, tuples of strings and
    ints): every rank lays the tensors out in one order.

    Example:
        >>> all_reduce_sums({"a": torch.ones(2)})
        {'a': tensor([1., 1.])}
    """
    _, world = rank_and_world()
    if world == 1:
        return sums
    shapes: dict[Hashable, tuple[int, ...]] = {}
    dtypes: dict[Hashable, torch.dtype] = {}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, {k: (tuple(v.shape), v.dtype) for k, v in sums.items()})
    for theirs in gathered:
        for key, (shape, dtype) in theirs.items():
            dtypes.setdefault(key, dtype)
            if shapes.setdefault(key, shape) != shape:
                raise RuntimeError(f"calibration across processes: '{key}' has shape {shapes[key]} on one rank "
                                   f"and {shape} on another; every rank must analyse the same model")
    order = sorted(shapes, key=repr)
    flat = torch.cat([(sums[k].detach().to("cpu", torch.float64) if k in sums
                       else torch.zeros(shapes[k], dtype=torch.float64)).reshape(-1) for k in order])
    if dist.get_backend() == "nccl":
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat)
    out, start = {}, 0
    for key in order:
        size = int(torch.Size(shapes[key]).numel())
        device = sums[key].device if key in sums else torch.device("cpu")
        out[key] = flat[start:start + size].reshape(shapes[key]).to(device, dtypes[key])
        start += size
    return out


def all_reduce_count(count: int | float) -> float:
    """A number added over ranks (batches seen, tokens); itself in one process.

    Example:
        >>> all_reduce_count(3)
        3
    """
    return all_reduce_sums({"n": torch.tensor(float(count))})["n"].item() if rank_and_world()[1] > 1 else count


def all_gather_union(items: set) -> set:
    """The union of every rank's set (picklable items); the set itself in one process.

    Example:
        >>> all_gather_union({"loss_fn"})
        {'loss_fn'}
    """
    _, world = rank_and_world()
    if world == 1:
        return items
    gathered: list = [None] * world
    dist.all_gather_object(gathered, set(items))
    return set().union(*gathered)


def on_rank_zero(measure: Callable[[], T]) -> T:
    """``measure()`` run on rank 0 only, its (picklable) result broadcast to every rank:
    timings are measured once, on one process, and every rank takes the same decision.

    Example:
        >>> on_rank_zero(lambda: 42)
        42
    """
    rank, world = rank_and_world()
    if world == 1:
        return measure()
    box = [measure() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


__all__ = ["rank_and_world", "rank_share", "all_reduce_sums", "all_reduce_count", "all_gather_union",
           "on_rank_zero"]
