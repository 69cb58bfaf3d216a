"""The torchvision zoo proof, shared by tests/test_zoo.py and benchmarks/zoo_sweep.py."""
from __future__ import annotations

import time
from collections import Counter

import torch
import torchvision

from helpers import branch_oracle_error, prune_and_check, unit_scale

# One model of every family runs in CI; the full sweep runs all of them.
FAMILIES = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet",
    "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf",
    "regnet_y_400mf", "resnet18", "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_0", "swin_t",
    "swin_v2_t", "vgg11_bn", "vit_b_16", "wide_resnet50_2",
]
ALL_MODELS = torchvision.models.list_models(module=torchvision.models)


# ViTs take their image size as an argument: at 64x64 they keep every block and width
# with 17 tokens instead of 197 (5-20x faster; the sweep times them at 224, full size)
SMALL_IMAGE = {"vit_b_16": 64}


def build(name: str, small: bool = False) -> torch.nn.Module:
    """``name`` from torchvision with random weights; ``small``: at ``SMALL_IMAGE``'s size where it has one."""
    extra = {"image_size": SMALL_IMAGE[name]} if small and name in SMALL_IMAGE else {}
    return torchvision.models.get_model(name, weights=None, **extra)


def input_for(name: str, small: bool = False) -> torch.Tensor:
    """Small images where the architecture allows; ViT/MaxViT fix 224 (ViT takes 64 when
    built ``small``), Swin needs windows."""
    if small and name in SMALL_IMAGE:
        size = SMALL_IMAGE[name]
    elif name.startswith(("vit", "maxvit", "swin")):
        size = 224
    elif name.startswith(("inception", "googlenet", "alexnet")):
        size = 96
    else:
        size = 64
    batch = 1 if name in ("vit_h_14", "regnet_y_128gf", "vit_l_16", "regnet_y_32gf") else 2
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def reason_kind(reason: str) -> str:
    """Collapse a freeze reason to its kind, for the sweep's summary column."""
    for key in ("graph output", "fixed width", "MultiheadAttention", "has no channel rule", "only one channel",
                "carries no channels", "fixed positions", "channel count is checked", "mixes"):
        if key in reason:
            return key
    return reason[:40]


def check_model(name: str, small: bool = False) -> dict:
    """Analyze, prune half of every prunable group, run the oracle. Returns a table row.
    ``small``: ViTs at a smaller image size (:func:`build`), as CI runs them."""
    model = unit_scale(build(name, small)).eval()
    x = input_for(name, small)
    start = time.perf_counter()
    graph, _, error = prune_and_check(model, x)
    frozen = [g for g in graph.groups if not g.prunable]
    zero_invariant = sum(g.zero_invariant for g in graph.prunable_groups)
    kinds = Counter(reason_kind(g.reason) for g in frozen)
    return {
        "model": name, "nodes": len(graph.gm.graph.nodes), "groups": len(graph.groups),
        "prunable": len(graph.prunable_groups),
        "zero_invariant": zero_invariant,
        "frozen": len(frozen), "frozen_why": ", ".join(f"{k} x{v}" for k, v in kinds.most_common()),
        # prune_and_check reports 0.0 when no group is zero-invariant: no oracle ran then
        "oracle_error": error if zero_invariant else None,
        "branch_oracle_error": branch_oracle_error(model, graph),  # every other zero-invariant branch removed
        "seconds": round(time.perf_counter() - start, 2),
    }
