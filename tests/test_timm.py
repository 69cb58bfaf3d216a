"""timm models through fxprune: the sweep's check (benchmarks/timm_sweep.py) on a few
small models that cover the functional and ATen rules (F.batch_norm with module
parameters given as keywords, TF "same" padding under torch.export, MobileViT-v2's
attention under torch.export, MobileOne's sums that start from 0 over affine norms). ``python benchmarks/timm_sweep.py`` runs all of them."""
import pytest

pytest.importorskip("timm")

from timm_zoo import CI_MODELS, KEEP_BELOW, check_model  # noqa: E402


@pytest.mark.parametrize("name", CI_MODELS)
def test_timm_model_prunes_with_the_oracle(name):
    row = check_model(name, torch_pruning=False)
    assert "fx_why" not in row, row.get("fx_why")
    assert row["prunable"] > 0 and row["kept"] < KEEP_BELOW, row
    assert row["oracle"] == "ran" and row["oracle_error"] < 1e-4, row
    assert row["branch_oracle_error"] is None or row["branch_oracle_error"] < 1e-4, row
