"""attention_units="query_slots": under grouped-query attention a unit is slot j, the j-th
query head of every key/value group; key/value heads stay, so the pruned model has the
same key/value heads and fewer query heads per key/value head.

A slot is not zero-invariant (zeroed query rows still attend, uniformly, to the shared
values), so the producer oracle cannot apply; removing a slot equals zeroing its columns
of the output projection, its only consumer, and that is what these tests check.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.passes.verify import output_error, zeroed_copy
from helpers import half_plan, unit_scale

transformers = pytest.importorskip("transformers")
from hf_models import tiny_models  # noqa: E402

MODELS = tiny_models()
HEAD_DIM, TOKENS, WIDTH = 4, 6, 16


class GqaBlock(nn.Module):
    """Grouped-query attention as users write it: ``repeat_kv`` (expand + reshape, as Hugging
    Face does) or SDPA's ``enable_gqa``."""

    def __init__(self, heads: int, kv_heads: int, form: str):
        super().__init__()
        self.heads, self.kv_heads, self.form = heads, kv_heads, form
        self.q_proj = nn.Linear(WIDTH, heads * HEAD_DIM)
        self.k_proj = nn.Linear(WIDTH, kv_heads * HEAD_DIM)
        self.v_proj = nn.Linear(WIDTH, kv_heads * HEAD_DIM)
        self.o_proj = nn.Linear(heads * HEAD_DIM, WIDTH)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, -1, HEAD_DIM).transpose(1, 2)
        k = self.k_proj(x).view(b, n, -1, HEAD_DIM).transpose(1, 2)
        v = self.v_proj(x).view(b, n, -1, HEAD_DIM).transpose(1, 2)
        r = self.heads // self.kv_heads
        if self.form == "repeat_kv":
            k = k[:, :, None].expand(b, self.kv_heads, r, n, HEAD_DIM).reshape(b, self.heads, n, HEAD_DIM)
            v = v[:, :, None].expand(b, self.kv_heads, r, n, HEAD_DIM).reshape(b, self.heads, n, HEAD_DIM)
        out = F.scaled_dot_product_attention(q, k, v, scale=0.5, enable_gqa=self.form == "enable_gqa")
        return x + self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


def _key(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def slot_groups(graph, query_key: str):
    return [g for g in graph.prunable_groups if query_key in g.slices([0], "out")]


def consumer_zeroing_error(model, graph, plan, small) -> float:
    """Removing query slots must equal zeroing their output-projection columns (the ``"in"``
    slices: a slot's only consumer), in a copy of the original."""
    ref = copy.deepcopy(model)
    tensors = dict(ref.named_parameters())
    with torch.no_grad():
        for gid, units in plan.items():
            for key, cuts in graph.group(gid).slices(units, "in").items():
                for dim, index in cuts:
                    tensors[key].index_fill_(dim, torch.as_tensor(index), 0)
        inputs = graph.example_inputs
        return output_error(inputs.call(ref.eval()), inputs.call(small))


def check_query_slots(model, graph, layers: dict[str, tuple[int, int, int]]) -> torch.nn.Module:
    """``layers``: {attention module path: (query heads, key/value heads, head_dim)}.
    Every layer has one slot group of size r whose unit is kv x head_dim query rows; the
    consumer oracle holds on half of them; removing one slot per layer leaves (r - 1) / r of
    q_proj's rows (half for r = 2) and all of k_proj / v_proj. Returns the pruned graph."""
    params = dict(model.named_parameters())
    plan = {}
    for path, (heads, kv_heads, head_dim) in layers.items():
        query = _key(path, "q_proj.weight")
        (group,) = slot_groups(graph, query)
        assert group.size == heads // kv_heads
        assert [len(rows) for _, rows in group.slices([0], "out")[query]] == [kv_heads * head_dim]
        assert not group.zero_invariant and "query_slots" in group.zero_invariance_reason
        assert set(group.slices([0], "in")) == {_key(path, "o_proj.weight")}
        for proj in ("k_proj", "v_proj"):  # key/value heads are frozen, the option named
            (kv,) = [g for g in graph.groups if _key(path, f"{proj}.weight") in g.slices([0], "out")]
            assert not kv.prunable and "attention_units='query_slots' keeps key/value heads" in kv.reason
        plan[group.id] = [group.size - 1]
    halves = half_plan(graph, [graph.group(gid) for gid in plan])
    assert halves and consumer_zeroing_error(model, graph, halves, fxprune.prune(graph, halves)) < 1e-4
    # the producer oracle does not apply: zeroed query rows still attend to the values
    with pytest.raises(fxprune.PlanError, match="not zero-invariant"):
        fxprune.check_zero_invariance(model, graph, halves)
    small = fxprune.prune(graph, plan)
    inputs = graph.example_inputs
    with torch.no_grad():
        assert output_error(inputs.call(model), inputs.call(small)) > 1e-3  # pruning changed the function...
        unpruned = inputs.call(zeroed_copy(model, graph, plan).eval())
        assert output_error(unpruned, inputs.call(small)) > 1e-3  # ...and is not zeroing the query rows
    for path, (heads, kv_heads, head_dim) in layers.items():
        q, k, v = (small.get_submodule(_key(path, p)).weight for p in ("q_proj", "k_proj", "v_proj"))
        r = heads // kv_heads
        rows = params[_key(path, "q_proj.weight")].shape[0]
        assert q.shape[0] == (r - 1) * kv_heads * head_dim == rows * (r - 1) // r
        for proj, kept in (("k_proj", k), ("v_proj", v)):
            assert kept.shape == params[_key(path, f"{proj}.weight")].shape
        assert small.get_submodule(_key(path, "o_proj")).weight.shape[1] == q.shape[0]
    return small


@pytest.mark.parametrize("form", ["repeat_kv", "enable_gqa"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 2)])
def test_hand_written_gqa_under_fx(form, heads, kv_heads):
    model = unit_scale(GqaBlock(heads, kv_heads, form)).eval()
    x = torch.randn(2, TOKENS, WIDTH)
    graph = fxprune.analyze(model, x, capture="fx", attention_units="query_slots")
    assert graph.capture == "fx"
    small = check_query_slots(model, graph, {"": (heads, kv_heads, HEAD_DIM)})
    assert small(x).shape == x.shape


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hugging_face_gqa_through_export(name):
    model, inputs, _ = MODELS[name]  # 4 query heads, 2 key/value heads, head_dim 8
    graph = fxprune.analyze(model, inputs, attention_units="query_slots")
    assert graph.capture == "export"
    small = check_query_slots(model, graph, {f"model.layers.{i}.self_attn": (4, 2, 8) for i in range(2)})
    with torch.no_grad():
        assert small(**inputs)["logits"].shape == model(**inputs).logits.shape


def test_without_gqa_query_slots_are_heads():
    model, inputs, _ = MODELS["bert"]
    sizes = {units: sorted(g.size for g in fxprune.analyze(model, inputs, attention_units=units).prunable_groups)
             for units in ("heads", "query_slots")}
    assert sizes["heads"] == sizes["query_slots"] and 4 in sizes["heads"]
    block = unit_scale(GqaBlock(4, 4, "repeat_kv")).eval()
    x = torch.randn(2, TOKENS, WIDTH)
    graph = fxprune.analyze(block, x, attention_units="query_slots")
    (group,) = slot_groups(graph, "q_proj.weight")
    assert group.size == 4 and group.zero_invariant  # one unit is a whole head, as under "heads"
    assert fxprune.check_zero_invariance(block, graph, {group.id: [0, 2]}) < 1e-4


def test_compress_takes_attention_units_from_the_spec():
    model, inputs, _ = tiny_models()["llama"]
    spec = {"example_inputs": inputs, "ratio": 0.5, "round_to": 1, "attention_units": "query_slots"}
    config = fxprune.compress(model, spec).model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 2)
    with pytest.raises(fxprune.SpecError, match="spec.attention_units"):
        fxprune.Spec(input_shape=[1, 4], ratio=0.5, attention_units="slots")
