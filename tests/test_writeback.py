"""emit="module": a plan written back into a copy of the user's own class.

Hugging Face models must stay Hugging Face models: same class, config updated, and the
round trips a user tries (save_pretrained / from_pretrained, generate() with a KV cache)
give what the pruned model computes. Where the class cannot carry the result, the error
names the config field or the module and the way out.

The written-back model is compared with the ORIGINAL model whose removed units are zeroed
(``zeroed_copy``; for query slots, their output-projection columns), not with the pruned
graph, which ``write_back`` already checks against with the same cutting code. The models
have unit-scale weights and randomized norm statistics (helpers.unit_scale), so a norm
indexed with the wrong channels changes the output.
"""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import SpecError, WriteBackError
from fxprune.passes import writeback
from fxprune.passes.verify import output_error, zeroed_copy
from helpers import (assert_generate_matches_greedy_decoding, assert_state_unchanged, half_plan, state_snapshot,
                     unit_scale)

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


def zeroed_original(model, graph, plan, role: str = "out") -> torch.nn.Module:
    """The original with the plan's ``role`` slices zeroed: producers (``zeroed_copy``, for
    zero-invariant groups) or consumers (``"in"``: query slots, whose only consumer is the
    output projection)."""
    if role == "out":
        return zeroed_copy(model, graph, plan).eval()
    ref = copy.deepcopy(model)
    tensors = dict(ref.named_parameters())
    with torch.no_grad():
        for gid, units in plan.items():
            for key, cuts in graph.group(gid).slices(units, role).items():
                for dim, index in cuts:
                    tensors[key].index_fill_(dim, torch.as_tensor(index), 0)
    return ref.eval()


def assert_equals_zeroed_original(mine, model, graph, plan, inputs, role: str = "out") -> torch.Tensor:
    """``mine`` computes what the original computes with the removed units zeroed, and that
    zeroing moves the original's output (else the comparison could not fail). Returns the output."""
    with torch.no_grad():
        want = _hidden(zeroed_original(model, graph, plan, role)(**inputs))
        got = _hidden(mine(**inputs))
        assert output_error(_hidden(model(**inputs)), want) > 1e-3, "the plan does not change the function"
    assert output_error(want, got) < 1e-4
    return got


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mlp_write_back_round_trips_through_save_pretrained(name, tmp_path):
    model, inputs, width = MODELS[name]
    before, config_before = state_snapshot(model), model.config.to_dict()
    graph = fxprune.analyze(model, inputs)
    plan = _first_half(_mlp_groups(graph, width))
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is type(model)
    assert getattr(mine.config, MLP_FIELD[name]) == width // 2
    got = assert_equals_zeroed_original(mine, model, graph, plan, inputs)
    with torch.no_grad():
        mine.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(_hidden(loaded(**inputs)), got)
    assert_state_unchanged(model, before)
    assert model.config.to_dict() == config_before


def test_llama_with_fewer_kv_heads_neurons_and_hidden_size_saves_loads_and_generates(tmp_path):
    model, inputs, width = MODELS["llama"]
    graph = fxprune.analyze(model, inputs)
    hidden = [g for g in graph.prunable_groups if g.size == model.config.hidden_size]
    exact = _first_half(_head_groups(graph, 2) + _mlp_groups(graph, width))  # zero-invariant groups
    assert_equals_zeroed_original(fxprune.prune(graph, exact, emit="module"), model, graph, exact, inputs)
    plan = exact | _first_half(hidden)
    mine = fxprune.prune(graph, plan, emit="module")
    config = mine.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 8)
    assert (config.intermediate_size, config.hidden_size) == (32, 16)
    assert mine.model.layers[1].self_attn.num_key_value_groups == 2
    assert model.config.num_key_value_heads == 2  # the caller's config is untouched
    with torch.no_grad():
        # the hidden size sits behind RMS norms (not zero-invariant: no zeroed original
        # to compare with), so with it the reference is the pruned graph
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
    logits = assert_equals_zeroed_original(mine, model, graph, plan, inputs, role="in")
    with torch.no_grad():
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
    assert_equals_zeroed_original(mine, model, graph, _first_half(_head_groups(graph, 2)), inputs)


@pytest.mark.parametrize("name, needle", [("bert", "num_attention_heads=2"), ("gpt2", "c_attn")])
def test_heads_a_config_cannot_express_name_the_field_and_the_way_out(name, needle):
    model, inputs, _ = MODELS[name]
    graph = fxprune.analyze(model, inputs)
    plan = _first_half(_head_groups(graph, 4))
    with pytest.raises(WriteBackError, match="emit='graph'") as info:
        fxprune.prune(graph, plan, emit="module")
    assert needle in str(info.value) and "from_pretrained would fail" in str(info.value)
    # the graph still carries it: it computes the original with those heads zeroed
    assert_equals_zeroed_original(fxprune.prune(graph, plan), model, graph, plan, inputs)


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

    model = unit_scale(torchvision.models.mobilenet_v3_small(weights=None)).eval()  # BatchNorm stats randomized
    x = torch.randn(1, 3, 64, 64)
    before = state_snapshot(model)
    graph = fxprune.analyze(model, x)
    plan = half_plan(graph)
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is type(model)
    convs = [m for m in mine.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups > 1 and c.groups == c.out_channels < 16 for c in convs)  # pruned depthwise
    for c in convs:
        assert (c.out_channels, c.in_channels) == (c.weight.shape[0], c.weight.shape[1] * c.groups)
    for bn in (m for m in mine.modules() if isinstance(m, nn.BatchNorm2d)):
        assert bn.num_features == bn.weight.shape[0] == bn.running_mean.shape[0]
    exact = half_plan(graph, [g for g in graph.prunable_groups if g.zero_invariant])
    assert len(exact) > 5
    with torch.no_grad():
        zeroed = zeroed_copy(model, graph, exact).eval()(x)
        got = fxprune.prune(graph, exact, emit="module")(x)
        assert output_error(model(x), zeroed) > 1e-3
        assert output_error(zeroed, got) < 1e-4
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


def test_a_size_hard_coded_in_python_fails_the_output_check_under_export():
    """Under torch.export the graph's constant is rewritten but the class keeps its literal:
    running the written-back copy fails, and the error names the module that raised (the
    view to 288 still runs on a batch of 2; head.fc then gets 288 features for 144)."""
    graph = fxprune.analyze(Net(), torch.randn(2, 1, 8, 8), capture="export")
    with pytest.raises(WriteBackError, match=r"fails in module 'head.fc' \(Linear\): RuntimeError"):
        fxprune.prune(graph, {0: [0, 1, 2, 3]}, emit="module")


def test_a_wrongly_cut_tensor_is_caught_by_the_output_check(monkeypatch):
    """write_back's own check catches a copy whose values are wrong (here every cut tensor
    is perturbed by 1%)."""
    net = unit_scale(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))).eval()
    graph = fxprune.analyze(net, torch.randn(3, 4))
    cut = writeback.cut_tensor
    monkeypatch.setattr(writeback, "cut_tensor", lambda tensor, cuts: cut(tensor, cuts) * 1.01)
    with pytest.raises(WriteBackError, match="differs from the pruned graph in output 0"):
        fxprune.prune(graph, {graph.prunable_groups[0].id: [0, 1]}, emit="module")


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
