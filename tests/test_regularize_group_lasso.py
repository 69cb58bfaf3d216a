"""GroupLasso: penalty value, proximal step, optimizers."""

import math

import pytest
import torch

from fxprune.errors import SpecError
from fxprune.regularize import ChannelSlices, GroupLasso


def conv_bn_channels(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    conv, bn = model[0], model[1]
    chans = [ChannelSlices([(conv.weight, 0, [c]), (conv.bias, 0, [c]),
                            (bn.weight, 0, [c]), (bn.bias, 0, [c])], label=c)
             for c in range(4)]
    return model, chans


def test_penalty_by_hand():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))
    b = torch.nn.Parameter(torch.tensor([0.0, 2.0]))
    chans = [ChannelSlices([(w, 0, [c]), (b, 0, [c])]) for c in range(2)]
    # channel 0: n=3, norm 5; channel 1: n=3, norm sqrt(5)
    expected = 0.1 * (math.sqrt(3) * 5 + math.sqrt(3) * math.sqrt(5))
    assert GroupLasso(chans, lam=0.1).penalty().item() == pytest.approx(expected, rel=1e-6)


def test_penalty_gradient_is_finite_at_a_zero_channel():
    w = torch.nn.Parameter(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    lasso = GroupLasso([ChannelSlices([(w, 0, [c])]) for c in range(2)], lam=1.0)
    lasso.penalty().backward()
    assert torch.allclose(w.grad, math.sqrt(2) * torch.tensor([[0.0, 0.0], [0.6, 0.8]]))


def test_prox_gives_exact_zeros_and_scales_survivors():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.1, 0.1], [0.0, 0.0]]))
    b = torch.nn.Parameter(torch.tensor([0.0, 0.1, 0.0]))
    chans = [ChannelSlices([(w, 0, [c]), (b, 0, [c])]) for c in range(3)]
    lasso = GroupLasso(chans, lam=2.0)
    lr = 0.1
    threshold = lr * 2.0 * math.sqrt(3)  # 0.346 > norm of channel 1 (0.173)
    factor = lasso.prox_(lr)
    assert torch.equal(w[1].detach(), torch.zeros(2)) and b[1].item() == 0.0
    assert torch.equal(w[2].detach(), torch.zeros(2))  # zero stays zero, no NaN
    assert torch.allclose(w[0].detach(), torch.tensor([3.0, 4.0]) * (1 - threshold / 5.0))
    assert factor[1] == 0 and factor[0] == pytest.approx(1 - threshold / 5.0)
    assert lasso.zero_channels().tolist() == [False, True, True]


def test_prox_leaves_other_entries_of_the_parameter_alone():
    w = torch.nn.Parameter(torch.full((4, 2), 0.01))
    lasso = GroupLasso([ChannelSlices([(w, 0, [1])]), ChannelSlices([(w, 0, [3])])], lam=1.0)
    lasso.prox_(lr=1.0)
    assert torch.equal(w[[0, 2]].detach(), torch.full((2, 2), 0.01))
    assert torch.equal(w[[1, 3]].detach(), torch.zeros(2, 2))


def test_constructor_and_norms_do_not_mutate_parameters():
    model, chans = conv_bn_channels()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lasso = GroupLasso(chans, lam=1.0)
    lasso.penalty(), lasso.channel_norms()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def weak_strong_model():
    """Channels 4..7 start small: a group lasso should remove them first."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 3))
    conv, bn = model[0], model[1]
    with torch.no_grad():
        bn.weight[4:] = 0.05
        conv.weight[4:] *= 0.1
        conv.bias[4:] *= 0.1
    chans = [ChannelSlices([(conv.weight, 0, [c]), (conv.bias, 0, [c]),
                            (bn.weight, 0, [c]), (bn.bias, 0, [c])], label=c)
             for c in range(8)]
    return model, chans


@pytest.mark.parametrize("make_opt,lam", [
    (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), 0.05),
    (lambda ps: torch.optim.Adam(ps, lr=0.01), 0.6),  # Adam's steps ignore grad scale
], ids=["sgd", "adam"])
def test_training_with_prox_zeroes_channels(make_opt, lam):
    model, chans = weak_strong_model()
    opt = make_opt(model.parameters())
    lasso = GroupLasso(chans, lam=lam, optimizer=opt)
    torch.manual_seed(1)
    x = torch.randn(32, 3, 8, 8)
    y = (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        lasso.prox_()  # lr read from the optimizer
    assert all(torch.isfinite(p).all() for p in model.parameters())
    zero = lasso.zero_channels()
    assert zero[4:].sum() >= 3 and not zero[:4].all()
    for c in zero.nonzero().flatten().tolist():
        assert torch.all(chans[c].values() == 0)
    # pruned channels contribute nothing: zeroed BN affine means constant-0 output
    with torch.no_grad():
        feats = model[:3].eval()(x)
    assert torch.all(feats[:, zero] == 0)


def test_training_with_penalty_in_the_loss_shrinks_norms():
    model, chans = conv_bn_channels()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    lasso = GroupLasso(chans, lam=0.05)
    start = lasso.channel_norms().sum()
    x = torch.randn(16, 3, 8, 8)
    for _ in range(30):
        loss = model(x).square().mean() * 0 + lasso.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert lasso.channel_norms().sum() < start


def test_lr_is_read_per_channel_from_the_optimizer():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [3.0, 4.0]]))
    v = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.5}, {"params": [v], "lr": 1.0}], lr=0.1)
    lasso = GroupLasso([ChannelSlices([(w, 0, [0])]), ChannelSlices([(v, 0, [0])])],
                       lam=1.0, optimizer=opt)
    factor = lasso.prox_()
    assert factor.tolist() == pytest.approx([1 - 0.5 * math.sqrt(2) / 5,
                                             1 - 1.0 * math.sqrt(2) / 5])


def test_prox_without_lr_or_optimizer_names_lr():
    w = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(SpecError, match="lr"):
        GroupLasso([ChannelSlices([(w, 0, [0])])], lam=1.0).prox_()


@pytest.mark.parametrize("lam", [-1.0, float("nan"), "a"])
def test_bad_lam_raises_spec_error(lam):
    w = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(SpecError, match="lam"):
        GroupLasso([ChannelSlices([(w, 0, [0])])], lam=lam)


def test_negative_lr_raises_spec_error():
    w = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(SpecError, match="lr"):
        GroupLasso([ChannelSlices([(w, 0, [0])])], lam=1.0).prox_(lr=-0.1)


def test_weights_scale_penalty_and_prox_per_channel():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.3, 0.4]]))
    chans = [ChannelSlices([(w, 0, [c])]) for c in range(2)]
    lasso = GroupLasso(chans, lam=1.0, weights=torch.tensor([0.0, 2.0]))
    # only channel 1 counts, twice: 2 * sqrt(2) * 0.5
    assert lasso.penalty().item() == pytest.approx(2 * math.sqrt(2) * 0.5, rel=1e-6)
    factor = lasso.prox_(lr=0.1)  # channel 1: threshold 0.1 * 2 * sqrt(2) = 0.28 < 0.5
    assert factor[0].item() == 1.0 and torch.equal(w[0].detach(), torch.tensor([3.0, 4.0]))
    assert factor[1].item() == pytest.approx(1 - 0.2 * math.sqrt(2) / 0.5, rel=1e-6)


@pytest.mark.parametrize("weights, match", [(torch.ones(3), r"shape \(2,\)"),
                                            (torch.tensor([1.0, -1.0]), ">= 0"),
                                            (torch.tensor([1.0, float("nan")]), "finite")])
def test_bad_weights_raise_spec_error(weights, match):
    w = torch.nn.Parameter(torch.ones(2, 2))
    chans = [ChannelSlices([(w, 0, [c])]) for c in range(2)]
    with pytest.raises(SpecError, match=match):
        GroupLasso(chans, lam=1.0, weights=weights)
