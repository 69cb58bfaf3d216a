"""Write a plan back into a copy of the user's own model class (``emit="module"``).

The prune pass emits a GraphModule: it owns the graph, so it can rewrite every constant.
Users of Hugging Face transformers need their own class back (``generate()``,
``save_pretrained()``, ``from_pretrained()``), so this pass copies the user's model with
the planned channels sliced out of every parameter and buffer (the same cuts the prune
pass makes), sets layer attributes and attention head counts from the analysis, updates
a Hugging Face ``config`` and proves it builds the same shapes, and finally checks the
copy against the pruned GraphModule on the example inputs. Removed residual branches
take whole blocks with them where a block computes only ``input + branch(input)``
(``fxprune.passes.branch_modules``): a Hugging Face layer whose attention and MLP both go
leaves its layer list, the later layers' ``layer_idx`` and the config's layer count and
per-layer lists follow. Where the class cannot carry the result, a
:class:`~fxprune.errors.WriteBackError` names the module or config field.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Mapping

import torch
import torch.fx
from torch.fx.node import map_aggregate
from torch.utils._pytree import tree_leaves

from .._util import eval_mode, first_line
from ..capture.parts import record_parts
from ..channels.branches import split_plan
from ..channels.graph import DependencyGraph
from ..errors import WriteBackError
from .branch_modules import drop_blocks, removed_blocks, removed_layers
from .expert_attrs import expert_cuts, sync_expert_counts, sync_expert_widths
from .hf_config import GRAPH_HINT, check_config, update_config, update_copied_fields, update_layer_count
from .layer_attrs import attention_heads, renumber_layers, sync_head_attrs, sync_layer_sizes
from .prune import PruneContext, cut_tensor, kept_ids, tensor_cuts



def write_back(graph: DependencyGraph, plan: Mapping[int, object], pruned: torch.fx.GraphModule) -> torch.nn.Module:
    """A pruned deep copy of ``graph.model`` (same class), checked against ``pruned``
    (the GraphModule ``prune_graph(graph, plan)`` returned). ``graph.model`` is untouched.

    >>> import torch, fxprune
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> mine = fxprune.prune(fxprune.analyze(net, torch.randn(2, 4)), {1: [0, 1, 2]}, emit="module")
    >>> type(mine).__name__, mine[0]
    ('Sequential', Linear(in_features=4, out_features=3, bias=True))
    """
    model = graph.model
    if model is None:
        raise WriteBackError("emit='module' needs the nn.Module that fxprune.analyze was given (an "
                             f"ExportedProgram has no class of its own to write into); {GRAPH_HINT}")
    blocks = removed_blocks(graph, split_plan(graph, plan)[1])  # modules that become the identity
    keep = kept_ids(graph, plan)
    cuts_by_key = expert_cuts(graph, plan, tensor_cuts(graph, keep))  # removed experts: dim 0 of their weights
    _refuse_multihead_attention(model, cuts_by_key)
    if graph.capture in ("fx", "parts"):  # both run the user's Python code
        _check_python_constants(graph, pruned)
    memo: dict[int, object] = {}
    for key, cuts in cuts_by_key.items():
        tensor = _tensor_at(model, key)
        memo[id(tensor)] = cut_tensor(tensor, cuts)  # deepcopy then reuses the cut tensor, ties kept
    new = copy.deepcopy(model, memo)
    heads = attention_heads(graph, PruneContext(graph, pruned, keep).new_shape)
    sync_layer_sizes(new, pruned)  # by the analysed paths, before blocks leave and paths renumber
    sync_head_attrs(new, heads)
    layers = removed_layers(new, blocks)
    drop_blocks(new, blocks)
    renumber_layers(new, layers)
    gone = lambda path: any(path == b or path.startswith(f"{b}.") for b in blocks)  # noqa: E731
    changed = update_config(new, _group_widths(graph, plan, gone), {p: h for p, h in heads.items() if not gone(p)})
    changed += update_layer_count(new, layers)
    changed += sync_expert_counts(new, graph, plan) + sync_expert_widths(new, graph, plan)  # mixtures of experts
    changed += update_copied_fields(new, model, changed)  # last: the fields set above by what they mean win
    check_config(new, changed)
    if not any(t.is_meta for t in new.parameters()):  # weightless (meta) models: shapes and config only
        _check_outputs(new, pruned, graph)
    return new


def _refuse_multihead_attention(model: torch.nn.Module, cuts: Mapping[str, list]) -> None:
    """``nn.MultiheadAttention`` computes its head size as ``embed_dim // num_heads`` and
    its inner width must equal ``embed_dim``: no instance can hold fewer heads of the same
    size, or a narrower input with the same heads."""
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            hit = sorted(k for k in cuts if k.startswith(f"{path}.") or (not path and k))
            if hit:
                raise WriteBackError(
                    f"nn.MultiheadAttention '{path}' cannot carry the plan ({hit[0]} shrinks): its head "
                    "size is embed_dim // num_heads and its inner width must equal embed_dim; "
                    f"{GRAPH_HINT}, or pass ignore=['{path}*'] to keep it whole")


def _group_widths(graph: DependencyGraph, plan: Mapping[int, object],
                  gone=lambda path: False) -> dict[str, tuple[int, int]]:
    """``{group's first producer: (channels before, after)}`` of every prunable group but
    those whose every tensor lives in a module that left (``gone(module path)``)."""
    return {(g.producers[0] if g.producers else f"group {g.id}"): (g.size, g.size - len(set(plan.get(g.id, ()))))
            for g in graph.prunable_groups
            if not all(gone(key.rpartition(".")[0]) for key in g.slices([0], "all"))}


def _tensor_at(model: torch.nn.Module, key: str) -> torch.Tensor:
    path, _, name = key.rpartition(".")
    try:
        tensor = getattr(model.get_submodule(path), name)
    except AttributeError:
        tensor = None
    if not isinstance(tensor, torch.Tensor):
        raise WriteBackError(f"the plan cuts '{key}', which is not a tensor attribute of the "
                             f"{type(model).__name__} (the captured graph created it); {GRAPH_HINT}")
    return tensor


def _check_python_constants(graph: DependencyGraph, pruned: torch.fx.GraphModule) -> None:
    """Under fx, a number the prune pass rewrote in a call (``x.view(-1, 400)``) is a
    literal in the user's Python code, which the copy still runs: name where it lives."""
    analysed = {n.name: n for n in graph.gm.graph.nodes}
    for node in pruned.graph.nodes:
        old = analysed.get(node.name)
        if old is None or node.op not in ("call_function", "call_method") or old.target != node.target:
            continue
        if _literals(old.args, old.kwargs) != _literals(node.args, node.kwargs):
            raise WriteBackError(
                f"{_where(node, graph.model)} hard-codes a size the plan changes: {node.name} = {_call(old)} must become "
                f"{_call(node)}, but the copy of your class would still run the old number. Compute it "
                f"from the tensor instead (x.flatten(1), x.view(x.size(0), -1)), or {GRAPH_HINT}")


def _literals(args, kwargs) -> list:
    found = []
    map_aggregate((args, kwargs), lambda a: found.append(a) if isinstance(a, (int, float)) else None)
    return found


class _Named:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


def _call(node: torch.fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    shown = map_aggregate(node.args, lambda a: _Named(a.name) if isinstance(a, torch.fx.Node) else a)
    return f"{name}{tuple(shown)}"


def _where(node: torch.fx.Node, model: torch.nn.Module) -> str:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return f"{type(model).__name__}.forward"
    path, cls = stack[-1]
    return f"module '{path}' ({getattr(cls, '__name__', cls)}.forward)"


def _check_outputs(new: torch.nn.Module, pruned: torch.fx.GraphModule, graph: DependencyGraph) -> None:
    """The copy must compute what the pruned graph computes on the example inputs. Under
    ``capture="parts"`` the copy runs its own forward on the model's inputs (post-processing
    included) and its parts' outputs are compared with the pruned graph's on the inputs
    those parts saw."""
    inputs = graph.model_inputs if graph.parts is not None else graph.example_inputs
    with torch.no_grad(), eval_mode(new), eval_mode(pruned):
        with _innermost_module(new) as active:
            try:
                if graph.parts is not None:
                    part_inputs, got, _ = record_parts(new, inputs, graph.parts)
                else:
                    got = inputs.clone().call(new)
            except Exception as exc:  # noqa: BLE001 - reported with the module that raised it
                where = f"module '{active[-1]}' ({type(new.get_submodule(active[-1])).__name__})" if active \
                    else f"{type(new).__name__}.forward"
                raise WriteBackError(
                    f"the pruned copy of your {type(new).__name__} fails in {where}: {type(exc).__name__}: "
                    f"{first_line(exc)}. Its Python code uses a size the plan "
                    f"changed that no attribute carries; {GRAPH_HINT}") from exc
        want = pruned(*part_inputs) if graph.parts is not None else inputs.clone().call(pruned)
    got_t = [t for t in tree_leaves(got) if isinstance(t, torch.Tensor)]
    want_t = [t for t in tree_leaves(want) if isinstance(t, torch.Tensor)]
    if [t.shape for t in got_t] != [t.shape for t in want_t]:
        raise WriteBackError(f"the pruned copy of your {type(new).__name__} returns shapes "
                             f"{[tuple(t.shape) for t in got_t]}, the pruned graph "
                             f"{[tuple(t.shape) for t in want_t]}; {GRAPH_HINT}")
    for i, (a, b) in enumerate(zip(got_t, want_t)):
        if a.device.type == "meta" or not a.is_floating_point() or not a.numel():  # e.g. no detection
            continue
        scale = max(b.abs().max().item(), 1e-6)
        error = (a - b).abs().max().item() / scale
        if error > max(1e-4, 4 * torch.finfo(a.dtype).eps):
            raise WriteBackError(f"the pruned copy of your {type(new).__name__} differs from the pruned "
                                 f"graph in output {i} (max relative error {error:.2g}); a layer reads a "
                                 f"size from an attribute fxprune does not know; {GRAPH_HINT}")


@contextmanager
def _innermost_module(model: torch.nn.Module):
    """A list that holds the paths of the modules running right now (innermost last)."""
    active: list[str] = []
    handles = []
    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(lambda m, a, p=path: active.append(p) and None))
            handles.append(module.register_forward_hook(lambda m, a, o: active.pop() and None))
    try:
        yield active
    finally:
        for h in handles:
            h.remove()


__all__ = ["write_back"]
