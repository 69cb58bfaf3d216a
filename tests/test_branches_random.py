"""Property test: residual branches of random DAGs (tests/strategies.py) are removed as
the oracle for depth says, alone and beside channel plans, through both front ends.

Random DAGs add any two tensors of equal width, attention steps are residual blocks, so
branches nest, fork from the stream at different points and meet projected shortcuts.
``FXPRUNE_HYPOTHESIS_EXAMPLES`` scales the number of examples (a tenth of it here: 20 by default).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

import fxprune
from fxprune.passes.verify import check_zero_invariance

sys.path.insert(0, os.path.dirname(__file__))
from strategies import OPS, architectures, build, example_input  # noqa: E402

EXAMPLES = max(10, int(os.environ.get("FXPRUNE_HYPOTHESIS_EXAMPLES", "200")) // 10)
# residual-rich: adds and attention blocks drawn more often
RESIDUAL_OPS = OPS + ("add", "add", "attn", "conv_bn")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(min_steps=4, max_steps=10, ops=RESIDUAL_OPS), data=st.data(),
       capture=st.sampled_from(("fx", "export")), with_channels=st.booleans())
def test_branch_removal_oracle(arch, data, capture, with_channels):
    model = build(arch).eval()
    x = example_input(arch.seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = fxprune.analyze(model, x, capture=capture)
    event(f"branches: {min(len(graph.branches), 3)}{'+' if len(graph.branches) > 3 else ''}")
    if not graph.branches:
        return
    chosen = data.draw(st.lists(st.sampled_from(graph.branches), min_size=1, unique_by=lambda b: b.id),
                       label="branches")
    plan = {b.id: [0] for b in chosen}
    if with_channels:
        groups = [g for g in graph.prunable_groups if g.zero_invariant]
        plan.update(fxprune.feasible_plan(graph, [(g.id, u) for g in groups for u in range(0, g.size, 2)]))
    note(f"branches: {[(b.id, b.join, b.output, b.parent, b.zero_invariant) for b in graph.branches]}")
    note(f"plan: {plan}")
    small = fxprune.prune(graph, plan)
    with torch.no_grad():
        assert small(x).shape == model(x).shape
    if all(b.zero_invariant for b in chosen):
        assert check_zero_invariance(model, graph, plan, small) < 1e-4
    else:
        with pytest.raises(fxprune.PlanError, match="not zero-invariant"):
            check_zero_invariance(model, graph, plan, small)
    kept = {n.name for n in small.graph.nodes}
    gone = [b for b in chosen if b.output not in kept]
    assert len(gone) == len(chosen), "a removed branch's output node is still in the graph"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
