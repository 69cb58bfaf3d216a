"""The torchvision classification zoo: analysis, ~50% pruning and the zero-invariance oracle.

CI runs one model per family; ``pytest -m zoo tests/test_zoo.py`` (or
``python benchmarks/zoo_sweep.py``) runs all 80."""
import pytest

from zoo import ALL_MODELS, FAMILIES, check_model


def test_every_family_is_listed_in_the_zoo():
    assert len(ALL_MODELS) == 80
    assert set(FAMILIES) <= set(ALL_MODELS)


@pytest.mark.parametrize("name", FAMILIES)
def test_family(name):
    row = check_model(name, small=True)
    assert row["prunable"] > 0 and row["zero_invariant"] > 0 and row["oracle_error"] < 1e-4
    # every other zero-invariant residual branch removed (None: the model has none)
    assert row["branch_oracle_error"] is None or row["branch_oracle_error"] < 1e-4
    if name.startswith("resnet"):
        assert row["branch_oracle_error"] is not None  # residual blocks: the column is a real check


@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(set(ALL_MODELS) - set(FAMILIES)))
def test_rest_of_zoo(name):
    row = check_model(name)
    assert row["prunable"] > 0 and row["zero_invariant"] > 0 and row["oracle_error"] < 1e-4
