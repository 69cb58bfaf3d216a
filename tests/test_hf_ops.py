"""Ops that froze whole Hugging Face families: Falcon's ``x @ self.weight.T``, Mamba's
depthwise causal conv (its weight reshaped back to its own shape, a zero-filled scan state,
``stack``), and GPT-2 under its default config (``use_cache=True``)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from helpers import prune_and_check, randomize

pytestmark = pytest.mark.dynamic_shapes  # fxprune's default capture (tests/conftest.py)

transformers = pytest.importorskip("transformers")
IDS = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}

TRANSPOSES = {"T": lambda w: w.T, "mT": lambda w: w.mT, "t": lambda w: w.t(),
              "transpose": lambda w: w.transpose(0, 1)}


class TransposedWeights(nn.Module):
    """Two linear layers written as ``x @ w.T`` (Falcon's spelling)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.w1, self.w2 = nn.Parameter(torch.randn(16, 8)), nn.Parameter(torch.randn(8, 16))

    def forward(self, x):
        t = TRANSPOSES[self.how]
        return torch.relu(x @ t(self.w1)) @ t(self.w2)


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("how", sorted(TRANSPOSES))
def test_matmul_with_a_transposed_weight_binds_like_a_linear_layer(how, capture):
    graph, small, error = prune_and_check(TransposedWeights(how), torch.randn(2, 8), capture=capture)
    (hidden,) = graph.prunable_groups
    assert hidden.size == 16 and hidden.zero_invariant and error < 1e-4
    # w1's rows produce the hidden channels, w2's columns consume them
    assert hidden.slices([3], role="out") == {"w1": [(0, [3])]}
    assert hidden.slices([3], role="in") == {"w2": [(1, [3])]}
    assert small.w1.shape == (8, 8) and small.w2.shape == (8, 8)


class CausalConv(nn.Module):
    """Mamba's mixer in small: in_proj, a depthwise causal conv1d, SiLU, out_proj."""

    def __init__(self, reshaped_weight: bool, width: int = 16, kernel: int = 4):
        super().__init__()
        self.reshaped_weight = reshaped_weight
        self.in_proj, self.out_proj = nn.Linear(8, width), nn.Linear(width, 8)
        self.conv = nn.Conv1d(width, width, kernel, groups=width, padding=kernel - 1)

    def forward(self, x):  # x: [batch, length, 8]
        h = self.in_proj(x).transpose(1, 2)
        if self.reshaped_weight:  # transformers' causal-conv fallback takes a [C, k] weight
            weight = self.conv.weight.squeeze(1).unsqueeze(1)
            h = F.conv1d(h, weight, self.conv.bias, padding=self.conv.kernel_size[0] - 1, groups=h.shape[1])
        else:
            h = self.conv(h)
        h = F.silu(h[..., : x.shape[1]])
        return self.out_proj(h.transpose(1, 2))


@pytest.mark.parametrize("reshaped_weight", [False, True])
def test_depthwise_causal_conv1d_prunes_under_export(reshaped_weight):
    model = randomize(CausalConv(reshaped_weight))
    graph, small, error = prune_and_check(model, torch.randn(2, 6, 8), capture="export")
    (inner,) = graph.prunable_groups
    assert inner.size == 16 and inner.zero_invariant and error < 1e-4
    assert set(inner.slices([0], role="out")) == {"in_proj.weight", "in_proj.bias", "conv.weight", "conv.bias"}
    assert small.get_parameter("conv.weight").shape == (8, 1, 4)


def test_falcon_mlp_and_hidden_size_prune_through_the_oracle():
    config = transformers.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=4, use_cache=False)
    torch.manual_seed(0)
    model = randomize(transformers.FalconForCausalLM(config).eval())
    graph, _, error = prune_and_check(model, IDS, capture="export", expect_prunable=2)
    mlp = [g for g in graph.prunable_groups if g.size == 4 * 32]
    assert len(mlp) == 1 and all(g.zero_invariant for g in mlp) and error < 1e-4


def test_mamba_inner_channels_prune_through_the_oracle():
    config = transformers.MambaConfig(vocab_size=100, hidden_size=32, state_size=4, num_hidden_layers=1,
                                      expand=2, conv_kernel=4, use_cache=False)
    torch.manual_seed(0)
    model = randomize(transformers.MambaForCausalLM(config).eval())
    graph, _, error = prune_and_check(model, IDS, capture="export", expect_prunable=2)
    inner = [g for g in graph.prunable_groups if g.size == 2 * 32]
    assert len(inner) == 1 and all(g.zero_invariant for g in inner) and error < 1e-4


def test_gpt2_with_its_default_config_is_captured_with_the_cache_off():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.config.use_cache  # the default: forward returns a cache, which no graph holds
    graph = fxprune.analyze(model, IDS)
    assert graph.capture_kwargs == {"use_cache": False} and graph.prunable_groups
    result = fxprune.compress(model, {"example_inputs": IDS, "ratio": 0.5, "emit": "module",
                                      "calibration": [IDS]})  # batches need not say use_cache
    assert "capture: use_cache=False for the capture" in result.report.notes
    assert model.config.use_cache and result.model.config.use_cache  # nobody's config was edited
    assert result.model.generate(IDS["input_ids"][:1], max_new_tokens=2, do_sample=False).shape == (1, 10)


class InterleavedRepeat(nn.Module):
    """Each channel repeated twice in place (Mamba-2's groups to heads, Cohere's rotary pairs)."""

    def __init__(self, output_size: int | None = None):
        super().__init__()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(12, 4)
        self.output_size = output_size  # Mamba-2 and Nemotron-H pass the size out as a hint

    def forward(self, x):
        hidden = torch.relu(self.a(x))
        if self.output_size is None:
            return self.b(hidden.repeat_interleave(2, dim=-1))
        return self.b(hidden.repeat_interleave(2, dim=-1, output_size=self.output_size))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("output_size", [None, 12])
def test_repeat_interleave_keeps_each_channel_with_its_copies(capture, output_size):
    model = randomize(InterleavedRepeat(output_size))
    graph, small, error = prune_and_check(model, torch.randn(3, 8), capture=capture)
    [group] = graph.prunable_groups
    assert group.size == 6 and group.zero_invariant and error < 1e-4
    assert group.slices([1], role="in") == {"b.weight": [(1, [2, 3])]}  # a channel's two copies go together
    assert small(torch.randn(3, 8)).shape == (3, 4)  # the hint now names the pruned size


@pytest.mark.parametrize("spelling", ["multiply", "subtract"])
def test_aten_aliases_of_mul_and_sub_have_their_rules(spelling):
    """``torch.multiply`` and friends export as their own untagged ATen ops (ConvBERT)."""

    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 4)
            self.scale = nn.Parameter(torch.rand(6) + 0.5)

        def forward(self, x):
            return self.b(getattr(torch, spelling)(self.a(x), self.scale))

    graph, _, _ = prune_and_check(Alias(), torch.randn(3, 8), capture="export")
    assert any(n.target == getattr(torch.ops.aten, spelling).Tensor for n in graph.gm.graph.nodes)
    assert [g.size for g in graph.prunable_groups] == [6]


def test_in_place_masked_fill_and_a_legacy_empty_cat_keep_channels():
    """XLM / Flaubert: ``scores.masked_fill_(mask, 0)`` and ``torch.cat([torch.empty(0), k])``."""

    class XLMish(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 4)

        def forward(self, x):
            h = torch.cat([x.new_empty(0), self.a(x)], dim=1)
            return self.b(h.masked_fill_(x[:, :1] > 0, 0.0))  # a mask over rows

    graph, _, _ = prune_and_check(XLMish(), torch.randn(3, 8), capture="export")
    assert [g.size for g in graph.prunable_groups] == [6]


class Unfolded(nn.Module):
    """A conv written as unfold + matmul (ConvBERT's span conv, MobileViT-V2's patches)."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.a = nn.Conv2d(3, 5, 1)
        self.unfold = nn.Unfold(kernel_size=(2, 3), padding=1)
        self.b = nn.Linear(5 * 6, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        cols = self.unfold(h) if self.spelling == "module" else F.unfold(h, (2, 3), padding=1)
        return self.b(cols.transpose(1, 2))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("spelling", ["module", "function"])
def test_im2col_turns_each_channel_into_its_block_of_window_rows(capture, spelling):
    graph, small, error = prune_and_check(randomize(Unfolded(spelling)), torch.randn(2, 3, 6, 6), capture=capture)
    [group] = graph.prunable_groups
    assert group.size == 5 and group.zero_invariant and error < 1e-4
    assert group.slices([1], role="in") == {"b.weight": [(1, list(range(6, 12)))]}  # channel 1: rows 6..11
