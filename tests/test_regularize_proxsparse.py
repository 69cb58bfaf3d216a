"""ProxSparse: the prox operator on hand-chosen 4-vectors, training with it, its masks,
and identical DDP replicas."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fxprune.errors import SpecError
from fxprune.regularize.proxsparse import ProxSparse, group_objective, prox_24
from fxprune.sparsity.masks import finalize
from fxprune.sparsity.nm import check_nm, nm_mask
from gloo_ranks import launch


@pytest.mark.parametrize("lam", [0.01, 1.0, 100.0])
def test_two_sparse_vector_is_a_fixed_point(lam):
    # with one other non-zero, e2(others) = 0: the soft threshold subtracts nothing
    y = torch.tensor([[3.0, 0.0, -2.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert torch.equal(prox_24(y, lam), y)


def test_three_sparse_vector_by_hand():
    lam, z = 0.01, [3.0, 2.0, 1.0]
    x = list(z)  # the fixed point of x_a = z_a - lam * x_b * x_c, by plain iteration
    for _ in range(200):
        x = [z[0] - lam * x[1] * x[2], z[1] - lam * x[0] * x[2], z[2] - lam * x[0] * x[1]]
    out = prox_24(torch.tensor([3.0, -2.0, 1.0, 0.0], dtype=torch.float64), lam)
    assert out.tolist() == pytest.approx([x[0], -x[1], x[2], 0.0], abs=1e-9)
    assert out[0] == pytest.approx(3 - 0.02, abs=2e-3)  # to first order 3 - lam * 2 * 1


def test_dense_vector_closed_form():
    # y = (1,1,1,1): by symmetry x = 1 - lam * 3 x^2, so x = (sqrt(1 + 12 lam) - 1) / (6 lam)
    lam = 0.01
    out = prox_24(torch.ones(4, dtype=torch.float64), lam)
    assert out.tolist() == pytest.approx([(math.sqrt(1 + 12 * lam) - 1) / (6 * lam)] * 4, abs=1e-9)


def test_large_lambda_gives_the_top_two():
    out = prox_24(torch.tensor([4.0, -3.0, 2.0, 1.0]), 10.0)
    assert out.abs().tolist() == [4.0, 3.0, 0.0, 0.0] and out[1] == -3.0


@pytest.mark.parametrize("lam", [0.05, 0.5, 5.0])
def test_result_objective_below_every_candidate(lam):
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(500, 4, generator=gen, dtype=torch.float64) * 1.5
    x = prox_24(y, lam)
    best = group_objective(x, y, lam)
    top = nm_mask(y, 2, 4)
    three = nm_mask(y, 3, 4)
    candidates = [y, y * top, y * three, torch.zeros_like(y)]
    candidates += [x + 0.01 * torch.randn(y.shape, generator=gen, dtype=torch.float64) for _ in range(20)]
    for c in candidates:
        assert (best <= group_objective(c, y, lam) + 1e-9).all()


def test_training_learns_a_two_sparse_mask_and_applies_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    teacher = nn.Linear(16, 3)
    original = net[0].weight.detach().clone()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    prox = ProxSparse(net, lam=300.0, optimizer=opt)
    assert list(prox.layers) == ["0", "2"] and prox.skipped == {}
    prox.attach()
    for _ in range(60):
        x = torch.randn(32, 16)
        loss = (net(x) - teacher(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert prox.two_sparse_fraction() == 1.0 and float(prox.penalty()) == 0.0
    learned = prox.masks()["0"]
    assert not torch.equal(learned, nm_mask(original, 2, 4))  # learning moved the mask
    prox.apply_masks(weights="original")
    finalize(net)
    assert torch.equal(net[0].weight.detach(), original * learned)  # the paper: original weights, learned mask
    assert check_nm(net[2].weight, 2, 4)


def test_trained_weights_option_and_errors():
    lin = nn.Linear(4, 2)
    prox = ProxSparse(lin, lam=1.0, keep_original=False)
    with pytest.raises(SpecError, match="keep_original=True"):
        prox.apply_masks()
    with pytest.raises(SpecError, match="'original' or 'trained'"):
        prox.apply_masks("best")
    trained = lin.weight.detach().clone()
    prox.apply_masks("trained")
    assert torch.equal(lin.weight.detach(), trained * nm_mask(trained, 2, 4))
    with pytest.raises(SpecError, match="no Linear/Conv weight with an input dim that is a multiple of 4"):
        ProxSparse(nn.Linear(3, 2), lam=1.0)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        prox = ProxSparse(ddp, lam=200.0, optimizer=opt)
        torch.manual_seed(100 + rank)  # different data on every rank
        for _ in range(10):
            loss = ddp(torch.randn(8, 8)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            prox.prox_()
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(gathered, params)
        if rank == 0:
            torch.save({"params": gathered, "two_sparse": prox.two_sparse_fraction()},
                       os.path.join(out_dir, "result.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_ddp_replicas_stay_identical(tmp_path):
    launch(_worker, (str(tmp_path),), str(tmp_path))
    result = torch.load(tmp_path / "result.pt")
    a, b = result["params"]
    assert torch.equal(a, b) and result["two_sparse"] == 1.0
