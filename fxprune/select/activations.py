"""Input activation norms of the layers that consume channels, over calibration batches.

An interpreter runs the batches through ``graph.gm`` (eval mode, no gradients) and, at
every node that multiplies an activation by a weight read from the model (``nn.Linear``
and ``nn.Conv*`` / ``nn.ConvTranspose*`` modules under torch.fx; ``aten.linear``, ``aten.conv*``,
``aten.addmm``, ``aten.mm``/``matmul`` with a ``get_attr`` weight under torch.export),
adds up the squares of each input channel over every token, pixel and sample (tokens a
batch's ``attention_mask`` marks as padding count for nothing). Only
those per-channel sums are kept, never an activation, so memory is one vector per
weight. The result is keyed like the analysis' bindings, ``(state_dict key, weight dim)``,
the dim whose index ``j`` multiplies input channel ``j``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune._util import eval_mode
from fxprune.capture.inputs import ExampleInputs
from fxprune.errors import SpecError
from fxprune.select.distributed import all_reduce_sums

aten = torch.ops.aten


@dataclass(frozen=True)
class _Consumer:
    """Where a node's activation and weight are, and which weight dim meets the channels."""

    act: int  # argument index of the activation
    weight_dim: int  # weight dim indexed by the activation's channels
    conv: bool  # channels on dim 1 (dim 0 unbatched), else on the last dim


_LINEAR, _ADDMM, _CONV = _Consumer(0, 1, False), _Consumer(1, 0, False), _Consumer(0, 1, True)
_CONV_T = _Consumer(0, 0, True)  # a transposed conv's weight is (in, out // groups, *kernel)
_FUNCTIONS = {  # target -> (consumer, argument index of the get_attr weight)
    F.linear: (_LINEAR, 1), aten.linear.default: (_LINEAR, 1),
    aten.addmm.default: (_ADDMM, 2),
    aten.mm.default: (_Consumer(0, 0, False), 1), aten.matmul.default: (_Consumer(0, 0, False), 1),
    **{f: (_CONV, 1) for f in (F.conv1d, F.conv2d, F.conv3d, aten.conv1d.default, aten.conv2d.default,
                               aten.conv3d.default, aten.convolution.default)},
    **{f: (_CONV_T, 1) for f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
                                 aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                                 aten.conv_transpose3d.input)},
}


def consumers(gm: torch.fx.GraphModule, canonical: dict[str, str]) -> dict[torch.fx.Node, tuple[_Consumer, str]]:
    """``{node: (consumer, weight key)}`` for the nodes whose activation meets a model weight.

    ``canonical`` maps every state_dict key to the one the analysis binds (tied weights).

    Example:
        >>> gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
        >>> [(n.name, key) for n, (_, key) in consumers(gm, {}).items()]
        [('_0', '0.weight')]
    """
    modules = dict(gm.named_modules())
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = modules.get(node.target)
            kind = None
            if isinstance(module, nn.Linear):
                kind = _LINEAR
            elif isinstance(module, nn.modules.conv._ConvNd):
                kind = _CONV_T if module.transposed else _CONV
            key = f"{node.target}.weight"
        elif node.op == "call_function" and node.target in _FUNCTIONS:
            kind, at = _FUNCTIONS[node.target]
            weight = node.args[at] if at < len(node.args) else node.kwargs.get("weight")
            if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
                continue  # a product of two activations (attention scores) has no weight
            if node.target is aten.convolution.default and node.args[6]:
                kind = _CONV_T  # transposed: its weight holds input channels on dim 0
            key = weight.target
        else:
            continue
        if kind is not None:
            found[node] = (kind, canonical.get(key, key))
    return found


class NormSums:
    """Per input channel sums of squares of the activations the consumers read, keyed
    ``(weight key, weight dim)``; only the weights' shapes are needed (meta tensors do).

    Example:
        >>> sums = NormSums({"fc.weight": torch.Size([3, 2])})
        >>> sums.add(torch.tensor([[3.0, 0.0], [4.0, 1.0]]), _LINEAR, "fc.weight")
        >>> sums.norms()[("fc.weight", 1)].tolist()
        [5.0, 1.0]
    """

    def __init__(self, shapes: dict[str, torch.Size]):
        self.shapes = shapes
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.mask: torch.Tensor | None = None  # [batch, tokens]: 1 for a real token, 0 for padding

    def set_batch(self, batch: ExampleInputs) -> None:
        """Take the padding mask of the batch whose activations come next."""
        mask = batch.kwargs.get("attention_mask")  # the Hugging Face name for the padding mask
        self.mask = mask.float() if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None

    def add(self, x, kind: _Consumer, key: str) -> None:
        """Add the squares of ``x``, the input of a consumer of weight ``key``, per channel."""
        shape = self.shapes.get(key)
        if not isinstance(x, torch.Tensor) or shape is None or len(shape) <= kind.weight_dim:
            return
        axis = (1 if x.ndim == len(shape) else 0) if kind.conv else x.ndim - 1
        width = shape[kind.weight_dim]
        if x.ndim == 0 or x.shape[axis] != width:
            return  # a grouped conv: its units tie input and output blocks, scored elsewhere
        others = [d for d in range(x.ndim) if d != axis % x.ndim]
        x = x.detach().float()
        if self.mask is not None and not kind.conv and x.ndim == 3 and tuple(x.shape[:2]) == tuple(self.mask.shape):
            x = x * self.mask.unsqueeze(-1)  # padded positions carry no information about the channel
        squares = x.square().sum(others)  # one temporary the size of x, then C numbers
        slot = (key, kind.weight_dim)
        self.sums[slot] = self.sums[slot] + squares if slot in self.sums else squares

    def norms(self) -> dict[tuple[str, int], np.ndarray]:
        """The L2 norms, the sums first added over ranks under ``torch.distributed``
        (each rank ran its share of the batches)."""
        return {slot: total.sqrt().double().cpu().numpy() for slot, total in all_reduce_sums(self.sums).items()}


class _NormRecorder(torch.fx.Interpreter):
    """Runs the graph and adds each consumer input's per-channel sum of squares."""

    def __init__(self, gm: torch.fx.GraphModule, watch: dict, sums: NormSums):
        super().__init__(gm, garbage_collect_values=True)
        self.watch, self.sums = watch, sums

    def run_node(self, n: torch.fx.Node):
        if n in self.watch:
            kind, key = self.watch[n]
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.sums.add(args[kind.act] if kind.act < len(args) else kwargs.get("input"), kind, key)
        return super().run_node(n)


def input_norms(gm: torch.fx.GraphModule, batches: Iterable[ExampleInputs],
                canonical: dict[str, str] | None = None) -> dict[tuple[str, int], np.ndarray]:
    """``{(weight key, weight dim): L2 norm of each input channel over every batch}``.

    Under ``torch.distributed`` ``batches`` are this rank's share and the sums are added
    over ranks. ``gm`` runs in eval mode with no gradients; its (and every submodule's) training flag
    is restored afterwards, and nothing else of it changes.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> gm = torch.fx.symbolic_trace(net)
        >>> norms = input_norms(gm, [ExampleInputs((torch.tensor([[3.0, 0.0], [4.0, 0.0]]),))])
        >>> norms[("0.weight", 1)].tolist()
        [5.0, 0.0]
    """
    canonical = canonical or {}
    weights = {canonical.get(k, k): v for k, v in
               [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]}
    sums = NormSums({k: v.shape for k, v in weights.items()})
    recorder = _NormRecorder(gm, consumers(gm, canonical), sums)
    device = next((t.device for t in weights.values()), torch.device("cpu"))
    with eval_mode(gm), torch.no_grad():
        for i, batch in enumerate(batches):
            batch = batch.to(device)
            sums.set_batch(batch)
            try:
                recorder.run(*batch.flat(gm), enable_io_processing=False)
            except Exception as error:  # the model's own error, on the user's batch
                raise model_fails(i, batch, error) from error
    return sums.norms()


def model_fails(i: int, batch: ExampleInputs, error: Exception) -> SpecError:
    """The error for a calibration batch the model cannot run."""
    return SpecError(f"spec.calibration[{i}]: the model fails on this batch ({batch.describe()}): "
                     f"{type(error).__name__}: {str(error).strip()[:300]}; give batches the model accepts, "
                     "like example_inputs")


__all__ = ["input_norms", "consumers", "NormSums", "model_fails"]
