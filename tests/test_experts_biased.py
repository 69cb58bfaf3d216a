"""Experts behind routers that rank biased scores (DeepSeek-V3 and its descendants: GLM-4-MoE,
ERNIE-4.5-MoE, MiniMax-M2, Nemotron-H, ...): ``sigmoid`` or ``softmax`` of the router logits
plus a per-expert selection bias (``e_score_correction_bias``), often through a group mask,
then the top-k. Removing expert e must equal masking its router logit and its selection
bias with -inf in the original; with a bias, the logit alone is not enough (the top-k would
still rank ``sigmoid(-inf) + bias[e]``), which these tests show by making the biases large."""
from __future__ import annotations

import pytest
import torch

import fxprune
from fxprune.errors import PlanError
from fxprune.passes.check_values import output_error
from fxprune.passes.verify import check_zero_invariance
from hf_zoo import inputs_for, shrunk_config
from helpers import unit_scale

pytestmark = pytest.mark.dynamic_shapes  # fxprune's default capture (tests/conftest.py)

# family -> (its selection bias key's tail, the dim that indexes experts, its config's expert count field)
FAMILIES = {"glm4_moe": ("gate.e_score_correction_bias", 0, "n_routed_experts"),
            "ernie4_5_moe": ("moe_statics.e_score_correction_bias", 1, "moe_num_experts")}


def biased_model(model_type: str, **config_changes):
    """The sweep's tiny model of ``model_type`` with selection biases of the size of the
    scores, so that they decide which experts a token takes."""
    import transformers

    config = shrunk_config(model_type)
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    name = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    model = unit_scale(getattr(transformers, name)(config)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, tensor in model.state_dict(keep_vars=True).items():  # a buffer, or ERNIE's parameter
            if key.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=g))
    return model, inputs_for(model, config)


@pytest.fixture(scope="module", params=list(FAMILIES))
def biased(request):
    model, inputs = biased_model(request.param)
    return request.param, model, inputs, fxprune.analyze(model, inputs)


def test_biased_router_experts_removed_equal_logit_and_bias_masking(biased):
    family, model, inputs, graph = biased
    tail, dim, _ = FAMILIES[family]
    [experts] = graph.experts  # the first layer is dense in both
    assert experts.size == 4 and experts.top_k == 2 and experts.prunable
    assert [(k.endswith(tail), d) for k, d in experts.biases] == [(True, dim)]
    for chosen in ([0], [1, 3]):
        plan = {experts.id: chosen}
        small = fxprune.prune(graph, plan)
        assert small.meta["fxprune.value_check"]["error"] < 1e-5
        assert check_zero_invariance(model, graph, plan, small) < 1e-5
        bias = small.state_dict()[experts.biases[0][0]]
        assert bias.shape[dim] == 4 - len(chosen)
    with torch.no_grad():  # removing experts changes the model: the oracle can fail
        assert output_error(model(**inputs), small(**inputs)) > 1e-2


def test_masking_the_router_logit_alone_is_not_the_removal(biased, monkeypatch):
    """Without the bias mask the reference still routes tokens to the removed experts
    (their biased score ranks first) and the oracle must fail."""
    _, model, _, graph = biased
    from fxprune.channels import experts as ex

    monkeypatch.setattr(ex.ExpertSet, "bias_mask", lambda self, units, shape, dim, dtype=torch.float32,
                        device=None: torch.zeros(shape, dtype=dtype, device=device))
    experts = graph.experts[0]
    plan = {experts.id: [int(model.state_dict()[experts.biases[0][0]].flatten().argmax())]}
    assert check_zero_invariance(model, graph, plan, fxprune.prune(graph, plan, verify="shapes"),
                                 tolerance=float("inf")) > 1e-3


def test_biased_router_write_back_updates_the_expert_count(biased):
    family, model, inputs, graph = biased
    field = FAMILIES[family][2]
    plan = {graph.experts[0].id: [2]}
    mine = fxprune.prune(graph, plan, emit="module")
    assert getattr(mine.config, field) == 3 and getattr(model.config, field) == 4
    assert check_zero_invariance(model, graph, plan, mine) < 1e-5


def test_group_top_k_needs_experts_left(biased):
    _, _, _, graph = biased
    with pytest.raises(PlanError, match="top_k=2.*leaves 1.*at most 2"):
        fxprune.prune(graph, {graph.experts[0].id: [0, 1, 2]})


def test_grouped_top_k_over_fixed_groups_freezes_its_experts():
    """n_group=2: the router views its scores as [tokens, 2, 2] and picks a group first;
    removing one expert leaves groups of 1 and 2, which that view cannot hold."""
    model, inputs = biased_model("glm4_moe", n_group=2, topk_group=1)
    graph = fxprune.analyze(model, inputs)
    [experts] = graph.experts
    assert not experts.prunable and "2 fixed groups of 2 experts" in experts.reason
    assert experts.removable == 0
    with pytest.raises(PlanError, match="frozen: the router ranks 2 fixed groups"):
        fxprune.prune(graph, {experts.id: [0]})


def test_router_that_also_gates_shared_experts_keeps_their_rows():
    """Inkling: one router for 4 routed experts and 1 shared expert; the top-k ranks
    ``sigmoid(logits)[..., :4] + bias`` and ``logits[..., 4:]`` weigh the shared expert.
    Removing a routed expert keeps the shared expert's row, and the slices past the
    routed experts move down with them."""
    from hf_zoo import make_model

    model, inputs = make_model("inkling_text")
    graph = fxprune.analyze(model, inputs)
    s = graph.experts[0]
    assert (s.size, s.router_extra, len(graph.experts)) == (4, 1, 2)
    plan = {s.id: [0, 2]}
    small = fxprune.prune(graph, plan, verify="shapes")  # the oracle below checks the values
    assert check_zero_invariance(model, graph, plan, small) < 1e-5
    assert small.state_dict()[s.router_keys[0]].shape[0] == 3  # 2 routed experts left + the shared one
    assert torch.equal(small.state_dict()[s.router_keys[0]][-1], model.state_dict()[s.router_keys[0]][-1])
