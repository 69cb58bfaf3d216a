"""Gates pass: insert L0 hard-concrete gates into a graph, and fold them back out.

``insert_gates(graph)`` returns a copy of ``graph.gm`` with one :class:`L0Gate` per
prunable, zero-invariant group. A gate has one ``log_alpha`` per *unit* of the group,
so every producer of a coupled group (the stem conv and each residual branch feeding
the same add, say) is multiplied by the *same* gate value for the same unit.

Where a gate acts: for each space (producer) of the group, the gate point is the last
node, in graph order, that binds ``role="out"`` parameters of that space, e.g. the
BatchNorm after a conv, or the conv itself when no norm follows. Only nodes that are
affine in their output parameters qualify (conv, linear, embedding, norms with affine
parameters), so that ``fold_gates`` can multiply the gate into those parameters
exactly. The gated model computes, per gate point, ``x * z[unit of channel]`` along
the channel dim.

Per forward pass each gate is evaluated once (one node right after the inputs), and
all its gate points use that value: in training a hard-concrete sample, in eval the
deterministic gate.

``fold_gates(gated)`` multiplies each gate point's output parameters by the
deterministic gate, removes the gate nodes, and stores the gates' probabilities
``P(z != 0)`` in ``folded.meta["fxprune_l0"]``; ``fxprune.compress(folded, {...,
"score": "l0"})`` ranks channels by them (see ``fxprune.select.score.l0``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from fxprune.channels.graph import DependencyGraph, Group
from fxprune.errors import SpecError
from fxprune.sharding import AFTER_TRAINING, check_unsharded, full, total_over

META_KEY = "fxprune_l0"  # GraphModule.meta key of the gate probabilities after fold_gates
POINTS_KEY = "fxprune_gate_points"  # GatedModel.meta key of its GatePoints
GATES_ATTR = "l0_gates"  # the ModuleDict of gates on a gated GraphModule

# Modules whose output is affine in their role="out" parameters, per channel:
# z * f(x; w, b) == f(x; z*w, z*b). Gate points are chosen among these only.
_AFFINE_OUT = (
    torch.nn.modules.conv._ConvNd,
    torch.nn.Linear,
    torch.nn.Embedding,
    torch.nn.modules.batchnorm._BatchNorm,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
)


class L0Gate(torch.nn.Module):
    """Hard-concrete gates (Louizos, Welling & Kingma 2018), one per pruning unit.

    ``forward()`` returns the gate vector ``z`` (size ``n``): a stochastic sample in
    training, the deterministic ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``
    in eval.

    Example:
        >>> gate = L0Gate(4, drop_rate=0.5)
        >>> gate.eval()().tolist()
        [0.5, 0.5, 0.5, 0.5]
        >>> round(gate.expected_l0().item(), 4)  # 4 * sigmoid(0 - beta * log(-gamma / zeta))
        3.3273
    """

    def __init__(self, n: int, *, drop_rate: float = 0.5, beta: float = 2 / 3,
                 gamma: float = -0.1, zeta: float = 1.1):
        super().__init__()
        if not 0.0 < drop_rate < 1.0:
            raise SpecError(f"drop_rate: must be in (0, 1), got {drop_rate}")
        if not (gamma < 0.0 and zeta > 1.0 and beta > 0.0):
            raise SpecError(f"gates: need gamma < 0 < 1 < zeta and beta > 0, got "
                            f"gamma={gamma}, zeta={zeta}, beta={beta}")
        self.beta, self.gamma, self.zeta = float(beta), float(gamma), float(zeta)
        init = math.log(1.0 - drop_rate) - math.log(drop_rate)
        self.log_alpha = torch.nn.Parameter(torch.full((n,), init))

    def extra_repr(self) -> str:
        return f"n={self.log_alpha.numel()}, beta={self.beta:.3g}, gamma={self.gamma}, zeta={self.zeta}"

    def forward(self) -> torch.Tensor:
        if not self.training:
            return self.deterministic()
        eps = 1e-6
        u = torch.rand_like(self.log_alpha).clamp(eps, 1.0 - eps)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The eval-mode gate: ``clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)``."""
        s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def prob_nonzero(self) -> torch.Tensor:
        """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` per unit."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def expected_l0(self) -> torch.Tensor:
        """The L0 penalty: expected number of non-zero gates (differentiable; under FSDP2
        summed over the ranks' pieces of ``log_alpha``)."""
        shift = self.beta * math.log(-self.gamma / self.zeta)
        return total_over([self.log_alpha], lambda la: torch.sigmoid(la - shift).sum())


def apply_gate(x: torch.Tensor, z: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` times ``z[index[i]]`` at position ``i`` along ``dim`` (``index = -1``: times 1)."""
    ext = torch.cat([z, z.new_ones(1)])  # index -1 picks the trailing 1
    shape = [1] * x.dim()
    shape[dim] = -1
    return x * ext[index].to(x.dtype).view(shape)


torch.fx.wrap("apply_gate")


@dataclass(frozen=True)
class GatePoint:
    """Gate ``group`` acts on the output of node ``node`` along ``dim``.

    ``index[i]`` is the group unit of position ``i`` (``-1``: not gated here);
    ``params`` are the ``(state_dict key, dim, positions, units)`` output parameters
    that node binds for those channels (what ``fold_gates`` scales).
    """

    group: int
    node: str
    dim: int
    index: np.ndarray
    params: tuple


class GatedModel(torch.fx.GraphModule):
    """A GraphModule with L0 gates; ``gm.l0_gates[str(group id)]`` are :class:`L0Gate`.

    Train it like the original (``loss = task + lam * gm.expected_l0()``), then
    ``fold_gates(gm)`` for an ordinary model with the deterministic gates baked in.
    """

    @property
    def gate_points(self) -> list[GatePoint]:
        """Where each gate acts (kept in ``meta``, which survives ``copy.deepcopy``)."""
        return self.meta[POINTS_KEY]

    def gates(self) -> dict[int, L0Gate]:
        """``{group id: L0Gate}``."""
        # GraphModule rebuilds the ModuleDict as a plain Module holding the same children
        return {int(k): g for k, g in getattr(self, GATES_ATTR).named_children()}

    def gate_parameters(self) -> list[torch.nn.Parameter]:
        """The ``log_alpha`` parameters (give them their own optimizer group if you like)."""
        return [g.log_alpha for g in self.gates().values()]

    def expected_l0(self) -> torch.Tensor:
        """Sum over all gates of ``P(z != 0)``: the expected number of open units."""
        gates = list(self.gates().values())
        if not gates:
            return torch.zeros(())
        return torch.stack([g.expected_l0() for g in gates]).sum()

    def gate_probabilities(self) -> dict[int, np.ndarray]:
        """``{group id: P(z != 0) per unit}``."""
        with torch.no_grad():
            return {gid: full(g.prob_nonzero()).double().numpy() for gid, g in self.gates().items()}

    def deterministic_gates(self) -> dict[int, np.ndarray]:
        """``{group id: eval-mode z per unit}`` (exact zeros are closed gates)."""
        with torch.no_grad():
            return {gid: full(g.deterministic()).double().numpy() for gid, g in self.gates().items()}


def _units_of(group: Group, roots_all: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Unit of ``group`` owning each id (``-1`` for fixed ids or ids of other groups)."""
    valid = ids >= 0
    roots = np.where(valid, roots_all[np.clip(ids, 0, None)], -1)
    pos = np.clip(np.searchsorted(group.classes, roots), 0, group.size - 1)
    return np.where(valid & (group.classes[pos] == roots), pos, -1)


def _in_space(ids: np.ndarray, spaces) -> np.ndarray:
    mask = np.zeros(ids.shape, dtype=bool)
    for s in spaces:
        mask |= (ids >= s.start) & (ids < s.start + s.size)
    return mask


def _affine_node(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op != "call_module":
        return False
    return isinstance(gm.get_submodule(str(node.target)), _AFFINE_OUT)


def find_gate_points(graph: DependencyGraph, notes: list[str] | None = None) -> list[GatePoint]:
    """The gate points of every prunable, zero-invariant group (see the module docstring).

    Example:
        >>> import fxprune
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 3))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> points = find_gate_points(fxprune.analyze(net, x))
        >>> [(p.group, p.node) for p in points]   # the gate multiplies the BatchNorm's output
        [(0, '_1')]
    """
    notes = [] if notes is None else notes
    gm = graph.gm
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in gm.graph.nodes}
    env = {getattr(k, "name", k): v for k, v in graph.state.env.items()}
    out_bindings = [b for b in graph.state.bindings.values() if b.role == "out" and b.node in nodes]
    points: list[GatePoint] = []
    for g in graph.groups:
        if not (g.prunable and g.zero_invariant):
            continue
        # for each space: the last affine node binding role="out" parameters of it
        spaces_at: dict[str, list] = {}
        for s in g.spaces:
            cands = [b.node for b in out_bindings
                     if _in_space(b.ids, [s]).any() and _affine_node(gm, nodes[b.node])]
            if not cands:
                notes.append(f"gates: group {g.id} space {s.origin} has no conv/linear/norm "
                             "producer node; left ungated")
                continue
            spaces_at.setdefault(max(cands, key=order.__getitem__), []).append(s)
        for name, spaces in sorted(spaces_at.items(), key=lambda kv: order[kv[0]]):
            tc = env.get(name)
            dims = [(d, m) for d, m in getattr(tc, "dims", {}).items() if _in_space(m.ids, spaces).any()]
            if len(dims) != 1:
                notes.append(f"gates: group {g.id} at node {name}: channel dim not unique; left ungated")
                continue
            dim, dmap = dims[0]
            index = np.where(_in_space(dmap.ids, spaces), _units_of(g, graph.roots, dmap.ids), -1)
            params = []
            for b in out_bindings:
                if b.node != name:
                    continue
                units = np.where(_in_space(b.ids, spaces), _units_of(g, graph.roots, b.ids), -1)
                pos = np.flatnonzero(units >= 0)
                if pos.size:
                    params.append((b.key, b.dim, pos, units[pos]))
            points.append(GatePoint(g.id, name, dim, index.astype(np.int64), tuple(params)))
    return points


def insert_gates(graph: DependencyGraph, *, drop_rate: float = 0.5, beta: float = 2 / 3,
                 gamma: float = -0.1, zeta: float = 1.1, notes: list[str] | None = None) -> GatedModel:
    """A copy of ``graph.gm`` with one hard-concrete gate per prunable zero-invariant group.

    ``drop_rate`` sets the initial ``log_alpha = log(1 - drop_rate) - log(drop_rate)``;
    ``beta`` (temperature), ``gamma`` < 0 and ``zeta`` > 1 (stretch) are the paper's
    defaults. The graph's own module is not modified.

    Example:
        >>> import fxprune
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 3))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> gated = insert_gates(fxprune.analyze(net, x))
        >>> opt = torch.optim.Adam(gated.parameters(), lr=1e-3)
        >>> loss = gated(x).square().mean() + 1e-3 * gated.expected_l0()
        >>> loss.backward(); opt.step()
        >>> sorted(gated.gates())
        [0]
    """
    points = find_gate_points(graph, notes)
    base = copy.deepcopy(graph.gm)
    gates = torch.nn.ModuleDict()
    for gid in sorted({p.group for p in points}):
        gates[str(gid)] = L0Gate(graph.group(gid).size, drop_rate=drop_rate, beta=beta,
                                 gamma=gamma, zeta=zeta)
    base.add_module(GATES_ATTR, gates)
    fxg = base.graph
    nodes = {n.name: n for n in fxg.nodes}
    last_input = [n for n in fxg.nodes if n.op == "placeholder"][-1]
    z_nodes = {}
    with fxg.inserting_after(last_input):
        for gid in reversed(sorted(int(k) for k in gates)):
            z_nodes[gid] = fxg.call_module(f"{GATES_ATTR}.{gid}", ())
    for i, p in enumerate(points):
        buf = f"l0_index_{i}"
        base.register_buffer(buf, torch.as_tensor(p.index), persistent=False)
        target = nodes[p.node]
        users = list(target.users)
        with fxg.inserting_after(target):
            idx = fxg.get_attr(buf)
        with fxg.inserting_after(idx):
            gated = fxg.call_function(apply_gate, (target, z_nodes[p.group], idx, p.dim))
        for u in users:
            u.replace_input_with(target, gated)
    fxg.lint()
    out = GatedModel(base, fxg, base.__class__.__name__)
    out.meta[POINTS_KEY] = points
    out.training = graph.gm.training
    return out


def fold_gates(gated: GatedModel) -> torch.fx.GraphModule:
    """An ordinary GraphModule: deterministic gates multiplied into each gate point's
    output parameters, gate nodes removed. Eval outputs equal the gated model's.

    ``folded.meta["fxprune_l0"]`` (and the ``meta`` of each gate point's node) holds ``{state_dict key: {"dim", "prob", "z"}}``
    (per index along ``dim``) for ``compress(folded, {..., "score": "l0"})``.

    Example:
        >>> import fxprune
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 3))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> gated = insert_gates(fxprune.analyze(net, x))
        >>> folded = fold_gates(gated)
        >>> torch.testing.assert_close(folded.eval()(x), gated.eval()(x))
    """
    check_unsharded(gated, "fold_gates", fix=AFTER_TRAINING)
    model = copy.deepcopy(gated)
    zs = {gid: g.deterministic().detach() for gid, g in model.gates().items()}
    probs = {gid: g.prob_nonzero().detach() for gid, g in model.gates().items()}
    params = dict(model.named_parameters())
    meta: dict[str, dict] = {}
    with torch.no_grad():
        for p in model.gate_points:
            for key, dim, pos, units in p.params:
                w = params[key]
                pos_t, units_t = torch.as_tensor(pos), torch.as_tensor(units)
                shape = [1] * w.dim()
                shape[dim] = -1
                sel = w.index_select(dim, pos_t) * zs[p.group][units_t].to(w.dtype).view(shape)
                w.index_copy_(dim, pos_t, sel)
                entry = meta.setdefault(key, {"dim": dim, "prob": np.ones(w.shape[dim]),
                                              "z": np.ones(w.shape[dim])})
                entry["prob"][pos] = probs[p.group][units_t].double().numpy()
                entry["z"][pos] = zs[p.group][units_t].double().numpy()
    fxg = model.graph
    by_node = {n.name: n for n in fxg.nodes}
    for p in model.gate_points:  # node meta survives re-capture (graphs are deep-copied)
        by_node[p.node].meta[META_KEY] = {key: meta[key] for key, *_ in p.params}
    for node in list(fxg.nodes):
        if node.op == "call_function" and node.target is apply_gate:
            node.replace_all_uses_with(node.args[0])
            fxg.erase_node(node)
    for node in list(fxg.nodes):
        if (node.op == "get_attr" and str(node.target).startswith("l0_index_")) or \
           (node.op == "call_module" and str(node.target).startswith(GATES_ATTR + ".")):
            fxg.erase_node(node)
    fxg.lint()
    folded = torch.fx.GraphModule(model, fxg, gated.__class__.__name__)  # drops unused modules
    folded.training = gated.training
    folded.meta[META_KEY] = meta
    return folded


def gate_meta(gm: torch.fx.GraphModule) -> dict[str, dict]:
    """The gate probabilities ``fold_gates`` left on ``gm`` (``{}`` if none).

    Read from ``gm.meta`` or, when the module was re-captured (a new GraphModule over a
    copy of the graph), from its nodes' ``meta``.

    Example:
        >>> import fxprune
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        ...                           torch.nn.Conv2d(8, 4, 3))
        >>> x = torch.randn(2, 3, 8, 8)
        >>> sorted(gate_meta(fold_gates(insert_gates(fxprune.analyze(net, x)))))
        ['1.bias', '1.weight']
    """
    found = dict(getattr(gm, "meta", {}).get(META_KEY, {}))
    for node in gm.graph.nodes:
        found.update(node.meta.get(META_KEY, {}))
    return found
