"""emit="module" sets config widths that a module copies under the field's own name.

RWKV's attention blocks keep ``config.attention_hidden_size`` (the width of key, value and
receptance) as an attribute. Once ``aten.copy_`` had a rule its attention channels became
prunable, and the write-back then failed: no field it knew of could rebuild the narrower
attention. It now sets that field where every layer agrees, and says which field when not.
"""
from __future__ import annotations

import tempfile

import pytest
import torch

import fxprune
from fxprune.errors import WriteBackError

pytest.importorskip("transformers")
from hf_zoo import make_model  # noqa: E402


def _attention_groups(graph):
    return [g for g in graph.prunable_groups
            if any(k.endswith("attention.key.weight") for k in g.slices([0], role="out"))]


@pytest.fixture(scope="module")
def rwkv():
    model, inputs = make_model("rwkv")
    return model, inputs, fxprune.analyze(model, inputs)


def test_attention_hidden_size_follows_the_plan(rwkv):
    model, inputs, graph = rwkv
    groups = _attention_groups(graph)
    assert len(groups) == model.config.num_hidden_layers  # one per block, each its own width
    old = model.config.attention_hidden_size
    plan = {g.id: list(range(0, g.size, 2)) for g in groups}
    mine = fxprune.prune(graph, plan, emit="module")
    assert mine.config.attention_hidden_size == old // 2 and model.config.attention_hidden_size == old
    assert all(b.attention.attention_hidden_size == old // 2 and b.attention.time_decay.shape == (old // 2,)
               for b in mine.rwkv.blocks)
    with tempfile.TemporaryDirectory() as d:  # the config alone rebuilds the pruned shapes
        mine.save_pretrained(d)
        back = type(mine).from_pretrained(d).eval()
    small = fxprune.prune(graph, plan)
    with torch.no_grad():
        want = small(**inputs).logits
        assert torch.allclose(mine(**inputs).logits, want, atol=1e-5)
        assert torch.allclose(back(**inputs).logits, want, atol=1e-5)


def test_attention_widths_that_differ_by_layer_name_the_field(rwkv):
    _, _, graph = rwkv
    first, *rest = _attention_groups(graph)
    with pytest.raises(WriteBackError, match="config.attention_hidden_size holds one value for every layer"):
        fxprune.prune(graph, {first.id: list(range(first.size // 2))}, emit="module")
