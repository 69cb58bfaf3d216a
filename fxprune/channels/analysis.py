"""Run the op rules over a captured graph and collect the channel groups."""
from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.fx

from ..capture import capture as capture_model
from ..capture import gc_paused
from ..errors import AnalysisError
from ..sharding import check_unsharded
from . import rules  # noqa: F401  (registers the built-in rules)
from .context import AnalysisState, RuleContext
from .graph import DependencyGraph, build_groups
from .heads import head_reshapes, kv_repeats
from .registry import load_plugins, lookup_rule
from .rules.experts import register_late_ops
from .rules.basic import get_attr_rule, input_rule, output_rule
from .rules.fallback import is_size_only, size_arithmetic_rule, unknown_rule
from .rules.pointwise import is_pointwise_node, pointwise_rule
from .values import TensorChannels

ATTENTION_UNITS = ("heads", "query_slots", "head_dim")  # see analyze()


def run_rules(gm: torch.fx.GraphModule, attention_units: str = "heads") -> AnalysisState:
    """Propagate channel maps through every node (shapes must already be on the nodes)."""
    state = AnalysisState(gm, attention_units=attention_units)
    if attention_units in ("heads", "query_slots"):
        state.head_reshapes = head_reshapes(gm)
    if attention_units == "query_slots":
        for expand, (slot, reshape) in kv_repeats(gm, state.head_reshapes).items():
            state.kv_repeats[expand] = slot
            state.kv_merges[reshape] = slot - 1
    strict = os.environ.get("FXPRUNE_STRICT_RULES") == "1"
    for node in gm.graph.nodes:
        ctx = RuleContext(state, node)
        if node.op == "placeholder":
            rule = input_rule
        elif node.op == "get_attr":
            rule = get_attr_rule
        elif node.op == "output":
            rule = output_rule
        else:
            rule = lookup_rule(node, state.modules)
            if rule is None and is_pointwise_node(node):
                rule = pointwise_rule  # known from what the op is (rules/pointwise.py)
            if rule is None:
                rule = size_arithmetic_rule if is_size_only(ctx) else unknown_rule
        try:
            value = rule(ctx)
        except Exception as exc:
            if strict:
                raise
            # A rule that cannot handle this use of its op must not guess: freeze.
            ctx.freeze_value(ctx.inputs(), f"the rule for {ctx.where()} could not handle it ({exc})")
            value = ctx.out() if ctx.out_shape() is not None else None
        if isinstance(value, TensorChannels) and ctx.out_shape() is not None and value.shape != ctx.out_shape():
            value = TensorChannels(ctx.out_shape(), value.dims)
        state.env[node] = value
    return state


def analyze(model, example_inputs, *, capture: str = "auto", attention_units: str = "heads",
            leaf_modules: Iterable = (), concrete_args: dict | None = None) -> DependencyGraph:
    """Capture ``model`` and find its channel dependency groups.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (``{"input_ids": ids, "attention_mask": mask}``) with the shapes ``forward`` takes.
    ``capture``: ``"auto"`` (torch.fx symbolic trace, falling back to torch.export, then
    to parts), ``"fx"``, ``"export"`` or ``"parts"`` (the submodules that hold the weights
    and take and return tensors, e.g. a detector's backbone and heads, in one graph whose
    inputs and outputs are theirs; see :mod:`fxprune.capture.parts`); ``graph.capture``
    says which ran. An ``ExportedProgram``
    is accepted as ``model``.
    ``attention_units``: where a reshape splits channels into heads x head_dim in front of
    an attention product, ``"heads"`` (default) makes a whole head one unit (with grouped-
    query attention, a key/value head together with its query heads); ``"query_slots"``
    makes slot j, the j-th query head of every key/value group, one unit under grouped-
    query attention and keeps the key/value heads (elsewhere it is ``"heads"``);
    ``"head_dim"`` makes position p of head_dim in every head one unit (heads keep their count).
    ``leaf_modules`` and ``concrete_args`` steer the fx front end: module classes or names
    to keep as single calls (they need a rule, see :func:`fxprune.register_rule`, or
    their channels are frozen), and values to bake in for control flow.

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    >>> graph = fxprune.analyze(net, torch.randn(1, 3, 16, 16))
    >>> [(g.size, g.prunable) for g in graph.groups], graph.capture
    ([(8, True), (3, False), (4, False)], 'fx')
    """
    if attention_units not in ATTENTION_UNITS:
        raise AnalysisError(f"attention_units must be one of {', '.join(map(repr, ATTENTION_UNITS))}, "
                            f"got {attention_units!r}")
    if isinstance(model, torch.nn.Module):
        check_unsharded(model, "analyze", AnalysisError)
    load_plugins()
    register_late_ops()
    with gc_paused():
        captured = capture_model(model, example_inputs, capture=capture, leaf_modules=leaf_modules,
                                 concrete_args=concrete_args)
        state = run_rules(captured.gm, attention_units)
        graph = build_groups(state, captured.inputs, captured.front_end)
        if captured.front_end == "parts":
            graph.model_inputs, graph.parts = captured.model_inputs, captured.parts
            graph.capture_notes = captured.notes
    graph.capture_kwargs = captured.added  # in graph.example_inputs, not given by the caller
    if isinstance(model, torch.nn.Module):
        graph.model = model
    return graph


__all__ = ["analyze", "run_rules"]
