"""ChannelSlices / ChannelTable / channel_slices_from_graph."""

from dataclasses import dataclass

import pytest
import torch

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


# A stand-in for the analysis' DependencyGraph, using only the documented API.
@dataclass
class FakeGroup:
    id: int
    size: int
    prunable: bool
    table: dict  # key -> dim (the channel's index is the same along that dim)

    def slices(self, channels, role="out"):
        assert role == "out"
        return {key: [(dim, list(channels))] for key, dim in self.table.items()}


@dataclass
class FakeGraph:
    groups: list


def test_channel_slices_from_graph_maps_keys_to_parameters_and_skips_buffers():
    m = conv_bn()
    out_slices = {"0.weight": 0, "0.bias": 0, "1.weight": 0, "1.bias": 0,
                  "1.running_mean": 0, "1.running_var": 0}
    graph = FakeGraph([FakeGroup(7, 4, True, out_slices),
                       FakeGroup(8, 2, False, {"3.weight": 0, "3.bias": 0})])
    chans = channel_slices_from_graph(m, graph)
    assert len(chans) == 4
    assert [ch.label for ch in chans] == [(7, c) for c in range(4)]
    params = {id(s.param) for ch in chans for s in ch}
    assert params == {id(m[0].weight), id(m[0].bias), id(m[1].weight), id(m[1].bias)}
    assert all(ch.numel() == 30 for ch in chans)
    assert len(channel_slices_from_graph(m, graph, include_frozen=True)) == 6
    ChannelTable(chans)  # disjoint


def test_channel_slices_from_graph_merges_tied_keys():
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "head": head})
    graph = FakeGraph([FakeGroup(0, 3, True, {"emb.weight": 1, "head.weight": 1})])
    chans = channel_slices_from_graph(model, graph)
    assert [len(ch) for ch in chans] == [1, 1, 1]
    assert chans[0].numel() == 5
    ChannelTable(chans)
