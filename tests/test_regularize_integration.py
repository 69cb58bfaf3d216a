"""Regularisers on channels from fxprune's own analysis: zeroed channels prune away."""

import torch

import fxprune
from fxprune.regularize import (ChannelTable, GroupLasso, LpDecay,
                                channel_slices_from_graph)


class ResidualNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                        torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.a = torch.nn.Sequential(torch.nn.Conv2d(8, 12, 3, padding=1),
                                     torch.nn.BatchNorm2d(12), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(12, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                        torch.nn.Linear(8, 3))

    def forward(self, x):
        h = self.stem(x)
        return self.head(torch.relu(h + self.b(self.a(h))))


def weakened_model_and_channels():
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = fxprune.analyze(model, x)
    chans = channel_slices_from_graph(model, graph)
    assert len(chans) == sum(g.size for g in graph.groups if g.prunable)
    # the residual couples stem and b: one channel owns slices of both producers
    residual = next(ch for ch in chans if len(ch) == 8)
    assert residual.numel() == (27 + 3) + (108 + 3)
    weak = torch.tensor([c % 4 == 0 for c in range(len(chans))])
    ChannelTable(chans).scale_(torch.where(weak, 0.01, 1.0))
    return model, x, chans, weak


def prune_zero_channels(model, x, chans, zero):
    plan = {}
    for ch, z in zip(chans, zero.tolist()):
        if z:
            gid, c = ch.label
            plan.setdefault(gid, []).append(c)
    graph = fxprune.analyze(model, x)  # the regularised weights
    return fxprune.prune(graph, plan), plan


def test_group_lasso_prox_on_analysis_channels_prunes_exactly():
    model, x, chans, weak = weakened_model_and_channels()
    lasso = GroupLasso(chans, lam=1.0)
    lasso.prox_(lr=0.01)  # threshold 0.01 * sqrt(n) sits between weak and strong norms
    zero = lasso.zero_channels()
    assert torch.equal(zero, weak)
    small, plan = prune_zero_channels(model, x, chans, zero)
    assert sum(len(v) for v in plan.values()) == int(weak.sum())
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)


def test_lp_group_decay_on_analysis_channels_prunes_exactly():
    model, x, chans, weak = weakened_model_and_channels()
    decay = LpDecay(chans, p=0.5, lam=1.0)
    for _ in range(5):  # no task loss: only the decay acts
        decay.before_step()
        decay.after_step(lr=0.05)
    zero = ChannelTable(chans).norms() == 0
    assert zero[weak].all() and not zero.all()
    small, _ = prune_zero_channels(model, x, chans, zero)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-5)
