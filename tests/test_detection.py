"""Detectors: the learnable parts are captured and pruned, the post-processing stays the
model's own code (capture="parts"), and the pruned copy still detects through its forward.

The default run takes a YOLO-style detector written here and an FCOS on a small ResNet-18
FPN; torchvision's five detectors run under ``-m zoo``.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.ops import nms

import fxprune
from fxprune.errors import SpecError, TraceError, WriteBackError
from fxprune.passes.verify import check_zero_invariance
from helpers import assert_state_unchanged, count_params, half_plan, randomize, state_snapshot


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv(3, 16, 2)
        self.stage1 = nn.Sequential(conv(16, 32, 2), conv(32, 32))
        self.stage2 = nn.Sequential(conv(32, 64, 2), conv(64, 64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c3 = self.stage1(self.stem(x))
        return c3, self.stage2(c3)


class Neck(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.fuse = nn.Sequential(conv(64 + 32, 48), conv(48, 48))
        self.lateral = conv(64, 64)

    def forward(self, c3: torch.Tensor, c4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fuse(torch.cat([self.up(c4), c3], 1)), self.lateral(c4)


class Head(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.small = nn.Sequential(conv(48, 32), nn.Conv2d(32, 5 + classes, 1))
        self.large = nn.Sequential(conv(64, 32), nn.Conv2d(32, 5 + classes, 1))

    def forward(self, p3: torch.Tensor, p4: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.small(p3).flatten(2), self.large(p4).flatten(2)], 2)


class TinyYolo(nn.Module):
    """A backbone, a neck that upsamples and concatenates, a head on two scales, then a
    decode whose output size depends on the values: score threshold and NMS."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.backbone, self.neck, self.head = Backbone(), Neck(), Head(classes)

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        preds = self.head(*self.neck(*self.backbone(torch.stack(images))))
        results = []
        for pred in preds.transpose(1, 2):  # per image: (anchors, 5 + classes)
            scores, labels = (pred[:, 4:5].sigmoid() * pred[:, 5:].sigmoid()).max(1)
            keep = scores > 0.3
            if not keep.any():  # value-dependent control flow: neither fx nor export takes it
                results.append({"boxes": pred.new_zeros(0, 4), "labels": labels[:0], "scores": scores[:0]})
                continue
            xy, wh = pred[keep, :2].sigmoid() * 64, pred[keep, 2:4].exp() * 8
            boxes = torch.cat([xy - wh / 2, xy + wh / 2], 1)
            kept = nms(boxes, scores[keep], 0.5)
            results.append({"boxes": boxes[kept], "labels": labels[keep][kept], "scores": scores[keep][kept]})
        return results


def small_fcos() -> nn.Module:
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = BackboneWithFPN(torchvision.models.resnet18(weights=None), {"layer2": "0", "layer3": "1", "layer4": "2"},
                               [128, 256, 512], 64, extra_blocks=LastLevelP6P7(64, 64))
    return torchvision.models.detection.FCOS(backbone, num_classes=3, min_size=128, max_size=128)


def check_detector(model: nn.Module, images: list[torch.Tensor], capture: str = "auto") -> fxprune.DependencyGraph:
    """Analyze, prune half of every zero-invariant group, check the oracle and the copy's own forward."""
    model = model.eval()
    before = state_snapshot(model)
    graph = fxprune.analyze(model, (images,), capture=capture)
    assert graph.capture == "parts"
    zero_invariant = [g for g in graph.prunable_groups if g.zero_invariant]
    assert len(zero_invariant) >= 3
    plan = half_plan(graph, zero_invariant)
    assert check_zero_invariance(model, graph, plan) < 1e-4
    mine = fxprune.prune(graph, plan, emit="module")
    assert type(mine) is type(model)
    assert check_zero_invariance(model, graph, plan, mine) < 1e-4  # the copy's own parts
    with torch.no_grad():
        out = mine(images)
    assert isinstance(out, list) and len(out) == len(images)
    assert all(set(o) == {"boxes", "labels", "scores"} and o["boxes"].shape[1:] == (4,) for o in out)
    assert count_params(mine) < 0.8 * count_params(model)
    assert_state_unchanged(model, before)
    return graph


def test_yolo_style_detector_is_pruned_through_its_parts():
    torch.manual_seed(0)
    model = randomize(TinyYolo()).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    graph = check_detector(model, images)
    # the learnable modules are the parts; the decode and NMS stay the model's code
    assert [p.path for p in graph.parts] == ["backbone", "neck", "head"]
    targets = {n.target for n in graph.gm.graph.nodes if n.op == "call_module"}
    assert "backbone.stage1.0.0" in targets  # the model's own state_dict paths
    # a tensor one part returns and only other parts take is an edge of the graph: c3 and c4
    # cross into the neck's concat and their channels shrink with it; the head's output,
    # which the decode reads, stays whole
    widths = {g.producers[0]: g.size for g in graph.prunable_groups}
    assert widths["backbone.stage1.1.0.weight[0]"] == 32 and widths["backbone.stage2.1.0.weight[0]"] == 64
    assert graph.parts[0].outputs == () and graph.parts[2].outputs == (0,)
    assert [g.size for g in graph.groups if not g.prunable] == [3, 8]


def test_a_part_output_other_code_reads_stays_whole():
    class Scored(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 1))
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, images):
            feats = self.body(torch.stack(images))
            scores = self.head(feats).flatten(1)
            return [s[s > 0] + f.mean() for s, f in zip(scores, feats)]  # feats read outside the parts

    graph = fxprune.analyze(Scored().eval(), ([torch.randn(3, 8, 8)],), capture="parts")
    assert graph.parts[0].outputs == (0,)  # body's output is a graph output: the code above reads it
    assert {g.producers[0]: g.size for g in graph.prunable_groups} == {"body.0.weight[0]": 8}


def test_small_fcos_keeps_detecting():
    torch.manual_seed(0)
    graph = check_detector(randomize(small_fcos()), [torch.rand(3, 128, 128)], capture="parts")
    assert [p.path for p in graph.parts] == ["backbone", "head"]


def test_compress_writes_a_detector_back_into_its_class():
    torch.manual_seed(0)
    model = randomize(TinyYolo()).eval()
    images = [torch.rand(3, 64, 64)]
    calibration = [([torch.rand(3, 64, 64)],), ([torch.rand(3, 64, 64), torch.rand(3, 64, 64)],)]
    result = fxprune.compress(model, {"ratio": 0.5, "fuse": False}, example_inputs=(images,),
                              calibration=calibration)  # activation norms: batches reach the parts
    assert type(result.model) is TinyYolo
    assert any("auto chose activation" in n for n in result.notes)
    assert any(n.startswith("capture: parts") for n in result.notes)
    assert result.model.neck.fuse[0][0].out_channels == 24
    with torch.no_grad():
        assert set(result.model(images)[0]) == {"boxes", "labels", "scores"}
    with pytest.raises(WriteBackError, match="emit='graph' cannot return a model captured as parts"):
        fxprune.compress(model, {"ratio": 0.5, "emit": "graph"}, example_inputs=(images,))


def test_parts_capture_says_why_nothing_could_be_captured():
    class Opaque(nn.Module):  # its only weight is used by the value-dependent code itself
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, images):
            return [x[x > 0] * self.w.sum() for x in images]

    with pytest.raises(TraceError, match="no submodule of Opaque could be captured as a part"):
        fxprune.analyze(Opaque(), ([torch.randn(3, 4)],), capture="parts")


def test_nested_example_inputs_are_checked_leaf_by_leaf():
    image = torch.rand(3, 8, 8)
    spec = fxprune.Spec(example_inputs=([image], {"scale": 2.0}), ratio=0.5)
    assert spec.make_example_inputs()[0][0] is image
    with pytest.raises(SpecError, match=r"spec.example_inputs\[0\]\[1\]: expected a tensor"):
        fxprune.Spec(example_inputs=([image, object()],), ratio=0.5)


DETECTORS = ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn", "ssd300_vgg16",
             "ssdlite320_mobilenet_v3_large"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", DETECTORS)
def test_torchvision_detectors(name):
    torch.manual_seed(0)
    keywords = {} if name.startswith("ssd") else {"min_size": 128, "max_size": 128}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **keywords)
    check_detector(model, [torch.rand(3, 128, 128)], capture="parts")


def test_a_module_whose_weight_other_code_reads_is_no_part():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
            self.head = nn.Sequential(nn.Conv2d(4, 6, 1), nn.ReLU(), nn.Conv2d(6, 2, 1))

        def forward(self, images):
            scores = self.head(self.body(torch.stack(images))).flatten(1)
            bias = self.body[0].bias.sum()  # body's weight read by the code around the parts
            return [s[s > 0] + bias for s in scores]

    graph = fxprune.analyze(Shared().eval(), ([torch.randn(3, 8, 8)],), capture="parts")
    assert [p.path for p in graph.parts] == ["head"]
    assert {g.producers[0]: g.size for g in graph.prunable_groups} == {"head.0.weight[0]": 6}


def test_export_error_is_short_and_keeps_the_details():
    # SSD's export error is a 4,900-character graph dump: the message keeps its first line
    with pytest.raises(TraceError) as info:
        fxprune.analyze(TinyYolo().eval(), ([torch.rand(3, 64, 64)],), capture="export")
    assert len(str(info.value)) < 600 and 'capture="parts"' in str(info.value)
    assert info.value.details.splitlines()[0][:60] in str(info.value)  # the full text, from its first line
