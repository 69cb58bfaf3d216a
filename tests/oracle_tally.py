"""How many property-test examples ran an oracle that could fail.

An oracle compares the pruned model with the original whose removed units are zeroed.
It can only catch a wrong rewrite when the plan removes something *and* the zeroing
moves the output: an empty plan, or units whose zeroing changes nothing, compares a
model with itself. Each property test records every example here; the conftest prints
"N of M examples ran a non-trivial oracle" per test at the end of the session.
"""
from __future__ import annotations

from collections import defaultdict

import torch

# test name -> [examples whose oracle could fail, examples]
TALLY: dict[str, list[int]] = defaultdict(lambda: [0, 0])


def moved(reference: torch.Tensor, zeroed: torch.Tensor, tolerance: float) -> bool:
    """Whether zeroing the planned units moved the output by more than ``tolerance``
    (relative): only then would a pruned model that forgot the plan fail the oracle.

    >>> moved(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 1.9]), 1e-4), moved(torch.ones(2), torch.ones(2), 1e-4)
    (True, False)
    """
    scale = reference.abs().max().clamp_min(1e-6)
    return bool((reference - zeroed).abs().max() / scale > tolerance)


def record(test: str, nontrivial: bool) -> None:
    """Count one example of ``test``; ``nontrivial``: its oracle could have failed."""
    counts = TALLY[test]
    counts[0] += bool(nontrivial)
    counts[1] += 1


def summary() -> list[str]:
    """One line per recorded test, e.g. ``test_x: 180 of 200 examples ran a non-trivial oracle``."""
    return [f"{test}: {n} of {m} examples ran a non-trivial oracle" for test, (n, m) in sorted(TALLY.items())]
