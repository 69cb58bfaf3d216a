"""The ``activation`` score's statistics with one weight in memory at a time.

``input_norms`` runs each calibration batch through the whole graph, every weight
resident. Here the graph runs node after node over *all* the batches at once: a weight
is read (``load(key)``) when a node that uses it runs and dropped right after (a weight
two distant nodes use, a tied embedding and output matrix, is read twice rather than
held across the layers between), and each node's outputs for every batch are kept only
until their last user ran.
So memory holds about one layer's weights plus the calibration activations carried from
layer to layer, the order llm-compressor's sequential pipeline and SparseGPT's own
scripts run a model larger than memory in. The graph may have been captured on the
meta device: only weights come from ``load``, and ``device=meta`` arguments that the
capture recorded (``arange``, ``_assert_tensor_metadata``) are read as ``device``.

The statistics are those of ``input_norms`` (the same ``NormSums``) and the consumers'
``column_abs_sums``, so ``activation_scores`` turns them into scores equal to the
in-memory ones. Nodes after the last consumer (a language model's logits and loss) are
not run: no score reads them.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.fx
from torch.func import functional_call

from fxprune.capture.inputs import ExampleInputs
from fxprune._util import eval_mode
from fxprune.select.activations import _FUNCTIONS, NormSums, consumers, model_fails
from fxprune.select.score import column_abs_sums

Load = Callable[[str], torch.Tensor]
Rows = Callable[[str, torch.Tensor], torch.Tensor]
EMBEDDING = torch.ops.aten.embedding.default


def layerwise_activation_stats(gm: torch.fx.GraphModule, batches: list[ExampleInputs], load: Load,
                               canonical: dict[str, str] | None = None, device: str | torch.device = "cpu",
                               rows: Rows | None = None
                               ) -> tuple[dict[tuple[str, int], np.ndarray], dict[tuple[str, int], np.ndarray]]:
    """``(norms, columns)``: the input norms ``input_norms`` gives and each consumer weight's
    ``column_abs_sums``, both keyed ``(weight key, weight dim)``, with weights read by ``load(key)``
    one at a time (see the module docstring). ``gm`` may hold meta tensors; under
    ``torch.distributed`` ``batches`` are this rank's share and the norms are added over ranks.

    ``rows(key, index)``, when given, reads only rows ``index`` (sorted) of a weight: an
    ``aten.embedding`` then reads the rows of the batches' tokens, and the last consumer
    (a language model's output matrix, whose product no statistic needs) is summed slice
    by slice, so neither vocabulary matrix is ever resident whole.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> weights = {k: v.clone() for k, v in net.state_dict().items()}
        >>> gm = torch.fx.symbolic_trace(net.to("meta"))
        >>> norms, columns = layerwise_activation_stats(gm, [ExampleInputs((torch.ones(4, 2),))], weights.__getitem__)
        >>> norms[("0.weight", 1)].tolist(), columns[("2.weight", 1)].shape
        ([2.0, 2.0], (3,))
    """
    run = _LayerwiseRun(gm, batches, load, canonical or {}, torch.device(device), rows)
    with eval_mode(gm), torch.no_grad():
        for node in run.nodes[:run.last_watched + 1]:
            run.step(node)
    return run.sums.norms(), run.columns


class _LayerwiseRun:
    """The state of one layer-by-layer pass: live activations, weights read, statistics."""

    def __init__(self, gm: torch.fx.GraphModule, batches: list[ExampleInputs], load: Load,
                 canonical: dict[str, str], device: torch.device, rows: Rows | None):
        self.gm, self.batches, self.load, self.device, self.rows = gm, batches, load, device, rows
        self.watch = consumers(gm, canonical)
        shapes = {canonical.get(k, k): v.shape for k, v in
                  [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]}
        self.sums, self.columns = NormSums(shapes), {}
        self.nodes = list(gm.graph.nodes)
        position = {n: i for i, n in enumerate(self.nodes)}
        # what comes after the last consumer feeds no statistic, and the last consumer
        # itself only needs its input recorded
        self.last_watched = max((position[n] for n in self.watch), default=-1)
        last_use = {}
        for node in self.nodes[:self.last_watched + 1]:
            for used in node.all_input_nodes:
                last_use[used] = node
        self.free_after: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for used, user in last_use.items():
            self.free_after.setdefault(user, []).append(used)
        self.env: dict[torch.fx.Node, list[Any]] = {}  # node -> its value for every batch
        self.weights: dict[torch.fx.Node, torch.Tensor] = {}  # get_attr node -> tensor, read at first use
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        for b, batch in enumerate(batches):
            for node, x in zip(placeholders, batch.to(device).flat(gm)):
                self.env.setdefault(node, []).append(x)

    def weight_of(self, node: torch.fx.Node) -> torch.Tensor:
        if node not in self.weights:
            self.weights[node] = _real(self.load(node.target), _attr(self.gm, node.target), self.device)
        return self.weights[node]

    def inputs(self, node: torch.fx.Node, b: int, weights: bool = True) -> tuple[tuple, dict]:
        """``node``'s arguments for batch ``b``: weights read on demand (None with
        ``weights=False``), meta devices made real."""
        def value(arg):
            if isinstance(arg, torch.fx.Node):
                if arg.op == "get_attr":
                    return self.weight_of(arg) if weights else None
                return self.env[arg][b]
            return self.device if isinstance(arg, torch.device) and arg.type == "meta" else arg
        return (torch.fx.node.map_aggregate(node.args, value), torch.fx.node.map_aggregate(node.kwargs, value))

    def step(self, node: torch.fx.Node) -> None:
        if node.op in ("placeholder", "get_attr", "output"):
            return
        module = _module_tensors(self.gm, node, self.load, self.device) if node.op == "call_module" else None
        if node in self.watch:
            kind, key = self.watch[node]
            for b, batch in enumerate(self.batches):
                args, kwargs = self.inputs(node, b, weights=False)  # the activation only
                self.sums.set_batch(batch)
                self.sums.add(args[kind.act] if kind.act < len(args) else kwargs.get("input"), kind, key)
            if (key, kind.weight_dim) not in self.columns:
                self.columns[key, kind.weight_dim] = self.column_sums(node, kind.weight_dim, module)
        if node is not self.nodes[self.last_watched]:
            values = []
            by_rows = self.reads_rows(node)
            for b, batch in enumerate(self.batches):
                args, kwargs = self.inputs(node, b, weights=not by_rows)
                try:
                    values.append(self.embedding(node, args) if by_rows else _call(self.gm, node, args, kwargs, module))
                except Exception as error:  # the model's own error, on the user's batch
                    raise model_fails(b, batch, error) from error
            self.env[node] = values
        for used in self.free_after.get(node, ()):  # its last user ran: drop its activations
            self.env.pop(used, None)
        for used in node.all_input_nodes:  # a weight is read again by a later user (a tied embedding
            self.weights.pop(used, None)   # and output matrix): never held across the layers between


    def column_sums(self, node: torch.fx.Node, dim: int, module: dict | None) -> np.ndarray:
        """The consumer's ``column_abs_sums``; slice by slice when its product is not computed."""
        if module is not None:
            return column_abs_sums(module["weight"], dim)
        weight = _weight_node(node)
        if self.rows is None or node is not self.nodes[self.last_watched] or dim == 0:
            return column_abs_sums(self.weight_of(weight), dim)
        like = _attr(self.gm, weight.target)
        return column_abs_sums(like, dim, lambda start, stop: self.read_rows(weight, torch.arange(start, stop)))

    def reads_rows(self, node: torch.fx.Node) -> bool:
        return (self.rows is not None and node.op == "call_function" and node.target is EMBEDDING
                and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "get_attr")

    def embedding(self, node: torch.fx.Node, args: tuple) -> torch.Tensor:
        """``aten.embedding`` from the rows of the tokens it looks up: the same values (a
        gather), without the vocabulary matrix (padding_idx and the rest only shape gradients)."""
        tokens, inverse = torch.unique(args[1], return_inverse=True)
        return EMBEDDING(self.read_rows(node.args[0], tokens), inverse)

    def read_rows(self, weight: torch.fx.Node, index: torch.Tensor) -> torch.Tensor:
        like, part = _attr(self.gm, weight.target), self.rows(weight.target, index)
        return part.to(self.device, like.dtype) if like.is_floating_point() else part.to(self.device)


def _attr(gm: torch.fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _real(tensor: torch.Tensor, like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The loaded tensor in the analysed model's dtype (the graph computes in it) on ``device``."""
    if tuple(tensor.shape) != tuple(like.shape):
        raise ValueError(f"a tensor of shape {tuple(tensor.shape)} was loaded for one of shape {tuple(like.shape)}")
    return tensor.to(device, like.dtype if like.is_floating_point() else tensor.dtype)


def _module_tensors(gm: torch.fx.GraphModule, node: torch.fx.Node, load: Load, device: torch.device) -> dict:
    module = gm.get_submodule(node.target)
    return {name: _real(load(f"{node.target}.{name}"), t, device)
            for name, t in [*module.named_parameters(), *module.named_buffers()]}


def _weight_node(node: torch.fx.Node) -> torch.fx.Node:
    at = _FUNCTIONS[node.target][1]
    return node.args[at] if at < len(node.args) else node.kwargs["weight"]


def _call(gm: torch.fx.GraphModule, node: torch.fx.Node, args, kwargs, module: dict | None):
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return functional_call(gm.get_submodule(node.target), module, tuple(args), dict(kwargs))


__all__ = ["layerwise_activation_stats"]
