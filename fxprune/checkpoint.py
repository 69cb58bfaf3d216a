"""Writing pruned checkpoints: a plan applied to a safetensors checkpoint on disk.

An 8B model need not be loaded to be pruned: the analysis runs on a copy built on the
meta device (no weight memory), and ``save_pruned`` then streams the checkpoint shard
by shard. Each shard's tensors are read one at a time, sliced with the same
``tensor_cuts`` / ``cut_tensor`` path that ``prune`` uses, written as the pruned shard and
freed before the next one, so peak memory follows the largest shard, not the model.

Removed residual branches take whole layers with them, as ``emit="module"`` does (a
Hugging Face layer whose attention and MLP both go): their keys are not written and the
later layers' keys are renumbered (``model.layers.5.`` -> ``model.layers.3.``), so the
checkpoint matches the config write-back computes (``num_hidden_layers``, ``layer_types``).

Everything is checked from the shards' headers before a byte is written: the folders,
the keys the plan cuts (tied weights may be stored under one name only), and every
tensor's shape against the analysed model's.
"""
from __future__ import annotations

import json
import shutil
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Mapping

import networkx as nx
import numpy as np

from .channels.branches import split_plan
from .channels.graph import DependencyGraph
from .errors import CheckpointError
from .passes.branch_modules import removed_blocks, removed_layers, renamed_key
from .passes.emit import prune
from .passes.hf_config import hf_config
from .passes.prune import cut_tensor, kept_ids, tensor_cuts
from .progress import step

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"
# Weights in other formats are not pruned, so they are not copied next to the pruned ones.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


@dataclass
class Layout:
    """A safetensors checkpoint as its headers describe it (no tensor data is read)."""

    folder: Path
    files: dict[str, list[str]]  # shard file name -> its keys, in file order
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    nbytes: dict[str, int] = field(default_factory=dict)
    sharded: bool = True  # an index json names the shards (else one model.safetensors)

    @property
    def file_of(self) -> dict[str, str]:
        return {key: name for name, keys in self.files.items() for key in keys}


def read_layout(folder: str | Path) -> Layout:
    """Read the shard list (``model.safetensors.index.json`` or ``model.safetensors``) and
    every shard's header: keys, shapes and sizes.

    >>> import tempfile, torch
    >>> from safetensors.torch import save_file
    >>> folder = tempfile.mkdtemp()
    >>> save_file({"w": torch.zeros(3, 4)}, f"{folder}/model.safetensors")
    >>> layout = read_layout(folder)
    >>> layout.files, layout.shapes, layout.nbytes
    ({'model.safetensors': ['w']}, {'w': (3, 4)}, {'w': 48})
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; pass the folder save_pretrained wrote")
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text(encoding="utf-8")).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{folder / INDEX} has no 'weight_map'; it is not a safetensors index")
        names, sharded = sorted(set(weight_map.values())), True
    elif (folder / SINGLE).is_file():
        names, sharded = [SINGLE], False
    else:
        found = sorted(p.name for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)[:5]
        raise CheckpointError(
            f"{folder} has neither {INDEX} nor {SINGLE} (weights found: {found or 'none'}); save the model with "
            "save_pretrained(folder) (transformers writes safetensors) or safetensors.torch.save_file")
    layout = Layout(folder, {}, sharded=sharded)
    for name in names:
        if not (folder / name).is_file():
            raise CheckpointError(f"{INDEX} names shard {name}, which is missing from {folder}; copy it there")
        header = _header(folder / name)
        layout.files[name] = list(header)
        for key, info in header.items():
            layout.shapes[key] = tuple(info["shape"])
            layout.nbytes[key] = info["data_offsets"][1] - info["data_offsets"][0]
    return layout


def _header(path: Path) -> dict:
    """The tensors of one safetensors file: an 8-byte little-endian length, then a JSON
    header (the format's specification); the data is never read."""
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    header.pop("__metadata__", None)
    return header


def _named_tensors(graph: DependencyGraph):
    """``(key, tensor)`` of every parameter and buffer, tied names included, of the
    analysed graph and of the user's model."""
    for root in (graph.gm, graph.model):
        if root is not None:
            yield from chain(root.named_parameters(remove_duplicate=False), root.named_buffers(remove_duplicate=False))


def tied_keys(graph: DependencyGraph) -> dict[str, list[str]]:
    """Every state_dict key -> all keys of the same tensor, over the analysed graph and the
    user's model (an exported graph keeps one name of a tied weight; the checkpoint may
    store it under the other: ``model.embed_tokens.weight`` for ``lm_head.weight``)."""
    ties, first = nx.Graph(), {}
    for key, tensor in _named_tensors(graph):
        ties.add_edge(first.setdefault(id(tensor), key), key)
    return {key: sorted(keys) for keys in nx.connected_components(ties) for key in keys}


def model_shapes(graph: DependencyGraph) -> dict[str, tuple[int, ...]]:
    """The analysed model's tensor shapes by state_dict key (meta tensors are fine)."""
    shapes = {}
    for key, tensor in _named_tensors(graph):
        shapes.setdefault(key, tuple(tensor.shape))
    return shapes


def check_shapes(graph: DependencyGraph, layout: Layout) -> dict[str, tuple[int, ...]]:
    """The analysed model's shapes (``model_shapes``), after checking that every tensor the
    checkpoint shares with it has the same shape."""
    shapes = model_shapes(graph)
    for key, shape in layout.shapes.items():
        if key in shapes and shapes[key] != shape:
            raise CheckpointError(
                f"checkpoint tensor '{key}' has shape {shape}, the analysed model's has {shapes[key]}: the graph "
                "was built from a different model shape; analyse a model built from the checkpoint's own config "
                "(AutoConfig.from_pretrained(folder), then from_config on the meta device)")
    return shapes


def checkpoint_cuts(graph: DependencyGraph, keep: np.ndarray, layout: Layout) -> dict[str, list]:
    """``tensor_cuts`` under the checkpoint's own keys, after checking that the checkpoint
    holds every tensor the plan cuts and that every tensor it shares with the analysed
    model has the same shape."""
    shapes, ties = check_shapes(graph, layout), tied_keys(graph)
    cuts, missing = {}, []
    for key, cut in tensor_cuts(graph, keep).items():
        stored = [k for k in ties.get(key, [key]) if k in layout.shapes]
        missing += [] if stored else [key]
        cuts.update((k, cut) for k in stored)
    if missing:
        unknown = [k for k in layout.shapes if k not in shapes]
        hint = (f"the checkpoint has keys the analysed model does not know ({_few(unknown)}): it was saved from "
                "another model class or naming; analyse the class it was saved from" if unknown else
                "the checkpoint lacks them: if they are tied to a stored weight, analyse the model itself (not an "
                "ExportedProgram) so that fxprune sees the tie; else save the whole model with save_pretrained")
        raise CheckpointError(f"the plan cuts {_few(missing)}, which no shard in {layout.folder} holds; {hint}")
    return cuts


def _few(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def check_destination(source: Path, dest: Path) -> None:
    """``dest`` must be a new or empty folder, not the checkpoint's own."""
    if dest.resolve() == source.resolve():
        raise CheckpointError(
            f"the destination {dest} is the source checkpoint; write the pruned checkpoint to a new folder "
            "(a failure halfway would otherwise leave neither model whole)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"the destination {dest} exists and is not an empty folder; pass a new folder "
                              "or delete this one first (nothing in it is overwritten)")


def key_renames(graph: DependencyGraph, plan: Mapping[int, object], layout: Layout) -> dict[str, str | None]:
    """Each checkpoint key -> its key in the pruned checkpoint, or None where the plan's
    branches or layers take its layer away (the blocks ``emit="module"`` drops; later
    entries of a layer list renumber).

    >>> import tempfile, torch, fxprune
    >>> from safetensors.torch import save_file
    >>> from fxprune.testing import ResidualLinear
    >>> net = torch.nn.Sequential(ResidualLinear(4), ResidualLinear(4))
    >>> folder = tempfile.mkdtemp()
    >>> save_file(net.state_dict(), f"{folder}/model.safetensors")
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> key_renames(graph, {graph.branches[0].id: [0]}, read_layout(folder))
    {'0.fc.bias': None, '0.fc.weight': None, '1.fc.bias': '0.fc.bias', '1.fc.weight': '0.fc.weight'}
    """
    branches = split_plan(graph, plan)[1]
    if not branches:
        return {key: key for key in layout.shapes}
    if graph.model is None:
        raise CheckpointError("the plan removes residual branches or layers, which only the analysed module's own "
                              "structure names; analyse the nn.Module (not an ExportedProgram)")
    blocks = removed_blocks(graph, branches)
    layers = removed_layers(graph.model, blocks)
    return {key: renamed_key(key, layers, blocks) for key in layout.shapes}


def plan_shards(layout: Layout, nbytes: Mapping[str, int], max_shard_size: int | str | None,
                renames: Mapping[str, str | None] | None = None) -> dict[str, list[str]]:
    """Output file name -> (source) keys, without the keys ``renames`` maps to None.
    ``None`` keeps the checkpoint's own shards and names (a shard left empty is not
    written); a size (bytes or ``"2GB"``) packs the pruned tensors anew, as
    ``save_pretrained`` names them."""
    renames = renames or {}
    kept = {name: [k for k in keys if renames.get(k, k) is not None] for name, keys in layout.files.items()}
    if max_shard_size is None:
        return {name: keys for name, keys in kept.items() if keys}
    from huggingface_hub import split_state_dict_into_shards_factory

    ordered = {key: nbytes[key] for keys in kept.values() for key in keys}
    split = split_state_dict_into_shards_factory(ordered, get_storage_size=int, max_shard_size=max_shard_size,
                                                 filename_pattern="model{suffix}.safetensors")
    return dict(split.filename_to_tensors)


def _config_json(graph: DependencyGraph, plan: Mapping[int, object], source: Path) -> str | None:
    """The pruned config.json: the source's own, with the fields the pruning changed as
    write-back computes and proves them (dtype, architectures and custom fields stay as
    the checkpoint has them). Write-back copies the analysed model: on the meta device
    that costs no memory."""
    config = hf_config(graph.model)
    if config is None:
        if (source / CONFIG).is_file():
            raise CheckpointError(
                f"{source} has a {CONFIG} but the analysed model has no Hugging Face config to update; analyse "
                "the model class that from_pretrained builds from this folder")
        return None
    before, after = config.to_dict(), prune(graph, plan, emit="module").config.to_dict()
    changed = {k: v for k, v in after.items() if before.get(k) != v}
    base = json.loads((source / CONFIG).read_text(encoding="utf-8")) if (source / CONFIG).is_file() else after
    return json.dumps({**base, **changed}, indent=2, sort_keys=True) + "\n"


def save_pruned(graph: DependencyGraph, plan: Mapping[int, object], source_dir: str | Path, dest_dir: str | Path,
                *, max_shard_size: int | str | None = None) -> Path:
    """Write the checkpoint in ``source_dir`` with ``plan``'s units removed to ``dest_dir``.

    ``graph`` is the analysis of the checkpoint's model (built on the meta device, it costs
    no weight memory). Shards are read, cut and written one at a time with their own names
    (or packed anew under ``max_shard_size``, e.g. ``"2GB"``); the index, the pruned
    ``config.json`` (for a Hugging Face model) and the other small files (tokenizer,
    generation config) follow. Layers the plan's branches remove are not written and later
    layers' keys renumber, as in the class ``emit="module"`` returns.
    ``from_pretrained(dest_dir)`` then loads the pruned model.
    Returns ``dest_dir``; raises ``CheckpointError`` before writing anything if the folders,
    keys or shapes do not fit.

    >>> import tempfile, torch, fxprune
    >>> from safetensors.torch import load_file, save_file
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    >>> src, dest = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> save_file(net.state_dict(), f"{src}/model.safetensors")
    >>> graph = fxprune.analyze(net, torch.randn(2, 4))
    >>> _ = fxprune.save_pruned(graph, {1: [0, 1, 2]}, src, dest)
    >>> {k: tuple(v.shape) for k, v in load_file(f"{dest}/model.safetensors").items()}
    {'0.bias': (3,), '0.weight': (3, 4), '2.bias': (2,), '2.weight': (2, 3)}
    """
    source, dest = Path(source_dir), Path(dest_dir)
    keep = kept_ids(graph, plan)  # a bad plan fails first, before any file is opened
    layout = read_layout(source)
    check_destination(source, dest)
    cuts = checkpoint_cuts(graph, keep, layout)
    renames = key_renames(graph, plan, layout)
    config = _config_json(graph, plan, source)
    numel = {k: _numel(shape, cuts.get(k, [])) for k, shape in layout.shapes.items() if renames[k] is not None}
    nbytes = {k: layout.nbytes[k] // max(_numel(layout.shapes[k], []), 1) * numel[k] for k in numel}
    shards = plan_shards(layout, nbytes, max_shard_size, renames)
    dest.mkdir(parents=True, exist_ok=True)
    write_shards(layout, cuts, shards, dest, renames)
    if len(shards) > 1 or (layout.sharded and max_shard_size is None):
        weight_map = {renames[k]: name for name, keys in shards.items() for k in keys}
        index = {"metadata": {"total_parameters": sum(numel.values()), "total_size": sum(nbytes.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (dest / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if config is not None:
        (dest / CONFIG).write_text(config, encoding="utf-8")
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and path.name not in (INDEX, CONFIG):
            shutil.copy2(path, dest / path.name)
    return dest


def write_shards(layout: Layout, cuts: Mapping[str, list], shards: Mapping[str, list[str]], dest: Path,
                 renames: Mapping[str, str | None] | None = None) -> None:
    """Read, cut and write one output shard at a time, each tensor under its new key
    (``renames``). A source shard stays open (memory-mapped) only while an output shard
    still needs a tensor of it."""
    renames = renames or {}
    from safetensors import safe_open
    from safetensors.torch import save_file

    file_of = layout.file_of
    left = defaultdict(int)
    for keys in shards.values():
        for key in keys:
            left[file_of[key]] += 1
    handles = {}
    for name, keys in shards.items():
        step(f"writing {name}")
        tensors = {}
        for key in keys:
            src = file_of[key]
            if src not in handles:
                handles[src] = safe_open(layout.folder / src, framework="pt")
            tensor = handles[src].get_tensor(key)
            tensors[renames.get(key) or key] = cut_tensor(tensor, cuts[key]) if key in cuts else tensor
            del tensor
            left[src] -= 1
            if not left[src]:
                del handles[src]  # unmaps the source shard
        save_file(tensors, dest / name, metadata={"format": "pt"})
        del tensors


def _numel(shape: tuple[int, ...], cuts: list) -> int:
    sizes = list(shape)
    for dim, index in cuts:
        sizes[dim] = len(index)
    return int(np.prod(sizes))


__all__ = ["save_pruned", "read_layout", "Layout", "checkpoint_cuts", "tied_keys", "key_renames"]
