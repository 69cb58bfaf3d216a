"""Scores of a model larger than memory, from its safetensors checkpoint.

A model analysed on the meta device has no weights to rank channels by. ``score_checkpoint``
reads them from the checkpoint one at a time while the calibration batches run through the
graph layer by layer (``fxprune.select.layerwise``), so memory holds about one layer's
weights plus the calibration activations. The ``activation`` scores it returns equal
``score_groups(graph, "activation", ...)`` on the model loaded whole; ``select`` turns
them into a plan and ``save_pruned`` writes the pruned checkpoint shard by shard.

Tensors are read with plain file reads at the offsets the shard's header gives, not
through a memory map: mapped pages of a shard count as the process's resident memory
until it is closed, which would double what a 500 MB embedding costs.
"""
from __future__ import annotations

import copy
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .channels.graph import DependencyGraph
from .checkpoint import _header, check_shapes, read_layout, tied_keys
from .errors import CheckpointError, SpecError
from .select.calibration import as_calibration, check_data_needs, graph_batches
from .select.layerwise import layerwise_activation_stats
from .select.score import _param_keys, activation_scores

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class CheckpointTensors(Mapping):
    """The analysed model's parameters, read from the checkpoint in ``folder`` when asked for
    (``tensors[key]``, under the model's key or a tied one) and never kept. Other tensors
    the graph reads (buffers) load the same way; one the checkpoint lacks (a non-persistent
    buffer such as a rotary embedding's ``inv_freq``) comes from the model when it holds real
    values, or from Hugging Face's own initialisation of its module (what ``from_pretrained``
    does for it).

    >>> import tempfile, fxprune
    >>> from safetensors.torch import save_file
    >>> net = torch.nn.Linear(2, 4)
    >>> folder = tempfile.mkdtemp()
    >>> save_file(net.state_dict(), f"{folder}/model.safetensors")
    >>> tensors = CheckpointTensors(fxprune.analyze(net, torch.randn(1, 2)), folder)
    >>> sorted(tensors), torch.equal(tensors["weight"], net.weight)
    (['bias', 'weight'], True)
    >>> torch.equal(tensors.rows("weight", torch.tensor([0, 2, 3])), net.weight[[0, 2, 3]])
    True
    """

    def __init__(self, graph: DependencyGraph, folder: str | Path):
        self.graph, self.layout = graph, read_layout(folder)
        check_shapes(graph, self.layout)
        self.ties, self.params = tied_keys(graph), sorted(_param_keys(graph.gm))
        self.headers = {name: _header(self.layout.folder / name) for name in self.layout.files}

    def __getitem__(self, key: str) -> torch.Tensor:
        stored = next((k for k in self.ties.get(key, [key]) if k in self.layout.shapes), None)
        return self._read(stored) if stored is not None else self._not_stored(key)

    def __contains__(self, key: object) -> bool:
        return key in self.params

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (dim 0, ascending) of tensor ``key``, read without the rest of it:
        one read per run of consecutive rows (the class example reads two runs)."""
        stored = next((k for k in self.ties.get(key, [key]) if k in self.layout.shapes), None)
        if stored is None:
            return self._not_stored(key)[index]
        index = index.tolist()
        runs, start = [], 0
        for i in range(1, len(index) + 1):
            if i == len(index) or index[i] != index[i - 1] + 1:
                runs.append(self._read(stored, index[start], index[i - 1] + 1))
                start = i
        return torch.cat(runs) if len(runs) > 1 else runs[0]

    def _read(self, key: str, first: int | None = None, stop: int | None = None) -> torch.Tensor:
        """The tensor, or its rows ``first:stop``."""
        name = self.layout.file_of[key]
        info = self.headers[name][key]
        if info["dtype"] not in DTYPES:
            raise CheckpointError(f"checkpoint tensor '{key}' has dtype {info['dtype']}, which fxprune cannot read; "
                                  f"supported: {', '.join(DTYPES)}")
        shape, (begin, end) = list(info["shape"]), info["data_offsets"]
        if first is not None:  # rows are contiguous in the row-major data
            row = (end - begin) // max(shape[0], 1)
            begin, end, shape[0] = begin + first * row, begin + stop * row, stop - first
        data = torch.empty(end - begin, dtype=torch.uint8)
        with open(self.layout.folder / name, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))  # the header's size, then the header, then the data
            fh.seek(8 + length + begin)
            if fh.readinto(data.numpy()) != end - begin:
                raise CheckpointError(f"{self.layout.folder / name} ends inside tensor '{key}': the file is truncated")
        return data.view(DTYPES[info["dtype"]]).reshape(shape)

    def _not_stored(self, key: str) -> torch.Tensor:
        for root in (self.graph.gm, self.graph.model):
            for name in self.ties.get(key, [key]):
                tensor = _get(root, name)
                if tensor is not None and tensor.device.type != "meta":
                    return tensor.detach()
        model, (owner, _, attr) = self.graph.model, key.rpartition(".")
        init = getattr(model, "_init_weights", None)  # a Hugging Face PreTrainedModel
        if callable(init) and _get(model, key) is not None:
            module = copy.deepcopy(model.get_submodule(owner)).to_empty(device="cpu")
            with torch.no_grad():
                init(module)
            return getattr(module, attr).detach()
        raise CheckpointError(
            f"'{key}' is neither in the checkpoint {self.layout.folder} nor held with real values by the analysed "
            "model (it is on the meta device); build that module with real values (outside torch.device('meta')) "
            "before analysing, or save the tensor into the checkpoint")


def _get(root, key: str) -> torch.Tensor | None:
    owner, _, attr = key.rpartition(".")
    try:
        module = root.get_submodule(owner) if owner else root
    except AttributeError:
        return None
    tensor = getattr(module, attr, None)
    return tensor if isinstance(tensor, torch.Tensor) else None


def score_checkpoint(graph: DependencyGraph, checkpoint: str | Path, calibration, *, score: str = "activation",
                     device: str | torch.device = "cpu", notes: list[str] | None = None) -> dict[int, np.ndarray]:
    """``{group id: scores}`` of ``graph`` (analysed on the meta device) with the weights of
    the safetensors ``checkpoint`` folder, computed layer by layer (see the module docstring):
    what ``fxprune.select.score.score_groups(graph, score, calibration=...)`` gives with the
    model in memory. ``score``: ``"activation"`` (the one score that needs only forward
    statistics). The graph computes in the analysed model's dtype: build it in the
    checkpoint's (``from_config(config, dtype=torch.bfloat16)``) to read the weights as
    stored. Under ``torch.distributed`` each rank runs its share of the batches.

    >>> import tempfile, fxprune
    >>> from safetensors.torch import save_file
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> folder = tempfile.mkdtemp()
    >>> save_file(net.state_dict(), f"{folder}/model.safetensors")
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> batches = [torch.randn(8, 4)]
    >>> from_disk = fxprune.score_checkpoint(graph, folder, batches)
    >>> from fxprune.select.score import score_groups
    >>> bool((from_disk[1] == score_groups(graph, "activation", calibration=batches)[1]).all())
    True
    """
    if score != "activation":
        raise SpecError(f"score_checkpoint: score={score!r} is not computed from a checkpoint; use 'activation' "
                        "(forward statistics, one layer at a time); 'taylor' needs the gradients of the whole "
                        "model: load it (or shard it with FSDP2) and use score_groups")
    if graph.parts is not None:
        raise SpecError("score_checkpoint: the graph was captured in parts, whose inputs only the whole model "
                        "computes; analyse a model that torch.export captures whole")
    check_data_needs(score, calibration, None, None)
    notes = [] if notes is None else notes
    tensors = CheckpointTensors(graph, checkpoint)
    batches = list(graph_batches(graph, as_calibration(calibration, graph.model_inputs), share=True))
    norms, columns = layerwise_activation_stats(graph.gm, batches, tensors.__getitem__, graph.state.canonical,
                                                device, rows=tensors.rows)
    return activation_scores(graph, norms, lambda key, dim: columns.get((key, dim)), notes, params=tensors)


__all__ = ["score_checkpoint", "CheckpointTensors"]
