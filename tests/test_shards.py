"""Pruned checkpoints written shard by shard (fxprune.save_pruned).

A tiny random Llama (grouped-query attention, tied embeddings: lm_head is not stored) is
saved in 4 safetensors shards; the analysis runs on a copy built on the meta device from
the checkpoint's config, as it would for an 8B model. The written checkpoint must load
with ``from_pretrained`` without missing or unexpected keys and give the logits of the
model pruned in memory.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import fxprune
from helpers import randomize

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402  (installed with transformers)

CONFIG = dict(vocab_size=100, max_position_embeddings=64, use_cache=False, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)
SHARD_BYTES = 28_000  # 87 kB of float32 weights -> exactly 4 shards
IDS = {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(folder, real model): the model saved in 4 shards, with a tokenizer file beside it."""
    torch.manual_seed(0)
    model = randomize(transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).eval())
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder, max_shard_size=SHARD_BYTES)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    assert len(list(folder.glob("model-*.safetensors"))) == 4
    return folder, model


def meta_graph(folder):
    """The analysis of a model built from the checkpoint's config on the meta device."""
    config = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return fxprune.analyze(model, {"input_ids": IDS["input_ids"].to("meta")}, capture="export")


def groups_by_kind(graph) -> dict[str, list]:
    """Key/value-head groups and MLP-neuron groups, told apart by the weights that produce them."""
    kinds = {"kv": [], "mlp": [], "hidden": []}
    for g in graph.prunable_groups:
        keys = g.slices([0], "out")
        if any(k.endswith("self_attn.k_proj.weight") for k in keys):
            kinds["kv"].append(g)
        elif any(k.endswith("mlp.gate_proj.weight") for k in keys):
            kinds["mlp"].append(g)
        elif "lm_head.weight" in g.slices([0], "all") or "model.embed_tokens.weight" in g.slices([0], "all"):
            kinds["hidden"].append(g)
    return kinds


def half_heads_and_neurons(graph) -> dict[int, list[int]]:
    """Every other kv head (with its query heads) and MLP neuron of every layer, from the first."""
    kinds = groups_by_kind(graph)
    assert len(kinds["kv"]) == len(kinds["mlp"]) == CONFIG["num_hidden_layers"], str(graph)
    return {g.id: list(range(0, g.size, 2)) for g in kinds["kv"] + kinds["mlp"]}


@pytest.fixture
def written(source, tmp_path):
    """The half-heads-and-neurons plan, written from the meta analysis."""
    folder, model = source
    graph = meta_graph(folder)
    plan = half_heads_and_neurons(graph)
    assert fxprune.save_pruned(graph, plan, folder, tmp_path / "pruned") == tmp_path / "pruned"
    return tmp_path / "pruned", plan


def load(folder):
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return loaded.eval()


def test_pruned_shards_load_and_match_the_model_pruned_in_memory(source, written):
    """The in-memory reference is write-back on the real-weights model (emit="module")."""
    folder, model = source
    dest, plan = written
    real = fxprune.analyze(model, IDS, capture="export")
    assert half_heads_and_neurons(real) == plan  # same model, same groups: the plan means the same channels
    mine = fxprune.prune(real, plan, emit="module")
    loaded = load(dest)
    fields = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert fields(loaded.config) == fields(mine.config)
    assert (loaded.config.num_attention_heads, loaded.config.num_key_value_heads) == (2, 1)
    assert loaded.config.intermediate_size == 32
    want = mine.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, want[key]), key
    with torch.no_grad():
        got = loaded(**IDS).logits
        assert torch.equal(got, mine(**IDS).logits)
        assert torch.allclose(got, fxprune.prune(real, plan)(**IDS).logits, atol=1e-5)  # the pruned graph too
        assert not torch.allclose(got, model(**IDS).logits, atol=1e-3)  # and not the unpruned model's


def test_shards_keep_their_names_and_the_index_its_totals(source, written):
    folder, _ = source
    dest, _ = written
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    assert sorted(p.name for p in dest.glob("*.safetensors")) == names
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    sizes, numels = 0, 0
    for name in names:
        with safe_open(dest / name, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for key in f.keys():
                assert index["weight_map"][key] == name
                tensor = f.get_tensor(key)
                sizes, numels = sizes + tensor.nbytes, numels + tensor.numel()
    assert index["metadata"] == {"total_size": sizes, "total_parameters": numels}
    old = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["weight_map"].keys() == old["weight_map"].keys() and "lm_head.weight" not in index["weight_map"]
    assert sizes < old["metadata"]["total_size"]
    for name in ("tokenizer_config.json", "generation_config.json"):
        assert (dest / name).read_bytes() == (folder / name).read_bytes()
    config = json.loads((dest / "config.json").read_text())
    assert (config["num_key_value_heads"], config["intermediate_size"], config["dtype"]) == (1, 32, "float32")


def test_untouched_tensors_are_copied_bit_for_bit(source, written):
    folder, _ = source
    dest, _ = written
    key = "model.layers.0.post_attention_layernorm.weight"
    old_name = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    new_name = json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"][key]
    with safe_open(folder / old_name, framework="pt") as old, safe_open(dest / new_name, framework="pt") as new:
        assert torch.equal(old.get_tensor(key), new.get_tensor(key))


@pytest.mark.parametrize("max_shard_size", [10_000, "1GB"])
def test_shards_can_be_packed_anew(source, tmp_path, max_shard_size):
    folder, model = source
    graph = meta_graph(folder)
    plan = half_heads_and_neurons(graph)
    fxprune.save_pruned(graph, plan, folder, tmp_path / "out", max_shard_size=max_shard_size)
    written = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    if max_shard_size == "1GB":  # one file and no index, as save_pretrained writes it
        assert written == ["model.safetensors"] and not (tmp_path / "out" / "model.safetensors.index.json").exists()
    else:  # 10 kB: more files than the 4 of 28 kB, each under the limit unless one tensor is larger
        assert len(written) > 4
        assert written == [f"model-{i:05d}-of-{len(written):05d}.safetensors" for i in range(1, len(written) + 1)]
        for name in written:
            with safe_open(tmp_path / "out" / name, framework="pt") as f:
                sizes = [f.get_tensor(k).nbytes for k in f.keys()]
            assert sum(sizes) <= max_shard_size or len(sizes) == 1, (name, sizes)
    small = fxprune.prune(fxprune.analyze(model, IDS, capture="export"), plan)
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "out")(**IDS).logits, small(**IDS).logits, atol=1e-5)


def test_a_tied_weight_stored_under_its_other_name_is_cut(source, tmp_path):
    """Pruning the hidden size cuts the embedding, which the exported graph knows as
    lm_head.weight and the checkpoint stores as model.embed_tokens.weight."""
    folder, model = source
    graph = meta_graph(folder)
    (hidden,) = groups_by_kind(graph)["hidden"]
    plan = {hidden.id: list(range(0, 32, 2))}
    fxprune.save_pruned(graph, plan, folder, tmp_path / "out")
    loaded = load(tmp_path / "out")
    assert loaded.model.embed_tokens.weight.shape == (100, 16) and loaded.lm_head.weight.shape == (100, 16)
    small = fxprune.prune(fxprune.analyze(model, IDS, capture="export"), plan)
    with torch.no_grad():
        assert torch.allclose(loaded(**IDS).logits, small(**IDS).logits, atol=1e-5)


def test_bad_folders_are_named_with_the_fix(source, tmp_path):
    folder, _ = source
    graph = meta_graph(folder)
    plan = half_heads_and_neurons(graph)
    with pytest.raises(fxprune.CheckpointError, match="does not exist; pass the folder save_pretrained wrote"):
        fxprune.save_pruned(graph, plan, tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(fxprune.CheckpointError, match="has neither model.safetensors.index.json nor model.safe"):
        fxprune.save_pruned(graph, plan, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(fxprune.CheckpointError, match="is the source checkpoint; write the pruned checkpoint to a new"):
        fxprune.save_pruned(graph, plan, folder, folder)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(fxprune.CheckpointError, match="exists and is not an empty folder; pass a new folder or delete"):
        fxprune.save_pruned(graph, plan, folder, tmp_path / "full")
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_class_names_the_keys(source, tmp_path):
    """LlamaModel's checkpoint says 'layers.0...' where LlamaForCausalLM's says 'model.layers.0...'."""
    folder, model = source
    copy.deepcopy(model.model).save_pretrained(tmp_path / "base")
    graph = meta_graph(folder)
    with pytest.raises(fxprune.CheckpointError) as err:
        fxprune.save_pruned(graph, half_heads_and_neurons(graph), tmp_path / "base", tmp_path / "out")
    message = str(err.value)
    assert "the plan cuts 'model.layers.0.self_attn.q_proj.weight'" in message and "which no shard in" in message
    assert "keys the analysed model does not know ('embed_tokens.weight'" in message
    assert "analyse the class it was saved from" in message
    assert not (tmp_path / "out").exists()


def test_a_graph_of_another_shape_names_the_tensor_and_both_shapes(source, tmp_path):
    folder, _ = source
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**CONFIG, "intermediate_size": 48}))
    other.save_pretrained(tmp_path / "other")
    graph = meta_graph(folder)
    with pytest.raises(fxprune.CheckpointError,
                       match=r"checkpoint tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape "
                             r"\((48, 32|32, 48)\), the analysed model's has \((64, 32|32, 64)\): the graph was built "
                             r"from a different"):
        fxprune.save_pruned(graph, half_heads_and_neurons(graph), tmp_path / "other", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_plan_the_config_cannot_hold_fails_before_any_file_is_written(source, tmp_path):
    """One intermediate_size for all layers: MLPs pruned to different widths cannot load."""
    folder, _ = source
    graph = meta_graph(folder)
    first, second = groups_by_kind(graph)["mlp"]
    with pytest.raises(fxprune.WriteBackError, match="intermediate_size"):
        fxprune.save_pruned(graph, {first.id: range(32), second.id: range(16)}, folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_removed_layer_unit_drops_the_same_keys_as_its_two_branches(source, tmp_path):
    """graph.layers: removing layer 0 as one unit writes what removing its attention and
    MLP branches writes (a pre-norm layer is its two branches)."""
    folder, _ = source
    graph = meta_graph(folder)
    layer0 = next(l for l in graph.layers if l.path == "model.layers.0")
    branches = {b.id: [0] for b in graph.branches if b.modules[0].startswith("model.layers.0.")}
    fxprune.save_pruned(graph, {layer0.id: [0]}, folder, tmp_path / "layer")
    fxprune.save_pruned(graph, branches, folder, tmp_path / "branches")
    for name in ("model.safetensors.index.json", "config.json"):
        assert json.loads((tmp_path / "layer" / name).read_text()) == json.loads((tmp_path / "branches" / name).read_text())
    index = json.loads((tmp_path / "layer" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith("model.layers.1.") for k in index) and "model.layers.0.mlp.up_proj.weight" in index


def test_removed_layers_are_not_written_and_later_keys_renumber(source, tmp_path):
    """Both branches of layer 0 go (the whole layer) and layer 1 loses half its key/value
    heads and MLP neurons: layer 1's tensors are written as layer 0's, the config says one
    layer with layer 1's widths (layer 0's, unpruned, no longer count), and the checkpoint
    loads into what emit="module" gives on the real weights."""
    folder, model = source
    graph = meta_graph(folder)
    layer0 = [b.id for b in graph.branches if b.modules[0].startswith("model.layers.0.")]
    kinds = groups_by_kind(graph)
    assert len(layer0) == 2
    plan = {gid: [0] for gid in layer0} | {g.id: list(range(0, g.size, 2)) for g in (kinds["kv"][1], kinds["mlp"][1])}
    fxprune.save_pruned(graph, plan, folder, tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    old = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == sorted(k for k in old if not k.startswith("model.layers.1."))  # layer 1 is now 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["intermediate_size"]) == (1, 1, 32)
    real = fxprune.analyze(model, IDS, capture="export")
    mine = fxprune.prune(real, plan, emit="module")
    loaded = load(tmp_path / "out")
    want = mine.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, want[key]), key
    assert loaded.model.layers[0].self_attn.layer_idx == 0
    with torch.no_grad():
        got = loaded(**IDS).logits
        assert torch.equal(got, mine(**IDS).logits)
        assert torch.allclose(got, fxprune.prune(real, plan)(**IDS).logits, atol=1e-5)
        assert not torch.allclose(got, model(**IDS).logits, atol=1e-3)
