"""Scores and costs of residual branches (depth units, ``graph.branches``).

Scores, lower = removed first (``BRANCH_SCORES``):

- ``output_norm`` (default): ``||f(x)|| / ||x||``, the branch's output relative to the
  stream it joins (the shortcut), root of the summed squares over every batch: what the
  join changes, relative to what passes by. A branch whose output is small next to the
  stream changes the model least when it goes.
- ``block_influence``: ``1 - cos(x_in, x_out)`` of the stream before (the shortcut) and
  after (the join), averaged over positions (ShortGPT's Block Influence, Men et al.
  2024): the cosine is taken along the channel dim (dim 1 of a 4-d ``N x C x H x W``
  tensor, the last dim otherwise) at every position.
- ``group_lasso``: the L2 norm of every parameter the branch removes (SSL's depth-wise
  group lasso, Wen et al. 2016): no data needed; a branch trained toward zero scores 0.
- ``angular_distance``: ``arccos(cos(x_l, x_{l+n})) / pi`` between the stream before a run
  of ``n`` consecutive branches (the first one's shortcut) and after it (the last one's
  join), per position along the channel dim as for ``block_influence``, averaged over
  positions (Gromov et al. 2024). Consecutive: siblings (the same ``parent``) in the
  order of their joins; a run that changes the stream's shape (a projection or a
  downsampling layer between its branches) is no run. A branch scores the smallest
  distance of the runs it is in, so the ``n`` branches of the best run score lowest and
  go together; a branch in no run of ``n`` scores ``inf`` (removed last). ``run`` = 1
  (``spec.branch_run``) is each branch alone: Block Influence's angle.
- ``calibration_loss``: the loss with the branch removed, re-evaluated after each
  removal (SLEB, Song et al. 2024; :mod:`fxprune.select.sleb`): ``loss_fn``, the model's
  own loss, or the output's change from the full model's.

The data-driven scores run over the ``calibration`` batches when given, else over the
example inputs. Costs: the FLOPs of the branch's nodes (counted per node with
``FlopCounterMode`` in one pass) or its parameter count.

Example:
    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    ...     def forward(self, x):
    ...         x = x + self.a(x)
    ...         return x + 0.01 * self.b(x)
    >>> graph = fxprune.analyze(Net(), torch.randn(8, 4))
    >>> s = score_branches(graph, "output_norm")
    >>> s[graph.branches[1].id] < s[graph.branches[0].id]
    True
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.fx
from torch.utils.flop_counter import FlopCounterMode

from fxprune.errors import SpecError
from fxprune.select.distributed import all_reduce_sums, rank_share
from fxprune.select.sleb import sleb_scores

DEPTH_KINDS = ("branches", "layers")  # the spec's units of depth: residual branches, whole layers
BRANCH_SCORES = ("output_norm", "block_influence", "group_lasso", "angular_distance", "calibration_loss")


def score_branches(graph, method: str = "output_norm", *, calibration=None, run: int = 1,
                   loss_fn=None, units: list | None = None) -> dict[int, float]:
    """``{branch id: score}`` for every branch of ``graph`` (see the module docstring).

    ``calibration``: a ``fxprune.select.calibration.Calibration`` (or None: the example
    inputs); ``run``: the ``n`` of ``angular_distance``; ``loss_fn``: the loss of
    ``calibration_loss`` (model output -> scalar tensor); ``units``: the depth units to
    score (default ``graph.branches``; whole layers, ``graph.layers``, score the same way:
    a layer's output is the stream after it minus the stream before it).
    """
    if method not in BRANCH_SCORES:
        raise SpecError(f"spec.branch_score: unknown branch score {method!r}; use one of "
                        f"{', '.join(BRANCH_SCORES)}")
    branches = graph.branches if units is None else units
    if not branches:
        return {}
    if method == "calibration_loss":
        return sleb_scores(graph, calibration=calibration, loss_fn=loss_fn, units=branches)
    if method == "angular_distance":
        return _angular_scores(graph, calibration, run, branches)
    if method == "group_lasso":
        tensors = dict(graph.gm.named_parameters(remove_duplicate=False))
        return {b.id: float(sum(float(tensors[k].detach().double().pow(2).sum()) for k in b.slices([0], "all")
                                if k in tensors) ** 0.5) for b in branches}
    stats = {b.id: [0.0, 0.0] for b in branches}
    watch = {}
    for b in branches:
        if b.output:  # a layer has no operand of its own: its output is x_out - x_in
            watch.setdefault(b.output, []).append(("out", b.id))
        watch.setdefault(b.shortcut, []).append(("in", b.id))
        watch.setdefault(b.join, []).append(("join", b.id))
    for values in _node_values(graph, watch, calibration):
        for b in branches:
            x, out, joined = values.get(("in", b.id)), values.get(("out", b.id)), values.get(("join", b.id))
            out = joined.double() - x.double() if out is None else out
            if method == "output_norm":
                stats[b.id][0] += float(out.double().pow(2).sum())
                stats[b.id][1] += float(x.double().pow(2).sum())
            else:
                dim = 1 if x.ndim == 4 else -1
                cos = torch.nn.functional.cosine_similarity(x.double(), joined.double(), dim=dim)
                stats[b.id][0] += float((1 - cos).sum())
                stats[b.id][1] += cos.numel()
    stats = {bid: pair.tolist() for bid, pair in  # each rank ran its share of the batches
             all_reduce_sums({bid: torch.tensor(pair, dtype=torch.float64) for bid, pair in stats.items()}).items()}
    return {bid: (num / den) ** 0.5 if method == "output_norm" else num / den
            for bid, (num, den) in ((bid, (n, max(d, 1e-30))) for bid, (n, d) in stats.items())}


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``arccos(cos(a, b)) / pi`` at every position: along dim 1 of 4-d tensors (channels of
    ``N x C x H x W``), the last dim otherwise; 0 = same direction, 0.5 = orthogonal, 1 = opposite.

    >>> d = angular_distance(torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 2.0], [-1.0, -1.0]]))
    >>> [round(v, 6) for v in d.tolist()]   # arccos is steep at +-1: exact angles come out within 1e-8
    [0.5, 1.0]
    """
    dim = 1 if a.ndim == 4 else -1
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=dim)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / torch.pi


def branch_runs(graph, n: int, units: list | None = None) -> list[list]:
    """Every run of ``n`` consecutive branches (or ``units``, e.g. ``graph.layers``):
    siblings (same ``parent``) in the order of their joins in the graph (shapes are
    checked later, on the values).

    >>> import torch, fxprune
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    ...     def forward(self, x):
    ...         for fc in self.fc:
    ...             x = x + fc(x)
    ...         return x
    >>> graph = fxprune.analyze(Net(), torch.randn(2, 4))
    >>> [[b.modules for b in run] for run in branch_runs(graph, 2)]
    [[['fc.0'], ['fc.1']], [['fc.1'], ['fc.2']]]
    """
    position = {node.name: i for i, node in enumerate(graph.gm.graph.nodes)}
    siblings: dict = {}
    for b in sorted(graph.branches if units is None else units, key=lambda b: position[b.join]):
        siblings.setdefault((b.kind, b.parent), []).append(b)
    return [chain[i:i + n] for chain in siblings.values() for i in range(len(chain) - n + 1)]


def _angular_scores(graph, calibration, run: int, units: list) -> dict[int, float]:
    if isinstance(run, bool) or not isinstance(run, int) or run < 1:
        raise SpecError(f"spec.branch_run: expected an integer >= 1 (branches per run), got {run!r}")
    runs = branch_runs(graph, run, units)
    watch: dict = {}
    for i, r in enumerate(runs):
        watch.setdefault(r[0].shortcut, []).append(("before", i))
        watch.setdefault(r[-1].join, []).append(("after", i))
    total, count, valid = [0.0] * len(runs), [0] * len(runs), [True] * len(runs)
    for values in _node_values(graph, watch, calibration):
        for i in range(len(runs)):
            before, after = values[("before", i)], values[("after", i)]
            if before.shape != after.shape:  # a downsampling layer between the branches: no run
                valid[i] = False
                continue
            angle = angular_distance(before, after)
            total[i] += float(angle.sum())
            count[i] += angle.numel()
    summed = all_reduce_sums({"total": torch.tensor(total, dtype=torch.float64),
                              "count": torch.tensor(count, dtype=torch.float64),
                              "invalid": torch.tensor([not v for v in valid], dtype=torch.float64)})
    total, count = summed["total"].tolist(), summed["count"].tolist()
    valid = [not bad for bad in summed["invalid"].tolist()]
    scores = {b.id: float("inf") for b in units}
    for i, r in enumerate(runs):
        if valid[i]:
            for b in r:
                scores[b.id] = min(scores[b.id], total[i] / max(count[i], 1))
    return scores


def _batches(graph, calibration, share: bool = False) -> Iterator:
    """The calibration batches (the example inputs without any); with ``share``, this
    rank's share under ``torch.distributed`` (the caller adds its sums over ranks)."""
    if calibration is None:
        yield from (rank_share([graph.example_inputs]) if share else [graph.example_inputs])
        return
    from fxprune.select.calibration import graph_batches

    yield from graph_batches(graph, calibration, share=share)


def _node_values(graph, watch: dict[str, list], calibration) -> Iterator[dict]:
    """For each batch, ``{(role, branch id): tensor}`` of the watched nodes' outputs."""
    gm = graph.gm
    was_training = gm.training
    gm.eval()
    try:
        for batch in _batches(graph, calibration, share=True):  # the callers add their sums over ranks
            seen: dict = {}

            class Tap(torch.fx.Interpreter):
                def run_node(self, node):
                    value = super().run_node(node)
                    for key in watch.get(node.name, ()):
                        seen[key] = value.detach().clone()  # an in-place join (x.add_(f(x))) overwrites x
                    return value

            with torch.no_grad():
                Tap(gm).run(*batch.flat(gm))
            yield seen
    finally:
        gm.train(was_training)


def node_flops(graph) -> dict[str, float]:
    """FLOPs of every node on the example inputs (one interpreted pass, counted per node)."""
    gm = graph.gm
    flops: dict[str, float] = {}

    class Count(torch.fx.Interpreter):
        def run_node(self, node):
            if node.op not in ("call_function", "call_method", "call_module"):
                return super().run_node(node)
            with FlopCounterMode(display=False) as counter:
                value = super().run_node(node)
            flops[node.name] = float(counter.get_total_flops())
            return value

    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            Count(gm).run(*graph.example_inputs.flat(gm))
    finally:
        gm.train(was_training)
    return flops


def branch_costs(graph, metric: str, units: list | None = None) -> dict[int, float]:
    """``{branch id: cost}``: the FLOPs of its nodes (``metric`` "flops" or "latency") or the
    parameters it removes ("params"), for ``units`` (default ``graph.branches``)."""
    units = graph.branches if units is None else units
    if metric == "params":
        tensors = dict(graph.gm.named_parameters(remove_duplicate=False))
        return {b.id: float(sum(tensors[k].numel() for k in b.slices([0], "all") if k in tensors))
                for b in units}
    flops = node_flops(graph)
    return {b.id: sum(flops.get(n, 0.0) for n in (*b.nodes, b.join)) if b.kind == "layer"
            else sum(flops.get(n, 0.0) for n in b.nodes) for b in units}


__all__ = ["BRANCH_SCORES", "DEPTH_KINDS", "score_branches", "branch_costs", "node_flops", "angular_distance", "branch_runs"]
