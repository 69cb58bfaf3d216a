"""Inference-time fusion: fold BatchNorm into the conv/linear before it, drop no-ops.

A pass over a ``torch.fx.GraphModule`` in the style of torch.fx's own passes: it works
on a deep copy (the caller's module is never touched), puts the copy in **eval mode**
(folding uses the BatchNorm running statistics, so the result is for inference only),
rewrites the graph and returns the new module with notes saying what it did not do
and why.

What it does:

* ``Conv{1,2,3}d`` / ``ConvTranspose{1,2,3}d`` + ``BatchNorm{1,2,3}d`` and
  ``Linear`` + ``BatchNorm1d`` (2-D input only) become one module, when the BatchNorm
  reads the conv's output, that output has no other user, the conv module is called
  once and its parameters are neither read directly nor shared with another module,
  and the BatchNorm tracks running statistics.
* ``nn.Dropout*`` and ``nn.Identity`` calls and functional dropout calls are replaced
  by their input.

Module types are matched exactly (``type(m) is nn.Conv2d``), not with ``isinstance``:
a subclass may override ``forward`` (weight standardisation, say), and folding a
BatchNorm into it would silently change the function.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_weights

from ..capture.effects import eliminate_dead_code
from ..capture.inputs import as_example_inputs


def _fold_conv(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    return fuse_conv_bn_eval(conv, bn)


def _fold_conv_transpose(conv: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    return fuse_conv_bn_eval(conv, bn, transpose=True)


def _fold_linear(linear: nn.Linear, bn: nn.modules.batchnorm._BatchNorm) -> nn.Linear:
    # fuse_linear_bn_eval needs an affine BatchNorm; an affine=False one is the
    # affine one with weight 1 and bias 0.
    weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
    fused = copy.deepcopy(linear)
    fused.weight, fused.bias = fuse_linear_bn_weights(
        linear.weight, linear.bias, bn.running_mean, bn.running_var, bn.eps, weight, bias)
    return fused


# (producer module type, BatchNorm type) -> (fold function, output ndim required or None).
# The Linear entry requires a 2-D output: on (N, L, C) input BatchNorm1d normalises
# dim 1 (L), not the linear's features.
FOLDS: dict[tuple[type, type], tuple[Callable, int | None]] = {
    (nn.Conv1d, nn.BatchNorm1d): (_fold_conv, 3),
    (nn.Conv2d, nn.BatchNorm2d): (_fold_conv, 4),
    (nn.Conv3d, nn.BatchNorm3d): (_fold_conv, 5),
    (nn.ConvTranspose1d, nn.BatchNorm1d): (_fold_conv_transpose, 3),
    (nn.ConvTranspose2d, nn.BatchNorm2d): (_fold_conv_transpose, 4),
    (nn.ConvTranspose3d, nn.BatchNorm3d): (_fold_conv_transpose, 5),
    (nn.Linear, nn.BatchNorm1d): (_fold_linear, 2),
}
BATCHNORMS = frozenset(bn for _, bn in FOLDS)

# Modules and functions that return their input at inference.
PASSTHROUGH_MODULES = frozenset({
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.FeatureAlphaDropout,
})
# function -> (position, keyword) of its `training` argument, which defaults to True.
PASSTHROUGH_FUNCTIONS: dict[Callable, tuple[int, str]] = {
    F.dropout: (2, "training"),
    F.dropout1d: (2, "training"),
    F.dropout2d: (2, "training"),
    F.dropout3d: (2, "training"),
    F.alpha_dropout: (2, "training"),
    F.feature_alpha_dropout: (2, "training"),
    torch.dropout: (2, "train"),
}


@dataclass
class FuseResult:
    """The fused module and what the pass did.

    ``notes`` say what was skipped and why (one line each, prefixed ``fuse:``),
    ``folded`` lists ``(producer, batchnorm)`` module names folded together and
    ``removed`` the names of the dropout / identity nodes taken out of the graph.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Dropout())
        >>> result = fuse(torch.fx.symbolic_trace(net))
        >>> result.folded, result.removed
        ([('0', '1')], ['_2'])
    """

    gm: fx.GraphModule
    notes: list[str] = field(default_factory=list)
    folded: list[tuple[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _output_ndim(node: fx.Node) -> int | None:
    """ndim of a node's output from shape metadata (ShapeProp or fake tensors), if any."""
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return len(meta.shape)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dim()
    return None


def _first_input(node: fx.Node):
    return node.args[0] if node.args else node.kwargs.get("input")


@dataclass
class _ModuleUses:
    """How the graph uses its modules: what makes a fold unsafe beyond the BN's input."""

    calls: Counter  # module name -> number of call_module nodes
    direct_reads: dict[str, str]  # module name -> an attribute a get_attr node reads
    param_names: dict[int, list[str]]  # id(parameter) -> every name it is registered under

    @classmethod
    def of(cls, gm: fx.GraphModule) -> _ModuleUses:
        direct_reads: dict[str, str] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                owner, _, attr = node.target.rpartition(".")
                direct_reads.setdefault(owner, attr)
        param_names: dict[int, list[str]] = {}
        for name, param in gm.named_parameters(remove_duplicate=False):
            param_names.setdefault(id(param), []).append(name)
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        return cls(calls=calls, direct_reads=direct_reads, param_names=param_names)


def _fold_candidate(gm: fx.GraphModule, bn_node: fx.Node, uses: _ModuleUses
                    ) -> str | tuple[fx.Node, Callable]:
    """The producer node and fold function for ``bn_node``, or why it cannot fold."""
    bn = gm.get_submodule(bn_node.target)
    if not bn.track_running_stats or bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False)"
    producer = _first_input(bn_node)
    if not isinstance(producer, fx.Node) or producer.op != "call_module":
        return f"it reads '{getattr(producer, 'name', producer)}', not a conv/linear module call"
    name = producer.target
    module = gm.get_submodule(name)
    entry = FOLDS.get((type(module), type(bn)))
    if entry is None:
        return f"it reads '{name}' ({type(module).__name__}), not a conv/linear with a fold rule"
    fold, ndim = entry
    kind = "linear" if ndim == 2 else "conv"
    if len(producer.users) != 1:
        return f"{kind} '{name}' output has {len(producer.users)} users"
    if uses.calls[name] != 1:
        return f"module '{name}' is called {uses.calls[name]} times"
    if name in uses.direct_reads:
        return f"parameter '{name}.{uses.direct_reads[name]}' is also read directly (get_attr)"
    for pname, param in module.named_parameters(prefix=name):
        others = [n for n in uses.param_names.get(id(param), []) if n != pname]
        if others:
            return f"module '{name}' shares parameter '{pname}' with '{others[0]}'"
    actual = _output_ndim(producer)
    if ndim == 2 and actual is None:
        return f"linear '{name}' output shape is unknown (pass example_inputs to fuse)"
    if actual is not None and actual != ndim:
        return (f"'{name}' output is {actual}-D; {type(module).__name__} + "
                f"{type(bn).__name__} folds on {ndim}-D only")
    return producer, fold


def _fold_batchnorms(gm: fx.GraphModule, result: FuseResult) -> None:
    uses = _ModuleUses.of(gm)
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module" or type(gm.get_submodule(bn_node.target)) not in BATCHNORMS:
            continue
        outcome = _fold_candidate(gm, bn_node, uses)
        if isinstance(outcome, str):
            result.notes.append(f"fuse: batchnorm '{bn_node.target}' not folded: {outcome}")
            continue
        producer, fold = outcome
        fused = fold(gm.get_submodule(producer.target), gm.get_submodule(bn_node.target))
        parent, _, attr = producer.target.rpartition(".")
        # (nn.Module.set_submodule is missing from older torch releases)
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        bn_node.replace_all_uses_with(producer)
        gm.graph.erase_node(bn_node)
        result.folded.append((producer.target, bn_node.target))


def _passthrough_training_flag(node: fx.Node) -> object:
    position, keyword = PASSTHROUGH_FUNCTIONS[node.target]
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, True)


def _remove_passthroughs(gm: fx.GraphModule, result: FuseResult) -> None:
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            is_passthrough = type(gm.get_submodule(node.target)) in PASSTHROUGH_MODULES
        elif node.op == "call_function":
            is_passthrough = node.target in PASSTHROUGH_FUNCTIONS
            if is_passthrough and _passthrough_training_flag(node) is True:
                result.notes.append(
                    f"fuse: removed '{node.name}' ({node.target.__name__}), traced with "
                    f"training=True: the graph applied dropout even in eval mode")
        else:
            is_passthrough = False
        source = _first_input(node) if is_passthrough else None
        if not isinstance(source, fx.Node):
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        result.removed.append(node.name)


def fuse(gm: fx.GraphModule, example_inputs=None) -> FuseResult:
    """Fold BatchNorms into the preceding conv/linear and drop dropout/identity nodes.

    Works on a deep copy of ``gm`` put in **eval mode**: folding uses BatchNorm
    running statistics, so the result computes what ``gm.eval()`` computes and is for
    inference only. The input module is never mutated. Linear + BatchNorm1d folds only
    when the linear output is known to be 2-D: from ``node.meta`` shape metadata
    (``ShapeProp``'s ``tensor_meta`` or ``val``) or, if ``example_inputs`` (a tuple or
    one tensor) is given, by propagating them through the copy. Candidates that cannot
    fold are kept and explained in ``FuseResult.notes``.

    Example::

        >>> import torchvision
        >>> gm = torch.fx.symbolic_trace(torchvision.models.resnet18().eval())
        >>> x = torch.randn(1, 3, 64, 64)
        >>> result = fuse(gm)
        >>> torch.allclose(result.gm(x), gm(x), atol=1e-5)
        True
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"fuse() takes a torch.fx.GraphModule, got {type(gm).__name__}; "
                        f"capture the model first (torch.fx.symbolic_trace(model))")
    gm = copy.deepcopy(gm).eval()
    if example_inputs is not None:
        with torch.no_grad():
            ShapeProp(gm).propagate(*as_example_inputs(example_inputs).flat(gm))
    result = FuseResult(gm=gm)
    _fold_batchnorms(gm, result)
    _remove_passthroughs(gm, result)
    eliminate_dead_code(gm)  # keeps mutating calls
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return result
