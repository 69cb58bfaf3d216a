"""benchmarks/minilm_depth.py's own parts on a tiny random BERT (no weights package needed): plans
are described by what they remove (whole layers, attention and MLP sublayers, thinned groups),
SLEB alone reads fewer calibration batches, and the best row of each kind is the one distilled."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import minilm  # noqa: E402
import minilm_depth  # noqa: E402

import fxprune  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    encoder = minilm.SentenceEncoder(transformers.BertModel(config)).eval()
    inputs = {"input_ids": torch.randint(1, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    return encoder, inputs, fxprune.analyze(encoder, inputs, capture="export")


def test_layer_pairs_are_each_layers_attention_and_mlp(tiny):
    _, _, graph = tiny
    pairs = minilm_depth.layer_pairs(graph)
    assert sorted(pairs) == [0, 1, 2, 3] and all(len(ids) == 2 for ids in pairs.values())
    for layer, ids in pairs.items():
        modules = sorted(m for b in graph.branches if b.id in ids for m in b.modules)
        assert any(".attention." in m for m in modules) and any(".intermediate." in m for m in modules)
        assert all(minilm_depth.layer_of(m) == layer for m in modules)


def test_describe_names_whole_layers_and_sublayer_pairs(tiny):
    encoder, inputs, graph = tiny
    assert len(graph.layers) == 4
    plan = {graph.layers[1].id: [0], graph.layers[3].id: [0]}
    assert minilm_depth.describe(graph, plan) == "2 layers"
    pairs = minilm_depth.layer_pairs(graph)
    both = {b: [0] for b in pairs[2]}
    assert minilm_depth.describe(graph, both) == "1 attn + 1 MLP (1 whole layers)"
    small = fxprune.prune(graph, plan)  # the layers leave: their parameters go, the output keeps its shape
    per_layer = sum(p.numel() for n, p in encoder.named_parameters() if n.startswith("bert.encoder.layer.0."))
    assert minilm.encoder_params(small) == minilm.encoder_params(encoder) - 2 * per_layer
    assert small(**inputs)[0].shape == (4, 32)


def test_describe_counts_sublayers_and_thinned_groups(tiny):
    _, _, graph = tiny
    attention = next(b for b in graph.branches if ".attention." in b.modules[0])
    mlps = [b for b in graph.branches if ".attention." not in b.modules[0]][:2]
    plan = {attention.id: [0], mlps[0].id: [0], mlps[1].id: [0], 0: [0]}
    text = minilm_depth.describe(graph, plan)
    whole = 1 if minilm_depth.layer_of(attention.modules[0]) in {minilm_depth.layer_of(b.modules[0]) for b in mlps} \
        else 0
    assert text.startswith("1 attn + 2 MLP") and text.endswith("1 groups thinned")
    assert ("(1 whole layers)" in text) == bool(whole)
    assert minilm_depth.describe(graph, {}) == "nothing"


def test_best_rows_takes_the_highest_spearman_of_each_kind_and_budget():
    rows = [{"budget": 1.0, "kind": "dense", "spearman": 1.0},
            {"budget": 0.5, "kind": "sublayers", "spearman": 0.4},
            {"budget": 0.5, "kind": "sublayers", "spearman": 0.6},
            {"budget": 0.5, "kind": "sublayers", "error": "boom"},
            {"budget": 0.75, "kind": "sublayers", "spearman": 0.3},
            {"budget": 0.5, "kind": "width", "spearman": 0.9}]
    assert minilm_depth.best_rows(rows) == {(0.5, "sublayers"): 2, (0.75, "sublayers"): 4, (0.5, "width"): 5}


def test_only_sleb_reads_fewer_calibration_batches_and_every_kind_has_jobs():
    calib = list(range(7))
    assert minilm_depth.calibration_for("calibration_loss", calib) == calib[:minilm_depth.SLEB_BATCHES]
    assert minilm_depth.calibration_for("output_norm", calib) == calib
    jobs = minilm_depth.plan_jobs(quick=False)
    assert {kind for _, kind, _ in jobs} == set(minilm_depth.KINDS)
    assert {s for _, kind, s in jobs if kind == "sublayers"} == set(minilm_depth.BRANCH_SCORES)
    assert {b for b, _, _ in jobs} == set(minilm_depth.BUDGETS)
