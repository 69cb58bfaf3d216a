"""N:M and block sparsity passes: masks, SR-STE, finalize, acceleration reports."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize

from fxprune.errors import SpecError
from fxprune.sparsity.block import apply_block, block_mask, check_block
from fxprune.sparsity.nm import apply_nm, check_nm, finalize, measure_density, nm_mask
from fxprune.sparsity.semi_structured import to_semi_structured
from fxprune.sparsity.semi_structured import _dense_reason, _fused_children, default_backend

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None),
}


def nonzeros_per_group(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Independent of the library: groups along dim 1 at every other position."""
    return (weight.movedim(1, -1).reshape(-1, m) != 0).sum(dim=1)


def sparse_layers(model: nn.Module):
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- N:M masks -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_every_group_has_at_most_n_nonzeros(arch, n, m):
    model = MODELS[arch]()
    result = apply_nm(model, n, m)
    layers = sparse_layers(model)
    assert {r.name for r in result.rows} == set(layers)
    masked = {r.name for r in result.masked}
    convs = [k for k in masked if isinstance(layers[k], nn.Conv2d)]
    linears = [k for k in masked if isinstance(layers[k], nn.Linear)]
    assert convs and linears, "both conv and linear layers must be covered"
    for name, module in layers.items():
        if name in masked:
            w = module.weight.detach()
            # exactly n kept per group (random weights have no zeros), so an all-zero mask fails
            assert (nonzeros_per_group(w, m) == n).all(), name
            assert check_nm(w, n, m)
            assert float((w != 0).float().mean()) == pytest.approx(n / m), name  # counted here
            assert result.row(name).density == pytest.approx(n / m), name  # and as the row reports it
            assert parametrize.is_parametrized(module, "weight")
        else:
            assert not parametrize.is_parametrized(module), name
            assert module.weight.shape[1] % m != 0, name
    # the first conv (3 input channels) can never be grouped by 4 or 8
    first = "conv1" if arch == "resnet18" else "features.0.0"
    assert result.row(first).status == "skipped"
    assert "(3) not a multiple of m=" in result.row(first).reason


def test_groups_run_along_input_channels_at_each_kernel_position():
    conv = nn.Conv2d(4, 1, kernel_size=(1, 2), bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, 4.0], [2.0, 3.0], [3.0, 2.0], [4.0, 1.0]]).reshape(1, 4, 1, 2))
    apply_nm(conv, 2, 4)
    kept = conv.weight.detach()[0, :, 0, :] != 0
    # kernel column 0 holds [1, 2, 3, 4] along I: keep I=2,3; column 1 holds [4, 3, 2, 1]: keep I=0,1
    assert kept.tolist() == [[False, True], [False, True], [True, False], [True, False]]

    linear = nn.Linear(8, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0, 8.0, 7.0, -6.0, 5.0]]))
    apply_nm(linear, 2, 4)
    assert linear.weight.detach().tolist() == [[0.0, 0.0, 3.0, -4.0, 8.0, 7.0, 0.0, 0.0]]


def test_grouped_conv_groups_per_group_input_channels():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=2), nn.Conv2d(16, 16, 3, groups=8), nn.Conv1d(8, 4, 3))
    result = apply_nm(model, 2, 4)
    assert [r.status for r in result.rows] == ["masked", "skipped", "masked"]
    assert "input channels per group (2) not a multiple of m=4" == result.rows[1].reason
    assert check_nm(model[0].weight, 2, 4) and check_nm(model[2].weight, 2, 4)


def test_ignored_and_skipped_layers_are_reported_with_reasons():
    model = torchvision.models.resnet18(weights=None)
    result = apply_nm(model, 2, 4, ignore=["fc", "layer4.*"])
    reasons = {r.name: r.reason for r in result.skipped}
    assert reasons["fc"] == "ignored by pattern 'fc'"
    assert reasons["layer4.0.conv1"] == "ignored by pattern 'layer4.*'"
    assert reasons["conv1"] == "input channels (3) not a multiple of m=4"
    assert not parametrize.is_parametrized(model.fc)
    assert not parametrize.is_parametrized(model.layer4[1].conv2)
    assert all(r.status == "masked" and r.reason == "" for r in result.masked)
    assert "skipped" in str(result) and "ignored by pattern 'fc'" in str(result)
    # a bare string is one pattern, not a list of characters
    assert apply_nm(nn.Sequential(nn.Linear(8, 8)), 2, 4, ignore="0").rows[0].status == "skipped"


def test_attention_out_proj_is_masked_through_multihead_attention():
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True).eval()
    result = apply_nm(layer, 2, 4)
    assert {r.name for r in result.masked} == {"self_attn.out_proj", "linear1", "linear2"}
    x = torch.randn(2, 5, 32)
    with torch.no_grad():  # eval + no_grad: MultiheadAttention's fused fast path reads out_proj.weight
        expected = layer(x)
        baked = copy.deepcopy(layer)
        finalize(baked)
        assert check_nm(baked.self_attn.out_proj.weight, 2, 4)
        assert torch.allclose(baked(x), expected, atol=1e-5)
        unmasked = copy.deepcopy(baked)
        unmasked.self_attn.out_proj.weight.copy_(layer.self_attn.out_proj.parametrizations.weight.original)
        assert not torch.allclose(unmasked(x), expected, atol=1e-3)  # the mask did take part


def test_tied_weights_are_skipped():
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    result = apply_nm(nn.Sequential(a, b), 2, 4)
    assert [r.status for r in result.rows] == ["skipped", "skipped"]
    assert "tied with 1" in result.rows[0].reason


def test_masks_survive_ten_sgd_steps():
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, groups=4, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8),
    )
    result = apply_nm(model, 2, 4)
    assert [r.status for r in result.rows] == ["skipped", "masked", "masked", "masked", "masked"]
    zero_before = {k: (mod.weight == 0).clone() for k, mod in sparse_layers(model).items()}
    originals = {k: mod.parametrizations.weight.original.detach().clone()
                 for k, mod in sparse_layers(model).items() if parametrize.is_parametrized(mod)}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 8, (16,))
    losses = []
    for _ in range(10):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, module in sparse_layers(model).items():
        w = module.weight.detach()
        if name in originals:
            assert check_nm(w, 2, 4), name
            assert torch.equal(w == 0, zero_before[name]), name
            assert not torch.equal(module.parametrizations.weight.original, originals[name]), name


def test_finalize_bakes_masks_and_matches_parametrized_output():
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    keys = list(model.state_dict())
    apply_nm(model, 2, 4)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    baked = finalize(model)
    assert "classifier.1.weight" in baked
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)
    assert check_nm(model.classifier[1].weight, 2, 4)
    assert finalize(model) == []


def test_finalize_of_a_copy_leaves_the_original_masked():
    # a deepcopy shares the parametrized class; torch's removal deletes the class's
    # ``weight`` property, which stripped the weight from the original too
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    apply_nm(model, 2, 4)
    x = torch.randn(3, 8)
    with torch.no_grad():
        expected = model(x)
    twin = copy.deepcopy(model)
    assert finalize(twin) == ["0.weight", "2.weight"]
    assert all(parametrize.is_parametrized(model[i], "weight") for i in (0, 2))
    assert check_nm(model[0].weight, 2, 4)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
        assert torch.equal(twin(x), expected)
    assert finalize(model) == ["0.weight", "2.weight"]


def test_measure_density_checks_patterns():
    model = torchvision.models.resnet18(weights=None)
    result = apply_nm(model, 1, 4, ignore="fc")
    rows = measure_density(model)
    assert {r.name for r in rows} == {f"{r.name}.weight" for r in result.masked}
    assert all(r.valid and r.pattern == "1:4" and r.density == pytest.approx(0.25) for r in rows)
    # break the pattern behind the mask's back: the check must notice
    with torch.no_grad():
        model.layer1[0].conv1.parametrizations.weight[0].mask.fill_(True)
    bad = {r.name: r.valid for r in measure_density(model)}
    assert bad["layer1.0.conv1.weight"] is False
    finalize(model)
    assert measure_density(model) == []
    after = {r.name: r for r in measure_density(model, all_layers=True)}
    assert after["layer2.0.conv1.weight"].density == pytest.approx(0.25)
    assert after["fc.weight"].valid is None and after["fc.weight"].density == 1.0


# --- SR-STE ------------------------------------------------------------------------------


def test_sr_ste_recomputes_mask_when_weights_change():
    layer = nn.Linear(8, 2, bias=False)
    apply_nm(layer, 2, 4, sr_ste=True)
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8], [8.0, 7, 6, 5, 4, 3, 2, 1]]))
    first = layer.weight != 0
    assert first.tolist() == [[False, False, True, True] * 2, [True, True, False, False] * 2]
    with torch.no_grad():
        original.copy_(original.flip(1))
    second = layer.weight != 0
    assert torch.equal(second, first.flip(1))
    assert torch.equal(second, nm_mask(original, 2, 4))
    assert check_nm(layer.weight, 2, 4)


@pytest.mark.parametrize("decay", [2e-4, 0.5])
def test_sr_ste_gradient_is_straight_through_plus_decay_of_pruned_weights(decay):
    layer = nn.Linear(16, 8)
    dense = layer.weight.detach().clone()
    apply_nm(layer, 2, 4, sr_ste=True, sr_ste_decay=decay)
    x = torch.randn(5, 16)
    target = torch.randn(5, 8)
    ((layer(x) - target) ** 2).sum().backward()

    mask = nm_mask(dense, 2, 4)
    effective = (dense * mask).requires_grad_()
    ((nn.functional.linear(x, effective, layer.bias.detach()) - target) ** 2).sum().backward()
    ste = effective.grad  # gradient w.r.t. the masked weight, passed straight through
    grad = layer.parametrizations.weight.original.grad
    assert torch.allclose(grad, ste + decay * (~mask) * dense, atol=1e-6)
    assert torch.allclose(grad[mask], ste[mask], atol=1e-6)  # kept weights: no decay
    extra = grad[~mask] - ste[~mask]
    assert torch.allclose(extra, decay * dense[~mask], atol=1e-6)
    assert extra.abs().min() > 0  # pruned weights really get the decay term
    assert ste[~mask].abs().min() > 0  # and the STE gradient too (not zeroed by the mask)


def test_sr_ste_trains_and_finalizes_to_nm():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 4))
    result = apply_nm(model, 2, 4, sr_ste=True)
    assert result.pattern == "2:4 sr-ste" and len(result.masked) == 2
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 8, 8, 8), torch.randint(0, 4, (8,))
    masks = []
    for _ in range(10):
        masks.append(model[0].weight != 0)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert check_nm(model[0].weight, 2, 4) and check_nm(model[3].weight, 2, 4)
    assert any(not torch.equal(masks[0], later) for later in masks[1:]), "SR-STE masks should move"
    assert all(r.valid for r in measure_density(model))
    with torch.no_grad():
        expected = model(x)
        finalize(model)
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert not parametrize.is_parametrized(model[0]) and check_nm(model[0].weight, 2, 4)


# --- block sparsity --------------------------------------------------------------------


@pytest.mark.parametrize("block,density", [(4, 0.5), ((8, 16), 0.3), (2, 0.1)])
def test_block_masks_reach_density(block, density):
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(64, 128), nn.Linear(128, 25))
    result = apply_block(model, block, density)
    bh, bw = (block, block) if isinstance(block, int) else block
    by_name = {r.name: r for r in result.rows}
    assert by_name["3"].status == "skipped" and "not divisible into" in by_name["3"].reason
    for name in ("0", "2"):
        w = model[int(name)].weight.detach().reshape(model[int(name)].weight.shape[0], -1)
        assert abs(by_name[name].density - density) <= bh * bw / w.numel(), name
        blocks = (w.reshape(w.shape[0] // bh, bh, -1, bw) != 0).sum(dim=(1, 3))
        assert set(blocks.unique().tolist()) <= {0, bh * bw}, "blocks are zeroed whole"
        assert check_block(w, (bh, bw), density)
    assert all(r.valid for r in measure_density(model))


def test_block_mask_keeps_largest_norm_blocks_and_finalizes():
    w = torch.ones(4, 8)
    w[2:, 4:] = 10.0
    w[:2, :4] = 5.0
    assert (block_mask(w, 2, 0.25) == (w == 10.0)).all()
    assert (block_mask(w, 2, 0.5) == (w >= 5.0)).all()
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    apply_block(model, (4, 8), 0.5)
    x = torch.randn(3, 32)
    expected = model(x).detach()
    assert finalize(model) == ["0.weight", "2.weight"]
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert not any(parametrize.is_parametrized(mod) for mod in model.modules())


# --- acceleration reports ------------------------------------------------------------------


def test_cpu_to_semi_structured_reports_no_kernel_and_changes_nothing():
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).to(torch.bfloat16)
    apply_nm(model, 2, 4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    expected = model(x)
    rows = to_semi_structured(model)
    assert [r.name for r in rows] == ["0", "2"]
    assert all(r.status == "dense" and r.reason == "cpu: no sparse kernel, masks give no speed" for r in rows)
    assert all(parametrize.is_parametrized(model[i], "weight") for i in (0, 2))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x), expected)


def test_dense_reasons_name_the_blocking_constraint():
    """The eligibility rules, exercised without a GPU by faking device and capability."""
    def reason(module, weight, capability=(9, 0), backend="cusparselt"):
        return _dense_reason(module, _FakeCuda(weight), capability=capability, backend=backend)

    w24 = nm_mask(torch.randn(64, 128), 2, 4).to(torch.float16)
    assert reason(nn.Linear(128, 64), w24) == ""
    assert reason(nn.Linear(128, 64), w24.float()) == "dtype float32 not supported (needs float16 or bfloat16)"
    assert "compute capability (7, 5) < (8, 0)" in reason(nn.Linear(128, 64), w24, capability=(7, 5))
    assert "not 2:4 sparse" in reason(nn.Linear(128, 64), torch.ones(64, 128, dtype=torch.float16))
    w = nm_mask(torch.randn(40, 128), 2, 4).half()
    assert reason(nn.Linear(128, 40), w) == "shape 40x128 not a multiple of (16, 16) (cusparselt)"
    w = nm_mask(torch.randn(64, 96), 2, 4).half()
    assert reason(nn.Linear(96, 64), w, capability=(8, 6), backend="cutlass") == \
        "shape 64x96 not a multiple of (32, 64) (cutlass)"
    assert reason(nn.Linear(128, 64), w24, capability=(8, 0), backend="cutlass") == ""
    assert reason(nn.Linear(128, 64), w24, capability=(9, 0), backend="cutlass") == (
        "compute capability (9, 0): torch's CUTLASS 2:4 kernels run on 8.x only; use backend='cusparselt'")
    assert "nn.Linear (2-D matmul) only" in reason(nn.Conv2d(128, 64, 1), w24)
    fused = _dense_reason(nn.Linear(128, 64), _FakeCuda(w24), capability=(9, 0), backend="cutlass",
                          fused_by="MultiheadAttention")
    assert fused == "weight read by MultiheadAttention's fused kernel, which has no sparse path"
    assert _fused_children(nn.TransformerEncoderLayer(32, 4)) == {"self_attn.out_proj": "MultiheadAttention"}


class _FakeCuda:
    """Stands in for a CUDA weight: a real tensor's values with device type 'cuda'."""

    def __init__(self, tensor):
        self._t = tensor
        self.device = torch.device("cuda")
        self.dtype, self.shape = tensor.dtype, tensor.shape

    def __getattr__(self, name):
        return getattr(self._t, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for semi-structured sparse kernels")
def test_cuda_to_semi_structured_converts_2_4_linears():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0 for sparse tensor cores")
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 100), nn.Linear(100, 64))
    model = model.to("cuda", torch.float16).eval()
    apply_nm(model, 2, 4)
    x = torch.randn(64, 256, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        expected = model(x)
    rows = {r.name: r for r in to_semi_structured(model)}
    assert rows["0"].status == "sparse", rows["0"].reason
    assert rows["2"].status == "dense" and "not a multiple of" in rows["2"].reason
    assert rows["3"].status == "dense" and "not 2:4 sparse" not in rows["3"].reason
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.inference_mode():
        assert torch.allclose(model(x), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for semi-structured sparse kernels")
def test_cuda_example_inputs_search_an_algorithm_per_converted_layer():
    if torch.cuda.get_device_capability() < (8, 0) or default_backend() != "cusparselt":
        pytest.skip("needs cuSPARSELt and compute capability >= 8.0")
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.Linear(256, 100))
    model = model.to("cuda", torch.bfloat16).eval()
    apply_nm(model, 2, 4)
    x = torch.randn(3, 700, 256, device="cuda", dtype=torch.bfloat16)  # 3-D: tokens are flattened
    with torch.inference_mode():
        expected = model(x)
    rows = {r.name: r for r in to_semi_structured(model, example_inputs=x)}
    for name in ("0", "2"):
        assert rows[name].status == "sparse" and isinstance(rows[name].alg_id, int), rows[name]
        assert model.get_submodule(name).weight.alg_id_cusparselt == rows[name].alg_id
    assert rows["3"].status == "dense" and rows["3"].alg_id is None
    with torch.inference_mode():
        assert torch.allclose(model(x).float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_example_inputs_need_converted_cusparselt_layers():
    model = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(4, 64)
    with pytest.raises(SpecError, match="backend='cutlass' has a single kernel; drop example_inputs"):
        to_semi_structured(model, backend="cutlass", example_inputs=x)
    with pytest.raises(SpecError, match="convert=False converts nothing; drop example_inputs"):
        to_semi_structured(model, backend="cusparselt", convert=False, example_inputs=x)
    # On CPU nothing converts, so nothing is tuned and the model does not even run.
    rows = to_semi_structured(model, backend="cusparselt", example_inputs=torch.randn(4, 3))
    assert [(r.status, r.alg_id) for r in rows] == [("dense", None)]


# --- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,m,message",
    [
        (4, 4, "n must be smaller than m"),
        (5, 4, "n must be smaller than m"),
        (0, 4, "n must be > 0"),
        (-1, 4, "n must be > 0"),
        (2.0, 4, "n must be an int, got float"),
        ("2", 4, "n must be an int, got str"),
        (True, 4, "n must be an int, got bool"),
        (2, 4.5, "m must be an int, got float"),
    ],
)
def test_bad_nm_arguments_raise_spec_error(n, m, message):
    with pytest.raises(SpecError, match=message):
        apply_nm(nn.Linear(8, 8), n, m)
    with pytest.raises(SpecError, match=message):
        check_nm(torch.ones(8, 8), n, m)


def test_other_bad_inputs_raise_spec_error():
    with pytest.raises(SpecError, match="sr_ste_decay must be"):
        apply_nm(nn.Linear(8, 8), 2, 4, sr_ste=True, sr_ste_decay=-1.0)
    with pytest.raises(SpecError, match="ignore patterns must be strings"):
        apply_nm(nn.Linear(8, 8), 2, 4, ignore=[3])
    with pytest.raises(SpecError, match="model must be a torch.nn.Module"):
        apply_nm(torch.ones(3), 2, 4)
    with pytest.raises(SpecError, match="not a multiple of m=4"):
        check_nm(torch.ones(8, 6), 2, 4)
    for block in (0, (4,), (4, 0), 2.5, True):
        with pytest.raises(SpecError, match="block must be"):
            apply_block(nn.Linear(8, 8), block)
    for density in (0, 1.5, float("nan"), "half"):
        with pytest.raises(SpecError, match="density must be"):
            apply_block(nn.Linear(8, 8), 4, density)


@pytest.mark.parametrize("round_to", [1, 4])
def test_compress_reports_measured_density_and_kernel_of_every_layer(round_to):
    import fxprune
    from fxprune.report import Report

    model = torchvision.models.resnet18(weights=None).eval()
    # global ranking at round_to=1 leaves some widths on multiples of 4 and some off them
    result = fxprune.compress(model, {"input_shape": [1, 3, 64, 64], "ratio": 0.3, "nm": "2:4",
                                      "round_to": round_to, "scope": "global"})
    rows = {row["layer"]: row for row in result.report.sparsity}
    convs = {n: m for n, m in result.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert set(rows) == set(convs)
    for name, row in rows.items():
        weight = convs[name].weight
        # the density is measured on the emitted model, after BN folding
        assert row["density"] == pytest.approx(float((weight != 0).float().mean()), abs=1e-6)
        assert row["kernel"] == "dense" and row["reason"]  # CPU: never a sparse kernel
        if row["pattern"] == "2:4":
            assert check_nm(weight, 2, 4) and row["density"] == pytest.approx(0.5, abs=0.01)
            assert "no sparse kernel" in row["reason"]
        else:
            assert "not a multiple of m=4" in row["reason"]
    skipped_for_width = [r for r in rows.values() if "input channels (" in r["reason"] and r["layer"] != "conv1"]
    hint = [n for n in result.report.notes if "set round_to=4" in n]
    if round_to == 4:  # pruned widths stay multiples of 4: only the 3-channel stem is skipped
        assert not skipped_for_width and not hint
    else:
        assert skipped_for_width and hint
    text = str(result.report)
    assert "sparsity (measured density" in text and "cpu: no sparse kernel" in text
    assert Report.from_dict(result.report.to_dict()).sparsity == result.report.sparsity
