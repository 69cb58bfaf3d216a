"""emit="module": a plan written back into a copy of the user's own class.

Hugging Face models must stay Hugging Face models: same class, config updated, and the
round trips a user tries (save_pretrained / from_pretrained, generate() with a KV cache)
give what the pruned model computes. Where the class cannot carry the result, the error
names the config field or the module and the way out.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import SpecError, WriteBackError
from helpers import assert_state_unchanged, state_snapshot

transformers = pytest.importorskip("transformers")
from hf_models import tiny_models  # noqa: E402

MODELS = tiny_models()
MLP_FIELD = {"bert": "intermediate_size", "gpt2": "n_inner", "llama": "intermediate_size",
             "qwen2": "intermediate_size", "vit": "intermediate_size", "t5": "d_ff"}


def _first_half(groups) -> dict[int, list[int]]:
    return {g.id: list(range(g.size // 2)) for g in groups}


def _mlp_groups(graph, width: int):
    return [g for g in graph.prunable_groups if g.size == width]


def _head_groups(graph, count: int):
    return [g for g in graph.prunable_groups if g.size == count]


def _hidden(out) -> torch.Tensor:
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def assert_generate_matches_greedy_decoding(model, prompt: torch.Tensor, steps: int) -> None:
    """generate() with its KV cache, at lengths the example inputs never had, gives the tokens
    of greedy decoding that runs the whole sequence at every step without a cache."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=True)
        sequence = prompt
        for _ in range(steps):
            step = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    assert generated.shape == (prompt.shape[0], prompt.shape[1] + steps)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mlp_write_back_round_trips_through_save_pretrained(name, tmp_path):
    model, inputs, width = MODELS[name]
    before, config_before = state_snapshot(model), model.config.to_dict()
    graph = fxprune.analyze(model, inputs)
    plan = _first_half(_mlp_groups(graph, width))
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is type(model)
    assert getattr(mine.config, MLP_FIELD[name]) == width // 2
    with torch.no_grad():
        want = _hidden(fxprune.prune(graph, plan)(**inputs))
        got = _hidden(mine(**inputs))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        mine.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(_hidden(loaded(**inputs)), got)
    assert_state_unchanged(model, before)
    assert model.config.to_dict() == config_before


def test_llama_with_fewer_kv_heads_neurons_and_hidden_size_saves_loads_and_generates(tmp_path):
    model, inputs, width = MODELS["llama"]
    graph = fxprune.analyze(model, inputs)
    hidden = [g for g in graph.prunable_groups if g.size == model.config.hidden_size]
    plan = _first_half(_head_groups(graph, 2) + _mlp_groups(graph, width) + hidden)
    mine = fxprune.prune(graph, plan, emit="module")
    config = mine.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert (config.intermediate_size, config.hidden_size) == (32, 16)
    assert mine.model.layers[1].self_attn.num_key_value_groups == 2
    assert model.config.num_key_value_heads == 2  # the caller's config is untouched
    with torch.no_grad():
        logits = mine(**inputs).logits
        torch.testing.assert_close(logits, fxprune.prune(graph, plan)(**inputs)["logits"], rtol=1e-4, atol=1e-5)
        mine.save_pretrained(tmp_path)
        torch.testing.assert_close(type(model).from_pretrained(tmp_path).eval()(**inputs).logits, logits)

    assert_generate_matches_greedy_decoding(mine, inputs["input_ids"][:1, :5], 7)


def test_llama_query_slots_keep_kv_heads_save_load_and_generate(tmp_path):
    model, inputs, _ = MODELS["llama"]  # 4 query heads over 2 key/value heads
    graph = fxprune.analyze(model, inputs, attention_units="query_slots")
    slots = [g for g in graph.prunable_groups
             if any(k.endswith("q_proj.weight") for k in g.slices([0], "out"))]
    assert [g.size for g in slots] == [2, 2]  # one group per layer: slot 0 and slot 1
    plan = {g.id: [1] for g in slots}
    mine = fxprune.prune(graph, plan, emit="module")
    assert (mine.config.num_attention_heads, mine.config.num_key_value_heads, mine.config.head_dim) == (2, 2, 8)
    assert [layer.self_attn.num_key_value_groups for layer in mine.model.layers] == [1, 1]
    assert mine.model.layers[0].self_attn.k_proj.out_features == 16  # key/value heads untouched
    assert model.model.layers[0].self_attn.num_key_value_groups == 2  # the caller's model is untouched
    with torch.no_grad():
        logits = mine(**inputs).logits
        torch.testing.assert_close(logits, fxprune.prune(graph, plan)(**inputs)["logits"], rtol=1e-4, atol=1e-5)
        mine.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert loaded.model.layers[1].self_attn.num_key_value_groups == 1
        torch.testing.assert_close(loaded(**inputs).logits, logits)
    # the KV cache holds 2 kv heads, each read by one query head
    assert_generate_matches_greedy_decoding(mine, inputs["input_ids"][:1, :5], 4)


def test_qwen2_head_size_survives_a_config_that_derives_it():
    model, inputs, width = MODELS["qwen2"]  # Qwen2Config.head_dim is None: hidden_size // heads
    graph = fxprune.analyze(model, inputs)
    mine = fxprune.prune(graph, _first_half(_head_groups(graph, 2)), emit="module")
    assert (mine.config.num_attention_heads, mine.config.num_key_value_heads, mine.config.head_dim) == (2, 1, 8)
    assert mine.model.layers[0].self_attn.q_proj.out_features == 16


@pytest.mark.parametrize("name, needle", [("bert", "num_attention_heads=2"), ("gpt2", "c_attn")])
def test_heads_a_config_cannot_express_name_the_field_and_the_way_out(name, needle):
    model, inputs, _ = MODELS[name]
    graph = fxprune.analyze(model, inputs)
    plan = _first_half(_head_groups(graph, 4))
    with pytest.raises(WriteBackError, match="emit='graph'") as info:
        fxprune.prune(graph, plan, emit="module")
    assert needle in str(info.value) and "from_pretrained would fail" in str(info.value)
    assert fxprune.prune(graph, plan)(**inputs) is not None  # the graph still carries it


def test_per_layer_widths_in_a_one_width_config_name_the_field():
    model, inputs, width = MODELS["llama"]
    graph = fxprune.analyze(model, inputs)
    first, second = _mlp_groups(graph, width)
    plan = {first.id: list(range(32)), second.id: list(range(16))}
    with pytest.raises(WriteBackError, match=r"config.intermediate_size .* \[32, 48\].*scope='local'"):
        fxprune.prune(graph, plan, emit="module")


def test_weightless_model_on_the_meta_device_gets_its_config():
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.zeros(1, 8, dtype=torch.long, device="meta"), "use_cache": False}
    graph = fxprune.analyze(model, inputs)
    mine = fxprune.prune(graph, _first_half(_head_groups(graph, 2)), emit="module")
    assert (mine.config.num_key_value_heads, model.config.num_key_value_heads) == (1, 2)
    assert mine.model.layers[0].self_attn.k_proj.weight.is_meta


# --- fx captures: PyTorch layers --------------------------------------------------

def test_fx_cnn_keeps_its_class_with_layer_attributes_matching_their_weights():
    import torchvision

    model = torchvision.models.mobilenet_v3_small(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    before = state_snapshot(model)
    graph = fxprune.analyze(model, x)
    from helpers import half_plan

    plan = half_plan(graph)
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is type(model)
    convs = [m for m in mine.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups > 1 and c.groups == c.out_channels < 16 for c in convs)  # pruned depthwise
    for c in convs:
        assert (c.out_channels, c.in_channels) == (c.weight.shape[0], c.weight.shape[1] * c.groups)
    for bn in (m for m in mine.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bn.num_features == bn.weight.shape[0] == bn.running_mean.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(mine(x), fxprune.prune(graph, plan)(x))
    assert_state_unchanged(model, before)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(x.view(-1, 8 * 6 * 6))  # the size written out, not read from x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.head = Head()

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


def test_a_size_hard_coded_in_python_names_the_module_and_the_fix():
    graph = fxprune.analyze(Net(), torch.randn(2, 1, 8, 8))
    with pytest.raises(WriteBackError, match=r"module 'head' \(Head.forward\) hard-codes .*288.*144.*x.flatten\(1\)"):
        fxprune.prune(graph, {0: [0, 1, 2, 3]}, emit="module")
    assert fxprune.prune(graph, {0: [0, 1, 2, 3]})(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_an_exported_program_has_no_class_to_write_into():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    program = torch.export.export(net, (torch.randn(2, 4),))
    graph = fxprune.analyze(program, torch.randn(2, 4))
    with pytest.raises(WriteBackError, match="ExportedProgram"):
        fxprune.prune(graph, {graph.prunable_groups[0].id: [0]}, emit="module")


def test_prune_rejects_an_unknown_emit():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="emit must be one of 'graph', 'module'"):
        fxprune.prune(fxprune.analyze(net, torch.randn(2, 4)), {}, emit="class")


# --- compress ----------------------------------------------------------------------

def test_compress_emits_the_users_class_for_export_captures_and_falls_back_with_a_note():
    model, inputs, _ = MODELS["llama"]
    result = fxprune.compress(model, {"example_inputs": inputs, "ratio": 0.5, "round_to": 1})
    assert type(result.model) is type(model) and result.model.config.intermediate_size == 32
    assert any("emit: your LlamaForCausalLM" in n for n in result.notes)

    bert, bert_inputs, _ = MODELS["bert"]  # halving every group includes BERT's heads
    spec = {"example_inputs": bert_inputs, "ratio": 0.5, "round_to": 1}
    result = fxprune.compress(bert, spec)
    assert isinstance(result.model, torch.fx.GraphModule)
    assert any(n.startswith("emit: a GraphModule") and "num_attention_heads" in n for n in result.notes)
    with pytest.raises(WriteBackError, match="num_attention_heads"):
        fxprune.compress(bert, {**spec, "emit": "module"})
    assert isinstance(fxprune.compress(model, {**spec, "example_inputs": inputs, "emit": "graph"}).model,
                      torch.fx.GraphModule)


def test_spec_emit_is_validated():
    with pytest.raises(SpecError, match="spec.emit"):
        fxprune.Spec(input_shape=[1, 4], ratio=0.5, emit="class")


def test_a_saved_pruned_bert_loads_in_a_process_without_fxprune(tmp_path):
    model, inputs, width = MODELS["bert"]
    graph = fxprune.analyze(model, inputs)
    mine = fxprune.prune(graph, _first_half(_mlp_groups(graph, width)), emit="module")
    mine.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        torch.save((inputs, mine(**inputs).last_hidden_state), tmp_path / "io.pt")
    code = (  # importing fxprune fails in this process
        "import sys, torch, transformers\nsys.modules['fxprune'] = None\n"
        f"inputs, want = torch.load(r'{tmp_path / 'io.pt'}')\n"
        f"model = transformers.BertModel.from_pretrained(r'{tmp_path / 'model'}').eval()\n"
        "torch.testing.assert_close(model(**inputs).last_hidden_state, want)\n"
        "print(model.config.intermediate_size)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(width // 2)]


def test_a_pruned_multihead_attention_cannot_be_written_into_its_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc = nn.Linear(16, 2)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0])

    graph = fxprune.analyze(Block().eval(), torch.randn(2, 5, 16))
    heads = next(g for g in graph.prunable_groups if g.size == 4)
    with pytest.raises(WriteBackError, match=r"nn.MultiheadAttention 'attn' cannot carry the plan.*emit='graph'"):
        fxprune.prune(graph, {heads.id: [0, 1]}, emit="module")
    assert fxprune.prune(graph, {heads.id: [0, 1]})(torch.randn(2, 5, 16)).shape == (2, 5, 2)
