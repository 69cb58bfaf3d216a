"""Measured latency per residual branch: how many milliseconds removing a branch saves.

The depth counterpart of :mod:`fxprune.select.latency_table` (which times channel
groups), for ``scope="latency"`` with ``units`` holding "branches". Removing a branch
erases its nodes and its join (the add becomes its shortcut), so the time it saves is
the time of those nodes. Each branch is cut out of the graph as a module of its own
(``branch_module``: its nodes and its join, the values it reads from outside as inputs),
fed what it receives in the full model on the example inputs, and timed alone; all the
branches are timed alternately in one rotation (``measure.round_robin``), so load
changes hit every one of them alike. As for channel groups:

- each sample repeats a branch's call until it lasts about ``SAMPLE_MS`` (timer noise);
- with ``compiled=True`` (``latency.compile``) CPU convs and 4-D inputs run in
  ``channels_last``, the layout ``torch.compile`` gives them; with ``fold=True``
  (``spec.fuse``) BatchNorms are folded into their convs first, as ``compress`` emits;
- branches that run the same kernels on the same shapes (resnet50's identical blocks of
  a stage, a ViT's twelve attention branches) share the mean of their times.

Example:
    >>> import torch, fxprune
    >>> from fxprune.measure import LatencySettings
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.small, self.big = torch.nn.Linear(8, 8), torch.nn.Linear(8, 512)
    ...         self.back = torch.nn.Linear(512, 8)
    ...     def forward(self, x):
    ...         x = x + self.small(x)
    ...         return x + self.back(torch.relu(self.big(x)))
    >>> graph = fxprune.analyze(Net(), torch.randn(64, 8))
    >>> ms = branch_times(graph, graph.branches, LatencySettings(threads=1, warmup=1, repeats=5))
    >>> sorted(ms) == [b.id for b in graph.branches] and all(v > 0 for v in ms.values())
    True
"""
from __future__ import annotations

import math

import torch
import torch.fx

from fxprune._util import eval_mode
from fxprune.measure import LatencySettings, device_timer, round_robin
from fxprune.passes.fuse import fuse
from fxprune.progress import step as progress_step
from fxprune.select.latency_table import SAMPLE_MS, _placed


def branch_module(gm: torch.fx.GraphModule, branch) -> tuple[torch.fx.GraphModule, list[str]]:
    """The branch's nodes and its join as a module of their own, and the names of the
    nodes of ``gm`` whose values it takes as inputs (in order). Parameters read with
    ``get_attr`` are copied in as ``get_attr`` too, not made inputs."""
    keep = set(branch.nodes) | {branch.join}
    nodes = [n for n in gm.graph.nodes if n.name in keep]
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    inputs: list[str] = []
    for node in nodes:
        for src in node.all_input_nodes:
            if src.name in keep or src.name in env:
                continue
            if src.op == "get_attr":
                env[src.name] = graph.get_attr(src.target)
            else:
                env[src.name] = graph.placeholder(f"in_{len(inputs)}")
                inputs.append(src.name)
    for node in nodes:
        env[node.name] = graph.node_copy(node, lambda n: env[n.name])
    graph.output(env[branch.join])
    return torch.fx.GraphModule(gm, graph), inputs


def _values(gm: torch.fx.GraphModule, example_inputs, names: set[str]) -> dict[str, object]:
    """The values of the named nodes in one eval pass of ``gm`` (an interpreter run)."""
    out: dict[str, object] = {}

    class Record(torch.fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in names:
                out[node.name] = value
            return value

    with eval_mode(gm), torch.inference_mode():
        Record(gm).run(*example_inputs.flat(gm))
    return out


def _signature(module: torch.fx.GraphModule, args: tuple) -> tuple:
    """What a branch runs: its ops, its parameter shapes and its input shapes."""
    ops = tuple(str(n.target) if n.op != "call_module" else type(module.get_submodule(n.target)).__name__
                for n in module.graph.nodes if n.op in ("call_function", "call_method", "call_module"))
    params = tuple(tuple(p.shape) for p in module.parameters())
    shapes = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else repr(a) for a in args)
    return ops, params, shapes


def branch_times(graph, branches, settings: LatencySettings, *, compiled: bool = False,
                 fold: bool = False) -> dict[int, float]:
    """``{branch id: ms}``: the time of each branch's nodes and join, timed alone (see the
    module docstring); branches with equal signatures share their mean."""
    if not branches:
        return {}
    gm = graph.gm
    cut = {b.id: branch_module(gm, b) for b in branches}
    values = _values(gm, graph.example_inputs, {name for _, names in cut.values() for name in names})
    device = torch.device(settings.device)
    runners, signature = {}, {}
    for bid, (module, names) in cut.items():
        args = tuple(values[n] for n in names)
        module.eval()
        if fold:
            try:
                module = fuse(module, args).gm
            except Exception:  # noqa: BLE001 -- a branch fuse cannot take is timed unfolded
                pass
        signature[bid] = _signature(module, args)
        module, ((args, _),) = _placed(module, [(args, {})], device, compiled)
        runners[bid] = lambda m=module, a=args: m(*a)
    progress_step(f"scope=latency: timing {len(runners)} residual branch(es)")
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    timer = device_timer(device)
    try:
        with torch.inference_mode():
            loops = {bid: max(1, int(math.ceil(SAMPLE_MS / max(timer(run), 1e-3)))) for bid, run in runners.items()}
            looped = [lambda r=run, n=loops[bid]: [r() for _ in range(n)] for bid, run in runners.items()]
            ms = {bid: t / loops[bid] for bid, t in zip(runners, round_robin(looped, settings, timer))}
    finally:
        torch.set_num_threads(previous)
    alike: dict[tuple, list[int]] = {}
    for bid, sig in signature.items():
        alike.setdefault(sig, []).append(bid)
    return {bid: sum(ms[b] for b in same) / len(same) for same in alike.values() for bid in same}


__all__ = ["branch_module", "branch_times"]
