"""Compress torchvision's resnet18 to half its FLOPs and print the report.

    python examples/quickstart.py
"""
import torchvision

import fxprune
from fxprune import compress

model = torchvision.models.resnet18(weights=None)  # random weights: no download
result = compress(model, {"input_shape": [1, 3, 224, 224], "target": {"flops": 0.5}})
print(result.report)
