"""Regularisers applied after a DDP-synchronised step keep replicas identical."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from fxprune.regularize import ChannelSlices, GroupLasso, LpDecay, TargetedGroupLasso
from gloo_ranks import launch

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # fail, never hang
    try:
        torch.manual_seed(0)  # same init on every rank (DDP also broadcasts it)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                    torch.nn.ReLU(), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 36, 4))
        conv, bn, head = model[0], model[1], model[4]
        chans = [ChannelSlices([(conv.weight, 0, [c]), (conv.bias, 0, [c]),
                                (bn.weight, 0, [c]), (bn.bias, 0, [c])]) for c in range(8)]
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        lasso = GroupLasso(chans, lam=0.5, optimizer=opt)
        decay = LpDecay([head.weight], p=0.5, lam=0.05, optimizer=opt)
        # selection runs on each rank's own weights: it must choose the same channels
        targeted = TargetedGroupLasso(model, {"example_inputs": (torch.randn(1, 3, 8, 8),),
                                              "target": {"flops": 0.5}, "round_to": 1}, lam=0.5,
                                      ramp_steps=4, update_every=2, optimizer=opt)
        torch.manual_seed(100 + rank)  # different data on every rank
        for _ in range(8):
            x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
            loss = torch.nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            with decay.step():
                opt.step()
            lasso.prox_()
            targeted.step()
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(gathered, params)
        if rank == 0:
            torch.save({"params": gathered,
                        "zero_channels": int(lasso.zero_channels().sum()),
                        "zero_fraction": decay.zero_fraction(),
                        "chosen": targeted.chosen()},
                       os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ddp_replicas_stay_identical(tmp_path):
    launch(worker, (str(tmp_path),), str(tmp_path))
    result = torch.load(tmp_path / "result.pt")
    a, b = result["params"]
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    # the regularisers did act (otherwise identical weights would prove nothing new)
    assert result["zero_channels"] > 0 or result["zero_fraction"] > 0
    assert result["chosen"]
