"""SRigL: ERK densities, drop/regrow counts and constant fan-in by hand, neuron ablation."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from fxprune.errors import SpecError
from fxprune.regularize.srigl import SRigL, drop_fraction, erk_densities, remove_ablated


def test_erk_by_hand_with_a_dense_layer():
    # raw scores: a (4x4) 8/16 = 0.5, b (100x100) 0.02; at density 0.5, a would exceed 1: a is
    # dense (16 weights), b gets the rest: (0.5 * 10016 - 16) / 10000 = 0.4992
    d = erk_densities({"a": (4, 4), "b": (100, 100)}, 0.5)
    assert d["a"] == 1.0 and d["b"] == pytest.approx(0.4992)


def test_a_layer_dense_under_erk_stays_unmasked_and_is_never_ablated():
    # ERK: a (4 -> 4) is capped at dense, b (4 -> 100) is sparse. A neuron of a with tiny
    # weights would hold no salient weight; left unmasked, it keeps them all
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 100, bias=False))
    with torch.no_grad():
        net[0].weight[1] = 1e-6
    srigl = SRigL(net, density=0.6, total_steps=100, delta_t=1, t_end=50)
    assert set(srigl.masks) == {"2"} and srigl.k["2"] < 4
    status = {r.name: r.status for r in srigl.rows}
    assert status == {"0": "skipped", "2": "masked"}
    assert "dense at its density" in next(r.reason for r in srigl.rows if r.name == "0")
    net(torch.randn(8, 4)).square().sum().backward()
    assert srigl.step()
    assert "0" not in srigl.ablated() and torch.equal(net[0].weight[1], torch.full((4,), 1e-6))


def _layer():
    layer = nn.Linear(8, 2, bias=False)
    layer.weight.data = torch.tensor([[8.0, 7.0, 6.0, 5.0, 0.1, 0.2, 0.3, 0.4],
                                      [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    return layer


def test_drop_and_regrow_by_hand():
    layer = _layer()
    srigl = SRigL(layer, density=0.5, total_steps=200, delta_t=50, t_end=100, erk=False, gamma_sal=0.0)
    assert srigl.k == {"": 4}
    mask = srigl.masks[""]
    mask.mask.copy_(torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool))
    mask.dense_grad = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.5, 0.1, 0.9, 0.2],
                                    [0.3, 0.8, 0.1, 0.2, 0.0, 0.0, 0.0, 0.0]])
    for _ in range(49):
        assert not srigl.step()
    assert srigl.step()  # t = 50: fraction 0.3 / 2 * (1 + cos(pi / 2)) = 0.15, drop round(0.6) = 1
    assert drop_fraction(50, 100, 0.3) == pytest.approx(0.15)
    # row 0 drops its smallest active |w| (5.0, input 3) and regrows the largest gradient (input 6)
    # row 1 drops 5.0 (input 4) and regrows input 1 (gradient 0.8)
    assert mask.mask.int().tolist() == [[1, 1, 1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, 1, 1, 1]]
    assert mask.mask.sum(1).tolist() == [4, 4]  # constant fan-in
    w = layer.parametrizations["weight"].original.detach()
    assert w[0, 6] == 0 and w[1, 1] == 0  # regrown weights start at 0
    assert w[0, 0] == 8.0 and w[1, 7] == 8.0


def test_late_steps_do_not_update_and_errors():
    layer = _layer()
    srigl = SRigL(layer, density=0.5, total_steps=100, delta_t=10, erk=False)
    assert srigl.t_end == 75
    with pytest.raises(SpecError, match="has no gradient yet"):
        srigl.update()
    with pytest.raises(SpecError, match="delta_t must be an int >= 1"):
        SRigL(_layer(), density=0.5, total_steps=10, delta_t=0)


def test_neuron_ablation_and_budget_shared_again():
    layer = nn.Linear(8, 4, bias=False)
    layer.weight.data = torch.tensor([1.0, 1.1, 1e-4, 1.2])[:, None].expand(4, 8).clone()
    srigl = SRigL(layer, density=0.25, total_steps=100, delta_t=10, t_end=50, erk=False)
    assert srigl.k == {"": 2}
    srigl.masks[""].dense_grad = torch.tensor([0.9, 0.8, 0.0, 0.7])[:, None].expand(4, 8).clone()
    for _ in range(10):
        srigl.step()
    # t = 10: fraction 0.15 * (1 + cos(pi / 5)) = 0.27, d = round(0.54) = 1. Salient: the 4 largest
    # active |w| (rows 3 and 1, 2 each) and the 4 largest inactive |grad| (row 0): row 2 has
    # none, fewer than 0.3 * 2, and is ablated
    assert srigl.ablated() == {"": [2]}
    counts = srigl.masks[""].mask.sum(1).tolist()
    assert counts == [2, 2, 0, 2]  # 8 weights over 3 neurons: floor(8 / 3) = 2 each
    assert float(layer.weight[2].detach().abs().sum()) == 0.0


def _ablated_net():
    """Linear(8, 4) -> ReLU -> Linear(4, 2) whose first layer's neuron 2 SRigL ablates (as above)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    net[0].weight.data = torch.tensor([1.0, 1.1, 1e-4, 1.2])[:, None].expand(4, 8).clone()
    srigl = SRigL(net, density=0.25, total_steps=100, delta_t=10, t_end=50, erk=False, ignore=["2"])
    srigl.masks["0"].dense_grad = torch.tensor([0.9, 0.8, 0.0, 0.7])[:, None].expand(4, 8).clone()
    for _ in range(10):
        srigl.step()
    assert srigl.ablated() == {"0": [2]}
    return net, srigl


def test_ablated_neurons_leave_through_compress():
    net, srigl = _ablated_net()
    x = torch.randn(16, 8)
    result = srigl.remove_ablated((x,))
    assert list(result.plan.values()) == [[2]]  # exactly the ablated neuron, nothing else
    small = result.model
    assert small(x).shape == (16, 2)
    weights = [m.weight for m in small.modules() if isinstance(m, nn.Linear)]
    assert [tuple(w.shape) for w in weights] == [(3, 8), (2, 3)]
    # it computes what the trained model computes once the dead neuron's bias is zeroed too
    with torch.no_grad():
        expected = net[0].weight.detach().clone()
        bias = net[0].bias.detach().clone()
        bias[2] = 0.0
        reference = net[2](torch.relu(x @ expected.T + bias))
    assert torch.allclose(small(x), reference, atol=1e-6)
    # the model keeps training as it was: still masked, its weight readable, its bias whole
    assert parametrize.is_parametrized(net[0], "weight") and net[0].weight.shape == (4, 8)
    assert float(net[0].bias.detach()[2]) != 0.0


def test_remove_ablated_without_dead_neurons_says_so():
    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    SRigL(net, density=0.5, total_steps=10, erk=False)
    with pytest.raises(SpecError, match="no channel has all of its Linear/Conv weights at zero"):
        remove_ablated(net, (torch.randn(2, 8),))
