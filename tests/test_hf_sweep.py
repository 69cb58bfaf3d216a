"""A handful of the hf sweep's families (benchmarks/hf_sweep.py) through the same per-model
proof: a dense causal LM, a mixture of experts, a GPT-2 with its default config (the cache
is turned off for the capture only), an encoder and a vision encoder, each shrunk
generically from its own config class."""
from __future__ import annotations

import pytest

from hf_zoo import architectures, check_model, shrunk_config

pytestmark = pytest.mark.dynamic_shapes  # fxprune's default capture (tests/conftest.py)

# model type -> its routed layers (expert sets); GLM-4-MoE: a sigmoid router with a
# selection bias and a group mask (DeepSeek-V3's form), its first layer dense
FAMILIES = {"llama": 0, "mixtral": 2, "glm4_moe": 1, "gpt2": 0, "bert": 0, "vit": 0}


def test_architectures_come_from_the_auto_mappings():
    found = architectures()
    assert found["llama"] == ("causal", "LlamaForCausalLM")
    assert found["vit"] == ("vision", "ViTForImageClassification")
    assert found["wav2vec2"][0] == "speech"
    assert len(found) > 250


def test_shrunk_config_is_small_and_consistent():
    config = shrunk_config("mixtral")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.num_local_experts, config.num_experts_per_tok) == (2, 64, 4, 2, 96, 4, 2)
    assert config.hidden_size % config.num_attention_heads == 0 and config.use_cache is False


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_prunes_through_the_oracle(model_type):
    row = check_model(model_type, round_trip=model_type in ("mixtral", "gpt2"))
    assert row["front_end"] == "export", row.get("why")
    assert row["mlp_groups"] >= 2 and row["mlp_ok"] and row["mlp_error"] < 1e-4, row
    assert row["head_groups"] >= 2 and row["head_error"] < 1e-4, row
    assert row["experts"] == FAMILIES[model_type]
    if row["experts"]:
        assert row["expert_error"] < 1e-4
    if not row["experts"]:  # a top-k over the experts is no channel op: the router is a unit
        assert row["no_rule"] == [], row["no_rule"]
    else:
        assert row["no_rule"] == ["ATen op aten.topk.default"], row["no_rule"]
    if model_type in ("mixtral", "gpt2"):
        assert row["module"] == "ok"


def test_gpt_oss_experts_take_their_biases_along():
    """GPT-OSS adds per-expert biases gathered by the routed expert ids (``bias[ids]``, an
    ``aten.index`` beside the grouped products): removing an expert must cut them too, or
    every later expert reads its neighbour's bias and the oracle fails (it did: 0.43)."""
    row = check_model("gpt_oss", round_trip=False)
    assert row["front_end"] == "export", row.get("why")
    assert row["experts"] == 2 and row["expert_error"] < 1e-4, row
