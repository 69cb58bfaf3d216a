"""The torch.export front end: Hugging Face models, ATen rules, the emitted GraphModule.

Every model here is built from a small random config (nothing is downloaded). The proof
is the same as for torchvision: pruning half of every prunable group keeps the output
shapes, and the zero-invariance oracle holds on half of every zero-invariant group.
"""
from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from helpers import half_plan, prune_and_check, unit_scale

transformers = pytest.importorskip("transformers")
from hf_models import tiny_models  # noqa: E402

MODELS = tiny_models()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hugging_face_models_analyse_prune_and_pass_the_oracle(name):
    model, inputs, mlp_width = MODELS[name]
    graph, _, error = prune_and_check(model, inputs, expect_prunable=2)
    assert graph.capture == "export"  # torch.fx cannot trace transformers 5 models
    assert error < 1e-4
    sizes = [g.size for g in graph.prunable_groups]
    assert sizes.count(mlp_width) == 2, f"one MLP neuron group per layer: {graph}"
    # every MLP group is zero-invariant: its neurons are removed exactly
    mlp = [g for g in graph.prunable_groups if g.size == mlp_width]
    assert all(g.zero_invariant for g in mlp)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_decoder_hidden_size_is_prunable_behind_rms_norms(name):
    """The logits do not carry the hidden size, so it is a group; RMS norm's mean over it
    makes it prunable but not zero-invariant."""
    model, inputs, _ = MODELS[name]
    graph = fxprune.analyze(model, inputs)
    hidden = [g for g in graph.prunable_groups if g.size == model.config.hidden_size
              and "model.embed_tokens.weight[1]" in g.producers]
    assert len(hidden) == 1 and not hidden[0].zero_invariant
    assert "mean" in hidden[0].zero_invariance_reason
    small = fxprune.prune(graph, {hidden[0].id: list(range(16))})
    assert small(**inputs).logits.shape == model(**inputs).logits.shape
    assert small.get_submodule("model.embed_tokens").weight.shape == (100, 16)


def test_encoder_hidden_size_stays_frozen_where_it_is_the_output():
    model, inputs, _ = MODELS["bert"]
    graph = fxprune.analyze(model, inputs)
    hidden = [g for g in graph.groups if "embeddings.word_embeddings.weight[1]" in g.producers]
    assert len(hidden) == 1 and not hidden[0].prunable and "graph output" in hidden[0].reason


def test_emitted_graph_saves_reloads_without_fxprune_reexports_and_compiles(tmp_path):
    model, inputs, _ = MODELS["llama"]
    graph = fxprune.analyze(model, inputs)
    small = fxprune.prune(graph, half_plan(graph))
    expected = small(**inputs).logits
    torch.save(small, tmp_path / "small.pt")
    torch.save((inputs, expected), tmp_path / "io.pt")
    code = (  # a fresh process where importing fxprune fails
        "import sys, torch\nsys.modules['fxprune'] = None\n"
        f"m = torch.load({str(tmp_path / 'small.pt')!r}, weights_only=False)\n"
        f"inputs, expected = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "out = m(**inputs)\nprint(torch.allclose(out['logits'], expected, atol=1e-6))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "True"
    again = torch.export.export(small, (), inputs, strict=False).module()
    assert torch.allclose(again(**inputs).logits, expected, atol=1e-6)
    compiled = torch.compile(small, backend="eager")  # dynamo capture; inductor is timed in benchmarks
    assert torch.allclose(compiled(**inputs).logits, expected, atol=1e-6)


def test_compress_costs_an_exported_model():
    model, inputs, _ = MODELS["gpt2"]
    result = fxprune.compress(model, {"example_inputs": inputs, "target": {"params": 0.8}, "scope": "local"})
    assert result.graph.capture == "export"
    assert any(note == "capture: torch.export" for note in result.notes)
    before, after = result.report.before, result.report.after
    assert after.params < before.params and after.flops < before.flops
    assert result.model(**inputs).last_hidden_state.shape == model(**inputs).last_hidden_state.shape


def test_an_exported_program_is_accepted():
    model, inputs, _ = MODELS["vit"]
    program = torch.export.export(model, (), inputs, strict=False)
    graph = fxprune.analyze(program, inputs)
    assert graph.capture == "export" and graph.prunable_groups


def test_a_model_that_returns_its_cache_is_captured_with_it_off_unless_asked_for_it():
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(config).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    assert fxprune.analyze(model, {"input_ids": ids}).capture_kwargs == {"use_cache": False}
    with pytest.raises(fxprune.TraceError, match="use_cache=False"):  # the caller's own choice stands
        fxprune.analyze(model, {"input_ids": ids, "use_cache": True}, capture="export")


class FunctionalBlock(nn.Module):
    """timm-style layers: F.conv2d / F.batch_norm / F.layer_norm / F.linear with the
    modules' own parameters, and a split whose sizes are computed from a shape."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.mix = nn.Conv2d(12, 12, 1)
        self.gconv = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.ln = nn.LayerNorm(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = F.conv2d(x, self.conv.weight, None, 1, 1)
        y = F.relu(F.batch_norm(y, self.bn.running_mean, self.bn.running_var, self.bn.weight, self.bn.bias,
                                False, 0.1, self.bn.eps))
        a, b = torch.split(y, [4, y.shape[1] - 4], dim=1)
        y = F.conv2d(torch.cat([b, a], 1), self.mix.weight, self.mix.bias)
        y = F.conv2d(y, self.gconv.weight, self.gconv.bias, 1, 1, 1, 3)
        y = F.layer_norm(y.mean((2, 3)), (12,), self.ln.weight, self.ln.bias)
        return F.linear(y, self.fc.weight, self.fc.bias)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_functional_layers_and_shape_computed_splits(capture):
    model = unit_scale(FunctionalBlock())
    graph, _, error = prune_and_check(model, torch.randn(2, 3, 8, 8), capture=capture)
    assert graph.capture == capture
    conv_group = [g for g in graph.prunable_groups if "conv.weight[0]" in g.producers]
    assert conv_group and conv_group[0].zero_invariant  # BN affine zeroed with it: exact
    assert error < 1e-4


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "vit_b_16"])
def test_torchvision_models_through_export_match_fx(name):
    import torchvision

    # vit_b_16 at 64x64: all its blocks and widths, 17 tokens instead of 197
    model = unit_scale(torchvision.models.get_model(name, weights=None, **({"image_size": 64} if name == "vit_b_16"
                                                                          else {}))).eval()
    x = torch.randn(1, 3, 64, 64)
    fx_graph = fxprune.analyze(model, x, capture="fx")
    graph, _, error = prune_and_check(model, x, capture="export")
    assert error < 1e-4
    # what fx finds prunable, export finds too; both see inside nn.MultiheadAttention (fx
    # traces it through as functional ops, export as ATen ops): vit_b_16's heads, MLPs
    # and 768 residual width
    found, fx_found = Counter(g.size for g in graph.prunable_groups), Counter(g.size for g in fx_graph.prunable_groups)
    assert fx_found <= found
    if name == "vit_b_16":
        assert fx_found == found == Counter({12: 12, 3072: 12, 768: 1})
