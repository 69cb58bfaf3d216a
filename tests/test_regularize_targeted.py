"""TargetedGroupLasso: shrinks exactly the channels a compress spec removes, so pruning is lossless."""

import copy

import pytest
import torch

import fxprune
from fxprune.errors import SpecError
from fxprune.measure import count_flops
from fxprune.regularize import TargetedGroupLasso


class ResidualNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                        torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.a = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3, padding=1, bias=False),
                                     torch.nn.BatchNorm2d(24), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(24, 16, 3, padding=1, bias=False),
                                     torch.nn.BatchNorm2d(16))
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(16, 4))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.b(self.a(h))))


X = torch.randn(1, 3, 8, 8)


def spec(**extra):
    return {"example_inputs": (X,), "target": {"flops": 0.5}, "scope": "local",
            "fuse": False, "score": "bn_scale", "round_to": 1, **extra}


def train(model, reg, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=gen)
        y = torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        reg.step()


@pytest.mark.parametrize("scope", ["local", "global"])
def test_training_zeroes_exactly_the_planned_channels_and_compress_is_lossless(scope):
    torch.manual_seed(0)
    model = ResidualNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    reg = TargetedGroupLasso(model, spec(scope=scope), lam=2.0, ramp_steps=10,
                             update_every=5, optimizer=opt)
    train(model, reg, opt, steps=40)
    chosen = reg.chosen()
    assert chosen and sorted(reg.zero_channels()) == sorted(chosen)
    sizes = {g.id: g.size for g in reg.graph.prunable_groups}
    assert len(chosen) < sum(sizes.values())  # the kept channels are alive

    model.eval()
    result = fxprune.compress(model, spec(scope=scope))
    removed = sorted((gid, c) for gid, units in result.plan.items() for c in units)
    assert removed == sorted(chosen)
    fraction = count_flops(result.model, X) / count_flops(model, X)
    assert fraction == pytest.approx(0.5, rel=0.02)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x), atol=1e-5, rtol=1e-4)


def test_strength_ramps_linearly_and_only_chosen_channels_shrink():
    torch.manual_seed(0)
    model = ResidualNet()
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    reg = TargetedGroupLasso(model, spec(), lam=1.0, ramp_steps=4, optimizer=opt)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # built, not changed
    norms0 = reg.lasso.channel_norms()
    strengths = []
    for _ in range(6):  # no optimizer step: only the prox acts
        strengths.append(reg.strength)
        reg.step()
    assert strengths == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    shrunk = reg.lasso.channel_norms() < norms0
    assert shrunk.tolist() == (reg.lasso.weights > 0).tolist()
    assert 0 < int(shrunk.sum()) < len(shrunk)


def test_step_takes_an_explicit_lr_without_an_optimizer():
    model = ResidualNet()
    reg = TargetedGroupLasso(model, spec(), lam=1.0, ramp_steps=1)
    with pytest.raises(SpecError, match="lr"):
        reg.step()
    norms0 = reg.lasso.channel_norms()
    reg.step(lr=10.0)  # threshold 10 * sqrt(n_c): every chosen channel goes to zero at once
    assert sorted(reg.zero_channels()) == sorted(reg.chosen())
    assert (reg.lasso.channel_norms()[reg.lasso.weights == 0] == norms0[reg.lasso.weights == 0]).all()


def test_ratio_spec_chooses_that_share_of_every_group():
    model = ResidualNet()
    reg = TargetedGroupLasso(model, {"example_inputs": (X,), "ratio": 0.5, "scope": "local", "round_to": 1},
                             lam=1.0, ramp_steps=1)
    per_group = {}
    for gid, _ in reg.chosen():
        per_group[gid] = per_group.get(gid, 0) + 1
    assert per_group == {g.id: g.size // 2 for g in reg.graph.prunable_groups}


@pytest.mark.parametrize("kwargs, match", [
    (dict(spec={"example_inputs": (X,)}), "spec.ratio, spec.target: give exactly one"),
    (dict(lam=0.0), "lam: expected a number > 0"),
    (dict(lam=-1.0), "lam: expected a finite number >= 0"),
    (dict(ramp_steps=0), "ramp_steps: expected an integer >= 1"),
    (dict(update_every=2.5), "update_every: expected an integer >= 1"),
    (dict(spec=spec(target={"flops": 1e-4})), r"spec.target.flops: 0.0001 is impossible"),
    (dict(spec=spec(budget=3)), "budget"),
])
def test_bad_arguments_raise_spec_error_naming_the_field(kwargs, match):
    args = dict(spec=spec(), lam=1.0, ramp_steps=10) | kwargs
    with pytest.raises(SpecError, match=match):
        TargetedGroupLasso(ResidualNet(), args.pop("spec"), **args)
