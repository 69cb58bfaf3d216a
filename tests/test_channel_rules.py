"""One small hand-written model per structure the channel analysis must handle.

Each test proves the structure with the zero-invariance oracle (``prune_and_check``)
and asserts what the analysis must have found (which layers share a group, what is
frozen and why)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from helpers import count_params, prune_and_check, randomize


def group_of(graph, origin: str):
    return next(g for g in graph.groups if origin in g.producers)


def conv_bn(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class ResidualStack(nn.Module):
    def __init__(self, blocks=6, c=8):
        super().__init__()
        self.stem = conv_bn(3, c)
        self.blocks = nn.ModuleList(nn.Sequential(conv_bn(c, 2 * c), nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c))
                                    for _ in range(blocks))
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        return self.head(x.mean((2, 3)))


def test_residual_add_ties_every_block_into_one_group():
    model = randomize(ResidualStack())
    graph, small, err = prune_and_check(model, torch.randn(2, 3, 8, 8))
    stream = group_of(graph, "stem.0.weight[0]")
    assert stream.size == 8 and stream.prunable and stream.zero_invariant
    assert {f"blocks.{i}.1.weight[0]" for i in range(6)} <= set(stream.producers)
    # The mean over H, W keeps zero-invariance; the head consumes the stream.
    assert "head.weight[1]" in stream.consumers
    assert small.get_submodule("stem.0").out_channels == 4


class DenseConcat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 6)
        self.b = conv_bn(6, 5)
        self.c = conv_bn(6 + 5 + 5, 7)
        self.head = nn.Conv2d(7 + 3, 4, 1)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        y = self.c(torch.cat([a, b, b], dim=1))  # the same tensor twice
        return self.head(torch.cat([y, x], 1))   # concat with a graph input (fixed part)


def test_concat_including_the_same_tensor_twice():
    graph, small, _ = prune_and_check(randomize(DenseConcat()), torch.randn(2, 3, 8, 8))
    b = group_of(graph, "b.0.weight[0]")
    plan = {b.id: [0, 1]}
    cut = b.slices([0, 1], role="in")["c.0.weight"]
    assert cut == [(1, [6, 7, 11, 12])]  # both copies of channels 0 and 1
    pruned = fxprune.prune(graph, plan)
    assert pruned.get_submodule("c.0").in_channels == 6 + 3 + 3
    assert {g.size for g in graph.prunable_groups} == {6, 5, 7}


class SplitChunkSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.left = nn.Conv2d(5, 4, 1)
        self.right = nn.Conv2d(7, 4, 1)
        self.chunked = nn.Conv2d(4, 4, 1)
        self.sliced = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        l, r = torch.split(x, [5, 7], dim=1)
        c1, c2 = (self.left(l) + self.right(r)).chunk(2, dim=1)
        return self.chunked(torch.cat([c1, c2], 1)) + self.sliced(x[:, 2:5])


def test_split_chunk_and_slice_rewrite_their_sizes():
    graph, small, _ = prune_and_check(randomize(SplitChunkSlice()), torch.randn(2, 3, 6, 6))
    stem = group_of(graph, "stem.0.weight[0]")
    plan = {stem.id: [0, 3, 4, 10]}  # three in the left piece (two of them inside [2:5]), one in the right
    pruned = fxprune.prune(graph, plan)
    assert pruned.get_submodule("left").in_channels == 2
    assert pruned.get_submodule("right").in_channels == 6
    assert pruned.get_submodule("sliced").in_channels == 1
    assert "[2, 6]" in pruned.code  # the split sizes were rewritten
    assert "slice(1, 2, None)" in pruned.code  # x[:, 2:5] -> x[:, 1:2]: one kept before, one inside


class ShuffleUnit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv_bn(3, 6)
        self.b = conv_bn(3, 6)
        self.after = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.after(y)


def test_channel_shuffle_is_a_permutation_not_a_tie():
    graph, _, _ = prune_and_check(randomize(ShuffleUnit()), torch.randn(2, 3, 6, 6))
    a, b = group_of(graph, "a.0.weight[0]"), group_of(graph, "b.0.weight[0]")
    assert a.id != b.id and a.size == b.size == 6  # nothing is tied across blocks
    assert a.slices([0], "in")["after.weight"] == [(1, [0])]
    assert b.slices([0], "in")["after.weight"] == [(1, [1])]  # interleaved
    pruned = fxprune.prune(graph, {a.id: [0, 1, 2]})  # unequal blocks: still valid
    assert "index_select" in pruned.code
    assert pruned.get_submodule("after").in_channels == 9


def test_nn_channel_shuffle_module():
    model = nn.Sequential(conv_bn(3, 8), nn.ChannelShuffle(2), nn.Conv2d(8, 3, 1))
    prune_and_check(randomize(model), torch.randn(2, 3, 6, 6))


class GroupedAndDepthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = conv_bn(3, 16, 1)
        self.grouped = conv_bn(16, 24, 3, groups=4)
        self.depthwise = conv_bn(24, 24, 3, groups=24)
        self.project = nn.Conv2d(24, 6, 1)

    def forward(self, x):
        return self.project(self.depthwise(self.grouped(self.expand(x))))


def test_grouped_and_depthwise_conv_remove_whole_groups():
    graph, _, _ = prune_and_check(randomize(GroupedAndDepthwise()), torch.randn(2, 3, 8, 8))
    g = group_of(graph, "grouped.0.weight[0]")
    assert g.size == 4  # one unit per conv group: 4 input + 6 output channels each
    assert "expand.0.weight[0]" in g.producers
    assert group_of(graph, "depthwise.0.weight[0]") is g  # its channels are the grouped conv's
    pruned = fxprune.prune(graph, {g.id: [1, 3]})
    assert pruned.get_submodule("grouped.0").groups == 2
    assert pruned.get_submodule("grouped.0").in_channels == 8
    assert pruned.get_submodule("depthwise.0").groups == 12


class SqueezeExcite(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv = conv_bn(3, c)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, c, 1)
        self.out = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        x = self.conv(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.out(x * s)  # [B, C, H, W] * [B, C, 1, 1]


def test_squeeze_excitation_ties_gate_to_features_and_stays_zero_invariant():
    graph, _, _ = prune_and_check(randomize(SqueezeExcite()), torch.randn(2, 3, 8, 8))
    g = group_of(graph, "conv.0.weight[0]")
    assert "fc2.weight[0]" in g.producers
    assert g.zero_invariant  # sigmoid(0) = 0.5, but it multiplies a zero channel


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = conv_bn(3, 6)
        self.pool = nn.AdaptiveAvgPool2d((2, 3))
        self.fc = nn.Linear(6 * 2 * 3, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def test_flatten_to_linear_removes_a_block_of_columns_per_channel():
    graph, _, _ = prune_and_check(randomize(FlattenLinear()), torch.randn(2, 3, 8, 8))
    g = group_of(graph, "features.0.weight[0]")
    assert g.slices([1], "in") == {"fc.weight": [(1, [6, 7, 8, 9, 10, 11])]}


class TokenModel(nn.Module):
    """Class token, position embedding and layer scale used directly in forward."""

    def __init__(self, dim=8, tokens=4):
        super().__init__()
        self.proj = nn.Linear(6, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.fc1, self.fc2 = nn.Linear(dim, 12), nn.Linear(12, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.proj(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = x + self.gamma * self.fc2(F.gelu(self.fc1(x)))
        return self.head(x[:, 0])


def test_parameters_used_directly_join_the_channel_space():
    graph, _, _ = prune_and_check(randomize(TokenModel()), torch.randn(2, 4, 6))
    stream = group_of(graph, "proj.weight[0]")
    assert {"cls_token[2]", "pos[2]", "gamma[0]", "fc2.weight[0]"} <= set(stream.producers)
    assert stream.prunable and stream.zero_invariant
    tokens = group_of(graph, "pos[1]")  # the token dim meets x's token dim, which carries no channels
    assert not tokens.prunable


class ConvNeXtBlock(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.scale = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        x = self.stem(x)
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + self.scale * y


def test_layernorm_after_permute_is_prunable_but_not_zero_invariant():
    graph, _, _ = prune_and_check(randomize(ConvNeXtBlock()), torch.randn(2, 3, 6, 6), expect_prunable=1)
    stream = group_of(graph, "stem.weight[0]")
    assert not stream.prunable  # it reaches the output
    dw = group_of(graph, "fc1.weight[0]")
    assert dw.prunable and dw.zero_invariant
    # a LayerNorm whose channels are prunable: statistics change, so not zero-invariant
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    graph = fxprune.analyze(model, torch.randn(3, 4))
    g = group_of(graph, "0.weight[0]")
    assert g.prunable and not g.zero_invariant and "layer-norm" in g.zero_invariance_reason
    assert fxprune.prune(graph, {g.id: [0, 1]}).get_submodule("1").normalized_shape == (6,)


class HandAttention(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.inp = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, 2)

    def forward(self, x):
        x = self.inp(x)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.out(x + self.proj(y))


def test_hand_written_attention_prunes_whole_heads_and_rewrites_reshapes():
    model = randomize(HandAttention(dim=24, heads=4))  # head_dim 6
    graph, small, _ = prune_and_check(model, torch.randn(2, 5, 5))
    heads = group_of(graph, "qkv.weight[0]")
    assert heads.size == 4 and heads.prunable and heads.zero_invariant
    # unit 0 is head 0: its 6 rows of q, of k and of v
    assert heads.slices([0], "out")["qkv.weight"] == [(0, [*range(0, 6), *range(24, 30), *range(48, 54)])]
    assert group_of(graph, "inp.weight[0]").prunable  # the residual stream: c // heads is pinned
    pruned = fxprune.prune(graph, {heads.id: [1, 2]})
    assert pruned.get_submodule("qkv").out_features == 36
    assert pruned.get_submodule("proj").in_features == 12
    assert pruned(torch.randn(3, 5, 5)).shape == (3, 5, 2)  # other batch sizes still run


def test_hand_written_attention_with_head_dim_units():
    graph = fxprune.analyze(randomize(HandAttention()), torch.randn(2, 5, 5), attention_units="head_dim")
    inner = group_of(graph, "qkv.weight[0]")
    assert inner.size == 4 and inner.prunable and inner.zero_invariant  # head_dim, tied across q/k/v and heads
    assert inner.slices([0], "out")["qkv.weight"] == [(0, [0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44])]
    pruned = fxprune.prune(graph, {inner.id: [1, 2]})
    assert pruned.get_submodule("qkv").out_features == 24
    assert pruned.get_submodule("proj").in_features == 8


def test_multihead_attention_is_traced_through_and_its_embedding_prunes():
    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn = nn.Linear(5, 8), nn.MultiheadAttention(8, 2, batch_first=True)
            self.mlp, self.out = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)), nn.Linear(8, 2)

        def forward(self, x):
            x = self.inp(x)
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return self.out(x + self.mlp(x))

    graph, _, error = prune_and_check(randomize(MHA()), torch.randn(2, 3, 5), expect_prunable=3)
    stream = group_of(graph, "inp.weight[0]")  # the embedding, read by in_proj and out_proj
    assert stream.prunable and stream.zero_invariant and "attn.out_proj.weight[0]" in stream.producers
    heads = group_of(graph, "attn.in_proj_weight[0]")
    assert heads.size == 2 and heads.prunable and heads.zero_invariant
    assert group_of(graph, "mlp.0.weight[0]").prunable
    assert error < 1e-4


class HardCodedReshape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv_bn(3, 12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        n = x.shape[0]
        y = self.conv(x).reshape(n, 12, -1)  # a hard-coded channel count
        return self.fc(y.mean(-1).view(n, 12))


def test_hard_coded_reshape_sizes_are_rewritten():
    graph, _, _ = prune_and_check(randomize(HardCodedReshape()), torch.randn(2, 3, 4, 4))
    g = group_of(graph, "conv.0.weight[0]")
    pruned = fxprune.prune(graph, {g.id: list(range(5))})
    assert "reshape(getitem, 7, -1)" in pruned.code and "view(getitem, 7)" in pruned.code


def test_pixel_shuffle_ties_each_output_channel_to_its_r2_inputs():
    model = nn.Sequential(conv_bn(3, 16), nn.PixelShuffle(2), nn.Conv2d(4, 3, 3, padding=1))
    graph, _, _ = prune_and_check(randomize(model), torch.randn(2, 3, 4, 4))
    g = group_of(graph, "0.0.weight[0]")
    assert g.size == 4 and g.slices([1], "out")["0.0.weight"] == [(0, [4, 5, 6, 7])]


class EmbedTied(nn.Module):
    """Embedding whose weight is also the output projection (weight tying)."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 16), nn.ReLU(), nn.Linear(16, dim))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, idx):
        x = self.emb(idx)
        return self.lm_head(x + self.mlp(x))


def test_embedding_and_weight_tying_share_one_channel_space():
    model = randomize(EmbedTied())
    graph, small, _ = prune_and_check(model, torch.randint(0, 11, (2, 5)))
    stream = group_of(graph, "emb.weight[1]")
    assert stream.prunable
    pruned = fxprune.prune(graph, {stream.id: [0, 1, 2]})
    assert pruned.get_submodule("emb").weight is pruned.get_submodule("lm_head").weight
    assert pruned.get_submodule("emb").embedding_dim == 5


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = conv_bn(3, 6), conv_bn(3, 6)
        self.shared = nn.Conv2d(6, 5, 1)
        self.out = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.shared(self.a(x))) + F.relu(self.shared(self.b(x))))


def test_one_module_called_twice_ties_both_calls():
    graph, _, _ = prune_and_check(randomize(CalledTwice()), torch.randn(2, 3, 6, 6))
    assert group_of(graph, "a.0.weight[0]") is group_of(graph, "b.0.weight[0]")


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.a(x)
        y += self.b(x)
        return self.out(self.act(y))


def test_in_place_ops():
    graph, _, _ = prune_and_check(randomize(InPlace()), torch.randn(2, 3, 6, 6))
    assert group_of(graph, "a.weight[0]") is group_of(graph, "b.weight[0]")


def test_graph_outputs_are_frozen_and_multiple_outputs_are_supported():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.h1, self.h2 = conv_bn(3, 8), nn.Conv2d(8, 4, 1), nn.Conv2d(8, 2, 1)

        def forward(self, x):
            f = self.body(x)
            return {"seg": self.h1(f), "aux": (self.h2(f), f.mean((2, 3)))}

    graph = fxprune.analyze(randomize(TwoHeads()).eval(), torch.randn(2, 3, 6, 6))
    for origin in ("h1.weight[0]", "h2.weight[0]", "body.0.weight[0]"):
        g = group_of(graph, origin)
        assert not g.prunable and "graph output" in g.reason
    assert not graph.prunable_groups


def test_pruning_shrinks_parameters_and_keeps_interface():
    model = randomize(ResidualStack()).eval()
    graph = fxprune.analyze(model, torch.randn(2, 3, 8, 8))
    from helpers import half_plan
    small = fxprune.prune(graph, half_plan(graph))
    assert count_params(small) < 0.5 * count_params(model)
    assert small(torch.randn(5, 3, 12, 12)).shape == (5, 4)  # other batch and image sizes still work


def test_two_shuffles_in_a_row():
    """Found by the random-architecture search: the second rewrite must find the first's output."""
    class TwoShuffles(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_bn(3, 8, 1)
            self.fc = nn.Linear(8, 5)

        def shuffle(self, x):
            y = x.view(x.size(0), 2, 4, x.size(2), x.size(3))
            return torch.transpose(y, 1, 2).contiguous().view(x.size(0), 8, x.size(2), x.size(3))

        def forward(self, x):
            return self.fc(self.shuffle(self.shuffle(self.conv(x))).mean((2, 3)))

    graph, small, _ = prune_and_check(randomize(TwoShuffles()), torch.randn(2, 3, 4, 4))
    assert small.code.count("torch.index_select(") == 2


def test_a_new_tensor_sized_by_a_channel_count_freezes_those_channels():
    class SizedZeros(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x):
            y = self.a(x)
            return self.b(y) + torch.zeros(y.size(1)).sum()  # the zeros' size changes with y's width

    graph = fxprune.analyze(SizedZeros(), torch.randn(2, 4), capture="fx")
    hidden = group_of(graph, "a.weight[0]")
    assert not hidden.prunable and "size of a new tensor" in hidden.reason


def test_feasible_plan_keeps_a_split_piece_that_mixes_two_groups():
    """shufflenet's pattern: concat two groups, shuffle, split; a piece holds half of each."""
    class MixedPieces(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(3, 4, 1), conv_bn(3, 4, 1)
            self.left, self.right = nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], 1)
            y = y.view(y.size(0), 2, 4, y.size(2), y.size(3)).transpose(1, 2).reshape(y.shape)
            first, second = y.chunk(2, dim=1)  # first = a0 b0 a1 b1
            return self.left(first) + self.right(second)

    graph = fxprune.analyze(randomize(MixedPieces()), torch.randn(2, 3, 4, 4))
    a, b = group_of(graph, "a.0.weight[0]"), group_of(graph, "b.0.weight[0]")
    plan = fxprune.feasible_plan(graph, [(a.id, 0), (a.id, 1), (b.id, 0), (b.id, 1)])
    assert sum(map(len, plan.values())) == 3  # the last would have emptied the first piece
    assert fxprune.prune(graph, plan)(torch.randn(2, 3, 4, 4)).shape == (2, 2, 4, 4)
