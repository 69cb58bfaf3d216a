"""BNScaleL1 (network slimming)."""

import pytest
import torch

from fxprune.errors import SpecError
from fxprune.regularize import BNScaleL1


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4, affine=False), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64, 3), torch.nn.BatchNorm1d(3))


def test_penalty_by_hand_and_only_affine_batchnorms():
    model = net()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
        model[8].weight.copy_(torch.tensor([0.25, -0.25, 3.0]))
    slim = BNScaleL1(model, lam=0.1)
    assert slim.names == ["1", "8"]
    assert slim.penalty().item() == pytest.approx(0.1 * (3.5 + 3.5))
    assert torch.equal(slim.channel_scores()["8"], torch.tensor([0.25, 0.25, 3.0]))


def test_penalty_gradient_is_lam_sign():
    bn = torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([2.0, -1.0, 0.5]))
    BNScaleL1(bn, lam=0.3).penalty().backward()
    assert torch.allclose(bn.weight.grad, torch.tensor([0.3, -0.3, 0.3]))


def test_prox_soft_thresholds_to_exact_zeros():
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.05, -0.05, 1.0, -1.0]))
    BNScaleL1(bn, lam=0.5).prox_(lr=0.2)
    assert torch.equal(bn.weight.detach(), torch.tensor([0.0, 0.0, 0.9, -0.9]))
    assert torch.equal(bn.bias.detach(), torch.zeros(4))  # bias untouched


OPTIMIZERS = [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
]


def fit(model, opt, steps, penalty=None, after=None):
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after is not None:
            after()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=["sgd", "adam"])
def test_penalty_in_the_loss_shrinks_the_scales(make_opt):
    model = net()
    opt = make_opt(model.parameters())
    slim = BNScaleL1(model, lam=0.2)
    start = sum(w.detach().abs().sum() for w in slim.scales)
    fit(model, opt, 30, penalty=slim.penalty)
    assert sum(w.detach().abs().sum() for w in slim.scales) < start


@pytest.mark.parametrize("make_opt", OPTIMIZERS, ids=["sgd", "adam"])
def test_prox_after_the_step_zeroes_weak_scales(make_opt):
    model = net()
    with torch.no_grad():
        model[1].weight[2:] = 0.01  # two weak channels
    opt = make_opt(model.parameters())
    slim = BNScaleL1(model, lam=0.5, optimizer=opt)
    fit(model, opt, 30, after=slim.prox_)
    gamma = model[1].weight.detach()
    assert torch.equal(gamma[2:], torch.zeros(2))
    assert (gamma[:2] != 0).all()


def test_constructor_does_not_mutate_the_model():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    BNScaleL1(model, lam=1.0).penalty()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_model_without_batchnorm_gives_zero_penalty():
    assert BNScaleL1(torch.nn.Linear(2, 2), lam=1.0).penalty().item() == 0.0


@pytest.mark.parametrize("lam", [-0.1, float("inf")])
def test_bad_lam_raises_spec_error(lam):
    with pytest.raises(SpecError, match="^lam:"):
        BNScaleL1(net(), lam=lam)


def test_prox_without_lr_raises_spec_error():
    with pytest.raises(SpecError, match="^lr:"):
        BNScaleL1(net(), lam=1.0).prox_()
