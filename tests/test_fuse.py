"""The inference-time fusion pass (fxprune.passes.fuse)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxprune.passes.fuse import FuseResult, fuse

TOL = dict(atol=1e-5, rtol=1e-4)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats and affine parameters, so folding changes the weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BATCHNORMS):
                n = module.num_features
                if module.running_mean is not None:
                    module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
                    module.running_var.copy_(torch.rand(n, generator=generator) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                    module.bias.copy_(torch.rand(n, generator=generator) - 0.5)
    return model


def trace(model: nn.Module) -> fx.GraphModule:
    return fx.symbolic_trace(randomize_batchnorms(model).eval())


def modules_of(gm: nn.Module, types) -> list[str]:
    return [name for name, m in gm.named_modules() if isinstance(m, types)]


def assert_same_function(gm: fx.GraphModule, result: FuseResult, *inputs):
    assert isinstance(result.gm, fx.GraphModule)
    result.gm.graph.lint()
    with torch.no_grad():
        torch.testing.assert_close(result.gm(*inputs), gm.eval()(*inputs), **TOL)


def test_resnet18_folds_every_batchnorm_and_leaves_input_alone():
    torch.manual_seed(0)
    gm = trace(torchvision.models.resnet18(weights=None))
    gm.train()  # the pass must eval its copy, not the caller's module
    code = gm.code
    state = {k: v.clone() for k, v in gm.state_dict().items()}

    result = fuse(gm)

    assert modules_of(result.gm, BATCHNORMS) == []
    assert len(result.folded) == 20
    assert ("conv1", "bn1") in result.folded
    assert result.notes == []
    # the input GraphModule is unchanged: same code, same tensors, still training
    assert gm.code == code
    assert gm.state_dict().keys() == state.keys()
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in state.items())
    assert gm.training and len(modules_of(gm, BATCHNORMS)) == 20
    # folding changed the conv weights (the BN stats were not the identity) ...
    assert not torch.allclose(result.gm.conv1.weight, gm.conv1.weight)
    # ... and kept the function
    assert_same_function(gm, result, torch.randn(2, 3, 64, 64))


class ConvFeedsTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_with_two_users_is_not_folded():
    gm = trace(ConvFeedsTwo())
    result = fuse(gm)
    assert modules_of(result.gm, nn.BatchNorm2d) == ["bn"]
    assert result.folded == []
    assert any("conv 'conv'" in note and "2 users" in note for note in result.notes)
    assert all(note.startswith("fuse: ") for note in result.notes)
    assert_same_function(gm, result, torch.randn(2, 3, 8, 8))


class ConvCalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


def test_conv_called_twice_is_not_folded():
    gm = trace(ConvCalledTwice())
    result = fuse(gm)
    assert modules_of(result.gm, nn.BatchNorm2d) == ["bn"]
    assert any("module 'conv' is called 2 times" in note for note in result.notes)
    assert_same_function(gm, result, torch.randn(2, 4, 8, 8))


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Identity(), nn.ReLU(),
                                  nn.AlphaDropout(0.1))
        self.skip = nn.Identity()

    def forward(self, x):
        y = F.dropout(self.body(x), 0.3, self.training)
        return self.skip(y) + x


def test_dropout_and_identity_are_removed():
    gm = trace(Noisy())
    result = fuse(gm)
    assert modules_of(result.gm, (nn.Dropout, nn.AlphaDropout, nn.Identity)) == []
    functions = [n.target for n in result.gm.graph.nodes if n.op == "call_function"]
    assert F.dropout not in functions
    assert len(result.removed) == 5
    assert result.notes == []  # traced in eval mode: training=False, nothing to say
    assert_same_function(gm, result, torch.randn(3, 8))


class AlwaysDropout(nn.Module):
    def forward(self, x):
        return F.dropout(x, 0.5) * 2  # training defaults to True: a bug the note points out


def test_dropout_traced_in_training_mode_is_noted():
    result = fuse(fx.symbolic_trace(AlwaysDropout()))
    assert [n.op for n in result.gm.graph.nodes] == ["placeholder", "call_function", "output"]
    assert any("training=True" in note for note in result.notes)


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv1d(3, 5, 3), nn.BatchNorm1d(5), (2, 3, 10)),
    (nn.Conv3d(3, 5, 3, groups=1), nn.BatchNorm3d(5), (1, 3, 6, 6, 6)),
    (nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4), (2, 4, 7, 7)),
    (nn.ConvTranspose2d(3, 5, 3, stride=2), nn.BatchNorm2d(5), (2, 3, 5, 5)),
    (nn.Conv2d(3, 5, 1), nn.BatchNorm2d(5, affine=False), (2, 3, 4, 4)),
])
def test_conv_batchnorm_variants_fold(conv, bn, shape):
    gm = trace(nn.Sequential(conv, bn, nn.ReLU()))
    result = fuse(gm)
    assert result.folded == [("0", "1")] and result.notes == []
    assert modules_of(result.gm, BATCHNORMS) == []
    assert_same_function(gm, result, torch.randn(shape))


@pytest.mark.parametrize("affine", [True, False])
def test_linear_batchnorm_folds_on_2d_input(affine):
    gm = trace(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, affine=affine)))
    x = torch.randn(4, 6)
    result = fuse(gm, example_inputs=x)
    assert result.folded == [("0", "1")]
    assert modules_of(result.gm, BATCHNORMS) == []
    assert_same_function(gm, result, x)


def test_linear_batchnorm_folds_with_shape_prop_metadata():
    gm = trace(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    x = torch.randn(4, 6)
    ShapeProp(gm).propagate(x)  # what the analysis leaves on node.meta
    result = fuse(gm)
    assert result.folded == [("0", "1")]
    assert_same_function(gm, result, x)


def test_linear_batchnorm_without_shapes_is_kept():
    gm = trace(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    result = fuse(gm)
    assert result.folded == []
    assert any("linear '0'" in note and "example_inputs" in note for note in result.notes)


def test_linear_batchnorm_on_3d_input_is_kept():
    # BatchNorm1d on (N, L, C) normalises dim 1 (L), not the linear's features.
    gm = trace(nn.Sequential(nn.Linear(7, 7), nn.BatchNorm1d(3)))
    x = torch.randn(2, 3, 7)
    result = fuse(gm, example_inputs=(x,))
    assert result.folded == []
    assert any("3-D" in note for note in result.notes)
    assert_same_function(gm, result, x)


def test_batchnorm_without_running_stats_is_kept():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)))
    result = fuse(gm)
    assert modules_of(result.gm, nn.BatchNorm2d) == ["1"]
    assert any("track_running_stats=False" in note for note in result.notes)
    assert_same_function(gm, result, torch.randn(2, 3, 6, 6))


def test_batchnorm_after_activation_is_explained():
    gm = trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)))
    result = fuse(gm)
    assert any("batchnorm '2' not folded: it reads '1' (ReLU)" in note for note in result.notes)
    assert_same_function(gm, result, torch.randn(2, 3, 6, 6))


class FunctionalConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 3, 3, 3))
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(F.conv2d(x, self.weight))


def test_batchnorm_after_functional_conv_is_explained():
    gm = trace(FunctionalConv())
    result = fuse(gm)
    assert any("batchnorm 'bn' not folded: it reads 'conv2d'" in note for note in result.notes)
    assert_same_function(gm, result, torch.randn(2, 3, 6, 6))


class StandardizedConv(nn.Conv2d):
    def forward(self, x):
        w = (self.weight - self.weight.mean()) / (self.weight.std() + 1e-5)
        return self._conv_forward(x, w, self.bias)


class LeafTracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, StandardizedConv) or super().is_leaf_module(m, qualname)


def test_conv_subclass_is_not_folded():
    # Folding into a subclass that overrides forward would change the function.
    model = randomize_batchnorms(nn.Sequential(StandardizedConv(3, 4, 3), nn.BatchNorm2d(4))).eval()
    gm = fx.GraphModule(model, LeafTracer().trace(model))
    assert any(n.op == "call_module" and n.target == "0" for n in gm.graph.nodes)
    result = fuse(gm)
    assert result.folded == []
    assert any("StandardizedConv" in note for note in result.notes)
    assert_same_function(gm, result, torch.randn(2, 3, 6, 6))


class TiedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.b(self.bn(self.a(x)))


def test_conv_with_tied_weight_is_not_folded():
    gm = trace(TiedConvs())
    result = fuse(gm)
    assert result.folded == []
    assert any("module 'a' shares parameter 'a.weight'" in note for note in result.notes)
    assert_same_function(gm, result, torch.randn(1, 4, 5, 5))


class ReadsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.abs().mean()


def test_conv_whose_weight_is_read_directly_is_not_folded():
    gm = trace(ReadsWeight())
    result = fuse(gm)
    assert result.folded == []
    assert any("read directly" in note for note in result.notes)
    assert_same_function(gm, result, torch.randn(1, 3, 6, 6))


def test_fuse_requires_a_graph_module():
    with pytest.raises(TypeError, match="symbolic_trace"):
        fuse(nn.Linear(2, 2))
