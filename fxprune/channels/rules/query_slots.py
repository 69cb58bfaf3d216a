"""Query slots: grouped-query attention pruned by query head, key/value heads kept.

Under grouped-query attention query head ``g * r + j`` reads key/value head g; j is its
*slot* in the group. ``analyze(..., attention_units="query_slots")`` makes slot j of
every group one unit, so removing it leaves every key/value head with the same number
of query heads (r shrinks by one) and the key/value projections untouched.

The slots get channels of their own where the graph spells the group size: the dim
``repeat_kv``'s expand broadcasts (``[B, kv, 1, S, D] -> [B, kv, r, S, D]``) opens r slot
channels, and the reshape that merges ``kv x r`` into the head dim lays them out as
``slot[j]`` at position ``g * r + j``, so the prune pass rewrites r in both constants.
With SDPA's ``enable_gqa`` there is no such constant: the query heads are tied by slot
where they meet the key/value heads. Either way the key/value head channels are frozen.

A slot is not zero-invariant: zeroing its query rows makes its attention uniform over
the values it shares with the other slots, not zero. Removing it does equal zeroing its
columns of the output projection (its only consumer): the group's ``oracle_role`` is
``"in"``, and the value check of every prune holds it.
"""
from __future__ import annotations

import numpy as np

from ..values import DimMap

OPTION = "attention_units='query_slots'"
KEEPS_KV = f"{OPTION} keeps key/value heads"
NOT_ZERO = (f"{OPTION}: a query slot with zeroed rows still attends (uniformly) to the values it shares "
            "with the other slots, so its output is not zero")


def slot_channels(ctx, n: int) -> DimMap:
    """The dim ``repeat_kv``'s expand broadcasts: n new channels, slot j of every group."""
    ids = ctx.new_space(n, f"query slots of {ctx.node.name}")
    ctx.state.spaces[-1].produces = False  # no tensor produces them: they tie the query heads
    slots = DimMap.of(ids, False)
    ctx.break_zi(slots, NOT_ZERO, only_non_zi=False, consumers_equal_removal=True)
    return slots


def merged_slots(ctx, kv: DimMap, slots: DimMap) -> DimMap:
    """``[.., kv, r, ..] -> [.., kv * r, ..]``: position g * r + j is slot j; the key/value
    heads keep their count, so their channels are frozen rather than mixed."""
    ctx.freeze(kv.ids, f"{KEEPS_KV} (at {ctx.where()})")
    return DimMap(np.tile(slots.ids, len(kv)), np.tile(slots.zi, len(kv)))


def tie_query_slots(ctx, q: DimMap | None, kv_heads: int, kv: list[DimMap | None]) -> DimMap | None:
    """SDPA with ``enable_gqa``: tie query head g * r + j to slot j of every group (the
    same position in each of the ``kv_heads`` blocks) and freeze the key/value heads."""
    for m in kv:
        if m is not None:
            ctx.freeze(m.ids, f"{KEEPS_KV} (at {ctx.where()})")
    if q is None:
        return None
    ctx.tie_blocks(q, kv_heads, across=True)
    ctx.break_zi(q, NOT_ZERO, only_non_zi=False, consumers_equal_removal=True)
    return q.with_zi(False)


__all__ = ["slot_channels", "merged_slots", "tie_query_slots", "KEEPS_KV", "NOT_ZERO", "OPTION"]
