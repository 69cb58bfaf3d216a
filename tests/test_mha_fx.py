"""nn.MultiheadAttention under the fx front end: traced through as functional ops on its own
parameters (same numbers as the module), so its heads and embedding prune; the options
with no exact functional form keep it whole, frozen with a reason that names the option."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.capture import capture
from helpers import half_plan, prune_and_check, randomize

E, H, L, S, B = 16, 4, 5, 7, 2


class Attend(nn.Module):
    """One MHA call; ``kind`` says which inputs are one tensor, ``use`` which masks it gets."""

    def __init__(self, kind="self", use=(), need_weights=False, average=True, causal=False, **options):
        super().__init__()
        if kind == "kdim":
            options.update(kdim=6, vdim=10)
        self.attn = nn.MultiheadAttention(E, H, **options)
        self.kind, self.use = kind, set(use)
        self.need_weights, self.average, self.causal = need_weights, average, causal

    def forward(self, q, k, v, key_padding_mask, attn_mask):
        key, value = {"self": (q, q), "shared_kv": (k, k)}.get(self.kind, (k, v))
        return self.attn(q, key, value, need_weights=self.need_weights, average_attn_weights=self.average,
                         is_causal=self.causal,
                         key_padding_mask=key_padding_mask if "kpm" in self.use else None,
                         attn_mask=attn_mask if "mask" in self.use else None)


def example(model: Attend, masks: dict | None = None, batched: bool = True) -> tuple:
    g = torch.Generator().manual_seed(1)
    first = model.attn.batch_first or not batched

    def seq(n, width):
        shape = (B, n, width) if first else (n, B, width)
        return torch.randn(shape[1:] if not batched else shape, generator=g)

    q = seq(L, E)
    k, v = seq(S, model.attn.kdim), seq(S, model.attn.vdim)
    if model.kind == "self":
        k = v = q
    masks = masks or {}
    kpm = masks.get("kpm", torch.zeros(B if batched else 1, S, dtype=torch.bool))
    if not batched:
        kpm = kpm[0]
    return q, k, v, kpm, masks.get("mask", torch.zeros(L, S))


def assert_traced_through_and_equal(model: Attend, inputs: tuple) -> torch.fx.GraphModule:
    model = randomize(model).eval()
    gm = capture(model, inputs).gm
    kept = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert kept == [], f"kept whole: {kept}"
    with torch.no_grad():
        want, got = model(*inputs), gm(*inputs)
    assert got[0].shape == want[0].shape
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    if want[1] is None:
        assert got[1] is None
    else:
        assert got[1].shape == want[1].shape
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    return gm


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["self", "shared_kv", "cross", "kdim"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_layouts_match_the_module(batch_first, bias, kind, need_weights):
    model = Attend(kind, need_weights=need_weights, batch_first=batch_first, bias=bias)
    assert_traced_through_and_equal(model, example(model))


def _masks(name: str) -> dict:
    g = torch.Generator().manual_seed(2)
    kpm_bool = torch.zeros(B, S, dtype=torch.bool)
    kpm_bool[0, -2:] = True  # the last two keys of sequence 0 are padding
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)  # True: not allowed
    return {
        "kpm_bool": {"kpm": kpm_bool},
        "kpm_float": {"kpm": torch.randn(B, S, generator=g)},
        "mask_bool": {"mask": causal},
        "mask_float": {"mask": torch.randn(L, S, generator=g)},
        "mask_per_head": {"mask": torch.randn(B * H, L, S, generator=g)},
        "both": {"kpm": kpm_bool, "mask": causal},
        "causal_hint": {"mask": causal},
    }[name]


@pytest.mark.parametrize("masks", ["kpm_bool", "kpm_float", "mask_bool", "mask_float", "mask_per_head", "both",
                                   "causal_hint"])
@pytest.mark.parametrize("weights", ["none", "averaged", "per_head"])
def test_masks_and_returned_weights_match_the_module(masks, weights):
    given = _masks(masks)
    use = [k for k in ("kpm", "mask") if k in given]
    model = Attend("cross", use=use, need_weights=weights != "none", average=weights == "averaged",
                   causal=masks == "causal_hint")
    assert_traced_through_and_equal(model, example(model, given))


@pytest.mark.parametrize("need_weights", [False, True])
def test_one_unbatched_sequence_matches_the_module(need_weights):
    model = Attend("cross", use=["kpm"], need_weights=need_weights, batch_first=True)
    assert_traced_through_and_equal(model, example(model, batched=False))


def test_dropout_in_eval_mode_is_traced_through():
    model = Attend("self", dropout=0.3)
    assert_traced_through_and_equal(model, example(model))


@pytest.mark.parametrize("options, names", [
    ({"dropout": 0.3, "train": True}, "dropout=0.3 in training mode"),
    ({"add_bias_kv": True}, "add_bias_kv=True"),
    ({"add_zero_attn": True}, "add_zero_attn=True"),
])
def test_options_without_a_functional_form_keep_it_whole_with_a_reason(options, names):
    train = options.pop("train", False)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn, self.out = nn.Linear(5, E), nn.MultiheadAttention(E, H, **options), nn.Linear(E, 3)

        def forward(self, x):
            x = self.inp(x)
            return self.out(x + self.attn(x, x, x)[0])

    model = randomize(Block()).train(train)
    graph = fxprune.analyze(model, torch.randn(L, B, 5))
    assert [n.target for n in graph.gm.graph.nodes if n.op == "call_module"] == ["inp", "attn", "out"]
    stream = next(g for g in graph.groups if "inp.weight[0]" in g.producers)
    assert not stream.prunable
    assert f"nn.MultiheadAttention 'attn' is kept whole under fx: {names}" in stream.reason


def test_a_mask_argument_left_none_keeps_it_whole_until_concrete_args_bake_it_in():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn = nn.Linear(5, E), nn.MultiheadAttention(E, H, batch_first=True)
            self.out = nn.Linear(E, 3)

        def forward(self, x, mask=None):
            x = self.inp(x)
            return self.out(x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])

    model, x = randomize(Block()).eval(), torch.randn(B, L, 5)
    graph = fxprune.analyze(model, x)
    stream = next(g for g in graph.groups if "inp.weight[0]" in g.producers)
    assert not stream.prunable and "concrete_args={'mask': None}" in stream.reason
    graph = fxprune.analyze(model, x, concrete_args={"mask": None})
    assert next(g for g in graph.groups if "inp.weight[0]" in g.producers).prunable


class EncoderDecoder(nn.Module):
    """Self-attention on the source, then cross attention from the target into it."""

    def __init__(self):
        super().__init__()
        self.src, self.tgt = nn.Linear(5, E), nn.Linear(3, E)
        self.self_attn = nn.MultiheadAttention(E, H)
        self.cross = nn.MultiheadAttention(E, H)
        self.head = nn.Linear(E, 2)

    def forward(self, src, tgt):
        memory = self.src(src)
        memory = memory + self.self_attn(memory, memory, memory, need_weights=False)[0]
        y = self.tgt(tgt)
        return self.head(y + self.cross(y, memory, memory, need_weights=False)[0])


def test_cross_attention_heads_and_both_embeddings_prune_and_the_oracle_holds():
    model = randomize(EncoderDecoder())
    inputs = (torch.randn(S, B, 5), torch.randn(L, B, 3))
    graph, small, error = prune_and_check(model, inputs, expect_prunable=3)
    by_producer = {p: g for g in graph.groups for p in g.producers}
    heads = by_producer["cross.in_proj_weight[0]"]
    assert heads.size == H and heads.prunable and heads.zero_invariant
    rows = heads.slices([1], "out")["cross.in_proj_weight"][0][1]
    head_dim = E // H
    assert rows == [i + j for i in (head_dim, E + head_dim, 2 * E + head_dim) for j in range(head_dim)]
    assert heads.slices([1], "in")["cross.out_proj.weight"] == [(1, list(range(head_dim, 2 * head_dim)))]
    # the fused in_proj_weight's columns serve the query and the key/value: one embedding
    stream = by_producer["tgt.weight[0]"]
    assert stream is by_producer["src.weight[0]"] and stream.prunable and stream.zero_invariant
    assert stream.slices([0], "in")["cross.in_proj_weight"] == [(1, [0])]
    assert "cross.out_proj.weight" in stream.slices([0], "out")
    assert error < 1e-4


def test_torchvision_vit_heads_under_fx():
    import torchvision

    model = randomize(torchvision.models.vit_b_16(weights=None, image_size=64)).eval()  # all 12 blocks, 17 tokens
    x = torch.randn(1, 3, 64, 64)
    graph = fxprune.analyze(model, x, capture="fx")
    assert graph.capture == "fx"
    prefix = "encoder.layers.encoder_layer_{}.self_attention."
    head_groups = [g for g in graph.prunable_groups if any(p.endswith("in_proj_weight[0]") for p in g.producers)]
    assert len(head_groups) == 12 and all(g.size == 12 and g.zero_invariant for g in head_groups)
    unit = head_groups[0].slices([0])
    assert unit[prefix.format(0) + "in_proj_weight"] == [(0, [b * 768 + j for b in range(3) for j in range(64)])]
    assert unit[prefix.format(0) + "in_proj_bias"] == [(0, [b * 768 + j for b in range(3) for j in range(64)])]
    assert head_groups[0].slices([0], "in")[prefix.format(0) + "out_proj.weight"] == [(1, list(range(64)))]
    sizes = Counter(g.size for g in graph.prunable_groups)
    assert sizes == Counter({12: 12, 3072: 12, 768: 1})  # heads, MLPs and the embedding (no longer frozen)
    exported = fxprune.analyze(model, x, capture="export")
    assert Counter(g.size for g in exported.prunable_groups) == sizes
    plan = half_plan(graph, head_groups)
    assert all(len(units) == 6 for units in plan.values())
    assert fxprune.check_zero_invariance(model, graph, plan) < 1e-4
    small = fxprune.prune(graph, {g.id: list(range(6)) for g in head_groups})
    assert small.get_parameter(prefix.format(3) + "in_proj_weight").shape == (3 * 384, 768)
    assert small.get_parameter(prefix.format(3) + "out_proj.weight").shape == (768, 384)
    with torch.no_grad():
        assert small(x).shape == model(x).shape == (1, 1000)


def test_flops_of_the_module_and_its_traced_graph_agree():
    """In eval mode under no_grad the module runs one fused kernel the FLOP counter cannot
    see; count_flops runs its plain path, so before/after reports compare like with like."""
    from fxprune.measure import count_flops

    model = randomize(Attend("self", batch_first=True)).eval()
    inputs = example(model)
    flops = count_flops(model, inputs)
    assert flops == count_flops(capture(model, inputs).gm, inputs)
    assert flops >= 2 * B * L * E * 4 * E  # in_proj (3 E x E) and out_proj (E x E) per token
    assert torch.backends.mha.get_fastpath_enabled()  # put back
