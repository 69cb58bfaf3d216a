"""Score pass: one importance number per pruning unit (channel) of every group.

A unit of a group owns entries in many tensors (producer rows, norm affine, consumer
columns, ...). Every score aggregates over *all* of them, so a residual group's channel
is judged by every layer it lives in, not just its first producer.

Methods (``SCORE_METHODS``, a registry name -> function; add one with ``register_score``,
and ``Spec(score=...)`` accepts it):

- ``magnitude``: mean |w| over every parameter entry the unit owns (producers and
  consumers; buffers such as BN running stats are excluded).
- ``group_lasso``: L2 norm of every parameter entry the unit owns (producers + consumers).
- ``bn_scale``: mean |gamma| of the BatchNorm weights among the group's producers
  (network slimming). A group with no BatchNorm gets ``magnitude`` scores instead;
  this is *not* silent: a line is appended to ``notes`` naming the group.
- ``taylor``: |sum over owned parameter entries of w * dL/dw|, the gradients summed over
  every calibration batch (``calibration``, or the one batch ``calib_inputs``) on a copy of
  ``graph.gm`` put in eval mode (batch statistics of tiny calibration batches would be
  meaningless; eval mode is deterministic). L is ``loss_fn(output)``, or without one
  ``fxprune.select.calibration.default_loss`` (next-token cross-entropy for a causal LM).
- ``activation``: sum over the unit's consumer entries (input columns j of the layers
  that read it) of ``sum_i |W[i, j]| * ||X_j||``, ``||X_j||`` the L2 norm of input channel
  j over every calibration token/position: Wanda's |W| * ||X|| (Sun et al. 2023, "A Simple
  and Effective Pruning Approach for Large Language Models") summed over a structure as
  its structured variant Wanda-sp does, the score FLAP (An et al. 2024, "Fluctuation-based
  Adaptive Structured Pruning for Large Language Models") compares with its fluctuation
  metric. A group none of whose units' consumers can be observed gets ``magnitude``, noted.
- ``l0``: P(z != 0) of trained L0 gates, read from ``gm.meta["fxprune_l0"]`` that
  ``fxprune.passes.gates.fold_gates`` writes; closed gates (deterministic z == 0) first.

Lower score = less important = pruned first.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator

import numpy as np
import torch

from fxprune.channels.graph import DependencyGraph, Group
from fxprune.channels.registry import load_plugins
from fxprune.errors import SpecError
from fxprune.passes.gates import gate_meta
from fxprune.select.activations import input_norms
from fxprune.select.distributed import all_gather_union, all_reduce_count, all_reduce_sums
from fxprune.select.calibration import (as_calibration, check_data_needs, default_loss, graph_batches,
                                        is_causal_lm)

ScoreFn = Callable[..., dict[int, np.ndarray]]
SCORE_METHODS: dict[str, ScoreFn] = {}


def register_score(name: str) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator: make ``fn(graph, *, calibration, calib_inputs, loss_fn, notes)`` available as ``name``.

    ``fn`` returns ``{group id: float array of size group.size}`` for every prunable
    group, lower = pruned first. ``calibration`` is a ``Calibration`` or None (with
    ``calib_inputs`` given it is that one batch); take ``**_`` for arguments you ignore.
    Once registered, ``name`` is a valid ``Spec.score``:
    ``fxprune.compress(model, {"score": name, ...})`` uses it, and so does
    ``fxprune compress ... --score NAME --plugin my_scores.py`` (or a package's
    ``fxprune.plugins`` entry point). A later registration replaces an earlier one.

    Example:
        >>> @register_score("ones")
        ... def ones(graph, **_):
        ...     return {g.id: np.ones(g.size) for g in graph.prunable_groups}
        >>> "ones" in known_scores()
        True
        >>> del SCORE_METHODS["ones"]
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_score needs a non-empty name, got {name!r}")

    def deco(fn: ScoreFn) -> ScoreFn:
        SCORE_METHODS[name] = fn
        return fn
    return deco


def known_scores() -> tuple[str, ...]:
    """The registered score names, after the ``fxprune.plugins`` entry points (which may
    register more) are loaded; ``Spec`` validates ``score`` against them.

    Example:
        >>> known_scores()[:2]
        ('magnitude', 'group_lasso')
    """
    load_plugins()
    return tuple(SCORE_METHODS)


def score_groups(graph: DependencyGraph, method: str, *, calibration=None, calib_inputs=None, loss_fn=None,
                 notes: list[str] | None = None) -> dict[int, np.ndarray]:
    """``{group id: float array of size group.size}`` for every prunable group.

    ``calibration``: input batches for the data-aware scores (``Spec.calibration``: a list,
    a .pt path, a callable returning an iterable, or an iterable); ``calib_inputs`` is the
    older one-batch form. ``notes``, if given, receives one line per fallback or caveat
    (e.g. bn_scale on a group without BatchNorm).

    Example:
        >>> import fxprune
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> graph = fxprune.analyze(net, torch.randn(1, 3, 16, 16))
        >>> {gid: s.shape for gid, s in score_groups(graph, "magnitude").items()}
        {0: (8,)}
    """
    if method not in known_scores():
        raise SpecError(f"spec.score: unknown score {method!r}; known: {', '.join(SCORE_METHODS)}; "
                        "register one with fxprune.select.score.register_score")
    notes = [] if notes is None else notes
    check_data_needs(method, calibration, calib_inputs, loss_fn)
    calibration = as_calibration(calibration if calib_inputs is None else [calib_inputs], graph.model_inputs)
    return SCORE_METHODS[method](graph, calibration=calibration, calib_inputs=calib_inputs, loss_fn=loss_fn,
                                 notes=notes)


def _param_keys(gm: torch.nn.Module) -> set[str]:
    return {name for name, _ in gm.named_parameters(remove_duplicate=False)}


def unit_entries(group: Group, roles: tuple[str, ...]) -> Iterator[tuple[str, int, np.ndarray, np.ndarray]]:
    """``(state_dict key, dim, indices along dim, unit of each index)`` for the group's bindings."""
    seen: set[tuple[str, int]] = set()
    for b in group.bindings:
        if b.role not in roles:
            continue
        key = group._aliases.get(b.key, [b.key])[0]
        if (key, b.dim) in seen:  # a tied tensor is counted once
            continue
        seen.add((key, b.dim))
        valid = b.ids >= 0
        roots = np.where(valid, group._roots[np.clip(b.ids, 0, None)], -1)
        pos = np.searchsorted(group.classes, roots)
        pos = np.clip(pos, 0, group.size - 1)
        mine = valid & (group.classes[pos] == roots)
        idx = np.flatnonzero(mine)
        if idx.size:
            yield key, b.dim, idx, pos[idx]


def _per_unit(group: Group, tensors: dict[str, torch.Tensor], roles: tuple[str, ...],
              reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Sum of ``reduce(entries)`` over the unit's entries, and the entry count, per unit."""
    total = np.zeros(group.size)
    count = np.zeros(group.size)
    for key, dim, idx, units in unit_entries(group, roles):
        if key not in tensors:
            continue
        t = tensors[key].detach().float()
        rows = t.index_select(dim, torch.as_tensor(idx)).movedim(dim, 0).reshape(len(idx), -1)
        np.add.at(total, units, reduce(rows).sum(1).double().numpy())
        np.add.at(count, units, rows.shape[1])
    return total, count


def _params(graph: DependencyGraph) -> dict[str, torch.Tensor]:
    keys = _param_keys(graph.gm)
    return {k: v for k, v in graph.gm.state_dict(keep_vars=False).items() if k in keys}


@register_score("magnitude")
def magnitude(graph: DependencyGraph, *, params=None, **_) -> dict[int, np.ndarray]:
    """Mean |w| over every parameter entry a unit owns (buffers excluded); ``params`` (a
    mapping by key, ``graph.gm``'s own by default) gives the weights."""
    params = _params(graph) if params is None else params
    out = {}
    for g in graph.prunable_groups:
        total, count = _per_unit(g, params, ("out", "in"), torch.abs)
        out[g.id] = total / np.maximum(count, 1)
    return out


@register_score("group_lasso")
def group_lasso(graph: DependencyGraph, **_) -> dict[int, np.ndarray]:
    """L2 norm of every parameter entry a unit owns (producers and consumers)."""
    params = _params(graph)
    return {g.id: np.sqrt(_per_unit(g, params, ("out", "in"), torch.square)[0])
            for g in graph.prunable_groups}


class _MagnitudeFallback:
    """Magnitude scores for groups a method cannot score, computed once and noted."""

    def __init__(self, graph: DependencyGraph, method: str, notes: list[str], params=None):
        self.graph, self.method, self.notes, self.scores, self.params = graph, method, notes, None, params

    def __call__(self, group, why: str) -> np.ndarray:
        if self.scores is None:
            self.scores = magnitude(self.graph, params=self.params)
        self.notes.append(f"score: group {group.id} ({', '.join(group.producers[:2])}) {why}; "
                          f"scored by magnitude instead of {self.method}")
        return self.scores[group.id]


@register_score("bn_scale")
def bn_scale(graph: DependencyGraph, *, notes: list[str], **kw) -> dict[int, np.ndarray]:
    """Mean |gamma| of the group's BatchNorm producers; magnitude (noted) where there is none."""
    bn_weights = {f"{name}.weight": m.weight for name, m in graph.gm.named_modules()
                  if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None}
    fallback = _MagnitudeFallback(graph, "bn_scale", notes)
    out = {}
    for g in graph.prunable_groups:
        total, count = _per_unit(g, bn_weights, ("out",), torch.abs)
        out[g.id] = total / count if count.min() > 0 else fallback(g, "has no BatchNorm scale for every channel")
    return out


@register_score("taylor")
def taylor(graph: DependencyGraph, *, calibration=None, loss_fn=None, notes: list[str], **_) -> dict[int, np.ndarray]:
    """|sum of w * dL/dw| over the unit's parameter entries, gradients summed over the batches.

    Example:
        >>> import fxprune
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
        >>> graph = fxprune.analyze(net, torch.randn(2, 4))
        >>> notes = []
        >>> s = score_groups(graph, "taylor", calibration=[torch.randn(3, 4)] * 2, notes=notes)
        >>> notes[-1]
        'score: taylor gradients taken in eval mode on 2 calibration batch(es), loss: 0.5 * mean squared output'
    """
    if calibration is None:
        check_data_needs("taylor", None, None, loss_fn)
    model = copy.deepcopy(graph.gm).eval()  # backward fills .grad: never on the user's tensors
    model.zero_grad(set_to_none=True)
    causal, used, count = is_causal_lm(graph.model), set(), 0
    for count, batch in enumerate(graph_batches(graph, calibration, share=True), 1):
        output = batch.call(model)
        loss, name = (loss_fn(output), "loss_fn") if loss_fn is not None else default_loss(output, batch, causal)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise SpecError(f"spec.loss_fn: must return a scalar tensor, got {type(loss).__name__}")
        loss.reshape(()).backward()  # .grad adds up: the gradient of the summed loss
        used.add(name)
    named = dict(model.named_parameters(remove_duplicate=False))
    # under torch.distributed each rank differentiated its share of the batches: add the gradients
    grads = all_reduce_sums({name: p.grad for name, p in named.items() if p.grad is not None})
    products = {name: (p * grads[name] if name in grads else torch.zeros_like(p)).detach()
                for name, p in named.items()}
    count, used = int(all_reduce_count(count)), all_gather_union(used)
    notes.append(f"score: taylor gradients taken in eval mode on {count} calibration batch(es), "
                 f"loss: {', '.join(sorted(used))}")
    return {g.id: np.abs(_per_unit(g, products, ("out", "in"), lambda x: x)[0])
            for g in graph.prunable_groups}


@register_score("activation")
def activation(graph: DependencyGraph, *, calibration=None, notes: list[str], **_) -> dict[int, np.ndarray]:
    """Sum over the unit's consumer columns j of sum_i |W[i, j]| * ||X_j|| (Wanda-sp).

    Example:
        >>> import fxprune
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        >>> _ = net[0].weight.data.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        >>> _ = net[0].bias.data.zero_()
        >>> graph = fxprune.analyze(net, torch.rand(2, 2))
        >>> score_groups(graph, "activation", calibration=[torch.rand(4, 2)])[1][2]  # never fires
        np.float64(0.0)
    """
    if calibration is None:
        check_data_needs("activation", None, None, None)
    norms = input_norms(graph.gm, graph_batches(graph, calibration, share=True), graph.state.canonical)
    params = _params(graph)
    return activation_scores(graph, norms, lambda key, dim: column_abs_sums(params[key], dim)
                             if key in params else None, notes)


def activation_scores(graph: DependencyGraph, norms: dict[tuple[str, int], np.ndarray],
                      columns: Callable[[str, int], np.ndarray | None], notes: list[str],
                      params=None) -> dict[int, np.ndarray]:
    """The ``activation`` score from input ``norms`` (``input_norms``) and ``columns(key, dim)``,
    the ``column_abs_sums`` of a consumer weight (None where the weight is unknown): the one
    formula of the in-memory score and of ``fxprune.score_checkpoint``. ``params`` gives the
    weights of the magnitude fallback (``graph.gm``'s own by default)."""
    fallback, out = _MagnitudeFallback(graph, "activation", notes, params), {}
    for g in graph.prunable_groups:
        score, seen, missed = np.zeros(g.size), np.zeros(g.size, dtype=bool), set()
        for key, dim, idx, units in unit_entries(g, ("in",)):
            column = columns(key, dim) if (key, dim) in norms else None
            if column is None:
                missed.add(key)
                continue
            np.add.at(score, units, column[idx] * norms[key, dim][idx])
            seen[units] = True
        if not seen.all():
            out[g.id] = fallback(g, "has units whose consuming layers (linear/conv inputs) were not observed")
            continue
        if missed:
            notes.append(f"score: group {g.id} activation score leaves out consumers it could not "
                         f"observe: {', '.join(sorted(missed)[:3])}")
        out[g.id] = score
    return out


CHUNK_ELEMENTS = 2 ** 22  # column_abs_sums converts at most this many weights (16 MB) to float32 at once


def column_abs_sums(weight: torch.Tensor, dim: int,
                    read_rows: Callable[[int, int], torch.Tensor] | None = None) -> np.ndarray:
    """``sum |W|`` over every dim but ``dim``, one float64 number per index along ``dim``,
    in slices of ``CHUNK_ELEMENTS`` (a 128256 x 2048 bfloat16 output matrix never becomes one
    float32 copy), each summed in float32 and the slices' sums added in float64. The same
    slices whatever holds the weight, so equal weights give equal sums. ``read_rows(start,
    stop)``, for ``dim`` > 0, gives rows ``start:stop`` of a weight not in memory (then
    ``weight`` only gives the shape: a meta tensor will do).

    Example:
        >>> column_abs_sums(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), 1).tolist()
        [4.0, 2.5]
    """
    weight = weight.detach()
    other = 1 if dim == 0 else 0
    step = max(1, CHUNK_ELEMENTS // max(1, weight.numel() // max(1, weight.shape[other])))
    total = torch.zeros(weight.shape[dim], dtype=torch.float64)
    reduce = [d for d in range(weight.ndim) if d != dim]
    parts = (weight.split(step, dim=other) if read_rows is None or other != 0 else
             (read_rows(start, min(start + step, weight.shape[0])) for start in range(0, weight.shape[0], step)))
    for part in parts:
        total += part.float().abs().sum(reduce).double().cpu()  # never abs_: float() of float32 is the weight
    return total.numpy()


@register_score("l0")
def l0(graph: DependencyGraph, *, notes: list[str], **_) -> dict[int, np.ndarray]:
    """P(z != 0) of the unit's L0 gate, from ``fold_gates`` (``gm.meta["fxprune_l0"]``).

    Units whose deterministic gate is exactly 0 score 0 (below every open unit): they go first.
    A group without gates gets ``magnitude`` scores, with a note.
    """
    meta = gate_meta(graph.gm)
    if not meta:
        raise SpecError("spec.score: score='l0' needs a model from fxprune.passes.gates.fold_gates "
                        "(insert_gates -> train -> fold_gates); this model carries no gate probabilities")
    out, fallback = {}, _MagnitudeFallback(graph, "l0", notes)
    for g in graph.prunable_groups:
        prob, z = np.full(g.size, -np.inf), np.full(g.size, -np.inf)
        for key, dim, idx, units in unit_entries(g, ("out",)):
            entry = meta.get(key)
            if entry is not None and entry["dim"] == dim:
                np.maximum.at(prob, units, entry["prob"][idx])
                np.maximum.at(z, units, entry["z"][idx])
        out[g.id] = np.where(z <= 0.0, 0.0, prob) if np.isfinite(prob).all() else fallback(g, "has no L0 gate")
    return out
