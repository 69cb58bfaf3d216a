"""fxprune: structured pruning for PyTorch as a torch.fx compiler.

>>> import torch, fxprune
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3))
>>> graph = fxprune.analyze(net, torch.randn(1, 3, 32, 32))
>>> g = graph.prunable_groups[0]            # conv 1's 16 output channels
>>> small = fxprune.prune(graph, {g.id: range(8)})
>>> small(torch.randn(1, 3, 32, 32)).shape
torch.Size([1, 8, 28, 28])
"""
from .capture import trace
from .channels import DependencyGraph, Group, analyze, register_rule
from .channels.branches import Branch, unit
from .channels.layers import Layer
from .channels.feasible import feasible_plan
from .errors import (AnalysisError, CheckpointError, FxpruneError, PlanError, SpecError, TraceError, VerificationError,
                     WeightError, WriteBackError)
from .compress import Result, compress
from .passes.emit import prune
from .checkpoint import save_pruned
from .checkpoint_scores import score_checkpoint
from .passes.verify import check_zero_invariance
from .spec import LatencySpec, Spec

__version__ = "0.1.0"

__all__ = [
    "analyze", "prune", "save_pruned", "score_checkpoint", "compress", "feasible_plan", "check_zero_invariance", "Spec", "LatencySpec", "Result", "trace", "register_rule", "DependencyGraph", "Group", "Branch", "Layer", "unit",
    "FxpruneError", "TraceError", "AnalysisError", "PlanError", "VerificationError", "SpecError", "WeightError", "WriteBackError",
    "CheckpointError",
]
