"""Deep weight factorization: exact init, collapse, closed forms, training."""

import pytest
import torch
from torch.nn.utils import parametrize

from fxprune.errors import SpecError
from fxprune.regularize import ChannelSlices, collapse, factorize


def small_cnn(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6),
                                torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    with torch.no_grad():  # non-trivial BN affine so the grouped form is exercised
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    return model.eval()


def bn_channels(model):
    conv, bn = model[0], model[1]
    return [ChannelSlices([(conv.weight, 0, [c]), (conv.bias, 0, [c]),
                           (bn.weight, 0, [c]), (bn.bias, 0, [c])]) for c in range(6)]


def fit(model, params, steps, make_opt, penalty):
    opt = make_opt(params)
    torch.manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y) + penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_factorized_forward_at_init_equals_original(depth):
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = 0.0
        ref = model(x)
    w = model[0].weight.detach().clone()
    dwf = factorize(model, depth=depth, lam=1e-3)
    assert torch.allclose(model(x), ref, atol=1e-5)
    assert model[0].weight[0, 0, 0, 0].item() == 0.0  # exact zero kept
    # balanced: every factor has magnitude |w|^(1/D) where that is >= min_magnitude
    factors = [getattr(model[0].parametrizations.weight, f"original{i}") for i in range(depth)]
    big = w.abs() > 1e-3
    for u in factors:
        assert torch.allclose(u.detach().abs()[big], w.abs()[big] ** (1 / depth), rtol=1e-5)
    assert len(dwf.factor_parameters()) == 3 * depth  # three weights with >= 2 dims
    # ... and at balanced factors the L2 penalty is at its closed-form minimum
    assert dwf.l2_penalty().item() == pytest.approx(dwf.equivalent_penalty().item(), rel=1e-4)


def test_closed_form_depth_two_by_hand():
    lin = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-4.0, 9.0, 0.25]]))
    dwf = factorize(lin, depth=2, lam=1.0)
    # min over u*v = w of (u^2 + v^2) / 2 is |w|: 4 + 9 + 0.25
    assert dwf.l2_penalty().item() == pytest.approx(13.25, rel=1e-6)
    assert dwf.equivalent_penalty().item() == pytest.approx(13.25, rel=1e-6)
    # an unbalanced factorization of the same weights costs more
    plist = lin.parametrizations.weight
    with torch.no_grad():
        plist.original0.mul_(2.0)
        plist.original1.div_(2.0)
    assert torch.allclose(lin.weight, torch.tensor([[-4.0, 9.0, 0.25]]))
    assert dwf.l2_penalty().item() > 13.25 + 1.0


def test_closed_form_depth_three_grouped_by_hand():
    w = torch.nn.Linear(2, 2)
    with torch.no_grad():
        w.weight.copy_(torch.tensor([[3.0, 0.0], [1.0, 2.0]]))
        w.bias.copy_(torch.tensor([4.0, 2.0]))
    chans = [ChannelSlices([(w.weight, 0, [c]), (w.bias, 0, [c])]) for c in range(2)]
    dwf = factorize(w, depth=3, lam=2.0, channels=chans)
    # lam * D / 2 * sum_c ||w_c||^(2/D), norms 5 and 3
    expected = 2.0 * 3 / 2 * (5 ** (2 / 3) + 3 ** (2 / 3))
    assert dwf.l2_penalty().item() == pytest.approx(expected, rel=1e-5)
    assert dwf.equivalent_penalty().item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(w.weight, torch.tensor([[3.0, 0.0], [1.0, 2.0]]))


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
], ids=["sgd", "adam"])
def test_collapse_equals_the_trained_factorized_forward(make_opt):
    model = small_cnn().train()
    dwf = factorize(model, depth=3, lam=1e-3)
    loss = fit(model, model.parameters(), 30, make_opt, dwf.l2_penalty)
    assert torch.isfinite(loss)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        factored = model(x)
    keys = set(small_cnn().state_dict())
    collapse(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert set(model.state_dict()) == keys  # plain weights under the original keys
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(model(x), factored, atol=1e-5)


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
], ids=["sgd", "adam"])
def test_grouped_form_trains_and_collapses(make_opt):
    model = small_cnn()
    x = torch.randn(4, 3, 8, 8)
    ref = model(x)
    chans = bn_channels(model)
    conv_weight = model[0].weight
    dwf = factorize(model, depth=3, lam=0.5, channels=chans)
    assert torch.allclose(model(x), ref, atol=1e-5)
    model.train()
    start = dwf.equivalent_penalty()
    fit(model, model.parameters(), 30, make_opt, dwf.l2_penalty)
    assert dwf.equivalent_penalty() < start
    model.eval()
    with torch.no_grad():
        factored = model(x)
    collapse(model)
    assert model[0].weight is conv_weight  # same Parameter object, now holding the product
    with torch.no_grad():
        assert torch.allclose(model(x), factored, atol=1e-5)


def test_weight_decay_on_factor_parameters_equals_l2_penalty():
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    da, db = factorize(a, depth=3, lam=0.1), factorize(b, depth=3, lam=0.1)
    x = torch.randn(5, 4)
    opt_a = torch.optim.SGD(da.factor_parameters(), lr=0.1, weight_decay=0.1)
    opt_b = torch.optim.SGD(db.factor_parameters(), lr=0.1)
    for _ in range(3):
        a(x).sum().backward()
        (b(x).sum() + db.l2_penalty()).backward()
        opt_a.step(), opt_b.step(), opt_a.zero_grad(), opt_b.zero_grad()
    for ua, ub in zip(da.factor_parameters(), db.factor_parameters()):
        assert torch.allclose(ua, ub, atol=1e-6)


def test_random_init_has_the_weight_scale_and_no_small_factors():
    lin = torch.nn.Linear(256, 128, bias=False)
    sigma = lin.weight.std().item()
    dwf = factorize(lin, depth=3, init="random", generator=torch.Generator().manual_seed(0))
    floor = 0.1 * sigma ** (1 / 3)
    for u in dwf.factor_parameters():
        assert u.detach().abs().min().item() >= floor * (1 - 1e-6)
    assert lin.weight.std().item() == pytest.approx(sigma, rel=0.15)


def test_params_by_name_and_bias_left_alone():
    model = small_cnn()
    factorize(model, depth=2, params=["6.weight"])
    assert parametrize.is_parametrized(model[6], "weight")
    assert not parametrize.is_parametrized(model[6], "bias")
    assert not parametrize.is_parametrized(model[0])


def test_collapse_leaves_foreign_parametrizations_alone():
    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    lin = torch.nn.Linear(3, 3)
    parametrize.register_parametrization(lin, "bias", Double())
    factorize(lin, depth=2, params=["weight"])
    collapse(lin)
    assert not parametrize.is_parametrized(lin, "weight")
    assert parametrize.is_parametrized(lin, "bias")


@pytest.mark.parametrize("kwargs,name", [
    ({"depth": 1}, "depth"), ({"depth": 2.5}, "depth"), ({"depth": True}, "depth"),
    ({"lam": -1.0}, "lam"), ({"init": "zeros"}, "init"), ({"params": ["nope"]}, "params"),
    ({"min_magnitude": 0.0}, "min_magnitude"),
])
def test_bad_arguments_raise_spec_error_naming_them(kwargs, name):
    with pytest.raises(SpecError, match=f"^{name}:"):
        factorize(torch.nn.Linear(2, 2), **kwargs)


def test_tied_and_foreign_parameters_are_refused():
    emb, head = torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    with pytest.raises(SpecError, match="tied"):
        factorize(torch.nn.ModuleDict({"e": emb, "h": head}), depth=2)
    other = torch.nn.Parameter(torch.ones(2, 2))
    with pytest.raises(SpecError, match="params"):
        factorize(torch.nn.Linear(2, 2), params=[other])
    lin = torch.nn.Linear(2, 2)
    with pytest.raises(SpecError, match="init"):
        factorize(lin, channels=[ChannelSlices([(lin.weight, 0, [0])])], init="random")


def test_factorizing_twice_is_refused():
    lin = torch.nn.Linear(3, 3)
    factorize(lin, depth=2)
    with pytest.raises(SpecError, match="already parametrized"):
        factorize(lin, depth=2)
    collapse(lin)
    factorize(lin, depth=2)  # fine again after collapse
