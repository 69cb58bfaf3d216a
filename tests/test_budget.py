"""Budget units, budget tables and ``fxprune.testing.assert_within_budget``."""
from __future__ import annotations

import pytest
import torch

from fxprune.budget import Budget, BudgetError, check_budget, load_budget, parse_count, parse_ms, parse_size
from fxprune.measure import count_flops, count_params
from fxprune.testing import assert_within_budget


@pytest.mark.parametrize("text, value", [
    ("5M", 5_000_000), ("1.2G", 1_200_000_000), ("300k", 300_000), ("300K", 300_000),
    (" 7 ", 7), (1e6, 1_000_000), (42, 42), ("2T", 2 * 10**12), ("1e3k", 1_000_000),
])
def test_parse_count(text, value):
    assert parse_count(text) == value


@pytest.mark.parametrize("text, value", [
    ("20MB", 20_000_000), ("1.5MiB", 1_572_864), ("800kB", 800_000), ("2KiB", 2048),
    ("1GB", 10**9), ("1GiB", 2**30), ("512B", 512), (1000, 1000), ("3 MB", 3_000_000),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text, value", [(40, 40.0), ("40ms", 40.0), ("0.04s", 40.0), ("800us", 0.8)])
def test_parse_ms(text, value):
    assert parse_ms(text) == pytest.approx(value)


@pytest.mark.parametrize("parser, text", [
    (parse_count, "5Q"), (parse_count, "five"), (parse_count, "-3"), (parse_count, -3),
    (parse_count, True), (parse_size, "20M"), (parse_size, "20XB"), (parse_ms, "3h"),
    (parse_count, ""), (parse_size, None),
])
def test_unparsable_units_name_the_field(parser, text):
    with pytest.raises(BudgetError, match="max_x"):
        parser(text, "max_x")


def test_budget_table_validation(tmp_path):
    with pytest.raises(BudgetError, match="no limit"):
        Budget.from_dict({"model": "torchvision:resnet18"})
    with pytest.raises(BudgetError, match="max_parms: unknown field"):
        Budget.from_dict({"max_parms": "5M"})
    with pytest.raises(BudgetError, match="device and threads"):
        Budget.from_dict({"max_latency_ms": 5})
    budget = Budget.from_dict({"max_latency_ms": "5ms", "latency": {"device": "cpu", "threads": 2},
                               "input": "1,3,8,8"})
    assert budget.latency.threads == 2 and budget.input_shape == [1, 3, 8, 8]
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "x"\n')
    with pytest.raises(BudgetError, match=r"no \[tool.fxprune.budget\] table"):
        load_budget(path)
    other = tmp_path / "budget.toml"
    other.write_text('max_params = "1k"\n')
    assert load_budget(other).max_params == 1000


def test_check_budget_boundary():
    net = torch.nn.Linear(10, 20)
    x = (torch.randn(3, 10),)
    exact = Budget(max_params=220, max_flops=1200)
    assert check_budget(net, x, exact).ok
    assert not check_budget(net, x, Budget(max_params=219)).ok
    assert not check_budget(net, x, Budget(max_flops=1199)).ok


def test_assert_within_budget_passes_and_fails_with_table():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 16, 16)
    params, flops = count_params(net), count_flops(net, x)
    assert_within_budget(net, x, max_params=params, max_flops=flops, max_size="1MB")
    assert_within_budget(net, input_shape=[1, 3, 16, 16], max_latency_ms="10s",
                         latency={"threads": 1, "repeats": 2})
    with pytest.raises(AssertionError) as info:
        assert_within_budget(net, x, max_params=params - 1, max_flops="1G")
    message = str(info.value)
    assert "limit" in message and "measured" in message and "FAIL" in message
    assert "max_params" in message and "pass" in message  # the FLOPs row still passes
