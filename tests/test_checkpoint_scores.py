"""Activation scores of a model larger than memory: a tiny Llama analysed on the meta device
and scored layer by layer from its safetensors checkpoint equals the model scored in memory,
and the plan from them prunes the checkpoint as it prunes the model."""

import copy
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import fxprune
from fxprune.capture.inputs import ExampleInputs
from fxprune.checkpoint_scores import CheckpointTensors
from fxprune.select.activations import input_norms
from fxprune.select.layerwise import layerwise_activation_stats
from fxprune.select.plan import select
from fxprune.select.score import score_groups
from helpers import unit_scale

IDS = (2, 8)


def tiny_llama(dtype: torch.dtype, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, use_cache=False, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return unit_scale(LlamaForCausalLM(config)).to(dtype).eval()


def batches(count: int) -> list[dict]:
    out = []
    for i in range(count):
        generator = torch.Generator().manual_seed(i)
        mask = torch.ones(IDS, dtype=torch.long)
        mask[1, -2:] = 0  # right padding: left out of the statistics on both paths
        out.append({"input_ids": torch.randint(0, 100, IDS, generator=generator), "attention_mask": mask})
    return out


def on_meta(folder, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=dtype).eval()
    return fxprune.analyze(model, {k: v.to("meta") for k, v in batches(1)[0].items()}, capture="export")


@pytest.mark.parametrize("dtype, tie", [(torch.float32, False), (torch.bfloat16, True)])
def test_checkpoint_scores_equal_in_memory_scores_and_prune_the_checkpoint_alike(tmp_path, monkeypatch, dtype, tie):
    from transformers import LlamaForCausalLM

    source, dest = tmp_path / "source", tmp_path / "pruned"
    tiny_llama(dtype, tie).save_pretrained(source, max_shard_size="20KB")  # several shards: weights come from each
    assert len(list(source.glob("*.safetensors"))) > 2
    model = LlamaForCausalLM.from_pretrained(source, dtype=dtype).eval()  # the model loaded whole
    in_memory = fxprune.analyze(model, batches(1)[0], capture="export")
    expected = score_groups(in_memory, "activation", calibration=batches(3))

    graph = on_meta(source, dtype)
    assert all(p.device.type == "meta" for p in graph.gm.parameters())
    whole = []  # tensors read whole: the vocabulary matrices are read by rows only
    read = CheckpointTensors.__getitem__
    monkeypatch.setattr(CheckpointTensors, "__getitem__", lambda self, key: whole.append(key) or read(self, key))
    scores = fxprune.score_checkpoint(graph, source, batches(3))
    assert "model.layers.1.mlp.down_proj.weight" in whole
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(whole)
    assert scores.keys() == expected.keys() and len(scores) >= 5  # hidden, kv heads and MLP groups
    for gid in expected:
        np.testing.assert_array_equal(scores[gid], expected[gid])  # the same float operations
    assert all(np.ptp(s) > 0 for s in scores.values())  # real rankings, not constants

    plan = select(graph, scores, fxprune.Spec(example_inputs=batches(1)[0], ratio=0.5, round_to=1))
    assert plan == select(in_memory, expected, fxprune.Spec(example_inputs=batches(1)[0], ratio=0.5, round_to=1))
    fxprune.save_pruned(graph, plan, source, dest)
    pruned = {k: v for f in sorted(dest.glob("*.safetensors")) for k, v in load_file(f).items()}
    small = fxprune.prune(in_memory, plan, emit="module").state_dict()
    assert pruned.keys() <= small.keys() and len(pruned) > 10
    for key, tensor in pruned.items():
        assert torch.equal(tensor, small[key]), key


def test_layerwise_reads_each_weight_once_and_frees_it():
    """One weight resident at a time: each is read when first used and dropped after its
    last user (a model held whole would have them all)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    reads, alive, resident = [], [], []

    def load(key):
        resident.append(sum(ref() is not None for ref in alive))  # weights still held when this one is read
        reads.append(key)
        tensor = weights[key].clone()
        alive.append(weakref.ref(tensor))
        return tensor

    gm = torch.fx.symbolic_trace(copy.deepcopy(model).to("meta"))
    xs = [ExampleInputs((torch.randn(5, 8),)) for _ in range(2)]
    norms, columns = layerwise_activation_stats(gm, xs, load)
    assert sorted(reads) == sorted(weights)  # every weight read exactly once
    assert max(resident) == 1  # a layer's bias is read while its weight is held, nothing more
    assert not any(ref() is not None for ref in alive)  # and none is kept
    expected = input_norms(torch.fx.symbolic_trace(model), xs)
    assert norms.keys() == expected.keys()
    for slot in expected:
        np.testing.assert_array_equal(norms[slot], expected[slot])


def test_score_checkpoint_refuses_scores_it_cannot_compute(tmp_path):
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    save_file(net.state_dict(), tmp_path / "model.safetensors")
    graph = fxprune.analyze(net, torch.randn(2, 4))
    with pytest.raises(fxprune.SpecError, match="score='taylor' is not computed from a checkpoint; use 'activation'"):
        fxprune.score_checkpoint(graph, tmp_path, [torch.randn(2, 4)], score="taylor")
    with pytest.raises(fxprune.SpecError, match="needs calibration batches"):
        fxprune.score_checkpoint(graph, tmp_path, None)


def test_a_tensor_in_neither_the_checkpoint_nor_the_model_is_named(tmp_path):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)

        def forward(self, x):
            return self.fc(x) * self.scale

    save_file(Scaled().state_dict(), tmp_path / "model.safetensors")
    with torch.device("meta"):
        meta = Scaled()
    graph = fxprune.analyze(meta, torch.randn(2, 4, device="meta"), capture="export")
    with pytest.raises(fxprune.CheckpointError, match="'scale' is neither in the checkpoint .* build that module "
                                                      "with real values"):
        CheckpointTensors(graph, tmp_path)["scale"]
    with pytest.raises(fxprune.CheckpointError, match="has shape"):
        save_file({"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}, tmp_path / "model.safetensors")
        CheckpointTensors(graph, tmp_path)
