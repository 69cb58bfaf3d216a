"""ChannelSlices / ChannelTable / channel_slices_from_graph."""

import pytest
import torch

import fxprune
from fxprune.errors import SpecError
from fxprune.regularize import ChannelSlices, ChannelTable, channel_slices_from_graph


def conv_bn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                               torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))


def test_numel_and_values_cover_all_slices():
    m = conv_bn()
    ch = ChannelSlices([(m[0].weight, 0, [2]), (m[0].bias, 0, [2]), (m[1].weight, 0, [2])])
    assert ch.numel() == 27 + 1 + 1
    expected = torch.cat([m[0].weight[2].reshape(-1), m[0].bias[2:3], m[1].weight[2:3]])
    assert torch.equal(ch.values(), expected)
    assert len(ch) == 3 and [s.dim for s in ch] == [0, 0, 0]


def test_negative_dim_is_normalised_and_consumer_columns_count():
    w = torch.nn.Parameter(torch.arange(12.0).view(3, 4))
    ch = ChannelSlices([(w, -1, torch.tensor([1, 3]))])
    assert ch.slices[0].dim == 1
    assert ch.numel() == 6
    assert torch.equal(ch.values(), torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0]))


def test_table_norms_match_per_channel_norms():
    m = conv_bn()
    chans = [ChannelSlices([(m[0].weight, 0, [c]), (m[0].bias, 0, [c]),
                            (m[1].weight, 0, [c]), (m[1].bias, 0, [c])]) for c in range(4)]
    table = ChannelTable(chans)
    expected = torch.stack([ch.values().norm() for ch in chans])
    assert torch.allclose(table.norms(), expected)
    assert torch.equal(table.numel, torch.tensor([30.0] * 4))


def test_norm_gradient_is_zero_not_nan_at_a_zero_channel():
    w = torch.nn.Parameter(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    table = ChannelTable([ChannelSlices([(w, 0, [c])]) for c in range(2)])
    table.norms().sum().backward()
    assert torch.isfinite(w.grad).all()
    assert torch.allclose(w.grad, torch.tensor([[0.0, 0.0], [0.6, 0.8]]))


def test_scale_touches_only_the_channel_entries():
    w = torch.nn.Parameter(torch.ones(3, 2))
    b = torch.nn.Parameter(torch.ones(3))
    table = ChannelTable([ChannelSlices([(w, 0, [c]), (b, 0, [c])]) for c in (0, 2)])
    table.scale_(torch.tensor([0.5, 0.0]))
    assert torch.equal(w.detach(), torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(b.detach(), torch.tensor([0.5, 1.0, 0.0]))


def test_overlapping_channels_are_refused():
    w = torch.nn.Parameter(torch.ones(3, 2))
    with pytest.raises(SpecError, match="channels"):
        ChannelTable([ChannelSlices([(w, 0, [0, 1])]), ChannelSlices([(w, 0, [1])])])
    with pytest.raises(SpecError, match="channels"):  # rows vs columns cross
        ChannelTable([ChannelSlices([(w, 0, [0])]), ChannelSlices([(w, 1, [0])])])


@pytest.mark.parametrize("bad", [
    [(torch.ones(2, 2), 2, [0])],          # dim out of range
    [(torch.ones(2, 2), 0, [5])],          # index out of range
    [(torch.ones(2, 2), 0)],               # not a triple
    [("weight", 0, [0])],                  # not a tensor
])
def test_bad_slices_raise_spec_error(bad):
    with pytest.raises(SpecError, match="channels"):
        ChannelSlices(bad)


def test_table_refuses_empty_and_wrong_types():
    with pytest.raises(SpecError, match="channels"):
        ChannelTable([])
    with pytest.raises(SpecError, match="channels"):
        ChannelTable([[(torch.ones(2), 0, [0])]])


def test_channel_lr_requires_a_common_lr_per_channel():
    w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    table = ChannelTable([ChannelSlices([(w, 0, [c]), (b, 0, [c])]) for c in range(2)])
    assert torch.allclose(table.channel_lr({id(w): 0.1, id(b): 0.1}), torch.tensor([0.1, 0.1]))
    with pytest.raises(SpecError, match="lr"):
        table.channel_lr({id(w): 0.1, id(b): 0.2})


def test_channel_slices_from_graph_maps_keys_to_parameters_and_skips_buffers():
    m = conv_bn()
    graph = fxprune.analyze(m, torch.randn(1, 3, 8, 8))
    chans = channel_slices_from_graph(m, graph)
    (g,) = graph.prunable_groups
    assert [ch.label for ch in chans] == [(g.id, c) for c in range(4)]
    params = {id(s.param) for ch in chans for s in ch}  # no running stats
    assert params == {id(m[0].weight), id(m[0].bias), id(m[1].weight), id(m[1].bias)}
    assert all(ch.numel() == 3 * 9 + 3 for ch in chans)
    consumers = channel_slices_from_graph(m, graph, role="in")
    assert [[(s.param is m[3].weight, s.dim, s.index.tolist()) for s in ch] for ch in consumers] \
        == [[(True, 1, [c])] for c in range(4)]
    # frozen: the head's 2 output channels; the 3 input channels own no producer entries
    assert len(channel_slices_from_graph(m, graph, include_frozen=True)) == 4 + 2
    ChannelTable(chans)  # disjoint


class Aliased(torch.nn.Module):
    """One conv registered under two names: its weight has two state_dict keys."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3)
        self.alias = self.conv
        self.head = torch.nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.head(torch.relu(self.alias(x)))


def test_channel_slices_from_graph_keeps_a_tied_parameter_once():
    model = Aliased()
    graph = fxprune.analyze(model, torch.randn(1, 3, 8, 8))
    chans = channel_slices_from_graph(model, graph)
    assert len(chans) == 6 and all(len(ch) == 2 for ch in chans)  # weight rows + bias, once
    assert {id(s.param) for ch in chans for s in ch} == {id(model.conv.weight), id(model.conv.bias)}
    ChannelTable(chans)


def _reference(model, graph, role):
    """What channel_slices_from_graph promises: g.slices([c], role), one channel at a time."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for g in graph.prunable_groups:
        for c in range(g.size):
            merged = {}
            for key, pairs in g.slices([c], role).items():
                if key in params:
                    for dim, idx in pairs:
                        merged.setdefault((id(params[key]), dim), set()).update(idx)
            out.append(((g.id, c), {k: sorted(v) for k, v in merged.items()}))
    return out


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_0", "shufflenet_v2_x0_5"])  # add, concat, split
@pytest.mark.parametrize("role", ["out", "in", "all"])
def test_channel_slices_from_graph_equals_per_channel_slices(name, role):
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    graph = fxprune.analyze(model, torch.randn(1, 3, 64, 64))
    fast = channel_slices_from_graph(model, graph, role=role)
    got = [(ch.label, {(id(s.param), s.dim): s.index.tolist() for s in ch}) for ch in fast]
    want = [item for item in _reference(model, graph, role) if item[1]]
    assert got == want
