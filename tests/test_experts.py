"""Experts as units (issue 21): found from router -> top-k -> experts, removed by cutting
router rows and expert weights; the oracle is the original with the removed experts'
router logits forced to -inf."""
from __future__ import annotations

import tempfile

import pytest
import torch
from torch import nn

import fxprune
from fxprune.errors import PlanError, VerificationError, WriteBackError
from fxprune.passes.check_values import output_error
from fxprune.passes.verify import check_zero_invariance
from helpers import unit_scale


class Expert(nn.Module):
    def __init__(self, d: int, h: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class LoopMoE(nn.Module):
    """A hand-written top-k mixture: router, softmax, top-k, a loop over its experts."""

    def __init__(self, d: int = 8, h: int = 12, experts: int = 4, k: int = 2):
        super().__init__()
        self.inp, self.router, self.head = nn.Linear(d, d), nn.Linear(d, experts), nn.Linear(d, 3)
        self.experts = nn.ModuleList(Expert(d, h) for _ in range(experts))
        self.k = k

    def forward(self, x):
        x = self.inp(x)
        weights, chosen = self.router(x).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (weights * (chosen == e)).sum(-1, keepdim=True) * expert(x)
        return self.head(x + out)


def mixtral(layers: int = 2, experts: int = 4):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=experts,
                           num_experts_per_tok=2, use_cache=False, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    return unit_scale(MixtralForCausalLM(config)).eval(), {"input_ids": ids}


@pytest.fixture(scope="module")
def loop_moe():
    torch.manual_seed(0)
    model = unit_scale(LoopMoE()).eval()
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    return model, x, fxprune.analyze(model, x, capture="fx")


@pytest.fixture(scope="module")
def tiny_mixtral():
    model, inputs = mixtral()
    return model, inputs, fxprune.analyze(model, inputs, capture="export")



def assert_generates_and_round_trips(mine, ids: torch.Tensor, new_tokens: int) -> None:
    """The emitted Mixtral generates, and save_pretrained / from_pretrained keep its logits."""
    assert mine.generate(ids, max_new_tokens=new_tokens, do_sample=False).shape == (ids.shape[0],
                                                                                  ids.shape[1] + new_tokens)
    with tempfile.TemporaryDirectory() as d:
        mine.save_pretrained(d)
        back = type(mine).from_pretrained(d).eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, mine(ids).logits)

def test_loop_moe_experts_removed_equal_router_masking(loop_moe):
    model, x, graph = loop_moe
    [experts] = graph.experts
    assert (experts.size, experts.top_k, experts.router) == (4, 2, "router")
    plan = {experts.id: [0, 2]}
    small = fxprune.prune(graph, plan)
    assert small.meta["fxprune.value_check"]["error"] < 1e-5
    assert check_zero_invariance(model, graph, plan, small) < 1e-5
    assert not any(k.startswith(("experts.0.", "experts.2.")) for k in small.state_dict())
    assert small.router.weight.shape == (2, 8)
    # the oracle can fail: without the masking the outputs differ
    with torch.no_grad():
        assert output_error(model(x), small(x)) > 1e-2


def test_loop_moe_neurons_inside_experts_with_experts(loop_moe):
    model, x, graph = loop_moe
    neurons = [g for g in graph.prunable_groups if g.size == 12]
    assert len(neurons) == 4  # one group per expert: their widths are independent
    plan = {graph.experts[0].id: [3], **{g.id: list(range(6)) for g in neurons}}
    small = fxprune.prune(graph, plan)
    assert check_zero_invariance(model, graph, plan, small) < 1e-5
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters()) * 0.7


def test_top_k_bounds_the_experts_removed(loop_moe):
    _, _, graph = loop_moe
    with pytest.raises(PlanError, match="top_k=2.*leaves 1.*at most 2"):
        fxprune.prune(graph, {graph.experts[0].id: [0, 1, 3]})
    with pytest.raises(PlanError, match="out of range"):
        fxprune.prune(graph, {graph.experts[0].id: [7]})


def test_mixtral_experts_and_expert_neurons_under_export(tiny_mixtral):
    model, inputs, graph = tiny_mixtral
    assert [(s.size, len(s.stacked)) for s in graph.experts] == [(4, 2), (4, 2)]
    neurons = [g for g in graph.prunable_groups if g.size == 24]
    assert len(neurons) == 2  # neuron j of every expert of a layer: the stacked weights share it
    assert any(k.endswith("experts.gate_up_proj") for k in neurons[0].slices([0], "out"))
    plan = {graph.experts[0].id: [1, 3], graph.experts[1].id: [0], **{g.id: list(range(12)) for g in neurons}}
    small = fxprune.prune(graph, plan)
    assert small.meta["fxprune.value_check"]["error"] < 1e-5
    assert check_zero_invariance(model, graph, plan, small) < 1e-5
    shapes = {k: tuple(v.shape) for k, v in small.state_dict().items()}
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"] == (2, 24, 16)
    assert shapes["model.layers.1.mlp.experts.down_proj"] == (3, 16, 12)
    assert shapes["model.layers.1.mlp.gate.weight"] == (3, 16)


def test_value_check_catches_a_wrong_expert_cut(tiny_mixtral, monkeypatch):
    _, _, graph = tiny_mixtral
    from fxprune.channels import experts as ex

    # a masking of the wrong expert is what a wrong cut would be checked against
    real = ex.ExpertSet.router_mask
    monkeypatch.setattr(ex.ExpertSet, "router_mask", lambda self, units, **kw: real(self, [u ^ 1 for u in units], **kw))
    with pytest.raises(VerificationError):
        fxprune.prune(graph, {graph.experts[0].id: [0]})


def test_mixtral_done_when_half_experts_half_neurons_module(tiny_mixtral):
    from transformers import MixtralForCausalLM

    model, inputs, graph = tiny_mixtral
    plan = {s.id: [0, 3] for s in graph.experts}
    plan |= {g.id: list(range(0, 24, 2)) for g in graph.prunable_groups if g.size == 24}
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is MixtralForCausalLM and model.config.num_local_experts == 4
    assert (mine.config.num_local_experts, mine.config.intermediate_size) == (2, 12)
    assert mine.model.layers[0].mlp.experts.num_experts == mine.model.layers[0].mlp.gate.num_experts == 2
    assert check_zero_invariance(model, graph, plan, mine) < 1e-5
    assert_generates_and_round_trips(mine, inputs["input_ids"], new_tokens=3)


def test_uneven_expert_counts_cannot_be_written_to_one_config(tiny_mixtral):
    _, _, graph = tiny_mixtral
    with pytest.raises(WriteBackError, match="num_local_experts.*\\[2, 3\\]"):
        fxprune.prune(graph, {graph.experts[0].id: [0, 1], graph.experts[1].id: [2]}, emit="module")


def test_expert_scores(loop_moe):
    from fxprune.select.expert_score import score_experts

    model, x, graph = loop_moe
    sid = graph.experts[0].id
    with torch.no_grad():
        h = model.inp(x)
        weights, chosen = model.router(h).softmax(-1).topk(2, dim=-1)
        share = torch.bincount(chosen.flatten(), minlength=4).double() / chosen.numel()
        reap = []
        for e, expert in enumerate(model.experts):
            gate = (weights * (chosen == e)).sum(-1)
            routed = gate > 0
            reap.append(float((gate[routed, None] * expert(h[routed])).norm(dim=-1).sum() / routed.sum()))
    assert torch.allclose(torch.as_tensor(score_experts(graph, "frequency")[sid]), share)
    assert torch.allclose(torch.as_tensor(score_experts(graph, "reap")[sid]), torch.tensor(reap, dtype=torch.double))
    loss = score_experts(graph, "loss")[sid]
    unused = int(share.argmin())
    assert (loss > 0).all() if share.min() > 0 else loss[unused] == 0


def test_mixtral_reap_and_frequency_agree_with_the_routing(tiny_mixtral):
    from fxprune.select.expert_score import score_experts

    _, _, graph = tiny_mixtral
    freq, reap = score_experts(graph, "frequency"), score_experts(graph, "reap")
    for s in graph.experts:
        assert abs(freq[s.id].sum() - 1) < 1e-9 and (reap[s.id] > 0).all()


def test_compress_half_experts_half_neurons_done_when():
    """Issue 21's "Done when": compress removes half the experts and half of each expert's
    neurons of a tiny Mixtral; the expert oracle holds; generate() and save/load work."""
    from transformers import MixtralForCausalLM

    model, inputs = mixtral()
    result = fxprune.compress(model, {"example_inputs": inputs, "ratio": 0.5, "units": ["channels", "experts"],
                                      "capture": "export", "emit": "module", "expert_score": "reap",
                                      "ignore": ["model.embed_tokens", "model.layers.*.self_attn.*"]})
    mine = result.model
    assert (mine.config.num_local_experts, mine.config.intermediate_size, mine.config.hidden_size) == (2, 12, 16)
    graph = fxprune.analyze(model, inputs, capture="export")
    assert check_zero_invariance(model, graph, result.plan, mine) < 1e-5
    assert any("experts scored by reap; removing 4 of 8" in n for n in result.notes)
    assert_generates_and_round_trips(mine, inputs["input_ids"], new_tokens=2)


def test_experts_take_a_float_ratio_or_a_target_not_a_ratio_per_module():
    with pytest.raises(fxprune.SpecError, match=r"spec\.ratio: experts are removed by a float ratio .* or a target"):
        fxprune.Spec(input_shape=[1, 4], ratio={"fc*": 0.5}, units=["channels", "experts"])
    spec = fxprune.Spec(input_shape=[1, 4], target={"params": 0.5}, units=["channels", "experts"])
    assert spec.unit_kinds == ("channels", "experts")


def test_experts_compete_with_expert_neurons_for_a_params_target():
    """A parameter target ranks experts and expert neurons on one scale: the landing keeps
    the target within the metric's promise, no routed layer keeps fewer than top_k experts,
    and the expert oracle holds on what it chose."""
    from fxprune.select.metrics import TARGET_METRICS

    model, inputs = mixtral()
    result = fxprune.compress(model, {"example_inputs": inputs, "target": {"params": 0.5}, "scope": "global",
                                      "units": ["channels", "experts"], "capture": "export", "round_to": 4,
                                      "expert_score": "reap",
                                      "ignore": ["model.embed_tokens", "model.layers.*.self_attn.*"]})
    graph = result.graph
    kept = result.report.after.params / result.report.before.params
    assert abs(kept - 0.5) <= 2 * TARGET_METRICS["params"].tolerance * 0.5
    removed = {s.id: len(result.plan.get(s.id, [])) for s in graph.experts}
    assert sum(removed.values()) > 0, "experts competed but none was taken"
    assert all(s.size - removed[s.id] >= s.top_k for s in graph.experts)
    assert any(gid < len(graph.groups) for gid in result.plan)  # expert neurons went too
    assert any(f"removes {sum(removed.values())} of 8 experts" in n for n in result.notes)
    assert check_zero_invariance(model, graph, result.plan, result.model) < 1e-5


def test_an_expert_costs_what_removing_it_saves(tiny_mixtral, loop_moe):
    """Parameters: its router row and its slices of the expert weights. FLOPs: nothing for
    experts routed by grouped products (every token still runs top_k of the kept ones), so
    they do not compete for a FLOPs target; a loop that runs every expert on every token
    saves the expert's FLOPs."""
    from fxprune.select.expert_target import expert_candidates, expert_costs

    _, _, graph = tiny_mixtral
    params = expert_costs(graph, "params")
    # router row 16, gate_up_proj [48, 16] and down_proj [16, 24] per expert
    assert all(c.tolist() == [16 + 48 * 16 + 16 * 24] * 4 for c in params.values())
    assert all(not c.any() for c in expert_costs(graph, "flops").values())
    notes = []
    spec = fxprune.Spec(input_shape=[1, 4], target={"flops": 0.5}, units=["channels", "experts"])
    assert expert_candidates(graph, spec, "flops", notes) == ({}, {}, {})
    assert "2 routed layer(s) keep their experts under target flops" in notes[0]
    model, x, loop_graph = loop_moe
    [flops] = expert_costs(loop_graph, "flops").values()
    expert_flops = 2 * x.shape[0] * (8 * 12 + 12 * 8)  # fc1 and fc2 on every token
    router_row = 2 * x.shape[0] * 8
    assert flops.tolist() == [expert_flops + router_row] * 4


def test_qwen2_moe_shared_expert_and_routed_experts():
    """Qwen2-MoE: routed experts beside a shared expert (a dense MLP with its own gate):
    experts, routed neurons and shared-expert neurons go together through the oracle, and
    the config carries num_experts, moe_intermediate_size, shared_expert_intermediate_size."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12,
                            shared_expert_intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, use_cache=False,
                            max_position_embeddings=32, decoder_sparse_step=1, mlp_only_layers=[])
    model = unit_scale(Qwen2MoeForCausalLM(config)).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    graph = fxprune.analyze(model, {"input_ids": ids}, capture="export")
    [experts] = graph.experts
    # widths stay multiples of 4: the eager grouped_mm kernel needs 16-byte strides
    plan = {experts.id: [1], **{g.id: [0, 1, 2, 3] for g in graph.prunable_groups if g.size in (12, 20)}}
    assert len(plan) == 3
    mine = fxprune.prune(graph, plan, emit="module")
    assert check_zero_invariance(model, graph, plan, mine) < 1e-5
    assert (mine.config.num_experts, mine.config.moe_intermediate_size,
            mine.config.shared_expert_intermediate_size) == (3, 8, 16)


def test_llama4_dense_dispatch_experts():
    """Llama 4 runs every expert on every token: the sigmoid of the top-k scores scattered
    into -inf scales the tokens tiled E times (``repeat(E, 1)``), a ``bmm`` multiplies them
    by the stacked weights, a sum over the experts joins them. An expert set per layer,
    holding that layer's weights only; the tiling, view and reshape sizes shrink with it."""
    from transformers import Llama4ForCausalLM

    from hf_zoo import inputs_for, shrunk_config

    config = shrunk_config("llama4_text")
    torch.manual_seed(0)
    model = unit_scale(Llama4ForCausalLM(config)).eval()
    inputs = inputs_for(model, config)
    graph = fxprune.analyze(model, inputs, capture="export")
    assert [(s.size, s.top_k, len(s.stacked), s.stacked[0].split(".")[2]) for s in graph.experts] == \
        [(4, 2, 2, "0"), (4, 2, 2, "1")]
    plan = {graph.experts[0].id: [1], graph.experts[1].id: [0, 3]}
    small = fxprune.prune(graph, plan)
    assert small.meta["fxprune.value_check"]["error"] < 1e-5
    assert check_zero_invariance(model, graph, plan, small) < 1e-5
    assert small.state_dict()["model.layers.1.feed_forward.experts.down_proj"].shape[0] == 2
    with torch.no_grad():
        assert output_error(model(**inputs), small(**inputs)) > 1e-2
    mine = fxprune.prune(graph, {s.id: [2] for s in graph.experts}, emit="module")
    assert mine.config.num_local_experts == 3 and mine.model.layers[0].feed_forward.num_experts == 3
    assert check_zero_invariance(model, graph, {s.id: [2] for s in graph.experts}, mine) < 1e-5
