"""The helpers written once in fxprune/_util.py: restoring training flags, SI formatting,
reading configuration files."""
import pytest
import torch
from torch import nn

from fxprune._util import eval_mode, format_si, read_config
from fxprune.errors import SpecError


def mixed_flags() -> nn.Module:
    """A training model with a frozen (eval) BatchNorm and an eval Dropout inside a training block."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                          nn.Sequential(nn.Conv2d(4, 4, 1), nn.Dropout(0.5), nn.ReLU()))
    model.train()
    model[1].eval()
    model[2][1].eval()
    return model


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


def test_eval_mode_gives_every_submodule_its_own_flag_back():
    model = mixed_flags()
    before = flags(model)
    assert len(set(before.values())) == 2  # mixed, or the test proves nothing
    with eval_mode(model):
        assert not any(flags(model).values())
    assert flags(model) == before


def test_eval_mode_restores_flags_when_the_body_raises():
    model = mixed_flags()
    before = flags(model)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert flags(model) == before


def test_flops_cost_model_leaves_mixed_flags_as_found():
    """The select pass's per-entry FLOPs used to end with ``gm.train(root flag)``, which
    turned a frozen BatchNorm back to training."""
    import fxprune
    from fxprune.select.metrics import flops_per_entry

    graph = fxprune.analyze(mixed_flags(), torch.randn(1, 3, 8, 8))
    graph.gm.train()
    frozen = [name for name, m in graph.gm.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.Dropout))]
    for name in frozen:
        graph.gm.get_submodule(name).eval()
    before = flags(graph.gm)
    assert flops_per_entry(graph)
    assert flags(graph.gm) == before


@pytest.mark.parametrize("value, kwargs, text", [
    (1_820_000_000, {"unit": "FLOPs"}, "1.82 GFLOPs"), (11_689_512, {"space": False}, "11.69M"),
    (1234, {"unit": "B", "digits": 3}, "1.234 kB"), (220, {}, "220"), (12, {"unit": "B"}, "12 B"),
    (-2e12, {}, "-2.00 T"),
])
def test_format_si(value, kwargs, text):
    assert format_si(value, **kwargs) == text


def test_read_config_names_the_file_in_every_failure(tmp_path):
    good = tmp_path / "a.toml"
    good.write_text("x = 1\n")
    assert read_config(good, SpecError, "spec") == {"x": 1}
    (tmp_path / "a.json").write_text('{"x": [1, 2]}')
    assert read_config(tmp_path / "a.json", SpecError, "spec") == {"x": [1, 2]}
    with pytest.raises(SpecError, match=r"^spec: file not found: .*missing.toml"):
        read_config(tmp_path / "missing.toml", SpecError, "spec")
    (tmp_path / "bad.toml").write_text("x = = 1\n")
    with pytest.raises(ValueError, match=r"^budget: cannot parse .*bad.toml"):
        read_config(tmp_path / "bad.toml", ValueError, "budget")
