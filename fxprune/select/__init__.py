"""Deciding what to prune: scores, selection policy and latency timing.

- ``score``: one importance number per channel; the score registry (``register_score``).
- ``calibration``: calibration batches (``spec.calibration``) and taylor's default loss.
- ``activations``: per-channel input norms of the consuming layers over those batches.
- ``metrics``: the target metrics registry (``flops``, ``params``, ``latency``).
- ``plan``: scores -> a pruning plan ``{group id: [units]}`` for a ratio or a target.
- ``ranking``: ranked (group, unit) candidates -> feasible, rounded plans.
- ``landing``: the search that lands a target by pruning and measuring candidates.
- ``align``: prefer kept widths on the channel multiples kernels block by.
- ``latency_table``: measured milliseconds saved per group (``scope="latency"``).
- ``latency_verify``: the end-to-end timing that keeps the faster latency plan.

The plan is carried out by ``fxprune.passes.prune``.
"""
