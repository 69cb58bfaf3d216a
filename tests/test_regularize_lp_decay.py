"""LpDecay: the implicit update, stability for p < 1, real training, group form."""

import math
import warnings

import pytest
import torch
from sklearn.datasets import load_digits

from fxprune.errors import SpecError
from fxprune.regularize import ChannelSlices, LpDecay, lp_decay_params


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(model, opt, decay, x, y, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        with decay.step():
            opt.step()
    return loss


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0, 3.0])
def test_update_matches_the_formula_by_hand(p):
    w_old = torch.tensor([2.0, -0.5, 0.0, 1e-20])
    w = torch.nn.Parameter(w_old.clone())
    lr, lam = 0.1, 0.3
    decay = LpDecay([w], p=p, lam=lam)
    decay.before_step()
    with torch.no_grad():
        w.add_(0.25)  # the "optimizer's" update
    w_hat = w_old + 0.25
    decay.after_step(lr=lr)
    mag = w_old.double().abs()
    if p <= 2:
        expected = w_hat.double() * mag ** (2 - p) / (mag ** (2 - p) + p * lr * lam)
    else:
        expected = w_hat.double() / (1 + p * lr * lam * mag ** (p - 2))
    assert torch.isfinite(w).all()
    assert torch.allclose(w.detach().double(), expected, rtol=1e-6, atol=0)
    if p < 2:
        assert w[2].item() == 0.0  # a weight at 0 stays 0 even though the step moved it


def test_penalty_value_by_hand():
    w = torch.nn.Parameter(torch.tensor([4.0, -9.0, 0.0]))
    assert LpDecay([w], p=0.5, lam=2.0).penalty().item() == pytest.approx(2.0 * (2 + 3))
    a = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    chans = [ChannelSlices([(a, 0, [c])]) for c in range(2)]
    assert LpDecay(chans, p=0.5, lam=1.0).penalty().item() == pytest.approx(math.sqrt(5))


def test_zero_lr_or_lam_is_a_no_op_even_at_zero():
    w = torch.nn.Parameter(torch.tensor([0.0, 1.0]))
    for lr, lam in [(0.0, 1.0), (0.1, 0.0)]:
        decay = LpDecay([w], p=0.5, lam=lam)
        decay.before_step()
        decay.after_step(lr=lr)
        assert torch.equal(w.detach(), torch.tensor([0.0, 1.0]))


def test_adam_p_half_trains_digits_and_produces_exact_zeros(digits):
    x, y = digits
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    decay = LpDecay(lp_decay_params(model), p=0.5, lam=1e-2, optimizer=opt)
    loss = train(model, opt, decay, x, y, steps=300)
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert torch.isfinite(loss)
    assert decay.zero_fraction() > 0.1
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9
    # the baseline without decay has (practically) no exact zeros
    base = mlp()
    opt = torch.optim.Adam(base.parameters(), lr=1e-2)
    plain = LpDecay(lp_decay_params(base), p=0.5, lam=0.0, optimizer=opt)
    train(base, opt, plain, x, y, steps=50)
    assert plain.zero_fraction() < 0.01


def test_sgd_p_half_produces_exact_zeros(digits):
    x, y = digits
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    decay = LpDecay(lp_decay_params(model), p=0.5, lam=1e-2, optimizer=opt)
    train(model, opt, decay, x, y, steps=150)
    assert all(torch.isfinite(q).all() for q in model.parameters())
    assert decay.zero_fraction() > 0.05


@pytest.mark.parametrize("make_opt,lam", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 0.05),
    # Adam moves every entry by about lr whatever the gradient: it needs a larger lam
    (lambda ps: torch.optim.Adam(ps, lr=1e-2), 0.5),
], ids=["sgd", "adam"])
def test_group_form_zeroes_whole_hidden_units(digits, make_opt, lam):
    x, y = digits
    model = mlp()
    first = model[0]
    chans = [ChannelSlices([(first.weight, 0, [c]), (first.bias, 0, [c])]) for c in range(64)]
    opt = make_opt(model.parameters())
    decay = LpDecay(chans, p=0.5, lam=lam, optimizer=opt)
    train(model, opt, decay, x, y, steps=200)
    assert all(torch.isfinite(q).all() for q in model.parameters())
    zero_rows = (first.weight == 0).all(1) & (first.bias == 0)
    partial = (first.weight == 0).any(1) & ~zero_rows
    assert zero_rows.sum() >= 5
    assert not partial.any()  # all of a channel or nothing
    assert decay.zero_fraction() == pytest.approx(zero_rows.float().mean().item())
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9


def test_lr_follows_the_optimizer_and_its_scheduler():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    decay = LpDecay([w], p=1.0, lam=1.0, optimizer=opt)
    for lr in (0.5, 0.05):
        before = w.detach().clone()
        w.grad = torch.zeros(3)
        with decay.step():
            opt.step()
        assert torch.allclose(w.detach(), before * before / (before + lr))
        sched.step()


def test_attach_hooks_apply_the_decay():
    w1, w2 = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt1, opt2 = torch.optim.Adam([w1], lr=0.1), torch.optim.Adam([w2], lr=0.1)
    manual = LpDecay([w1], p=0.5, lam=0.5, optimizer=opt1)
    pre, post = LpDecay([w2], p=0.5, lam=0.5).attach(opt2)
    for _ in range(3):
        for w, opt in ((w1, opt1), (w2, opt2)):
            opt.zero_grad()
            w.square().sum().backward()
        with manual.step():
            opt1.step()
        opt2.step()
    assert torch.equal(w1.detach(), w2.detach()) and not torch.equal(w1.detach(), torch.ones(2))
    pre.remove(), post.remove()


def test_optimizer_weight_decay_warns():
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.warns(UserWarning, match="weight_decay"):
        LpDecay([w], p=0.5, lam=1.0, optimizer=torch.optim.AdamW([w], lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LpDecay([w], p=0.5, lam=1.0, optimizer=torch.optim.AdamW([w], lr=0.1, weight_decay=0))


def test_constructor_does_not_mutate_and_module_means_all_parameters():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    decay = LpDecay(model, p=0.5, lam=1.0)
    decay.penalty(), decay.zero_fraction()
    assert len(decay.params) == 4
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_group_lr_mismatch_and_missing_lr_raise():
    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.1}, {"params": [b], "lr": 0.2}])
    decay = LpDecay([ChannelSlices([(w, 0, [0]), (b, 0, [0])])], p=0.5, lam=1.0, optimizer=opt)
    decay.before_step()
    with pytest.raises(SpecError, match="lr"):
        decay.after_step()
    bare = LpDecay([w], p=0.5, lam=1.0)
    bare.before_step()
    with pytest.raises(SpecError, match="lr"):
        bare.after_step()


def test_after_step_without_before_step_raises():
    with pytest.raises(RuntimeError, match="before_step"):
        LpDecay([torch.nn.Parameter(torch.ones(2))], p=0.5, lam=1.0).after_step(lr=0.1)


@pytest.mark.parametrize("kwargs,name", [
    ({"p": 0.0, "lam": 1.0}, "p"), ({"p": -1.0, "lam": 1.0}, "p"),
    ({"p": float("inf"), "lam": 1.0}, "p"), ({"p": 0.5, "lam": -1e-3}, "lam"),
])
def test_bad_arguments_raise_spec_error_naming_them(kwargs, name):
    with pytest.raises(SpecError, match=f"^{name}:"):
        LpDecay([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_bad_targets_raise_spec_error():
    w = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(SpecError, match="targets"):
        LpDecay([], p=0.5, lam=1.0)
    with pytest.raises(SpecError, match="targets"):
        LpDecay([w, ChannelSlices([(w, 0, [0])])], p=0.5, lam=1.0)
