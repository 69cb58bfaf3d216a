"""Every training-time tool run the same way in one process, under DDP and under FSDP2.

``RECIPES`` holds one recipe per tool: how to prepare the model (structure changes such as
parametrizations, which must come before ``fully_shard``), how to build the tool, what
to add to the loss and what to call after ``optimizer.step()``. ``train`` runs a recipe
on one "mode": ``single`` (one process, the whole batch), ``ddp``, ``fsdp_before`` (the
tool built before ``fully_shard``) or ``fsdp_after``. Ranks take interleaved halves of the
same global batches, so every mode computes the same training. ``run_ranks`` forks the
ranks (``gloo_ranks``).
"""
from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist
from torch import nn

import fxprune
from fxprune.errors import FxpruneError
from fxprune.passes.gates import fold_gates
from fxprune.regularize import (BNScaleL1, ChannelSlices, GroupLasso, LpDecay, ProxSparse, SRigL,
                                Spartan, TargetedGroupLasso, channel_slices_from_graph, collapse,
                                factorize)
from fxprune.regularize.l0 import l0_gate
from fxprune.sharding import full
from fxprune.sparsity.block import apply_block
from fxprune.sparsity.masks import finalize
from fxprune.sparsity.nm import apply_nm
from gloo_ranks import launch

STEPS = 6
BATCH = 8  # global batch; each of 2 ranks takes 4


def mlp() -> nn.Module:
    # hidden 16 -> Linear(16, 8): under 2-way FSDP each hidden channel's column in the
    # second weight is split across the ranks (rows 0-3 on rank 0, 4-7 on rank 1)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(),
                         nn.Linear(8, 4)).double()


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 16, 4)).double().eval()  # eval: BN statistics alike on every rank


def mlp_input(n: int = 2, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(n, 8, generator=gen, dtype=torch.float64)


def conv_input(n: int = 2, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=gen, dtype=torch.float64)


class Recipe:
    """Defaults: an MLP, SGD, no structure change, the tool built by ``build``."""

    model, inputs = staticmethod(mlp), staticmethod(mlp_input)
    structural = False  # prepare() changes the model's structure: only before fully_shard
    unsharded_build = False  # build() runs the model: only before fully_shard
    stale_before = False  # built before fully_shard, the tool must raise (it cannot find the new parameters)
    per_layer = True  # fully_shard each layer, then the root; False: the root alone
    lr = 0.1

    def prepare(self, model):  # structure changes (before fully_shard, unless testing the error)
        return model

    def build(self, model):  # the tool, on the model as it is now (before or after fully_shard)
        return None

    def connect(self, tool, opt):  # the optimizer exists only after fully_shard
        if tool is not None:
            tool.optimizer = opt

    def extra_loss(self, tool, model):
        return 0.0

    def after_step(self, tool):
        pass

    def report(self, tool) -> dict:  # quantities every mode must agree on
        return {}

    def finish(self, tool, model):  # the after-training step (masks baked, factors collapsed)
        pass


class PlainMLP(Recipe):
    """No tool: what the other recipes must differ from."""


class PlainConvNet(Recipe):
    model, inputs = staticmethod(convnet), staticmethod(conv_input)


def split_channels(model: nn.Module, graph) -> list:
    """The 16 hidden channels of ``mlp`` with their consumer columns (role "all"): each owns
    a row of the first weight (on one rank) and a column of the second (on both ranks)."""
    chans = channel_slices_from_graph(model, graph, role="all")
    first = chans[0].label[0]
    return [ch for ch in chans if ch.label[0] == first]


class Analysed(Recipe):
    """The analysis runs on the unsharded model (it executes the model); the tool may be
    built from it after fully_shard."""

    def prepare(self, model):
        self.graph = fxprune.analyze(model, (mlp_input(),))
        return model


class GroupLassoProx(Analysed):
    def build(self, model):
        return GroupLasso(split_channels(model, self.graph), lam=0.3)

    def after_step(self, tool):
        tool.prox_()

    def report(self, tool):
        return {"norms": tool.channel_norms(), "zero": tool.zero_channels()}


class HandBuiltLasso(Recipe):
    """Channels built by hand hold the parameter objects, which fully_shard replaces: built
    before it they must raise, built after it they work."""

    stale_before = True

    def build(self, model):
        first = model[0]
        return GroupLasso([ChannelSlices([(first.weight, 0, [c]), (first.bias, 0, [c])])
                           for c in range(16)], lam=0.3)

    def after_step(self, tool):
        tool.prox_()

    def report(self, tool):
        return {"norms": tool.channel_norms()}


class GroupLassoPenalty(GroupLassoProx):
    def extra_loss(self, tool, model):
        return tool.penalty()

    def after_step(self, tool):
        pass


class LpDecayGrouped(Analysed):
    def build(self, model):
        return LpDecay(split_channels(model, self.graph), p=0.5, lam=0.5)

    def connect(self, tool, opt):
        tool.attach(opt)

    def report(self, tool):
        return {"penalty": tool.penalty(), "zero": torch.tensor(tool.zero_fraction())}


class LpDecayElementwise(LpDecayGrouped):
    def build(self, model):
        return LpDecay(model, p=0.5, lam=0.05)


class BNL1(Recipe):
    model, inputs = staticmethod(convnet), staticmethod(conv_input)

    def build(self, model):
        return BNScaleL1(model, lam=0.5)

    def extra_loss(self, tool, model):
        return 0.1 * tool.penalty()

    def after_step(self, tool):
        tool.prox_()

    def report(self, tool):
        return {f"scale {k}": v for k, v in tool.channel_scores().items()}


class Targeted(Recipe):
    model, inputs = staticmethod(convnet), staticmethod(conv_input)
    unsharded_build = True

    def build(self, model):
        spec = {"example_inputs": (conv_input(1),), "target": {"flops": 0.5}, "round_to": 1}
        return TargetedGroupLasso(model, spec, lam=2.0, ramp_steps=2, update_every=2)

    def after_step(self, tool):
        tool.step()

    def report(self, tool):
        return {"chosen": torch.tensor(tool.chosen()), "zero": torch.tensor(tool.zero_channels())}


class L0Gates(Recipe):
    structural = True

    def prepare(self, model):
        self.gated = l0_gate(model, mlp_input())
        return self.gated

    def extra_loss(self, tool, model):
        return 0.05 * model.expected_l0()

    def report(self, tool):  # outside forward: log_alpha is sharded by now
        return {"expected_l0": self.gated.expected_l0().detach(),
                **{f"p {k}": torch.from_numpy(v) for k, v in self.gated.gate_probabilities().items()}}

    def finish(self, tool, model):
        fold_gates(model)


class DWFElementwise(Recipe):
    structural = True

    def prepare(self, model):
        self.dwf = factorize(model, depth=2, lam=1e-2)
        return model

    def extra_loss(self, tool, model):
        return self.dwf.l2_penalty()

    def report(self, tool):
        return {"equivalent": self.dwf.equivalent_penalty()}

    def finish(self, tool, model):
        collapse(model)


class DWFGrouped(DWFElementwise):
    per_layer = False  # the channel scales are shared by the layers: one FSDP unit
    def prepare(self, model):
        graph = fxprune.analyze(model, (mlp_input(),))
        self.dwf = factorize(model, depth=3, lam=1e-2, channels=channel_slices_from_graph(model, graph))
        return model


class SRSTE(Recipe):
    structural = True

    def prepare(self, model):
        apply_nm(model, 2, 4, sr_ste=True, sr_ste_decay=0.1)
        return model

    def finish(self, tool, model):
        finalize(model)


class BlockMasks(Recipe):
    structural = True

    def prepare(self, model):
        apply_block(model, (2, 2), 0.5)
        return model

    def finish(self, tool, model):
        finalize(model)


class ProxSparse24(Recipe):
    def build(self, model):
        return ProxSparse(model, lam=20.0)

    def after_step(self, tool):
        tool.prox_()

    def report(self, tool):
        return {"two_sparse": torch.tensor(tool.two_sparse_fraction()),
                "penalty": tool.penalty(), **{f"mask {k}": v for k, v in tool.masks().items()}}

    def finish(self, tool, model):
        tool.apply_masks()


class SpartanNM(Recipe):
    structural = True

    def prepare(self, model):
        self.sched = Spartan(model, 2, 4, total_steps=STEPS, beta_start=1.0, beta_end=50.0)
        return model

    def after_step(self, tool):
        self.sched.step()

    def finish(self, tool, model):
        self.sched.finish()


class SRigLFanIn(Recipe):
    structural = True

    def prepare(self, model):
        self.srigl = SRigL(model, density=0.5, total_steps=STEPS + 2, delta_t=2, erk=False)
        return model

    def after_step(self, tool):
        self.srigl.step()

    def report(self, tool):
        return {f"mask {k}": m.mask for k, m in self.srigl.masks.items()}


RECIPES: dict[str, type[Recipe]] = {
    "plain_mlp": PlainMLP,
    "plain_convnet": PlainConvNet,
    "hand_built_lasso": HandBuiltLasso,
    "group_lasso_prox": GroupLassoProx,
    "group_lasso_penalty": GroupLassoPenalty,
    "lp_decay_grouped": LpDecayGrouped,
    "lp_decay_elementwise": LpDecayElementwise,
    "bn_l1": BNL1,
    "targeted": Targeted,
    "l0_gates": L0Gates,
    "dwf_elementwise": DWFElementwise,
    "dwf_grouped": DWFGrouped,
    "sr_ste": SRSTE,
    "block": BlockMasks,
    "proxsparse": ProxSparse24,
    "spartan": SpartanNM,
    "srigl": SRigLFanIn,
}
MODES = ("ddp", "fsdp_before", "fsdp_after")


def _shard(model: nn.Module, per_layer: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for module in model.modules() if per_layer else ():  # a unit per layer, as for LLMs
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def train(name: str, mode: str) -> dict:
    """Run recipe ``name`` in ``mode``; returns the whole state dict and the report (on
    every rank: the report of a sharded tool must already be the whole one)."""
    recipe = RECIPES[name]()
    rank, world = (dist.get_rank(), dist.get_world_size()) if mode != "single" else (0, 1)
    model = recipe.model()
    late = mode == "fsdp_after" and recipe.structural  # expected to raise a clear error
    if not late:
        model = recipe.prepare(model)
    tool = recipe.build(model) if mode == "fsdp_before" else None
    if mode.startswith("fsdp"):
        _shard(model, recipe.per_layer)
    if late:
        model = recipe.prepare(model)
    net = nn.parallel.DistributedDataParallel(model) if mode == "ddp" else model
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr)
    if mode != "fsdp_before":
        tool = recipe.build(model)
    recipe.connect(tool, opt)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        x = recipe.inputs(BATCH, gen)
        y = torch.randn(BATCH, 4, generator=gen, dtype=torch.float64)
        x, y = x[rank::world], y[rank::world]
        torch.manual_seed(1000 + step)  # the same gate samples on every rank and in one process
        loss = (net(x) - y).square().mean() + recipe.extra_loss(tool, model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        recipe.after_step(tool)
    state = {k: full(v).detach().clone() for k, v in model.state_dict().items()}
    report = {k: full(torch.as_tensor(v)).detach().clone() for k, v in recipe.report(tool).items()}
    try:
        recipe.finish(tool, model)
        finish_error = None
    except FxpruneError as err:  # expected on a sharded model: the message says what to do
        finish_error = str(err)
    return {"state": state, "report": report, "finish_error": finish_error}


def _worker(rank: int, world: int, port: int, jobs: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for name, mode in jobs:
            try:
                results[(name, mode)] = train(name, mode)
            except FxpruneError as err:  # a combination that cannot work: the error is the result
                results[(name, mode)] = {"error": str(err)}
            except Exception:  # a failure: reported by the test, the other jobs still run
                results[(name, mode)] = {"failure": traceback.format_exc()}
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(jobs: list, out_dir: str, world: int = 2) -> list[dict]:
    """Run ``jobs`` (``(recipe name, mode)`` pairs) on ``world`` forked gloo ranks; returns
    each rank's ``{(name, mode): result}``."""
    launch(_worker, (jobs, out_dir), out_dir, world)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
