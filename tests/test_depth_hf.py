"""Whole layers leave your own class (emit="module"): Hugging Face decoders and layer lists.

A Hugging Face decoder layer is two residual branches (attention, MLP); with both removed
the layer is the identity, so the written-back copy deletes it from its ``nn.ModuleList``,
renumbers the later attention modules' ``layer_idx`` (the KV cache is indexed by it) and
sets ``num_hidden_layers`` and the per-layer ``layer_types``. The copy must compute what the
pruned graph computes (and not what the original does), ``generate()`` with its cache must
give the tokens of cacheless greedy decoding, and save_pretrained / from_pretrained must
round-trip. Weights are unit scale (helpers.unit_scale) so that every layer matters.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.errors import WriteBackError
from fxprune.passes.verify import output_error
from helpers import assert_generate_matches_greedy_decoding, assert_state_unchanged, state_snapshot, unit_scale

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
LAYERS = 4
# Qwen2 with a sliding window on two layers: the kept layers' types must follow them
QWEN_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def _decoder(name: str) -> torch.nn.Module:
    small = dict(vocab_size=100, max_position_embeddings=64, use_cache=False, hidden_size=32, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**small))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **small, use_sliding_window=True, sliding_window=4, layer_types=QWEN_TYPES))
    return unit_scale(model).eval()


def _layer_of(branch) -> int:
    """The decoder layer a branch lives in, from the modules it removes."""
    return int(branch.modules[0].split("layers.")[1].split(".")[0])


def _every_other_layer(graph, first: int = 1) -> dict[int, list[int]]:
    """Both branches (attention and MLP) of layers first, first + 2, ..."""
    plan = {b.id: [0] for b in graph.branches if _layer_of(b) % 2 == first % 2}
    assert len(plan) == LAYERS, [b.modules[:1] for b in graph.branches]
    return plan


@pytest.fixture(scope="module")
def analysed():
    """name -> (model, its analysis, state before): one export per family for the file."""
    found = {}

    def get(name):
        if name not in found:
            model = _decoder(name)
            found[name] = (model, fxprune.analyze(model, {"input_ids": IDS}), state_snapshot(model))
        return found[name]
    return get


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_decoder_loses_every_other_layer_and_keeps_its_class(name, analysed, tmp_path):
    model, graph, before = analysed(name)
    plan = _every_other_layer(graph)
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is type(model) and len(mine.model.layers) == 2 and len(model.model.layers) == LAYERS
    assert [layer.self_attn.layer_idx for layer in mine.model.layers] == [0, 1]  # were 0 and 2
    assert mine.config.num_hidden_layers == 2 and model.config.num_hidden_layers == LAYERS
    if name == "qwen2":
        assert mine.config.layer_types == ["full_attention", "sliding_attention"]  # layers 0 and 2
        assert model.config.layer_types == QWEN_TYPES
    want = [k.replace(".layers.2.", ".layers.1.") for k in model.state_dict()
            if ".layers.1." not in k and ".layers.3." not in k]
    assert list(mine.state_dict()) == want
    for key, tensor in mine.model.layers[1].state_dict().items():  # original layer 2, tensor for tensor
        assert torch.equal(tensor, model.model.layers[2].state_dict()[key]), key
    with torch.no_grad():
        logits = mine(input_ids=IDS).logits
        torch.testing.assert_close(logits, fxprune.prune(graph, plan)(input_ids=IDS)["logits"], rtol=1e-5, atol=1e-5)
        assert output_error(model(input_ids=IDS).logits, logits) > 1e-2  # the layers mattered
        mine.save_pretrained(tmp_path)
        loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert loaded.config.num_hidden_layers == 2 and [l.self_attn.layer_idx for l in loaded.model.layers] == [0, 1]
        torch.testing.assert_close(loaded.eval()(input_ids=IDS).logits, logits)
    assert_generate_matches_greedy_decoding(mine, IDS[:1, :5], 6)
    assert_state_unchanged(model, before)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_other_layouts_lose_layers_too(name):
    """GPT-2 counts its layers in n_layer (the config's attribute_map); a T5 block is a list
    of two sublayers, each adding its own branch: the block, which holds both, goes."""
    torch.manual_seed(0)
    if name == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=100, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64, use_cache=False, bos_token_id=0,
            eos_token_id=0))
    else:
        model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64,
                                                                  num_layers=LAYERS, num_heads=4))
    model = unit_scale(model).eval()
    graph = fxprune.analyze(model, {"input_ids": IDS})
    # transformer.h.1..., encoder.block.1...: layers 1 and 3
    plan = {b.id: [0] for b in graph.branches if int(b.modules[0].split(".")[2]) % 2}
    assert len(plan) == LAYERS
    mine = fxprune.prune(graph, plan, emit="module")
    layers = mine.transformer.h if name == "gpt2" else mine.encoder.block
    assert type(mine) is type(model) and len(layers) == 2 and mine.config.num_hidden_layers == 2
    key = "logits" if name == "gpt2" else "last_hidden_state"
    with torch.no_grad():
        got = mine(input_ids=IDS)[key]
        torch.testing.assert_close(got, fxprune.prune(graph, plan)(input_ids=IDS)[key], rtol=1e-5, atol=1e-5)
        assert output_error(model(input_ids=IDS)[key], got) > 1e-2
    if name == "gpt2":
        assert [block.attn.layer_idx for block in layers] == [0, 1]
        assert_generate_matches_greedy_decoding(mine, IDS[:1, :5], 4)


def test_compress_removes_the_negligible_layers_and_keeps_the_class():
    """Layers 1 and 3 write almost nothing into the stream: ranked by their output norm,
    their four branches are the half of the eight that ratio 0.5 removes."""
    model = _decoder("llama")
    with torch.no_grad():
        for i in (1, 3):
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-3)
    result = fxprune.compress(model, {"example_inputs": {"input_ids": IDS}, "units": "branches", "ratio": 0.5})
    removed = sorted({_layer_of(fxprune.unit(result.graph, gid)) for gid in result.plan})
    assert removed == [1, 3] and len(result.plan) == 4, result.plan
    mine = result.model
    assert type(mine) is type(model) and mine.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in mine.model.layers] == [0, 1]
    assert_generate_matches_greedy_decoding(mine, IDS[:1, :5], 4)


def test_attention_removed_without_its_mlp_names_the_layer_and_the_way_out(analysed):
    _, graph, _ = analysed("llama")
    attention = next(b for b in graph.branches if _layer_of(b) == 1 and any("self_attn" in m for m in b.modules))
    plan = {attention.id: [0]}
    with pytest.raises(WriteBackError, match=r"module 'model.layers.1' \(LlamaDecoderLayer\) keeps branch .*mlp"
                                             r".*no config field can skip one.*emit='graph'"):
        fxprune.prune(graph, plan, emit="module")
    with torch.no_grad():  # the graph carries it
        assert fxprune.prune(graph, plan)(input_ids=IDS)["logits"].shape == (2, 8, 100)


def test_post_norm_bert_layer_keeps_its_norms_so_the_class_cannot_drop_it():
    """BERT normalises after each add: with both branches of a layer removed, the graph
    still computes LayerNorm(LayerNorm(x)), which no BertLayer-less copy computes."""
    config = transformers.BertConfig(vocab_size=100, max_position_embeddings=64, hidden_size=32,
                                     num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = unit_scale(transformers.BertModel(config)).eval()
    graph = fxprune.analyze(model, {"input_ids": IDS})
    plan = {b.id: [0] for b in graph.branches if ".layer.1." in b.modules[0] or ".layer.3." in b.modules[0]}
    assert len(plan) == 4
    with pytest.raises(WriteBackError, match=r"module 'encoder.layer.1.attention.output' \(BertSelfOutput\) computes "
                                             r"more .*node 'layer_norm.*post-norm.*emit='graph'"):
        fxprune.prune(graph, plan, emit="module")
    result = fxprune.compress(model, {"example_inputs": {"input_ids": IDS}, "units": "branches", "ratio": 0.5})
    assert isinstance(result.model, torch.fx.GraphModule) and any("post-norm" in n for n in result.notes)


# --- nn.ModuleList blocks of your own classes ---------------------------------------------

class Block(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Stack(nn.Module):
    def __init__(self, order=None):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.head = nn.Linear(8, 3)
        self.order = order

    def forward(self, x):
        for i in self.order or range(len(self.blocks)):
            x = self.blocks[i](x)
        return self.head(x)


X = torch.randn(3, 8)


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_module_list_loses_the_entries_of_removed_blocks(capture):
    model = unit_scale(Stack()).eval()
    graph = fxprune.analyze(model, X, capture=capture)
    plan = {graph.branches[0].id: [0], graph.branches[2].id: [0]}
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is Stack and len(mine.blocks) == 2 and len(model.blocks) == 4
    assert torch.equal(mine.blocks[0].fc1.weight, model.blocks[1].fc1.weight)
    assert torch.equal(mine.blocks[1].fc1.weight, model.blocks[3].fc1.weight)
    with torch.no_grad():
        torch.testing.assert_close(mine(X), fxprune.prune(graph, plan)(X))
        assert output_error(model(X), mine(X)) > 1e-2


def test_module_list_run_out_of_order_is_not_shortened():
    model = unit_scale(Stack(order=[3, 2, 1, 0])).eval()
    graph = fxprune.analyze(model, X, capture="fx")
    with pytest.raises(WriteBackError, match=r"nn.ModuleList 'blocks' is not run entry after entry in list order "
                                             r"\(the graph runs its entries as \[3, 2, 1, 0\] of 4\).*emit='graph'"):
        fxprune.prune(graph, {graph.branches[0].id: [0]}, emit="module")
