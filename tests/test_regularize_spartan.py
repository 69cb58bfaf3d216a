"""Spartan: Sinkhorn's budget by hand, the schedule, hard forward with soft gradients, and
the final fixed masks."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fxprune.errors import SpecError
from fxprune.regularize.spartan import Spartan, sinkhorn_topk
from fxprune.sparsity.masks import finalize
from fxprune.sparsity.nm import check_nm, nm_mask


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_sinkhorn_two_entries_by_hand():
    # k = 1 of 2: by symmetry mu = -beta (a + b) / 2, so m = sigmoid(+-beta (a - b) / 2)
    a, b, beta = 0.9, 0.3, 5.0
    m = sinkhorn_topk(torch.tensor([[a, b]]), 1, beta)
    assert m[0].tolist() == pytest.approx([_sigmoid(beta * (a - b) / 2), _sigmoid(beta * (b - a) / 2)], abs=1e-6)


@pytest.mark.parametrize("k", [1, 2, 2.5, 3])
def test_sinkhorn_meets_the_budget_and_orders_like_the_scores(k):
    scores = torch.rand(64, 4, generator=torch.Generator().manual_seed(0))
    m = sinkhorn_topk(scores, k, beta=8.0)
    assert torch.allclose(m.sum(-1), torch.full((64,), float(k)), atol=1e-4)
    assert torch.equal(m.argsort(-1), scores.argsort(-1))  # monotone in the score
    sharp = sinkhorn_topk(scores, 2, beta=2000.0)
    assert torch.equal(sharp > 0.5, nm_mask(scores, 2, 4))  # large beta: the hard top-k


def test_schedule_by_hand():
    net = nn.Linear(8, 4)
    sched = Spartan(net, 2, 4, total_steps=100, beta_start=1.0, beta_end=100.0)
    assert (sched.budget, sched.beta, sched.frozen) == (4.0, 1.0, False)
    for _ in range(10):
        sched.step()
    assert sched.budget == pytest.approx(3.0) and sched.beta == pytest.approx(100 ** (10 / 80))
    for _ in range(70):
        sched.step()
    assert (sched.budget, sched.beta, sched.frozen) == (2.0, pytest.approx(100.0), True)


def test_forward_is_hard_gradient_is_soft_and_mask_freezes():
    torch.manual_seed(0)
    net = nn.Linear(8, 4, bias=False)
    sched = Spartan(net, 2, 4, total_steps=10, beta_start=4.0, beta_end=4.0)
    for _ in range(2):
        sched.step()  # budget 2: hard 2:4 forward
    raw = net.parametrizations["weight"].original
    x = torch.randn(16, 8)
    out = net(x)
    assert torch.allclose(out, x @ (raw * nm_mask(raw, 2, 4)).T.detach())
    out.square().sum().backward()
    dropped = ~nm_mask(raw, 2, 4)
    assert (raw.grad[dropped] != 0).all()  # pruned weights still learn (a fixed mask gives them 0)
    for _ in range(6):
        sched.step()
    assert sched.frozen
    frozen = nm_mask(raw.detach(), 2, 4)
    with torch.no_grad():
        raw.mul_(-torch.rand_like(raw))  # weights move; the mask does not
    assert torch.equal(net.weight != 0, frozen)


def test_training_ends_on_exact_nm_and_errors():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    teacher = nn.Linear(8, 3)
    steps = 20
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sched = Spartan(net, 1, 4, total_steps=steps)
    for _ in range(steps):
        x = torch.randn(32, 8)
        loss = (net(x) - teacher(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    result = sched.finish()
    finalize(net)
    assert [r.density for r in result.masked] == [0.25, 0.25]
    assert check_nm(net[0].weight, 1, 4) and check_nm(net[2].weight, 1, 4)
    with pytest.raises(SpecError, match="total_steps must be an int >= 1"):
        Spartan(nn.Linear(8, 4), 2, 4, total_steps=0)
    with pytest.raises(SpecError, match="budget k must be in"):
        sinkhorn_topk(torch.rand(2, 4), 4, 1.0)


def test_sinkhorn_gradient_is_the_implicit_one():
    # the budget holds for every score, so the gradient of a row's sum is 0; and the
    # gradient of any weighted sum matches central finite differences of the soft mask
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    sinkhorn_topk(scores, 2, beta=3.0).sum().backward()
    assert scores.grad.abs().max() < 1e-9
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    scores.grad = None
    (sinkhorn_topk(scores, 2, beta=3.0) * weights).sum().backward()
    for i, j in [(0, 0), (1, 2), (2, 3)]:
        bump = torch.zeros_like(scores)
        bump[i, j] = 1e-6
        up = (sinkhorn_topk((scores + bump).detach(), 2, beta=3.0) * weights).sum()
        down = (sinkhorn_topk((scores - bump).detach(), 2, beta=3.0) * weights).sum()
        assert scores.grad[i, j].item() == pytest.approx(((up - down) / 2e-6).item(), rel=1e-4, abs=1e-7)
