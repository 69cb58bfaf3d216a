"""Whole layers as depth units (graph.layers): found from the graph, removed as the identity.

A layer is an entry of an nn.ModuleList / nn.Sequential whose nodes have one entry and one
exit of the same shape; removing it rewires the exit to the entry. Its oracle is the
original model with that module's forward replaced by the identity, written here with a
forward hook of the test's own (independent of fxprune.channels.layers.identity_layers).
A post-norm layer (BERT) is no residual branch, yet it leaves its class as a layer.
Weights are unit scale (helpers.unit_scale) so that every layer matters.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.channels.layers import covered_by_branches
from fxprune.errors import VerificationError
from fxprune.passes.verify import check_zero_invariance, output_error
from fxprune.select.branch_score import BRANCH_SCORES, score_branches
from helpers import assert_generate_matches_greedy_decoding, assert_state_unchanged, state_snapshot, unit_scale

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
LAYERS = 4


def identity_hooked(model: nn.Module, paths: list[str]):
    """Forward hooks making each module at ``paths`` return its hidden-states input."""
    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        return (x, *output[1:]) if isinstance(output, tuple) else x

    return [model.get_submodule(p).register_forward_hook(hook, with_kwargs=True) for p in paths]


def oracle(model: nn.Module, paths: list[str], call):
    handles = identity_hooked(model, paths)
    try:
        with torch.no_grad():
            return call(model)
    finally:
        for h in handles:
            h.remove()


def _hf(name: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    small = dict(vocab_size=100, max_position_embeddings=64, hidden_size=32, num_hidden_layers=LAYERS,
                 num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    if name == "bert":
        model = transformers.BertModel(transformers.BertConfig(**small))
    elif name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, use_cache=False, num_key_value_heads=2))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**small, use_cache=False, num_key_value_heads=2))
    return unit_scale(model).eval()


def _layer_list(model: nn.Module) -> nn.ModuleList:
    return model.encoder.layer if hasattr(model, "encoder") else model.model.layers


@pytest.mark.parametrize("name", ["bert", "llama", "qwen2"])
def test_hf_model_loses_half_its_layers_through_compress_and_keeps_its_class(name, tmp_path):
    model = _hf(name)
    before = state_snapshot(model)
    result = fxprune.compress(model, {"example_inputs": {"input_ids": IDS}, "units": "layers", "ratio": 0.5,
                                      "emit": "module"})
    graph, mine = result.graph, result.model
    prefix = "encoder.layer" if name == "bert" else "model.layers"
    assert [l.path for l in graph.layers] == [f"{prefix}.{i}" for i in range(LAYERS)]
    removed = sorted(fxprune.unit(graph, gid).path for gid in result.plan)
    assert len(removed) == LAYERS // 2 and all(fxprune.unit(graph, gid).kind == "layer" for gid in result.plan)
    kept = [i for i in range(LAYERS) if f"{prefix}.{i}" not in removed]
    assert type(mine) is type(model) and len(_layer_list(mine)) == 2 and mine.config.num_hidden_layers == 2
    for new, old in enumerate(kept):  # the kept layers are the original ones, tensor for tensor
        for key, tensor in _layer_list(mine)[new].state_dict().items():
            assert torch.equal(tensor, _layer_list(model)[old].state_dict()[key]), key
    key = "last_hidden_state" if name == "bert" else "logits"
    with torch.no_grad():
        got = mine(input_ids=IDS)[key]
        torch.testing.assert_close(got, fxprune.prune(graph, result.plan)(input_ids=IDS)[key], rtol=1e-5, atol=1e-5)
    want = oracle(model, removed, lambda m: m(input_ids=IDS)[key])  # the removed layers as the identity
    assert output_error(want, got) < 1e-5
    assert output_error(model(input_ids=IDS)[key], got) > 1e-2  # the layers mattered
    assert check_zero_invariance(model, graph, result.plan, mine) < 1e-5
    mine.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=IDS)[key], got)
    if name != "bert":
        assert [layer.self_attn.layer_idx for layer in mine.model.layers] == [0, 1]
        assert [layer.self_attn.layer_idx for layer in loaded.model.layers] == [0, 1]
        assert_generate_matches_greedy_decoding(mine, IDS[:1, :5], 6)
    assert_state_unchanged(model, before)


def test_a_pre_norm_layer_is_its_two_branches_and_competes_once():
    """Llama: removing a layer equals removing its attention and MLP branches (the same
    graph), and with both kinds competing the layer is left to its branches."""
    model = _hf("llama")
    graph = fxprune.analyze(model, {"input_ids": IDS})
    layer = graph.layers[1]
    inner = covered_by_branches(graph, layer)
    assert len(inner) == 2 and all(b.modules[0].startswith("model.layers.1.") for b in inner)
    by_layer = fxprune.prune(graph, {layer.id: [0]})(input_ids=IDS)["logits"]
    by_branches = fxprune.prune(graph, {b.id: [0] for b in inner})(input_ids=IDS)["logits"]
    torch.testing.assert_close(by_layer, by_branches, rtol=0, atol=0)
    both = fxprune.prune(graph, {layer.id: [0], inner[0].id: [0]})(input_ids=IDS)["logits"]  # the branch goes with it
    torch.testing.assert_close(both, by_layer, rtol=0, atol=0)
    result = fxprune.compress(model, {"example_inputs": {"input_ids": IDS}, "units": ["branches", "layers"],
                                      "ratio": 0.5, "emit": "graph"})
    assert all(fxprune.unit(graph, gid).kind == "branch" for gid in result.plan)
    assert any("8 residual branch(es) compete" in n for n in result.notes), result.notes
    bert = fxprune.analyze(_hf("bert"), {"input_ids": IDS})  # post-norm: its norms are more than its branches
    assert covered_by_branches(bert, bert.layers[0]) == []


def test_the_layer_oracle_catches_a_wrong_rewrite(monkeypatch):
    """A removal that rewires a layer's exit to the wrong tensor (here: the input of the
    layer before it, skipping two layers) keeps every shape; the value check refuses it."""
    import fxprune.passes.prune as prune_pass

    model = _hf("bert")
    graph = fxprune.analyze(model, {"input_ids": IDS})
    layer, before = graph.layers[2], graph.layers[1]
    assert fxprune.prune(graph, {layer.id: [0]}) is not None  # the right rewrite passes
    real = prune_pass.remove_branches

    def wrong(ctx, units):
        real(ctx, [dataclasses.replace(u, shortcut=before.shortcut) if u.id == layer.id else u for u in units])

    monkeypatch.setattr(prune_pass, "remove_branches", wrong)
    with pytest.raises(VerificationError, match="masked"):
        fxprune.prune(graph, {layer.id: [0]})


# --- torchvision and your own nn.Sequential --------------------------------------------------

def test_torchvision_resnet_blocks_leave_their_stages():
    """A BasicBlock applies a ReLU after its add, so it is no removable branch in its class;
    as a layer it leaves its nn.Sequential stage."""
    torchvision = pytest.importorskip("torchvision")
    model = unit_scale(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = fxprune.analyze(model, x)
    assert [l.path for l in graph.layers] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    plan = {l.id: [0] for l in graph.layers if l.path in ("layer1.1", "layer3.1")}
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is type(model) and len(mine.layer1) == 1 and len(mine.layer3) == 1 and len(mine.layer2) == 2
    with torch.no_grad():
        got = mine(x)
    assert output_error(oracle(model, ["layer1.1", "layer3.1"], lambda m: m(x)), got) < 1e-5
    assert output_error(model(x), got) > 1e-2
    small = fxprune.prune(graph, plan)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in mine.parameters()) \
        < sum(p.numel() for p in model.parameters())


class PostNorm(nn.Module):
    """A post-norm residual block: no residual branch can leave, the whole layer can."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.fc, self.norm = nn.Linear(width, width), nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.fc(x))


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_your_sequential_loses_its_quietest_layers(capture):
    torch.manual_seed(0)
    model = unit_scale(nn.Sequential(PostNorm(), PostNorm(), PostNorm(), PostNorm(), nn.Linear(8, 3))).eval()
    with torch.no_grad():  # blocks 1 and 3 barely move the stream
        for i in (1, 3):
            model[i].fc.weight.mul_(1e-3)
            model[i].fc.bias.zero_()
            model[i].norm.weight.fill_(1.0)
            model[i].norm.bias.zero_()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    x = x - x.mean(-1, keepdim=True)
    x = x / x.std(-1, keepdim=True, unbiased=False)  # normalised: a layer norm of it is nearly itself
    result = fxprune.compress(model, {"example_inputs": (x,), "units": "layers", "ratio": 0.5,
                                      "emit": "module", "capture": capture})
    assert sorted(fxprune.unit(result.graph, g).path for g in result.plan) == ["1", "3"], result.plan
    mine = result.model
    assert type(mine) is nn.Sequential and len(mine) == 3 and isinstance(mine[2], nn.Linear)
    with torch.no_grad():
        assert output_error(oracle(model, ["1", "3"], lambda m: m(x)), mine(x)) < 1e-5


# --- scores ---------------------------------------------------------------------------------

class PreNorm(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, 16), nn.Linear(16, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


def test_every_branch_score_ranks_layers_and_block_influence_is_one_minus_cos():
    torch.manual_seed(0)
    model = unit_scale(nn.Sequential(PostNorm(), PreNorm(), PreNorm(), nn.Linear(8, 3))).eval()
    with torch.no_grad():
        model[2].fc2.weight.zero_()
        model[2].fc2.bias.zero_()  # layer 2 is exactly the identity
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    graph = fxprune.analyze(model, x)
    layers = graph.layers
    assert [l.path for l in layers] == ["0", "1", "2"]  # the Linear changes the shape: no layer
    seen = {}
    handles = [model[i].register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out)))
               for i in range(3)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    influence = score_branches(graph, "block_influence", units=layers)
    norms = score_branches(graph, "output_norm", units=layers)
    for i, l in enumerate(layers):
        a, b = seen[i]
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
        assert influence[l.id] == pytest.approx(float((1 - cos).mean()), abs=1e-9)
        assert norms[l.id] == pytest.approx(float((b - a).double().norm() / a.double().norm()), rel=1e-6)
    for method in BRANCH_SCORES:
        scores = score_branches(graph, method, units=layers)
        assert set(scores) == {l.id for l in layers}
        if method != "group_lasso":  # the identity layer changes nothing; its weights are not zero
            assert scores[layers[2].id] == pytest.approx(0.0, abs=1e-6), method
            assert scores[layers[2].id] < min(scores[layers[0].id], scores[layers[1].id]), method


def test_graph_text_lists_layers_and_cli_accepts_units_layers():
    from fxprune.cli import _units
    from fxprune.cli.render import graph_json, layers_text

    graph = fxprune.analyze(nn.Sequential(PostNorm(), PostNorm(), nn.Linear(8, 2)), torch.randn(2, 8))
    text = layers_text(graph)
    assert "2 layers" in text and "PostNorm" not in text and "--units layers" in text
    assert [row[:2] for row in [line.split()[:2] for line in text.splitlines()[-2:]]] == \
        [[str(graph.layers[0].id), "0"], [str(graph.layers[1].id), "1"]]
    import json
    data = json.loads(graph_json(graph, "m", [2, 8]))
    assert [l["path"] for l in data["layers"]] == ["0", "1"]
    assert _units("layers") == "layers" and _units("channels,layers") == ["channels", "layers"]
    assert _units("both") == ["channels", "branches"]
    import argparse
    with pytest.raises(argparse.ArgumentTypeError, match="unknown kind 'layer'"):
        _units("layer")


ZOO = {  # shallow copies: the blocks are the originals'
    "timm:convnext_atto": lambda tv, timm: timm.create_model("convnext_atto", pretrained=False, depths=(2, 2, 2, 2)),
    "timm:vit_tiny_patch16_224": lambda tv, timm: timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                                                   img_size=32, depth=4),
    "torchvision:mobilenet_v2": lambda tv, timm: tv.models.mobilenet_v2(),
    "torchvision:efficientnet_b0": lambda tv, timm: tv.models.efficientnet_b0(),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_every_other_layer_of_zoo_models_holds_the_identity_oracle(name):
    """Every other layer (nested ones too: a timm stage that keeps its shape holds its
    blocks, an inverted residual its depthwise conv block) removed: the pruned graph (value
    check included) equals the original with those modules hooked to the identity."""
    tv, timm = pytest.importorskip("torchvision"), pytest.importorskip("timm")
    model = unit_scale(ZOO[name](tv, timm)).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    graph = fxprune.analyze(model, x)
    plan = {l.id: [0] for l in graph.layers[::2]}
    assert len(plan) >= 2, [l.path for l in graph.layers]
    small = fxprune.prune(graph, plan)
    assert check_zero_invariance(model, graph, plan, small) < 1e-5
    outer = [l.path for l in graph.layers[::2] if not any(l.path.startswith(f"{o.path}.") for o in graph.layers[::2])]
    assert output_error(oracle(model, outer, lambda m: m(x)), small(x)) < 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert fxprune.feasible_plan(graph, [(l.id, 0) for l in graph.layers[:1]]) == {graph.layers[0].id: [0]}


def test_a_flops_target_is_met_with_layers_and_channels_in_one_ranking():
    """units=["channels", "layers"] with a target: one ranking lands it, and the quiet
    layers go before channels of the loud ones."""
    torch.manual_seed(0)
    model = unit_scale(nn.Sequential(*(PreNorm(16) for _ in range(4)), nn.Linear(16, 3))).eval()
    with torch.no_grad():
        model[2].fc2.weight.mul_(1e-4)  # layer 2 writes almost nothing into the stream
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    spec = fxprune.Spec(example_inputs=(x,), target={"flops": 0.7}, units=["layers", "channels"])
    assert spec.units == ["channels", "layers"]
    result = fxprune.compress(model, spec)
    kinds = {getattr(fxprune.unit(result.graph, gid), "kind", "channels") for gid in result.plan}
    layers = [fxprune.unit(result.graph, gid).path for gid in result.plan if gid >= len(result.graph.groups)]
    assert "2" in layers and kinds <= {"channels", "layer"}, result.plan
    assert any("layer(s)" in n for n in result.notes), result.notes


class InPlace(nn.Module):
    """Writes into its input: removing it would leave the caller's tensor unwritten."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x += self.fc(x)
        return x


class Wider(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        return torch.relu(self.fc(x))


class Reversed(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(PostNorm() for _ in range(3))

    def forward(self, x):
        for block in reversed(self.blocks):
            x = block(x)
        return x


def test_what_is_no_layer_and_what_your_class_cannot_drop():
    x = torch.randn(2, 8)
    # export records the write into the input (add_); a symbolic trace records `x += y` as an add
    graph = fxprune.analyze(nn.Sequential(InPlace(), PostNorm(), Wider(), nn.Linear(16, 2)), x, capture="export")
    assert [l.path for l in graph.layers] == ["1"]  # no in-place write into its input, no change of shape
    graph = fxprune.analyze(Reversed().eval(), x)
    assert [l.path for l in graph.layers] == ["blocks.2", "blocks.1", "blocks.0"]  # in the order they run
    with pytest.raises(fxprune.WriteBackError, match=r"nn.ModuleList 'blocks' is not run entry after entry"):
        fxprune.prune(graph, {graph.layers[1].id: [0]}, emit="module")
    assert fxprune.prune(graph, {graph.layers[1].id: [0]})(x).shape == (2, 8)  # the graph carries it
