"""Attention heads as pruning units, found from the graph (no per-family code).

A unit of a head group is one whole head: head_dim rows of the query projection (with
grouped-query attention, a key/value head and the query heads it serves). The oracle holds
on those groups, and removing half the heads of every layer leaves a model that runs.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fxprune
from fxprune.passes.verify import output_error
from helpers import unit_scale

transformers = pytest.importorskip("transformers")
from hf_models import tiny_models  # noqa: E402

MODELS = tiny_models()
QUERY = {  # the query projection's weight in layer 0 of each family
    "bert": "encoder.layer.0.attention.self.query.weight", "gpt2": "h.0.attn.c_attn.weight",
    "llama": "model.layers.0.self_attn.q_proj.weight", "qwen2": "model.layers.0.self_attn.q_proj.weight",
    "vit": "layers.0.attention.q_proj.weight",
    "t5": "encoder.block.0.layer.0.SelfAttention.q.weight",
}


ORACLE_TOLERANCE = 1e-4  # check_zero_invariance's default


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_one_heads_queries_move_the_output_far_past_the_oracle_tolerance(name):
    """The test models can see a query slicing error: zeroing the query rows (and bias) of
    head 0 in layer 0 changes the output by over 100x the oracle's tolerance. Under Hugging
    Face's own initialisation the tiny BERT moved by 1.5e-5, Llama by 1e-3."""
    model, inputs, _ = MODELS[name]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    zeroed = copy.deepcopy(model)
    query = zeroed.get_submodule(QUERY[name].removesuffix(".weight"))
    with torch.no_grad():
        query.weight[:head_dim] = 0
        if query.bias is not None:
            query.bias[:head_dim] = 0
        moved = output_error(model(**inputs), zeroed(**inputs))
    assert moved > 100 * ORACLE_TOLERANCE, f"{name}: one head moved the output by only {moved:.2g}"


def head_groups(graph, key: str):
    return [g for g in graph.prunable_groups if key in g.slices([0], "out")]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_unit_is_a_whole_head_and_the_oracle_holds(name):
    model, inputs, _ = MODELS[name]
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or config.num_heads
    head_dim = getattr(config, "d_kv", None) or config.hidden_size // heads
    graph = fxprune.analyze(model, inputs)
    found = head_groups(graph, QUERY[name])
    assert len(found) == 1, str(graph)
    group = found[0]
    kv_heads = getattr(config, "num_key_value_heads", heads)
    assert group.size == kv_heads
    dim, rows = group.slices([0], "out")[QUERY[name]][0]
    fused = 3 if name == "gpt2" else 1  # GPT-2's c_attn holds q, k and v: a head has rows in each
    assert len(rows) == fused * head_dim * heads // kv_heads  # one head (with its query heads under GQA)
    assert group.zero_invariant
    error = fxprune.check_zero_invariance(model, graph, {group.id: list(range(0, group.size, 2))})
    assert error < 1e-4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_half_the_heads_of_every_layer_go_and_the_model_runs(name):
    model, inputs, _ = MODELS[name]
    graph = fxprune.analyze(model, inputs)
    plan = {}
    for g in graph.prunable_groups:
        if any(k.endswith(("query.weight", "c_attn.weight", "q_proj.weight", "q.weight"))
               for k in g.slices([0], "out")):
            plan[g.id] = list(range(g.size // 2))
    assert plan
    small = fxprune.prune(graph, plan)
    with torch.no_grad():
        out, ref = small(**inputs), model(**inputs)
    first = next(iter(ref.values()))
    assert next(iter(out.values())).shape == first.shape


def test_pruned_llama_keeps_a_uniform_query_per_kv_ratio():
    model, inputs, _ = MODELS["llama"]  # 4 query heads, 2 key/value heads, head_dim 8
    graph = fxprune.analyze(model, inputs)
    plan = {g.id: [1] for g in graph.prunable_groups if "model.layers.0.self_attn.k_proj.weight" in
            g.slices([0], "out") or "model.layers.1.self_attn.k_proj.weight" in g.slices([0], "out")}
    assert len(plan) == 2
    small = fxprune.prune(graph, plan)
    for layer in range(2):
        attn = f"model.layers.{layer}.self_attn"
        assert small.get_submodule(f"{attn}.k_proj").weight.shape[0] == 8   # 1 kv head left
        assert small.get_submodule(f"{attn}.v_proj").weight.shape[0] == 8
        assert small.get_submodule(f"{attn}.q_proj").weight.shape[0] == 16  # its 2 query heads
        assert small.get_submodule(f"{attn}.o_proj").weight.shape[1] == 16
    assert small(**inputs).logits.shape == model(**inputs).logits.shape


def test_torchvision_vit_heads_through_export():
    import torchvision

    model = unit_scale(torchvision.models.vit_b_16(image_size=64)).eval()
    x = torch.randn(1, 3, 64, 64)
    graph = fxprune.analyze(model, x, capture="export")
    in_proj = "encoder.layers.encoder_layer_0.self_attention.in_proj_weight"
    group = head_groups(graph, in_proj)[0]
    assert group.size == 12  # heads
    dim, rows = group.slices([0], "out")[in_proj][0]
    assert len(rows) == 3 * 64  # one head's rows of q, k and v in the fused projection
    assert fxprune.check_zero_invariance(model, graph, {group.id: list(range(6))}) < 1e-4
    small = fxprune.prune(graph, {group.id: list(range(6))})
    assert small(x).shape == model(x).shape


def test_head_dim_units_stay_available():
    model, inputs, _ = MODELS["bert"]
    graph = fxprune.analyze(model, inputs, attention_units="head_dim")
    group = head_groups(graph, QUERY["bert"])[0]
    assert group.size == 8  # head_dim positions, tied across the 4 heads
    assert len(group.slices([0], "out")[QUERY["bert"]][0][1]) == 4
    with pytest.raises(fxprune.AnalysisError, match="attention_units"):
        fxprune.analyze(model, inputs, attention_units="rows")


def test_llm_shaped_graph_is_analysed_and_costed_on_the_meta_device():
    """No weight memory: a Llama-3-8B-shaped layer stack (2 of its 32 layers) on meta."""
    from fxprune.measure import count_flops, count_params

    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=4096, num_attention_heads=32,
                                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                      use_cache=False)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.zeros(1, 16, dtype=torch.long, device="meta")}
    graph = fxprune.analyze(model, inputs)
    sizes = sorted(g.size for g in graph.prunable_groups)
    assert sizes == [8, 8, 4096, 14336, 14336]  # kv heads (x2 layers), hidden size, MLP (x2)
    plan = {g.id: list(range(g.size // 2)) for g in graph.prunable_groups if g.size in (8, 14336)}
    small = fxprune.prune(graph, plan)
    assert small.get_submodule("model.layers.0.self_attn.k_proj").weight.shape == (512, 4096)
    assert small.get_submodule("model.layers.0.self_attn.q_proj").weight.shape == (2048, 4096)
    assert count_params(small) < count_params(model)
    assert count_flops(small, inputs) < count_flops(graph.gm, inputs)
