"""SRigL (Lasby et al. 2024, "Dynamic Sparse Training with Structured Sparsity"): sparse
training where every active neuron keeps the same number k of inputs (constant fan-in).

Each Linear/Conv layer gets a ``FanInMask``: every output neuron reads exactly k of its
``fan_in`` inputs (``in * prod(kernel)``), k from the layer's density, by default
Erdős–Rényi-Kernel (``erk_densities``). A layer whose density comes out at 1 (ERK caps
small layers, such as a stem conv reading 1-3 channels) stays dense and unmasked: its
weights count in the budget, but it has nothing to regrow and no neuron of it is ablated.
Every ``delta_t`` steps until ``t_end`` (75% of training by default), ``update`` at step t:

1. the drop fraction is ``alpha / 2 * (1 + cos(pi t / t_end))``; d = round(fraction * k);
2. neuron ablation: over the whole layer the (k - d) * neurons largest ``|w|`` among the
   active weights and the d * neurons largest ``|grad|`` among the inactive ones are
   *salient*; a neuron with fewer than ``gamma_sal * k`` salient weights is ablated (all
   its weights masked), and the layer's budget is shared again among the neurons left;
3. every active neuron drops its d smallest ``|w|`` and regrows, among the inputs that
   were inactive before the drop, the largest ``|grad|`` until it holds k again; regrown
   weights start at 0.

Ablated neurons leave physically through ``compress``: ``remove_ablated(model, inputs)``
(or ``SRigL.remove_ablated``) finds the channels whose every Linear/Conv producer row is
zero, zeroes the rest of them (biases, norm affine, the next layers' columns), and hands
``compress`` a per-group ratio that removes exactly those channels.

The gradients are those of the effective (masked) weight, recorded by the mask on every
backward, so inactive weights have one. Under DDP or FSDP2 that recorded gradient is each
rank's own (it is taken before the gradients are averaged), so ``update`` averages it over
the ranks (``process_group``, by default all of them once ``torch.distributed`` is
initialised): every rank then takes the decisions one process would take on the whole
batch. Everything else is deterministic given the weights and gradients (the initial masks
come from a seeded generator); under FSDP2 (built before ``fully_shard``) the decisions are
taken on the whole weights, gathered at each update, and each rank zeroes its own rows.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from fxprune.errors import SpecError
from fxprune.sharding import check_rows_sharded, full, local, shard_offsets
from fxprune.sparsity.masks import FixedMask, LayerRow, check_real, mask_layers, normalize_ignore, \
    remove_parametrization


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Per-layer densities by Erdős–Rényi-Kernel: proportional to ``sum(shape) / prod(shape)``,
    scaled so the layers hold ``density`` of their weights in all; a layer that would exceed
    1 is dense and the rest are rescaled.

    Example:
        >>> d = erk_densities({"a": (10, 10), "b": (100, 100)}, 0.1)
        >>> round(d["a"], 4), round(d["b"], 4)   # a: 10x b; 100 a + 10000 b = 0.1 * 10100
        (0.9182, 0.0918)
    """
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / sizes[n] for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(sizes.values()) - sum(sizes[n] for n in dense)
        scale = budget / sum(raw[n] * sizes[n] for n in shapes if n not in dense)
        over = {n for n in shapes if n not in dense and scale * raw[n] > 1}
        if not over:
            return {n: 1.0 if n in dense else scale * raw[n] for n in shapes}
        dense |= over


class FanInMask(FixedMask):
    """A mask with the same number ``k`` of active inputs in every active output neuron; it
    records the gradient of the effective weight (``dense_grad``) on every backward."""

    def __init__(self, mask: torch.Tensor, k: int):
        super().__init__(mask)
        self.k, self.pattern = k, f"fan-in {k}"
        self.dense_grad: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        effective = weight * self.mask
        if effective.requires_grad:
            effective.register_hook(self._record)
        return effective

    def _record(self, grad: torch.Tensor) -> None:
        self.dense_grad = grad.detach()

    def check(self, weight: torch.Tensor) -> bool:
        per_row = (weight.detach().reshape(weight.shape[0], -1) != 0).sum(1)
        return bool((per_row <= self.k).all())


def drop_fraction(t: int, t_end: int, alpha: float) -> float:
    """``alpha / 2 * (1 + cos(pi t / t_end))``: the share of each neuron's weights replaced at step t.

    Example:
        >>> drop_fraction(50, 100, 0.3)
        0.15
    """
    return alpha / 2 * (1 + math.cos(math.pi * t / t_end))


class SRigL:
    """Constant fan-in dynamic sparse training over every eligible layer of ``model``.

    Args:
        model: its Linear/Conv1d/2d/3d weights get a ``FanInMask``.
        density: fraction of the weights kept over all masked layers, in (0, 1).
        total_steps: training length; ``t_end`` defaults to 75% of it.
        delta_t: steps between mask updates (default 100).
        alpha: initial drop fraction (default 0.3); gamma_sal: ablation threshold (0.3).
        erk: per-layer densities by ERK (default) or the same density everywhere.
        ignore: fnmatch patterns of module names left dense; seed: the initial masks.
        process_group: the data-parallel ranks whose recorded gradients ``update`` averages
            (default: every rank, when ``torch.distributed`` is initialised).

    Call ``step()`` after every ``optimizer.step()``.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> srigl = SRigL(net, density=0.25, total_steps=100, delta_t=10, erk=False)
        >>> srigl.k
        {'0': 4, '2': 2}
    """

    def __init__(self, model: nn.Module, density: float, total_steps: int, *, delta_t: int = 100,
                 t_end: int | None = None, alpha: float = 0.3, gamma_sal: float = 0.3, erk: bool = True,
                 ignore: str | Iterable[str] = (), seed: int = 0, process_group=None):
        self.density = check_real(density, "SRigL density", low=0.0, high=1.0, low_open=True)
        for name, value in (("total_steps", total_steps), ("delta_t", delta_t)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpecError(f"SRigL: {name} must be an int >= 1, got {value!r}")
        self.model, self.delta_t, self.alpha, self.gamma_sal = model, delta_t, float(alpha), float(gamma_sal)
        self.t_end = int(0.75 * total_steps) if t_end is None else t_end
        self.t = 0
        self.process_group = process_group
        patterns = normalize_ignore(ignore)
        shapes: dict[str, tuple[int, ...]] = {}

        def probe(name: str, module: nn.Module, weight: torch.Tensor):
            shapes[name] = tuple(weight.shape)  # the eligible layers (registers nothing)
            return None, "probe"

        mask_layers(model, patterns, probe)
        densities = erk_densities(shapes, self.density) if erk else {n: self.density for n in shapes}
        gen = torch.Generator().manual_seed(seed)
        self.k: dict[str, int] = {}
        self.masks: dict[str, FanInMask] = {}

        def plan(name: str, module: nn.Module, weight: torch.Tensor):
            fan_in = math.prod(weight.shape[1:])
            k = min(fan_in, max(1, round(densities[name] * fan_in)))
            if k == fan_in:  # dense (ERK caps small layers at 1): nothing to drop or regrow, and
                # a neuron's weights there are never sparse, so ablation would only cut capacity
                return None, "dense at its density (ERK): left unmasked, counted in the budget"
            scores = torch.rand(weight.shape[0], fan_in, generator=gen)
            keep = torch.zeros_like(scores, dtype=torch.bool)
            keep.scatter_(1, scores.topk(k, dim=1).indices, True)
            mask = FanInMask(keep.reshape(weight.shape).to(weight.device), k)
            self.k[name], self.masks[name] = k, mask
            return mask, ""

        self.rows: list[LayerRow] = mask_layers(model, patterns, plan)
        self.budget = {n: self.k[n] * shapes[n][0] for n in self.k}  # weights per layer, kept constant

    def step(self) -> bool:
        """Advance one step; update the masks when due (returns whether it did)."""
        self.t += 1
        if self.t % self.delta_t or self.t >= self.t_end:
            return False
        self.update()
        return True

    def ablated(self) -> dict[str, list[int]]:
        """The neurons (output channels) of each layer that hold no active weight."""
        return {name: (~m.mask.reshape(m.mask.shape[0], -1).any(1)).nonzero().flatten().tolist()
                for name, m in self.masks.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Drop and regrow every layer's weights at the current step (see the module docs)."""
        fraction = drop_fraction(self.t, self.t_end, self.alpha)
        for name, mask in self.masks.items():
            if mask.dense_grad is None:
                raise SpecError(f"SRigL.update: layer {name!r} has no gradient yet; call it after a backward pass")
            module = self.model.get_submodule(name)
            original = module.parametrizations["weight"].original
            check_rows_sharded(original, "SRigL")
            shape = original.shape
            w = full(original.detach()).reshape(shape[0], -1).abs().float()
            g = self._replica_mean(mask.dense_grad).reshape(shape[0], -1).abs().float()
            active = mask.mask.reshape(shape[0], -1)
            alive = active.any(1)
            k = self.k[name]
            drop = round(fraction * k)
            alive &= ~self._ablate(w, g, active, alive, k, drop)
            rows = int(alive.sum())
            k = min(w.shape[1], max(1, self.budget[name] // max(rows, 1)))  # the budget, shared again
            self.k[name] = mask.k = k
            new = torch.zeros_like(active)
            keep = max(0, min(k, int(active.sum(1).max())) - drop)
            kept = w.masked_fill(~active, -1.0).topk(keep, dim=1).indices  # the largest active survive
            new.scatter_(1, kept, True)
            grow = g.masked_fill(active, -1.0).topk(k - keep, dim=1).indices  # inactive before the drop
            grown = torch.zeros_like(active).scatter_(1, grow, True)
            new |= grown
            new &= alive[:, None]
            piece = local(original.detach())  # this rank's rows (all of them unless sharded)
            rows = slice(shard_offsets(original)[0], shard_offsets(original)[0] + piece.shape[0])
            flat = piece.reshape(piece.shape[0], -1)
            flat.masked_fill_((grown & alive[:, None])[rows], 0.0)  # regrown weights start at 0
            flat.masked_fill_(~new[rows], 0.0)
            mask.mask.copy_(new.reshape(shape))
            mask.pattern = f"fan-in {k}"

    def _replica_mean(self, grad: torch.Tensor) -> torch.Tensor:
        """The recorded gradient averaged over the data-parallel ranks (as the optimizer's is)."""
        if not (dist.is_available() and dist.is_initialized()):
            return grad
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return grad
        total = grad.clone()
        dist.all_reduce(total, group=self.process_group)
        return total / world

    def _ablate(self, w, g, active, alive, k: int, drop: int) -> torch.Tensor:
        """Neurons with fewer than ``gamma_sal * k`` salient weights (layer-wide top |w| among
        the active, top |grad| among the inactive)."""
        rows = int(alive.sum())
        salient = torch.zeros_like(active)
        magnitudes = w.masked_fill(~(active & alive[:, None]), -1.0).flatten()
        count = min(rows * (k - drop), int((magnitudes >= 0).sum()))
        salient.view(-1)[magnitudes.topk(count).indices] = True
        grads = g.masked_fill(active | ~alive[:, None], -1.0).flatten()
        count = min(rows * drop, int((grads >= 0).sum()))
        if count:
            salient.view(-1)[grads.topk(count).indices] = True
        return alive & (salient.sum(1) < self.gamma_sal * k)


    def remove_ablated(self, example_inputs, **spec):
        """``remove_ablated(self.model, example_inputs, **spec)``: a smaller copy without the
        ablated neurons (the masks are baked in the copy; the model keeps training as it is)."""
        return remove_ablated(self.model, example_inputs, **spec)


def dead_channels(model: nn.Module, graph) -> dict[int, list[int]]:
    """The channels of each prunable, zero-invariant group whose every Linear/Conv weight
    producer row is all zero (what SRigL's ablation leaves), by group id.

    Example:
        >>> import fxprune
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> _ = net[0].weight.data[1].zero_()
        >>> dead_channels(net, fxprune.analyze(net, (torch.randn(1, 4),)))
        {1: [1]}
    """
    from fxprune.regularize.channels import channel_slices_from_graph

    invariant = {g.id for g in graph.groups if g.zero_invariant}
    out: dict[int, list[int]] = {}
    for channel in channel_slices_from_graph(model, graph, role="out"):
        gid, unit = channel.label
        rows = [s for s in channel.slices if s.param.dim() >= 2]  # weights; biases and norms are 1-d
        if gid in invariant and rows and all(not s.param.detach().index_select(s.dim, s.index).any() for s in rows):
            out.setdefault(gid, []).append(unit)
    return out


def _baked_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parametrized tensors (the masks) are plain parameters holding
    their masked values; ``model`` keeps its masks (``remove_parametrization``)."""
    import copy

    from torch.nn.utils import parametrize

    work = copy.deepcopy(model)
    for module in work.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                remove_parametrization(module, name, leave_parametrized=True)
    return work


def remove_ablated(model: nn.Module, example_inputs, **spec):
    """``compress`` a copy of ``model`` without the neurons whose weights are all zero.

    The copy's masks are baked; each dead channel (``dead_channels``) then
    has its other entries zeroed too (bias, norm affine, consumer columns: it computes
    nothing and nothing reads it), and ``compress`` removes exactly those channels:
    ``ratio`` per group id, ``score="magnitude"`` (the dead ones score 0), ``round_to=1``.
    ``spec`` adds or overrides spec fields (``fuse``, ``emit``, ...). The result's model
    computes what the copy with the dead channels zeroed computes; it differs from
    ``model`` only by what those channels' biases contributed. ``model`` is not changed.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> _ = net[0].weight.data[1].zero_()
        >>> remove_ablated(net, (torch.randn(1, 4),)).model(torch.randn(5, 4)).shape
        torch.Size([5, 2])
        >>> remove_ablated(net, (torch.randn(1, 4),)).plan
        {1: [1]}
    """
    from fxprune.channels import analyze
    from fxprune.compress import compress
    from fxprune.regularize.channels import channel_slices_from_graph

    work = _baked_copy(model)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    graph = analyze(work, inputs)
    dead = dead_channels(work, graph)
    if not dead:
        raise SpecError("remove_ablated: no channel has all of its Linear/Conv weights at zero; train with "
                        "SRigL until it ablates neurons (SRigL.ablated() lists them) or lower gamma_sal")
    with torch.no_grad():
        for channel in channel_slices_from_graph(work, graph, role="all"):
            if channel.label[1] in dead.get(channel.label[0], ()):
                for s in channel.slices:
                    s.param.index_fill_(s.dim, s.index, 0.0)
    sizes = {g.id: g.size for g in graph.groups}
    ratio = {str(gid): len(units) / sizes[gid] for gid, units in dead.items()}
    return compress(work, {"example_inputs": inputs, "ratio": ratio, "score": "magnitude", "round_to": 1,
                           "max_ratio": 1.0, **spec})


__all__ = ["SRigL", "FanInMask", "erk_densities", "drop_fraction", "dead_channels", "remove_ablated"]
