"""Property tests on random CNN DAGs (see tests/strategies.py).

The zero-invariance oracle (DESIGN.md, invariant 3) needs no knowledge of the
architecture: zeroing the producer slices of the pruned channels in the original model
must give the pruned model's output. The other properties: output shape kept, same
plan -> same pruned weights, the caller's model untouched.

Every example whose model has a group that can lose a unit removes at least one
(``draw_removal``); the oracle tests reject the others, since their oracle would compare a
model with itself, and record how many examples ran an oracle that could fail
(tests/oracle_tally.py, printed at the end of the session).

``FXPRUNE_HYPOTHESIS_EXAMPLES`` sets the number of examples per test (default 100; a
nightly run sets more).
"""
from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import fxprune

sys.path.insert(0, os.path.dirname(__file__))
from strategies import architectures, attention_units, build, example_input, gqa_blocks  # noqa: E402
import oracle_tally  # noqa: E402

EXAMPLES = int(os.environ.get("FXPRUNE_HYPOTHESIS_EXAMPLES", "100"))
RELATIVE_TOLERANCE = 1e-4

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
# The properties with no oracle (shapes, determinism) draw half as many: they share the
# architectures with the oracle tests, and the dynamic-shape export of the shape test
# costs 3.5x a static one (it was the slowest test of the suite)
HALF = settings(SETTINGS, max_examples=max(1, EXAMPLES // 2))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny tensors: with several intra-op threads on a busy machine a 2x12x8x8 conv takes
    ~20 ms instead of ~0.3 ms (thread hand-off dominates), so run this module on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def draw_removal(data, graph, groups, first_from=None, require: bool = True) -> list[tuple[int, int]]:
    """A hypothesis-drawn candidate list over ``groups`` whose first unit can be removed on its
    own (``feasible_plan`` keeps it: a unit whose removal would empty a layer, such as one of
    two channels split in two, cannot), so the plan it gives is never empty; the first unit
    comes from ``first_from`` where one of those can be removed. Without a removable unit
    the example is rejected (``assume``: its oracle would compare the model with itself),
    or, with ``require=False``, the list is empty."""
    pairs = [(g.id, u) for g in groups for u in range(g.size)]
    removable = [p for p in pairs if fxprune.feasible_plan(graph, [p])]
    if not require and not removable:
        return []
    assume(removable)
    preferred = [(gid, u) for gid, u in removable if first_from and gid in {g.id for g in first_from}]
    first = data.draw(st.sampled_from(preferred or removable), label="first removed unit")
    rest = data.draw(st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs)), label="candidates")
    return [first] + [p for p in rest if p != first]


def zero_out_slices(model: torch.nn.Module, graph, plan: dict[int, list[int]], role: str = "out") -> torch.nn.Module:
    """A copy of ``model`` with every ``role`` slice of the planned channels zeroed (``"out"``:
    producers, the oracle; ``"in"``: consumers, for groups whose only use is their consumers)."""
    zeroed = copy.deepcopy(model)
    # every named tensor: non-persistent buffers (rotary tables) are channels too
    state = dict(zeroed.named_parameters()) | dict(zeroed.named_buffers())
    with torch.no_grad():
        for gid, units in plan.items():
            for key, entries in graph.group(gid).slices(units, role=role).items():
                assert key in state, f"group {gid}: slice key {key!r} is not a tensor of the model"
                for dim, indices in entries:
                    state[key].index_fill_(dim, torch.as_tensor(indices, dtype=torch.long), 0)
    return zeroed


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], what: str) -> None:
    assert list(before) == list(after), f"{what}: state_dict keys differ"
    for key in before:
        assert before[key].shape == after[key].shape, f"{what}: {key} shape {before[key].shape} -> {after[key].shape}"
        assert before[key].dtype == after[key].dtype, f"{what}: {key} dtype differs"
        assert torch.equal(before[key], after[key]), f"{what}: {key} values differ"


FRONT_ENDS = st.sampled_from(("fx", "export"))


@SETTINGS
@given(arch=architectures(), data=st.data(), capture=FRONT_ENDS)
def test_zero_invariance_oracle(arch, data, capture):
    model = build(arch)
    x = example_input(arch.seed)
    graph = fxprune.analyze(model, x, capture=capture)
    assert graph.capture == capture
    assert graph.groups, "analysis found no groups at all"
    zero_invariant = [g for g in graph.groups if g.prunable and g.zero_invariant]
    plan = fxprune.feasible_plan(graph, draw_removal(data, graph, zero_invariant))
    note(f"groups: {[(g.id, g.size, g.prunable, g.zero_invariant) for g in graph.groups]}")
    note(f"plan: {plan}")
    assert plan, "the first drawn unit can always be removed"
    small = fxprune.prune(graph, plan)
    zeroed = zero_out_slices(model, graph, plan).eval()
    small.eval()
    with torch.no_grad():
        expected = zeroed(x)
        actual = small(x)
        oracle_tally.record("test_zero_invariance_oracle",
                            bool(plan) and oracle_tally.moved(model(x), expected, RELATIVE_TOLERANCE))
    assert actual.shape == expected.shape == (x.shape[0], 5)
    error = relative_error(actual, expected)
    assert error < RELATIVE_TOLERANCE, f"pruned output differs from the zeroed model: relative error {error:.3g}"
    # Every producer slice the plan names is gone from the pruned model, and nothing more there.
    removed: dict[tuple[str, int], set[int]] = {}
    for gid, units in plan.items():
        for key, entries in graph.group(gid).slices(units, role="out").items():
            for dim, indices in entries:
                removed.setdefault((key, dim), set()).update(indices)
    original = dict(model.named_parameters()) | dict(model.named_buffers())
    pruned = dict(small.named_parameters()) | dict(small.named_buffers())
    for (key, dim), indices in removed.items():
        assert pruned[key].shape[dim] == original[key].shape[dim] - len(indices), (key, dim)


@pytest.mark.dynamic_shapes  # the exported graph must take batch 3 (tests/conftest.py)
@HALF
@given(arch=architectures(), data=st.data(), capture=FRONT_ENDS)
def test_pruning_all_groups_keeps_output_shape(arch, data, capture):
    model = build(arch)
    x = example_input(arch.seed)
    graph = fxprune.analyze(model, x, capture=capture)
    prunable = graph.prunable_groups
    if not prunable:  # nothing to prune: analysis still worked and prune({}) is a copy
        assert all(g.reason for g in graph.groups)
    plan = fxprune.feasible_plan(graph, draw_removal(data, graph, prunable, require=False))
    note(f"plan: {plan}")
    assert bool(plan) == any(fxprune.feasible_plan(graph, [(g.id, u)]) for g in prunable for u in range(g.size))
    for gid, units in plan.items():
        assert 0 < len(units) < graph.group(gid).size
    small = fxprune.prune(graph, plan).eval()
    with torch.no_grad():
        reference = model(x)
        out = small(x)
        assert out.shape == reference.shape
        assert torch.isfinite(out).all()
        # The pruned graph takes other batch sizes too, like the original (an exported
        # graph's batch dim is dynamic: docs/analysis.md).
        other = example_input(arch.seed + 1, batch=3)
        assert small(other).shape == model(other).shape
    removed = sum(len(u) for u in plan.values())
    if removed:
        n_before = sum(p.numel() for p in model.parameters())
        n_after = sum(p.numel() for p in small.parameters())
        assert n_after < n_before, "channels were removed but no parameter shrank"


@HALF
@given(arch=architectures(), data=st.data())
def test_same_model_same_plan_same_result(arch, data):
    model = build(arch)
    x = example_input(arch.seed)
    first, second = fxprune.analyze(model, x), fxprune.analyze(model, x)
    describe = lambda graph: [(g.id, g.size, g.prunable, g.zero_invariant, g.reason) for g in graph.groups]
    assert describe(first) == describe(second)
    candidates = draw_removal(data, first, first.prunable_groups, require=False)
    plan = fxprune.feasible_plan(first, candidates)
    assert fxprune.feasible_plan(second, candidates) == plan
    for group in first.groups:
        units = range(group.size)
        assert group.slices(units, role="all") == second.group(group.id).slices(units, role="all")
    results = [fxprune.prune(first, plan), fxprune.prune(second, plan), fxprune.prune(first, plan)]
    states = [snapshot(r) for r in results]
    assert_same_state(states[0], states[1], "two analyses of the same model")
    assert_same_state(states[0], states[2], "pruning the same graph twice")
    with torch.no_grad():
        outputs = [r.eval()(x) for r in results]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


@SETTINGS
@given(arch=architectures(), data=st.data(), training=st.booleans())
def test_input_model_is_not_mutated(arch, data, training):
    model = build(arch).train(training)
    x = example_input(arch.seed)
    before = snapshot(model)
    modes = {name: m.training for name, m in model.named_modules()}
    with torch.no_grad():
        reference = copy.deepcopy(model).eval()(x)
    graph = fxprune.analyze(model, x)
    assert_same_state(before, snapshot(model), "analyze")
    plan = fxprune.feasible_plan(graph, draw_removal(data, graph, graph.prunable_groups, require=False))
    small = fxprune.prune(graph, plan)
    assert_same_state(before, snapshot(model), "prune")
    assert {name: m.training for name, m in model.named_modules()} == modes, "module training flags changed"
    # The pruned model shares no storage with the caller's: changing it in place leaves the original alone.
    with torch.no_grad():
        for tensor in list(small.parameters()) + list(small.buffers()):
            if tensor.is_floating_point():
                tensor.add_(1.0)
    assert_same_state(before, snapshot(model), "in-place edit of the pruned model")
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model).eval()(x), reference)


@SETTINGS
@given(arch=architectures(min_steps=2, max_steps=4, ops=("conv", "act", "attn"), ensure="attn"), data=st.data(),
       capture=FRONT_ENDS)
def test_attention_blocks_pass_the_oracle(arch, data, capture):
    """Multi-head and grouped-query attention, with and without rotary embeddings, with
    heads, head_dim positions or (under grouped-query attention) query slots as units:
    pruning equals zeroing."""
    units = data.draw(attention_units(arch), label="attention_units")
    model = build(arch)
    x = example_input(arch.seed)
    graph = fxprune.analyze(model, x, capture=capture, attention_units=units)
    zero_invariant = [g for g in graph.groups if g.prunable and g.zero_invariant]
    # the first unit removed is an attention unit (a head, head_dim position) where one is
    # zero-invariant: that is what this test is for
    attention = [g for g in zero_invariant if any(b.key.endswith(("_q.weight", "_k.weight")) for b in g.bindings)]
    plan = fxprune.feasible_plan(graph, draw_removal(data, graph, zero_invariant, first_from=attention))
    note(f"plan: {plan}")
    assert plan, "the first drawn unit can always be removed"
    small = fxprune.prune(graph, plan).eval()
    with torch.no_grad():
        expected = zero_out_slices(model, graph, plan).eval()(x)
        actual = small(x)
        moved = oracle_tally.moved(model(x), expected, RELATIVE_TOLERANCE)
        oracle_tally.record("test_attention_blocks_pass_the_oracle", bool(plan) and moved)
        oracle_tally.record("test_attention_blocks_pass_the_oracle, an attention unit removed",
                            moved and any(g.id in plan for g in attention))
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < RELATIVE_TOLERANCE
    for step_index, step in enumerate(arch.steps):
        if step.op != "attn" or units != "heads" or step.params[0] == 1:
            continue  # (a single head is no unit: its head_dim positions are)
        heads, head_dim = step.params[0], step.params[2]
        key = f"layers.s{step_index}_q.weight"
        groups = [g for g in graph.prunable_groups if any(b.key == key and b.dim == 0 for b in g.bindings)]
        for g in groups:  # a head is one unit: head_dim rows of the query projection
            assert [len(rows) for dim, rows in g.slices([0], "out")[key]] == [head_dim * (heads // g.size)]
    if units == "query_slots":
        check_query_slots(arch, graph, model, x, data, "query slots in test_attention_blocks_pass_the_oracle")


@SETTINGS
@given(arch=architectures(min_steps=2, max_steps=4, ops=("gqa", "conv")), data=st.data(), capture=FRONT_ENDS)
def test_query_slots_pass_the_consumer_oracle(arch, data, capture):
    """Grouped-query attention (repeat_kv or enable_gqa) with query slots as units."""
    model = build(arch)
    x = example_input(arch.seed)
    graph = fxprune.analyze(model, x, capture=capture, attention_units="query_slots")
    check_query_slots(arch, graph, model, x, data, "test_query_slots_pass_the_consumer_oracle", require=True)


def check_query_slots(arch, graph, model, x, data, test: str, require: bool = False) -> None:
    """Each grouped-query block's query heads form one group of r slots (a unit: kv_heads x
    head_dim query rows); a slot's only consumer is the output projection, so removing
    slots equals zeroing their columns there (the producer oracle does not apply: zeroed
    query rows still attend to the shared values)."""
    slots = []
    for step_index, step in gqa_blocks(arch):
        heads, kv_heads, head_dim = step.params[:3]
        if kv_heads == 1:
            continue  # one key/value head: its view keeps head_dim positions, no head dim to slot
        key = f"layers.s{step_index}_q.weight"
        (group,) = [g for g in graph.groups if any(b.key == key and b.dim == 0 for b in g.bindings)]
        assert group.size == heads // kv_heads and not group.zero_invariant
        assert [len(rows) for dim, rows in group.slices([0], "out")[key]] == [kv_heads * head_dim]
        assert set(group.slices([0], "in")) == {f"layers.s{step_index}_o.weight"}
        k_rows = [g for g in graph.groups if any(b.key == f"layers.s{step_index}_k.weight" and b.dim == 0
                                                  for b in g.bindings)]
        assert all(not g.prunable for g in k_rows), "query_slots keeps key/value heads"
        slots += [group] if group.prunable else []
    if require:  # an example without a prunable slot group checks nothing here
        assume(slots)
    plan = fxprune.feasible_plan(graph, draw_removal(data, graph, slots, require=False))
    event(f"query slots removed: {bool(plan)}")  # --hypothesis-show-statistics: how often this ran
    note(f"query-slot plan: {plan}")
    small = fxprune.prune(graph, plan).eval()
    with torch.no_grad():
        expected = zero_out_slices(model, graph, plan, role="in").eval()(x)
        actual = small(x)
        oracle_tally.record(test,
                            bool(plan) and oracle_tally.moved(model(x), expected, RELATIVE_TOLERANCE))
    assert relative_error(actual, expected) < RELATIVE_TOLERANCE
