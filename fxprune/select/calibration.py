"""Calibration data: the batches that data-aware scores (``activation``, ``taylor``) run.

``spec.calibration`` is a list of inputs shaped like ``example_inputs`` (each a tensor, a
tuple of tensors or a dict of keyword inputs), a path to such a list saved with
``torch.save``, or in Python a callable that returns a fresh iterable of them (a
DataLoader factory) or any iterable (consumed by its first use). :class:`Calibration`
holds one of those; ``batches`` yields :class:`~fxprune.capture.inputs.ExampleInputs`,
checking each against the structure of the example inputs as it goes, so a lazy source
is never loaded whole.

``default_loss`` is what ``taylor`` differentiates when no ``loss_fn`` is given.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten

from fxprune._check import fail, got
from fxprune.capture.dynamic import describe_dynamic_dims, shape_mismatch
from fxprune.capture.inputs import ExampleInputs, bad_leaf
from fxprune.capture.parts import record_parts
from fxprune.errors import SpecError
from fxprune.select.distributed import rank_and_world

WHERE = "spec.calibration"
_SAVE_HINT = "save a list of inputs with torch.save([batch, ...], 'calib.pt')"


class Calibration:
    """Calibration batches: a checked list, a callable returning an iterable, or an iterable.

    ``path`` is the file the list was read from (kept so a spec can be written back).

    Example:
        >>> cal = as_calibration([torch.zeros(2, 4), torch.ones(3, 4)])
        >>> [b.describe() for b in cal.batches()]
        ['(2, 4)', '(3, 4)']
    """

    def __init__(self, source: list | Callable[[], Iterable] | Iterable, path: str | None = None):
        self.source, self.path = source, path

    def batches(self, like: ExampleInputs | None = None, where: str = WHERE) -> Iterator[ExampleInputs]:
        """Each batch as ExampleInputs, checked against ``like``'s structure; at least one."""
        items = self.source() if callable(self.source) else self.source
        if not isinstance(items, Iterable) or isinstance(items, (torch.Tensor, Mapping, str)):
            fail(where, f"the callable must return an iterable of batches, {got(items)}")
        count = 0
        for count, item in enumerate(items, 1):
            yield as_batch(f"{where}[{count - 1}]", item, like)
        if count == 0:
            fail(where, "yielded no batch; a one-shot iterator (a generator) is consumed by its "
                        "first use: pass a list, or a callable that returns a fresh iterable")

    def __repr__(self) -> str:
        what = (f"path={self.path!r}" if self.path else f"{len(self.source)} batches"
                if isinstance(self.source, list) else type(self.source).__name__)
        return f"Calibration({what})"


def as_calibration(value: Any, like: ExampleInputs | None = None, where: str = WHERE) -> Calibration | None:
    """Normalise what users give as calibration data (None stays None); lists and files are
    checked here, element by element, lazy sources when they are iterated.

    Example:
        >>> like = ExampleInputs((torch.zeros(1, 4),))
        >>> as_calibration([{"x": torch.zeros(1, 4)}], like)
        Traceback (most recent call last):
        ...
        fxprune.errors.SpecError: spec.calibration[0]: keyword inputs (x) but example_inputs are positional ((1, 4)); give every batch the same form as example_inputs
    """
    if value is None or isinstance(value, Calibration):
        if isinstance(value, Calibration) and isinstance(value.source, list):
            for i, item in enumerate(value.source):
                as_batch(f"{where}[{i}]", item, like)
        return value
    path = None
    if isinstance(value, (str, os.PathLike)):
        path, value = str(value), load_calibration(value, where)
    if isinstance(value, (torch.Tensor, Mapping)):
        fail(where, f"expected a list of batches, {got(value)}; wrap one batch in a list: "
                    "calibration=[batch]")
    if isinstance(value, (list, tuple)):
        if not value:
            fail(where, "an empty list holds no batch; give at least one input batch like "
                        "example_inputs, e.g. calibration=[x1, x2]")
        for i, item in enumerate(value):
            as_batch(f"{where}[{i}]", item, like)
        return Calibration(list(value), path)
    if callable(value) or isinstance(value, Iterable):
        return Calibration(value)
    fail(where, f"expected a list of input batches, a .pt file of one, a callable returning an "
                f"iterable or an iterable, {got(value)}")


def load_calibration(path: str | os.PathLike, where: str = WHERE) -> list:
    """The list saved at ``path`` with ``torch.save`` (tensors, tuples and dicts only:
    ``weights_only=True`` runs no pickled code).

    Example:
        >>> load_calibration("missing.pt")
        Traceback (most recent call last):
        ...
        fxprune.errors.SpecError: spec.calibration: cannot read 'missing.pt': no such file; save a list of inputs with torch.save([batch, ...], 'calib.pt')
    """
    file = Path(path)
    if not file.is_file():
        fail(where, f"cannot read {str(path)!r}: no such file; {_SAVE_HINT}")
    try:
        data = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types; all mean "not a tensor file"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        fail(where, f"cannot read {str(path)!r} as a torch.save file ({type(error).__name__}: "
                    f"{first[:200]}); {_SAVE_HINT}")
    if not isinstance(data, (list, tuple)):
        fail(where, f"{str(path)!r} holds {type(data).__name__}, not a list of batches; {_SAVE_HINT}")
    return list(data)


def as_batch(where: str, value: Any, like: ExampleInputs | None = None) -> ExampleInputs:
    """One batch (a tensor, a tuple of tensors or a dict of keyword inputs) as ExampleInputs,
    with the form, the inputs and each tensor's number of dims of ``like``.

    Example:
        >>> as_batch("spec.calibration[0]", (torch.zeros(2, 3),)).describe()
        '(2, 3)'
    """
    if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
        batch = ExampleInputs((), dict(value))
    elif isinstance(value, torch.Tensor):
        batch = ExampleInputs((value,))
    elif isinstance(value, (list, tuple)) and value and any(isinstance(v, torch.Tensor)
                                                            for v in tree_flatten(value)[0]):
        batch = ExampleInputs(tuple(value))
    else:
        fail(where, f"a batch is a tensor, a tuple of tensors or a dict of keyword inputs "
                    f"(like example_inputs), {got(value)}")
    bad = bad_leaf((batch.args, batch.kwargs))
    if bad is not None:
        fail(f"{where}{bad[0][3:]}", f"expected a tensor (or a number, a string or None), {got(bad[1])}")
    if like is not None:
        # keywords that are settings, not data (use_cache=False, which the capture may add)
        # come from example_inputs when a batch leaves them out
        settings = {k: v for k, v in like.kwargs.items() if k not in batch.kwargs and not isinstance(v, torch.Tensor)}
        if settings:
            batch = ExampleInputs(batch.args, {**batch.kwargs, **settings})
        _same_form(where, batch, like)
    return batch


def _same_form(where: str, batch: ExampleInputs, like: ExampleInputs) -> None:
    form = {False: "positional", True: "keyword"}
    if bool(batch.kwargs) != bool(like.kwargs):
        fail(where, f"{form[bool(batch.kwargs)]} inputs ({_names(batch)}) but example_inputs are "
                    f"{form[bool(like.kwargs)]} ({like.describe()}); give every batch the same "
                    "form as example_inputs")
    if len(batch.args) != len(like.args) or set(batch.kwargs) != set(like.kwargs):
        fail(where, f"inputs {batch.describe()} do not match example_inputs {like.describe()}; "
                    "give every batch the same inputs as example_inputs (names and count)")
    pairs = list(zip(batch.args, like.args)) + [(v, like.kwargs[k]) for k, v in batch.kwargs.items()]
    # nested inputs: leaf by leaf where the nesting matches (a detector's list of images may
    # hold another count of images than the example's)
    pairs = [leaf for mine, theirs in pairs for leaf in _leaf_pairs(mine, theirs)]
    for mine, theirs in pairs:
        if isinstance(theirs, torch.Tensor) and (not isinstance(mine, torch.Tensor) or mine.ndim != theirs.ndim):
            fail(where, f"inputs {batch.describe()} do not match example_inputs {like.describe()}: "
                        "every tensor needs the number of dims of its example (batch and sequence "
                        "sizes may differ)")


def _leaf_pairs(mine: Any, theirs: Any) -> list[tuple[Any, Any]]:
    mine_leaves, mine_spec = tree_flatten(mine)
    theirs_leaves, theirs_spec = tree_flatten(theirs)
    return list(zip(mine_leaves, theirs_leaves)) if mine_spec == theirs_spec else []


def _names(batch: ExampleInputs) -> str:
    return ", ".join(batch.kwargs) if batch.kwargs else batch.describe()


def _shapes(batch: ExampleInputs) -> str:
    """The tensors' shapes only (``input_ids=(2, 8)``), without settings such as use_cache."""
    return ExampleInputs(tuple(a for a in batch.args if isinstance(a, torch.Tensor)),
                         {k: v for k, v in batch.kwargs.items() if isinstance(v, torch.Tensor)}).describe()


def graph_batches(graph, calibration: Calibration, *, share: bool = False) -> Iterator[ExampleInputs]:
    """The batches for ``graph.gm``: checked against the example inputs, and for a graph
    captured by torch.export against the shapes it takes (its batch and sequence dims are
    dynamic where the model allows, the others are the example's).

    ``share=True``: under ``torch.distributed``, only this rank's share of them
    (``fxprune.select.distributed.rank_share``); the caller adds its sums over ranks.

    Example:
        >>> import fxprune
        >>> graph = fxprune.analyze(torch.nn.Linear(4, 2), torch.randn(1, 4))
        >>> [b.describe() for b in graph_batches(graph, as_calibration([torch.randn(5, 4)]))]
        ['(5, 4)']
    """
    like = graph.model_inputs
    rank, world = rank_and_world() if share else (0, 1)
    for i, batch in enumerate(calibration.batches(like)):
        if graph.parts is None and graph.capture == "export":
            mismatch = shape_mismatch(graph.gm, batch)
            if mismatch is not None:
                fail(f"{WHERE}[{i}]", f"shapes {_shapes(batch)} do not fit the graph torch.export "
                                      f"captured from example_inputs {_shapes(like)}: {mismatch}; its dims "
                                      f"of any size: {describe_dynamic_dims(graph.gm)}, the others take "
                                      "the example's size (see the capture note); give batches that fit "
                                      "(or use capture='fx' where it works)")
        if i % world != rank:
            continue  # another rank's batch: checked (every rank fails alike), not run here
        if graph.parts is not None:  # the model runs the batch; its parts' inputs feed graph.gm
            batch = ExampleInputs(record_parts(graph.model, batch, graph.parts)[0])
        yield batch


def check_data_needs(score: str, calibration: Any, calib_inputs: Any, loss_fn: Any) -> None:
    """Raise a SpecError when ``score`` lacks the data it needs: ``activation`` needs
    batches, ``taylor`` batches (``calibration``) or the older pair ``calib_inputs`` with
    ``loss_fn``; ``calibration`` and ``calib_inputs`` exclude each other.

    Example:
        >>> check_data_needs("activation", None, None, None)
        Traceback (most recent call last):
        ...
        fxprune.errors.SpecError: spec.calibration: score='activation' needs calibration batches: calibration=[x1, x2, ...] (inputs like example_inputs), or in a file calibration = "calib.pt" (a torch.save'd list; CLI: --calibration FILE)
    """
    if calibration is not None and calib_inputs is not None:
        fail("spec.calibration, spec.calib_inputs", "give one: calibration (a list of batches) "
             "supersedes calib_inputs (one batch); pass calibration=[batch] alone")
    if score == "activation" and calibration is None and calib_inputs is None:
        fail(WHERE, "score='activation' needs calibration batches: calibration=[x1, x2, ...] (inputs "
                    "like example_inputs), or in a file calibration = \"calib.pt\" (a torch.save'd "
                    "list; CLI: --calibration FILE)")
    if score != "taylor" or calibration is not None:
        return
    missing = [f"spec.{n}" for n, v in (("calib_inputs", calib_inputs), ("loss_fn", loss_fn)) if v is None]
    if missing:
        fail(", ".join(missing), "score='taylor' needs calibration data: calibration=[x1, x2, ...] "
             "(loss_fn optional, see fxprune.select.calibration.default_loss), or the older pair of "
             "a calibration batch (calib_inputs: tuple of tensors) and a loss function (loss_fn: "
             "model output -> scalar tensor); a file can name a torch.save'd list (calibration = "
             "\"calib.pt\") but cannot hold a loss: pass it in Python: Spec(..., calib_inputs=(x,), "
             "loss_fn=fn) or Spec.load(path, calib_inputs=(x,), loss_fn=fn)")


def default_loss(output: Any, batch: ExampleInputs, causal_lm: bool) -> tuple[torch.Tensor, str]:
    """The loss ``taylor`` differentiates when the spec has no ``loss_fn``, and its name:

    1. ``output.loss`` when the model computed one (a Hugging Face model given ``labels``);
    2. for a causal language model (``causal_lm``) whose output has ``logits`` and whose
       batch has ``input_ids``: next-token cross-entropy, the loss LLM-Pruner (Ma et al.
       2023) takes its gradients from; positions whose ``attention_mask`` is 0 are left out;
    3. otherwise ``0.5 * mean(y ** 2)`` summed over the floating outputs ``y`` (the logits
       if there are any): it needs no labels, and its gradient ``y`` weighs each channel
       by how much it moves the output, the second-order term of an output-matching loss.
       An output whose leading dims are the batch's ``attention_mask``'s is averaged over
       the real tokens only, so padding changes neither the loss nor its gradients.

    Example:
        >>> loss, name = default_loss(torch.ones(2, 3), ExampleInputs((torch.ones(2, 4),)), False)
        >>> float(loss), name
        (0.5, '0.5 * mean squared output')
    """
    loss = _field(output, "loss")
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        return loss.reshape(()), "the model's own loss (output.loss)"
    logits, ids = _field(output, "logits"), batch.kwargs.get("input_ids")
    if (causal_lm and isinstance(logits, torch.Tensor) and isinstance(ids, torch.Tensor)
            and logits.ndim == ids.ndim + 1 and logits.shape[:-1] == ids.shape and ids.shape[-1] > 1):
        labels = ids[..., 1:].clone()
        mask = batch.kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.shape == ids.shape:
            labels[mask[..., 1:] == 0] = -100  # cross_entropy's ignore_index
        return (F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels.flatten()),
                "next-token cross-entropy")
    outputs = [logits] if isinstance(logits, torch.Tensor) else tree_flatten(output)[0]
    outputs = [y for y in outputs if isinstance(y, torch.Tensor) and y.is_floating_point()]
    if not outputs:
        raise SpecError(f"spec.loss_fn: the model's output ({type(output).__name__}) holds no floating "
                        "tensor to build the default loss from; pass loss_fn (output -> scalar tensor)")
    mask = batch.kwargs.get("attention_mask")
    return sum(0.5 * _token_mean(y.float().square(), mask) for y in outputs), "0.5 * mean squared output"


def _token_mean(values: torch.Tensor, mask: Any) -> torch.Tensor:
    """The mean of ``values`` over the positions ``mask`` (``[batch, tokens]``) keeps, or
    over all of them when the mask does not fit its leading dims.

    Example:
        >>> float(_token_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]])))
        2.0
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or tuple(values.shape[:2]) != tuple(mask.shape):
        return values.mean()
    keep = (mask != 0).reshape(*mask.shape, *[1] * (values.ndim - 2))
    per_position = values[0, 0].numel()
    return values.masked_fill(~keep, 0).sum() / (keep.sum() * per_position).clamp_min(1)


def _field(output: Any, name: str) -> Any:
    if isinstance(output, Mapping):
        return output.get(name)
    return getattr(output, name, None) if not isinstance(output, (torch.Tensor, tuple, list)) else None


def is_causal_lm(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face model that generates text from its own tokens
    (``can_generate()`` and not encoder-decoder): next-token loss is its training loss.

    Example:
        >>> is_causal_lm(torch.nn.Linear(2, 2))
        False
    """
    can_generate = getattr(model, "can_generate", None)
    config = getattr(model, "config", None)
    try:
        return bool(callable(can_generate) and can_generate()
                    and not getattr(config, "is_encoder_decoder", False))
    except Exception:  # a foreign can_generate with other needs: not a causal LM we know
        return False


__all__ = ["Calibration", "as_calibration", "as_batch", "load_calibration", "graph_batches",
           "check_data_needs", "default_loss", "is_causal_lm"]
