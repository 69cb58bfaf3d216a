"""Calibrated one-shot N:M masks: Wanda and SparseGPT against hand computations, the
layer-after-layer order, and ``nm`` alone through the spec, ``compress`` and the CLI."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fxprune import compress
from fxprune.errors import SpecError
from fxprune.spec import Spec
from fxprune.sparsity.calibrated import apply_nm_calibrated
from fxprune.sparsity.masks import measure_density
from fxprune.sparsity.nm import apply_nm, check_nm
from fxprune.sparsity.sparsegpt import DAMP, sparsegpt_prune


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return layer


def test_wanda_mask_by_hand():
    # inputs: channel norms are ||(3, 4)|| = 5, ||(0, 1)|| = 1, ||(0, 0.5)|| = 0.5, ||(2, 0)|| = 2
    x = torch.tensor([[3.0, 0.0, 0.0, 2.0], [4.0, 1.0, 0.5, 0.0]])
    w = torch.tensor([[1.0, 4.0, 9.0, 3.0],     # scores 5, 4, 4.5, 6 -> keep 0 and 3
                      [-0.1, 8.0, -1.0, 1.0]])  # scores 0.5, 8, 0.5, 2 -> keep 1 and 3
    layer = _linear(w)
    apply_nm_calibrated(layer, 2, 4, score="activation", calibration=[x])
    expected = torch.tensor([[1.0, 0.0, 0.0, 3.0], [0.0, 8.0, 0.0, 1.0]])
    assert torch.equal(layer.weight.detach(), expected)  # Wanda keeps the values
    magnitude = _linear(w)
    apply_nm(magnitude, 2, 4)
    assert not torch.equal(magnitude.weight.detach(), expected)  # the inputs changed the choice


def _closed_form(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """3:4 SparseGPT on one group of 4 columns, row by row, written independently of the
    Cholesky form: the pruned column q minimises w_q^2 / [H_q^-1]_00 where H_q is the damped
    Hessian of columns q.. (the columns left of q are fixed when q is visited); the columns
    right of q get the OBS update -w_q / [H_q^-1]_00 * [H_q^-1]_{:, 0}."""
    h = h.double() + DAMP * h.diagonal().double().mean() * torch.eye(4, dtype=torch.float64)
    out = w.double().clone()
    inverses = [torch.linalg.inv(h[q:, q:]) for q in range(4)]
    for row in out:
        q = min(range(4), key=lambda j: row[j] ** 2 / inverses[j][0, 0])
        inv = inverses[q]
        row[q:] -= row[q] / inv[0, 0] * inv[:, 0]
    return out


def test_sparsegpt_single_group_matches_closed_form():
    torch.manual_seed(0)
    x = torch.randn(256, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)
    h = 2 * x.T @ x / len(x)
    w = torch.randn(6, 4, dtype=torch.float64)
    w[0, 0] = 1e-3  # row 0 drops its first column: the update is OBS over the whole H
    new, keep = sparsegpt_prune(w, h, 3, 4)
    assert torch.allclose(new, _closed_form(w, h), atol=1e-10)
    assert keep.sum(1).tolist() == [3] * 6
    # the brief's formula for a single pruned weight q: -w_q / [H^-1]_qq * H^-1_{:, q}
    hd = h + DAMP * h.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    inv = torch.linalg.inv(hd)
    assert torch.allclose(new[0], w[0] - w[0, 0] / inv[0, 0] * inv[:, 0], atol=1e-10)


def test_sparsegpt_two_layers_each_fitted_to_pruned_inputs():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False)).double()
    dense = [net[0].weight.detach().clone(), net[2].weight.detach().clone()]
    x = torch.randn(128, 4, dtype=torch.float64) @ torch.randn(4, 4, dtype=torch.float64)
    apply_nm_calibrated(net, 3, 4, score="sparsegpt", calibration=[x[:64], x[64:]])
    first = _closed_form(dense[0], 2 * x.T @ x / len(x))
    assert torch.allclose(net[0].weight.detach(), first, atol=1e-8)
    hidden = torch.tanh(x @ first.T)  # what layer 2 sees once layer 1 is pruned
    second = _closed_form(dense[1], 2 * hidden.T @ hidden / len(hidden))
    assert torch.allclose(net[2].weight.detach(), second, atol=1e-8)
    dense_hidden = torch.tanh(x @ dense[0].T)
    assert not torch.allclose(second, _closed_form(dense[1], 2 * dense_hidden.T @ dense_hidden / 128), atol=1e-4)


def test_output_error_sparsegpt_below_wanda_below_magnitude():
    torch.manual_seed(2)
    scales = torch.logspace(-1, 1, 32)  # inputs of very different loudness
    mix = torch.eye(32) + 0.8 * torch.randn(32, 32) / 32 ** 0.5  # and correlated
    x = (torch.randn(512, 32) * scales) @ mix
    layer = nn.Linear(32, 16)
    errors = {}
    for score in ("magnitude", "activation", "sparsegpt"):
        pruned = nn.Linear(32, 16)
        pruned.load_state_dict(layer.state_dict())
        apply_nm_calibrated(pruned, 2, 4, score=score, calibration=[x])
        with torch.no_grad():
            errors[score] = float((pruned(x) - layer(x)).square().mean() / layer(x).square().mean())
        assert check_nm(pruned.weight, 2, 4)
    assert errors["sparsegpt"] < errors["activation"] < errors["magnitude"], errors


@pytest.mark.parametrize("score", ["activation", "sparsegpt"])
@pytest.mark.parametrize("nm", ["2:4", "1:4", "4:8"])
def test_pattern_exact_after_finalize(score, nm):
    n, m = map(int, nm.split(":"))
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    result = apply_nm_calibrated(net, n, m, score=score, calibration=[torch.randn(40, 16)])
    rows = measure_density(net)
    assert [(r.name, r.density, r.valid) for r in rows] == [("0.weight", n / m, True), ("2.weight", n / m, True)]
    assert [r.density for r in result.masked] == [n / m, n / m]


def test_conv_wanda_and_sparsegpt_skip_reason():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.Linear(8 * 16, 4))
    batches = [torch.randn(2, 8, 6, 6)]
    wanda = apply_nm_calibrated(net, 2, 4, score="activation", calibration=batches)
    assert [r.status for r in wanda.rows] == ["masked", "masked"]
    net2 = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 16, 4))
    sgpt = apply_nm_calibrated(net2, 2, 4, score="sparsegpt", calibration=batches)
    assert sgpt.row("0").status == "skipped" and "nn.Linear only" in sgpt.row("0").reason
    assert sgpt.row("2").density == 0.5


def test_padding_tokens_are_left_out():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 2, bias=False)

        def forward(self, x, attention_mask):
            return self.proj(x)

    x = torch.tensor([[[1.0, 1.0, 0.1, 0.1], [0.0, 0.0, 100.0, 100.0]]])  # the loud token is padding
    model = Tokens()
    model.proj.weight.data = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]])
    apply_nm_calibrated(model, 2, 4, score="activation",
                        calibration=[{"x": x, "attention_mask": torch.tensor([[1, 0]])}])
    assert model.proj.weight[0].tolist() == [1.0, 1.0, 0.0, 0.0]


def _mlp():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()


@pytest.mark.parametrize("score", ["magnitude", "activation", "sparsegpt"])
def test_nm_alone_through_compress(score):
    model = _mlp()
    calib = [torch.randn(32, 16) for _ in range(2)]
    spec = {"example_inputs": (torch.randn(4, 16),), "nm": "2:4", "score": score}
    if score != "magnitude":
        spec["calibration"] = calib
    result = compress(model, spec)
    weights = [m.weight for m in result.model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(w.shape) for w in weights] == [(32, 16), (8, 32)]  # no channel removed
    assert all(check_nm(w, 2, 4) and float((w != 0).float().mean()) == 0.5 for w in weights)
    assert result.plan == {} and any("nm alone" in note for note in result.notes)
    assert any(f"nm: 2:4 masks ({score if score == 'magnitude' else ''}" in note for note in result.notes)
    assert all(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), result.model.state_dict().values())
               if a.dim() == 2)  # the input model is untouched, the output masked


def test_spec_nm_alone_and_its_errors():
    spec = Spec(input_shape=[1, 16], nm="2:4", score="sparsegpt", calibration=[torch.randn(2, 16)])
    assert (spec.prunes_channels, spec.mask_method) == (False, "sparsegpt")
    assert Spec(input_shape=[1, 16], nm="2:4", calibration=[torch.randn(2, 16)]).mask_method == "activation"
    with pytest.raises(SpecError, match="spec.calibration: score='sparsegpt' chooses the nm masks"):
        Spec(input_shape=[1, 16], nm="2:4", score="sparsegpt")
    with pytest.raises(SpecError, match="spec.score: 'taylor' ranks channels, and nm alone"):
        Spec(input_shape=[1, 16], nm="2:4", score="taylor")
    with pytest.raises(SpecError, match="or nm alone"):
        Spec(input_shape=[1, 16])
    both = Spec(input_shape=[1, 16], ratio=0.25, nm="2:4", score="sparsegpt", calibration=[torch.randn(2, 16)])
    assert (both.score_method, both.mask_method) == ("activation", "sparsegpt")


def test_cli_nm_alone(tmp_path):
    from tests.test_cli import fxprune

    torch.save(_mlp(), tmp_path / "mlp.pt")
    torch.save([torch.randn(16, 16)], tmp_path / "calib.pt")
    proc = fxprune("compress", str(tmp_path / "mlp.pt"), "--input", "2,16", "--nm", "2:4", "--score", "sparsegpt",
                   "--calibration", str(tmp_path / "calib.pt"), "-o", str(tmp_path / "out.pt"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "SparseGPT" in proc.stdout
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert all(check_nm(m.weight, 2, 4) for m in out.modules() if isinstance(m, nn.Linear))


def test_cli_without_goal_names_nm(tmp_path):
    from tests.test_cli import fxprune

    torch.save(_mlp(), tmp_path / "mlp.pt")
    proc = fxprune("compress", str(tmp_path / "mlp.pt"), "--input", "2,16")
    assert proc.returncode != 0 and "--nm N:M alone" in proc.stderr


def test_block_mask_ranked_by_wanda_by_hand():
    from fxprune.sparsity.block import apply_block, check_block
    from fxprune.sparsity.calibrated import apply_block_calibrated

    # channel norms (1, 1, 10, 10): block (row 0, cols 0-1) of |W| * norm has L2 norm 5 * sqrt(2),
    # the others 1 * 10 * sqrt(2), 3 * sqrt(2) and 2 * 10 * sqrt(2): keep (0, 2-3) and (1, 2-3)
    w = torch.tensor([[5.0, 5.0, 1.0, 1.0], [3.0, 3.0, 2.0, 2.0]])
    x = torch.tensor([[1.0, 1.0, 10.0, 10.0]])
    layer = _linear(w)
    result = apply_block_calibrated(layer, (1, 2), 0.5, calibration=[x])
    assert torch.equal(layer.weight.detach(), torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]]))
    assert result.masked[0].density == 0.5 and check_block(layer.weight, (1, 2), 0.5)
    magnitude = _linear(w)
    apply_block(magnitude, (1, 2), 0.5)
    assert magnitude.weight[0, 0] == 5.0  # magnitude keeps the large block reading quiet inputs
