"""Ops that froze groups in the transformers sweep (benchmarks/hf_sweep.py), one small model each.

Each op now has a channel rule: the channels through it stay prunable and, where zeroing
keeps them zero, the zero-invariance oracle holds (``prune_and_check``), under both front
ends where the op exists under both. Before these rules: ``aten.conv2d.padding`` froze
SigLIP's patch embedding, ``aten.glu`` Parakeet's conformer convolution, ``aten.baddbmm``
GPT-NeoX-Japanese's and RecurrentGemma's attention, ``aten.cumsum`` the gated-delta-net
families, ``aten.copy_`` RWKV and the Qwen3-Next family, and ``wrap_with_set_grad_enabled``
(a ``torch.no_grad()`` block under export) HRM and PhiMoE.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from helpers import prune_and_check

BOTH = ["fx", "export"]


def _group_of(graph, key: str, dim: int = 0):
    """The group whose channels ``key`` produces along ``dim``."""
    found = [g for g in graph.groups if any(d == dim for d, _ in g.slices([0], role="out").get(key, []))]
    assert len(found) == 1, str(graph)
    return found[0]


class ConvPaddingConv(nn.Module):
    """A string padding: export spells it ``aten.convNd.padding``."""

    def __init__(self, nd: int, padding: str):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[nd - 1]
        self.a, self.b = conv(3, 8, 3, padding=padding), conv(8, 4, 3, padding=padding)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("capture", BOTH)
@pytest.mark.parametrize("nd,padding", [(1, "same"), (2, "same"), (2, "valid"), (3, "same")])
def test_conv_with_string_padding(nd, padding, capture):
    torch.manual_seed(0)
    x = torch.randn(1, 3, *([7] * nd))
    graph, small, error = prune_and_check(ConvPaddingConv(nd, padding), x, capture=capture)
    middle = _group_of(graph, "a.weight")
    assert middle.prunable and middle.zero_invariant and middle.size == 8, middle.reason
    if capture == "export":
        targets = {str(n.target) for n in graph.gm.graph.nodes}
        assert f"aten.conv{nd}d.padding" in targets  # the spelling this rule is for
    assert error < 1e-4


class LinearGlu(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.a, self.b, self.form = nn.Linear(4, 16), nn.Linear(8, 3), form
        self.glu = nn.GLU(dim=-1)

    def forward(self, x):
        h = self.a(x)
        h = self.glu(h) if self.form == "module" else F.glu(h, dim=-1)
        return self.b(h)


class ConvGluConv(nn.Module):
    """Parakeet's conformer convolution: pointwise conv to 2C, glu over channels, depthwise conv."""

    def __init__(self):
        super().__init__()
        self.a, self.dw, self.b = nn.Conv1d(4, 16, 1), nn.Conv1d(8, 8, 3, groups=8, padding=1), nn.Conv1d(8, 4, 1)

    def forward(self, x):
        return self.b(self.dw(F.glu(self.a(x), dim=1)))


@pytest.mark.parametrize("capture", BOTH)
@pytest.mark.parametrize("form", ["function", "module"])
def test_glu_pairs_the_halves(form, capture):
    torch.manual_seed(0)
    graph, _, error = prune_and_check(LinearGlu(form), torch.randn(2, 5, 4), capture=capture)
    group = _group_of(graph, "a.weight")
    assert group.prunable and group.zero_invariant and group.size == 8, group.reason
    # removing output channel 2 removes the rows of a (2) and of b (10) that make it
    assert group.slices([2], role="out")["a.weight"] == [(0, [2, 10])]
    assert error < 1e-4


@pytest.mark.parametrize("capture", BOTH)
def test_glu_over_conv_channels(capture):
    torch.manual_seed(0)
    graph, _, error = prune_and_check(ConvGluConv(), torch.randn(2, 4, 9), capture=capture)
    group = _group_of(graph, "a.weight")
    assert group.prunable and group.zero_invariant and group.size == 8, group.reason
    assert error < 1e-4


class BaddbmmAttention(nn.Module):
    """Scores ``beta * bias + alpha * q @ k^T`` (GPT-NeoX-Japanese), softmax, then values."""

    def __init__(self, beta: float):
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(4, 6), nn.Linear(6, 4)
        self.register_buffer("bias", torch.randn(1, 5, 5))
        self.beta = beta

    def forward(self, x):
        scores = torch.baddbmm(self.bias, self.q(x), self.k(x).transpose(1, 2), beta=self.beta, alpha=0.5)
        return self.o(torch.softmax(scores, dim=-1) @ self.v(x))


@pytest.mark.parametrize("capture", BOTH)
@pytest.mark.parametrize("beta", [1.0, 0.0])
def test_baddbmm_ties_query_and_key(beta, capture):
    torch.manual_seed(0)
    graph, _, error = prune_and_check(BaddbmmAttention(beta), torch.randn(2, 5, 4), expect_prunable=2,
                                      capture=capture)
    qk = _group_of(graph, "q.weight")
    assert qk is _group_of(graph, "k.weight") and qk.size == 8  # the contracted dim: one group
    assert qk.prunable and qk.zero_invariant, qk.reason  # a zeroed q/k channel adds 0 to every score
    assert _group_of(graph, "v.weight").prunable
    assert error < 1e-4


class LinearScan(nn.Module):
    def __init__(self, scan, dim: int):
        super().__init__()
        self.a, self.b, self.scan, self.dim = nn.Linear(4, 8), nn.Linear(8, 3), scan, dim

    def forward(self, x):
        return self.b(self.scan(self.a(x), self.dim))


SCANS = {"cumsum": (torch.cumsum, True), "cumprod": (torch.cumprod, True),
         "logcumsumexp": (torch.logcumsumexp, False)}


@pytest.mark.parametrize("capture", BOTH)
@pytest.mark.parametrize("name", sorted(SCANS))
def test_scan_along_the_sequence_keeps_channels(name, capture):
    scan, keeps_zero = SCANS[name]
    torch.manual_seed(0)
    model, x = LinearScan(scan, 1).eval(), torch.randn(2, 5, 4)
    if keeps_zero:
        graph, _, error = prune_and_check(model, x, capture=capture)
        group = _group_of(graph, "a.weight")
        assert group.prunable and group.zero_invariant and error < 1e-4, group.reason
    else:  # log(k) after k zeros: prunable, but zeroing is not removing
        group = _group_of(fxprune.analyze(model, x, capture=capture), "a.weight")
        assert group.prunable and not group.zero_invariant, group.reason


@pytest.mark.parametrize("capture", BOTH)
def test_scan_along_channels_freezes_them(capture):
    """Entry c of a running sum over channels mixes channels 0..c: none of them can go."""
    graph = fxprune.analyze(LinearScan(torch.cumsum, -1), torch.randn(2, 5, 4), capture=capture)
    group = _group_of(graph, "a.weight")
    assert not group.prunable and "cumsum runs along a channel dim" in group.reason


class IndexAssign(nn.Module):
    """RWKV's CPU attention: ``output[:, t] = f(x[:, t])`` into a zeros_like buffer
    (``aten.copy_`` into a select view under export, ``setitem`` under fx)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        out = torch.zeros_like(h)
        for t in range(5):  # the example length (fx cannot loop over a traced size)
            out[:, t] = torch.relu(h[:, t]) * 2
        return self.b(out)


class CopyInto(nn.Module):
    """``dst.copy_(src)`` spelled as a Tensor method, into a buffer shaped like src."""

    def __init__(self, broadcast: bool = False):
        super().__init__()
        self.a, self.b, self.broadcast = nn.Linear(4, 8), nn.Linear(8, 3), broadcast

    def forward(self, x):
        h = self.a(x)
        dst = torch.zeros_like(h)
        dst.copy_(h.sum(-1, keepdim=True) if self.broadcast else torch.tanh(h))
        return self.b(dst + h)


@pytest.mark.parametrize("model,capture", [(IndexAssign, "export"), (CopyInto, "fx"), (CopyInto, "export")])
def test_copy_into_a_buffer_keeps_channels(model, capture):  # fx cannot trace index assignment
    torch.manual_seed(0)
    graph, _, error = prune_and_check(model(), torch.randn(2, 5, 4), capture=capture)
    group = _group_of(graph, "a.weight")
    assert group.prunable and group.zero_invariant and error < 1e-4, group.reason
    if capture == "export":
        assert any(str(n.target) == "aten.copy_.default" for n in graph.gm.graph.nodes)


@pytest.mark.parametrize("capture", BOTH)
def test_copy_of_one_value_over_channels_is_not_zero_invariant(capture):
    """``dst.copy_(s)`` with ``s`` broadcast over channels: a zeroed dst channel holds s, not 0."""
    graph = fxprune.analyze(CopyInto(broadcast=True), torch.randn(2, 5, 4), capture=capture)
    group = _group_of(graph, "a.weight")
    assert group.prunable and not group.zero_invariant, group.reason


class GradRegions(nn.Module):
    """A ``torch.no_grad()`` block and an ``enable_grad()`` block inside forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.a(x)
        with torch.no_grad():
            h = self.b(torch.relu(h))
        with torch.enable_grad():
            h = torch.relu(h) * 2
        return self.c(h)


def test_no_grad_blocks_are_inlined_under_export():
    torch.manual_seed(0)
    graph, small, error = prune_and_check(GradRegions(), torch.randn(2, 4), expect_prunable=2, capture="export")
    nodes = list(graph.gm.graph.nodes)
    assert not any("wrap_with_set_grad_enabled" in str(n.target) for n in nodes)
    assert _group_of(graph, "a.weight").prunable and _group_of(graph, "b.weight").prunable
    assert error < 1e-4
    # the grad-mode switches stay in the graph, pruned or not: the no_grad block still detaches
    switches = [n.args[0] for n in small.graph.nodes if n.target is torch._C._set_grad_enabled]
    assert switches.count(False) == 1 and len(switches) >= 2
    x = torch.randn(2, 4, requires_grad=True)
    out = small(x)
    assert out.requires_grad  # the layer after the block records a graph again
    out.sum().backward()
    assert x.grad is None  # but nothing reaches x through the no_grad block
    assert torch.is_grad_enabled()  # and the mode in effect before the call is back


class DivideByParameter(nn.Module):
    """``h / scale`` with ``scale`` a positive per-channel parameter (a learned temperature)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.b(self.a(x) / self.scale)


@pytest.mark.parametrize("capture", BOTH)
def test_division_by_a_zeroed_channel_is_not_zero_invariant(capture):
    """Zeroing the channel's producers zeroes its divisor too: 0/0 is NaN, not 0. The group
    stays prunable, but the oracle does not apply to it (and removing it is still exact)."""
    torch.manual_seed(0)
    model, x = DivideByParameter().eval(), torch.randn(2, 4)
    graph = fxprune.analyze(model, x, capture=capture)
    group = _group_of(graph, "a.weight")
    assert "scale" in group.slices([0], role="out")  # the divisor is one of the channel's producers
    assert group.prunable and not group.zero_invariant
    assert "divisor" in group.zero_invariance_reason
    keep = [c for c in range(8) if c % 2]
    small = fxprune.prune(graph, {group.id: [c for c in range(8) if c not in keep]})
    with torch.no_grad():  # removal equals the model computed on the kept channels alone
        want = F.linear(model.a(x)[:, keep] / model.scale[keep], model.b.weight[:, keep], model.b.bias)
        assert torch.allclose(graph.example_inputs.call(small), want, atol=1e-5)


class DivideByNonZero(nn.Module):
    """``h / (exp(g) + 1)``: the divisor is never zero, so the quotient keeps h's zeros."""

    def __init__(self):
        super().__init__()
        self.a, self.g, self.b = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.a(x) / (torch.exp(self.g(x)) + 1) + self.g(x))


@pytest.mark.parametrize("capture", BOTH)
def test_division_by_a_nonzero_divisor_keeps_the_oracle(capture):
    torch.manual_seed(0)
    graph, _, error = prune_and_check(DivideByNonZero(), torch.randn(2, 4), capture=capture)
    group = _group_of(graph, "a.weight")
    assert group.prunable and group.zero_invariant and error < 1e-4, group.zero_invariance_reason


class PoolWithIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        pooled, _ = F.max_pool2d(self.a(x), 2, return_indices=True)
        return self.b(pooled)


@pytest.mark.parametrize("capture", BOTH)
def test_pooling_with_indices_freezes_with_a_reason(capture):
    """A pooling call that returns (values, indices) has no one-to-one rule: it freezes what
    it touches and says so (it raised a NameError: the fallback was never imported)."""
    graph = fxprune.analyze(PoolWithIndices(), torch.randn(1, 3, 12, 12), capture=capture)
    group = _group_of(graph, "a.weight")
    assert not group.prunable and "has no channel rule" in group.reason
