"""Spec: the configuration of ``fxprune.compress``; validation and loading.

Every error is a SpecError whose message starts with the field path and says the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils._pytree import tree_leaves

from fxprune._check import (check_bool, check_choice, check_int, check_keys, did_you_mean, fail,
                             got)
from fxprune._util import read_config
from fxprune.errors import SpecError
from fxprune.measure import LatencySettings
from fxprune.capture import FRONT_ENDS
from fxprune.capture.inputs import ExampleInputs, bad_leaf
from fxprune.channels.analysis import ATTENTION_UNITS
from fxprune.passes.emit import EMITS as PRUNE_EMITS
from fxprune.passes.prune import VERIFY
from fxprune.select.calibration import Calibration, as_calibration, check_data_needs
from fxprune.select.branch_score import BRANCH_SCORES, DEPTH_KINDS
from fxprune.select.expert_score import EXPERT_SCORES
from fxprune.select.metrics import TARGET_METRICS
from fxprune.select.score import known_scores
from fxprune.sparsity.calibrated import CALIBRATED, MASK_SCORES

SCOPES = ("global", "local", "latency")
UNIT_KINDS = ("channels", "branches", "layers", "experts")  # what competes for the budget (docs/depth.md, docs/experts.md)
CAPTURES = FRONT_ENDS
EMITS = ("auto", *PRUNE_EMITS)  # "auto": graph for fx captures, module for export and parts ones
_CODE_ONLY = ("example_inputs", "calib_inputs", "loss_fn")  # cannot live in a file
_MASK_ONLY = tuple(s for s in MASK_SCORES if s not in ("magnitude", "activation"))  # not channel scores
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

# The ``[latency]`` section is ``fxprune.measure.LatencySettings``: one class validates it
# for the spec, measuring, budgets and the CLI. ``LatencySpec`` is its public name here.
LatencySpec = LatencySettings


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fraction(path: str, value: Any, closed: bool, meaning: str) -> float:
    interval = "(0, 1]" if closed else "(0, 1)"
    if not _is_number(value):
        fail(path, f"expected a float in {interval}, {got(value)}")
    if not (0 < value < 1 or (closed and value == 1)):
        fail(path, f"{value} is out of range: it must be in {interval}, {meaning}")
    return float(value)


def _list_of(value: Any, kind: type | tuple[type, ...]) -> bool:
    """A non-empty list or tuple whose items are all ``kind``."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, kind) for v in value)


def _tensors(path: str, value: Any, hint: str) -> tuple[Any, ...] | dict[str, Any]:
    """Positional inputs (a tensor or a tuple of them), or keyword inputs (a dict by name,
    how Hugging Face models are called); each may nest tensors in tuples, lists and dicts
    (a detector takes a list of images: ``([image],)``)."""
    if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
        value = dict(value)
    else:
        value = (value,) if isinstance(value, torch.Tensor) else value
        if not isinstance(value, (list, tuple)) or not value:
            fail(path, f"expected a non-empty tuple of inputs (tensors, or tuples, lists and dicts of "
                       f"them) or a dict of keyword inputs, {got(value)}; {hint}")
        value = tuple(value)
    bad = bad_leaf(value)
    if bad is not None:
        fail(f"{path}{bad[0]}", f"expected a tensor (or a number, a string or None), {got(bad[1])}; "
                                "inputs nest tensors in tuples, lists and dicts")
    if not tree_leaves(value) or not any(isinstance(t, torch.Tensor) for t in tree_leaves(value)):
        fail(path, f"holds no tensor; {hint}")
    return value


def _shape(path: str, value: Any, nested: bool = True) -> list[int] | list[list[int]]:
    if nested and _list_of(value, (list, tuple)):
        return [_shape(f"{path}[{i}]", v, False) for i, v in enumerate(value)]
    if not isinstance(value, (list, tuple)) or not value:
        fail(path, f"expected a non-empty list of ints like [1, 3, 224, 224], {got(value)}")
    return [check_int(f"{path}[{i}]", d, 1) for i, d in enumerate(value)]


def _nm(path: str, value: Any) -> str:
    match = _NM.match(value) if isinstance(value, str) else None
    if match is None or not 0 < int(match[1]) < int(match[2]):
        fail(path, f"expected a string 'N:M' with integers 0 < N < M, e.g. '2:4', {got(value)}")
    return f"{int(match[1])}:{int(match[2])}"


@dataclass
class Spec:
    """What ``fxprune.compress`` should do. Validated on construction.

    Inputs, exactly one of:
        example_inputs: tuple of tensors to trace with (one tensor is wrapped), or a dict of
            keyword inputs (``{"input_ids": ids}``); either may nest tensors in tuples,
            lists and dicts (a detector: ``([image],)``); Python only.
        input_shape: the input's shape, ``[1, 3, 224, 224]``, or a list of shapes for
            several inputs; ``make_example_inputs()`` draws float32 normal tensors.
    Goal, at most one of (and one of them, or ``nm``):
        ratio: fraction of channels to remove from every prunable group, in (0, 1), or
            ``{group id or fnmatch module-name pattern: ratio}`` (keys stored as str).
        target: ``{metric: fraction of the original to keep}``, one key, value in
            (0, 1]; a metric of the registry ``fxprune.select.metrics.TARGET_METRICS``
            ("flops", "params", "latency", or one added with ``register_metric``).
    Options:
        capture: front end, "auto" (default: torch.fx, falling back to torch.export, then
            to parts), "fx", "export" (Hugging Face transformers need export) or "parts"
            (the learnable submodules in one graph, e.g. a detector's backbone and heads;
            the rest of forward stays your code, so the result is your class).
        attention_units: what one unit of an attention group is: "heads" (default: a
            whole head; with grouped-query attention a key/value head and its query
            heads), "query_slots" (the same query head of every key/value group; the
            key/value heads stay) or "head_dim" (position p of head_dim in every head).
        score: channel importance, a name in the score registry
            (``fxprune.select.score.SCORE_METHODS``; built in: magnitude, group_lasso,
            bn_scale, taylor, activation, l0; add one with ``register_score``), or "auto"
            (default): "activation" when calibration batches are given (the best score at
            every budget of ``benchmarks/minilm.py``), else "magnitude". With ``nm`` it
            also names the mask method (``fxprune.sparsity.calibrated.MASK_SCORES``):
            "magnitude", "activation" (Wanda) or "sparsegpt" (a mask method only: channels
            are then ranked by "activation"); other channel scores mask by magnitude.
        scope: "local" (default): every group loses the same fraction, lowest scores
            first; under a target the fraction is found by pruning and counting, and
            kept widths are moved onto multiples of 16-64 when that still lands. Uniform,
            aligned widths run at least as fast as Torch-Pruning's at equal FLOPs on the
            seven CNNs of ``benchmarks/latency.py``, and the plan is deterministic.
            "latency": local shares scaled by each group's measured latency per FLOP
            (kernels timed on ``latency.device``), kept only when the whole model runs
            2% faster than the local plan; timing makes it slower to run and not
            deterministic. "global": channels compete across groups, ranked by score
            normalised per group (divided by the FLOPs/params they carry under a
            target); fewest FLOPs per unit of importance, but it thins cheap early
            layers, which run far below their FLOPs.
        round_to: kept channel counts are multiples of it where the group allows (int
            >= 1, default 8, what kernels vectorise by; 1 for exact counts).
        max_ratio: most a single group may lose, in (0, 1] (default 0.9).
        ignore: fnmatch patterns of module names never pruned (default empty).
        fuse: fold batch norms into the convolutions afterwards (default True; a graph
            only: an emitted module keeps its BatchNorms).
        emit: what ``result.model`` is: "graph" (a ``torch.fx.GraphModule``), "module" (a
            pruned copy of your own class, Hugging Face ``config`` updated, checked
            against the graph) or "auto" (default): "graph" for an fx capture, "module"
            for an export or parts capture, falling back to "graph" with a note when the
            class cannot carry the result (an exported graph is fixed to the example
            shapes; a parts graph holds only the parts, so there it is an error).
        verify: "values" (default): the pruned model is checked against the original with
            the removed units masked on the example inputs (``VerificationError`` on a
            mismatch); "shapes": only shapes are re-propagated (saves two forward passes).
        nm: None (default) or "N:M" semi-structured sparsity on top, e.g. "2:4"; alone
            (no ratio or target) it masks the model without removing channels.
        latency: a LatencySpec (``fxprune.measure.LatencySettings``: device, batch_size,
            threads, warmup, repeats, compile, compile_backend), or a dict of its fields
            (the ``[latency]`` table of a file).
        calibration: input batches for score="activation" and "taylor": a list of inputs
            like example_inputs (tensors, tuples or dicts of keyword inputs), a path to
            such a list saved with ``torch.save`` (in a file, relative to it), or in
            Python a callable returning an iterable, or any iterable (used once). Becomes
            a ``fxprune.select.calibration.Calibration``.
        calib_inputs, loss_fn: Python only: one batch (the older form of calibration)
            and ``loss_fn(model output) -> scalar tensor`` for score="taylor" (optional
            with calibration: ``fxprune.select.calibration.default_loss``).
        seed: int >= 0 for every random draw (default 0).
        units: which kinds of unit compete for the budget: "channels" (default),
            "branches" (residual branches, whole blocks: ``graph.branches``) or
            ``["channels", "branches"]`` (one ranking, scores normalised within each
            kind and divided by cost; with scope="latency" and a target, divided by the
            measured ms each unit saves; docs/depth.md).
            "layers": whole layers (entries of an ``nn.ModuleList`` or ``nn.Sequential``
            that become the identity: ``graph.layers``), scored by ``branch_score``,
            alone or beside "channels" and "branches" (not with scope="latency").
        branch_score: how branches are ranked: "output_norm" (default: the branch's
            output norm relative to the stream), "block_influence" (1 - cos of the
            stream before and after), "group_lasso" (the L2 norm of its weights),
            "angular_distance" (arccos(cos) / pi of the stream before and after a run of
            ``branch_run`` consecutive branches) or "calibration_loss" (SLEB: the loss,
            ``loss_fn`` or the output's change, with the branch removed, one removal at a
            time); ``fxprune.select.branch_score``.
        branch_run: the ``n`` of ``branch_score="angular_distance"``: branches per run
            (default 1: each branch alone).
        units, continued: may include "experts" (a mixture of experts' experts: ``graph.experts``):
            with a float ``ratio``, each routed layer loses that share of its experts (at
            most ``E - top_k``), lowest ``expert_score`` first; with a ``target``, experts
            are ranked per unit of cost with the other kinds; docs/experts.md.
        expert_score: how experts are ranked: "frequency" (default: the share of router
            choices that pick it), "reap" (router weight times expert output norm) or
            "loss" (the loss with the expert removed); ``fxprune.select.expert_score``.

    Files hold the same fields in a table (TOML) or object (JSON); in a file named
    pyproject.toml the spec is the ``[tool.fxprune.compress]`` table.

    Example:
        >>> spec = Spec(input_shape=[1, 3, 32, 32], target={"flops": 0.5}, round_to=8)
        >>> spec.make_example_inputs()[0].shape
        torch.Size([1, 3, 32, 32])
    """

    example_inputs: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)
    input_shape: list[int] | list[list[int]] | None = None
    ratio: float | dict[str, float] | None = None
    target: dict[str, float] | None = None
    capture: str = "auto"
    attention_units: str = "heads"
    score: str = "auto"
    scope: str = "local"
    round_to: int = 8
    max_ratio: float = 0.9
    ignore: list[str] = field(default_factory=list)
    fuse: bool = True
    emit: str = "auto"
    verify: str = "values"
    nm: str | None = None
    latency: LatencySpec = field(default_factory=LatencySpec)
    calibration: Calibration | None = field(default=None, repr=False, compare=False)
    calib_inputs: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)
    loss_fn: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    seed: int = 0
    units: str | list[str] = "channels"
    branch_score: str = "output_norm"
    expert_score: str = "frequency"
    branch_run: int = 1

    def __post_init__(self) -> None:
        check_choice("spec.capture", self.capture, CAPTURES)
        check_choice("spec.attention_units", self.attention_units, ATTENTION_UNITS)
        check_choice("spec.score", self.score, ("auto", *known_scores(), *_MASK_ONLY))
        check_choice("spec.scope", self.scope, SCOPES)
        check_int("spec.round_to", self.round_to, 1)
        self.max_ratio = _fraction("spec.max_ratio", self.max_ratio, True,
                                   "the most a single group may lose")
        ignore = self.ignore
        if not isinstance(ignore, (list, tuple)) or not all(isinstance(p, str) for p in ignore):
            fail("spec.ignore", f"expected a list of module-name patterns, {got(self.ignore)}")
        self.ignore = list(self.ignore)
        check_bool("spec.fuse", self.fuse)
        check_choice("spec.emit", self.emit, EMITS)
        check_choice("spec.verify", self.verify, VERIFY)
        self.nm = None if self.nm is None else _nm("spec.nm", self.nm)
        if not isinstance(self.latency, LatencySettings):
            self.latency = LatencySettings.from_dict(self.latency, where="spec")
        check_int("spec.seed", self.seed, 0)
        if self.example_inputs is not None:
            self.example_inputs = _tensors("spec.example_inputs", self.example_inputs,
                                           "in a TOML/JSON file give spec.input_shape instead")
        if self.input_shape is not None:
            self.input_shape = _shape("spec.input_shape", self.input_shape)
        _exactly_one("spec.example_inputs, spec.input_shape", self.example_inputs, self.input_shape,
                     "example_inputs (a tuple of tensors) or input_shape (e.g. [1, 3, 224, 224])")
        if self.nm is None or self.ratio is not None or self.target is not None:
            _exactly_one("spec.ratio, spec.target", self.ratio, self.target, "ratio (fraction of "
                         "channels to remove, e.g. 0.3 or {'layer4.*': 0.5}) or target (fraction of "
                         "the original to keep, e.g. {'flops': 0.5}), or nm alone (masks only, "
                         "e.g. nm='2:4')")
        self.ratio = None if self.ratio is None else self._check_ratio()
        self.target = None if self.target is None else _target("spec.target", self.target)
        self._check_taylor()
        self.units = _units("spec.units", self.units)
        check_choice("spec.branch_score", self.branch_score, BRANCH_SCORES)
        check_choice("spec.expert_score", self.expert_score, EXPERT_SCORES)
        if "experts" in self.unit_kinds and isinstance(self.ratio, Mapping):
            fail("spec.ratio", "experts are removed by a float ratio (the share of each routed layer's "
                 "experts, e.g. ratio=0.5) or a target (e.g. {'params': 0.5}); a ratio per module does "
                 "not apply to them")
        if "experts" in self.unit_kinds and self.target is not None and self.scope == "latency":
            fail("spec.scope", "scope='latency' times channel groups only; with units including "
                 "'experts' use scope='local' or 'global' (experts are ranked per unit of cost)")
        check_int("spec.branch_run", self.branch_run, 1)
        depth = set(DEPTH_KINDS) & set(self.unit_kinds)
        if "layers" in depth and self.scope == "latency":
            fail("spec.scope", "scope='latency' times channel groups and residual branches; with units "
                 "including 'layers' use scope='local' or 'global' (layers are ranked per unit of cost)")
        if depth and self.scope == "latency" and self.target is None:
            fail("spec.scope", "scope='latency' with units including 'branches' chooses between branches "
                 "and channels against a target (e.g. target={'flops': 0.5}); a ratio fixes the share "
                 "of each kind: give a target, or scope='local'")
        if depth and isinstance(self.ratio, Mapping):
            fail("spec.ratio", "a ratio per group or module applies to channels; with units including "
                 "'branches' give one float ratio (the share of branches removed) or a target")

    @property
    def unit_kinds(self) -> tuple[str, ...]:
        """``units`` as a tuple of kinds.

        Example:
            >>> Spec(input_shape=[1, 4], ratio=0.5, units=["branches", "channels"]).unit_kinds
            ('channels', 'branches')
        """
        return (self.units,) if isinstance(self.units, str) else tuple(self.units)

    def _check_ratio(self) -> float | dict[str, float]:
        def one(path: str, value: Any) -> float:
            value = _fraction(path, value, False, "the fraction of channels to remove")
            if value > self.max_ratio:
                fail(path, f"{value} exceeds spec.max_ratio={self.max_ratio}, the most a single "
                      "group may lose; lower the ratio or raise max_ratio")
            return value

        if not isinstance(self.ratio, Mapping):
            if not _is_number(self.ratio):
                fail("spec.ratio", "expected a float in (0, 1) or a dict {group id or module "
                      f"pattern: float}}, {got(self.ratio)}")
            return one("spec.ratio", self.ratio)
        if not self.ratio:
            fail("spec.ratio", "an empty dict prunes nothing; map group ids or module-name "
                  "patterns to ratios, e.g. {'layer4.*': 0.5}")
        for key in self.ratio:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                fail("spec.ratio", f"keys are group ids or module-name patterns, {got(key)}")
        return {str(k): one(f"spec.ratio[{str(k)!r}]", v) for k, v in self.ratio.items()}

    @property
    def prunes_channels(self) -> bool:
        """Whether channels are removed (a ratio or a target); ``nm`` alone only masks."""
        return self.ratio is not None or self.target is not None

    @property
    def score_method(self) -> str:
        """The channel score that runs: ``score``, with "auto" resolved by the data given
        (and a mask-only method such as "sparsegpt" ranking channels by "activation")."""
        if self.score in _MASK_ONLY:
            return "activation"
        if self.score != "auto":
            return self.score
        return "activation" if self.calibration is not None or self.calib_inputs is not None else "magnitude"

    @property
    def mask_method(self) -> str | None:
        """How ``nm`` masks are chosen (None without ``nm``): "magnitude", "activation"
        (Wanda) or "sparsegpt"; "auto" is "activation" with calibration batches.

        Example:
            >>> Spec(input_shape=[1, 8], nm="2:4").mask_method
            'magnitude'
        """
        if self.nm is None:
            return None
        method = self.score_method if self.score == "auto" else self.score
        return method if method in MASK_SCORES else "magnitude"

    def _check_taylor(self) -> None:
        if self.calib_inputs is not None:
            self.calib_inputs = _tensors("spec.calib_inputs", self.calib_inputs,
                                         "pass a batch of real inputs, e.g. calib_inputs=(images,)")
        if self.loss_fn is not None and not callable(self.loss_fn):
            fail("spec.loss_fn", f"expected a callable, output -> scalar, {got(self.loss_fn)}")
        if self.prunes_channels:
            check_data_needs(self.score_method, self.calibration, self.calib_inputs, self.loss_fn)
        elif self.score not in ("auto", *MASK_SCORES):
            fail("spec.score", f"{self.score!r} ranks channels, and nm alone (no ratio or target) "
                 f"removes none: there score names the mask method, one of {', '.join(MASK_SCORES)}")
        if self.mask_method in CALIBRATED and self.calibration is None and self.calib_inputs is None:
            fail("spec.calibration", f"score={self.score!r} chooses the nm masks on calibration "
                 "batches: calibration=[x1, x2, ...] (inputs like example_inputs), or in a file "
                 "calibration = \"calib.pt\" (CLI: --calibration FILE); score='magnitude' needs none")
        self.calibration = as_calibration(self.calibration, self._example_form())

    def _example_form(self) -> ExampleInputs:
        """What every calibration batch must look like (meta tensors: nothing allocated)."""
        if isinstance(self.example_inputs, dict):
            return ExampleInputs((), self.example_inputs)
        if self.example_inputs is not None:
            return ExampleInputs(self.example_inputs)
        shapes = self.input_shape if isinstance(self.input_shape[0], list) else [self.input_shape]
        return ExampleInputs(tuple(torch.empty(s, device="meta") for s in shapes))

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        """``nm`` as a pair of ints, or None.

        Example:
            >>> Spec(input_shape=[1, 4], ratio=0.5, nm="2:4").nm_pair
            (2, 4)
        """
        return None if self.nm is None else tuple(int(x) for x in self.nm.split(":"))

    def make_example_inputs(self) -> tuple[torch.Tensor, ...] | dict[str, Any]:
        """The example inputs as given, or seeded float32 normal draws of ``input_shape``.

        Example:
            >>> x, y = Spec(input_shape=[[2, 3], [2, 5]], ratio=0.5).make_example_inputs()
            >>> tuple(y.shape), x.dtype
            ((2, 5), torch.float32)
        """
        if self.example_inputs is not None:
            return self.example_inputs
        shapes = self.input_shape if isinstance(self.input_shape[0], list) else [self.input_shape]
        generator = torch.Generator().manual_seed(self.seed)
        return tuple(torch.randn(s, generator=generator, dtype=torch.float32) for s in shapes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that ``from_dict`` turns back into an equal Spec.

        Tensors and callables are left out (example_inputs become their input_shape);
        None values are omitted, so the dict also fits a TOML table.

        Example:
            >>> Spec.from_dict(Spec(input_shape=[1, 8], ratio=0.25).to_dict()).ratio
            0.25
        """
        out: dict[str, Any] = {}
        for name in (f.name for f in fields(self) if f.name not in _CODE_ONLY):
            value = getattr(self, name)
            if name == "input_shape" and value is None:
                if isinstance(self.example_inputs, dict):
                    continue  # keyword inputs have no file form
                if not all(isinstance(t, torch.Tensor) for t in self.example_inputs):
                    continue  # nested inputs have no file form either
                shapes = [list(t.shape) for t in self.example_inputs]
                value = shapes[0] if len(shapes) == 1 else shapes
            if isinstance(value, LatencySpec):
                value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
            if isinstance(value, Calibration):
                value = value.path  # a file's batches are named by their path; others stay in Python
            if value is not None:
                out[name] = copy.deepcopy(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> Spec:
        """Build a Spec from a dict (a file's table); ``overrides`` win over its keys.

        Example:
            >>> Spec.from_dict({"input_shape": [1, 3, 8, 8], "ratio": 0.5}).ratio
            0.5
        """
        if not isinstance(data, Mapping):
            fail("spec", f"expected a table/dict of settings, {got(data)}")
        known = [f.name for f in fields(cls)]
        check_keys("spec", data, known)
        check_keys("spec", overrides, known)
        return cls(**{**data, **overrides})

    @classmethod
    def load(cls, source: Spec | Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> Spec:
        """A Spec from a Spec, a dict, or a path to a .toml/.json file (or pyproject.toml).

        ``overrides`` add what a file cannot hold, e.g. ``calib_inputs`` and ``loss_fn``.

        Example:
            >>> Spec.load({"input_shape": [1, 8], "target": {"params": 0.5}}).target
            {'params': 0.5}
        """
        if isinstance(source, Spec):
            check_keys("spec", overrides, [f.name for f in fields(cls)])
            return dataclasses.replace(source, **overrides) if overrides else source
        if isinstance(source, Mapping):
            return cls.from_dict(source, **overrides)
        if not isinstance(source, (str, os.PathLike)):
            fail("spec", f"expected a Spec, a dict or a .toml/.json path, {got(source)}")
        data = _read_file(Path(source))
        try:
            return cls.from_dict(data, **overrides)
        except SpecError as error:
            raise SpecError(f"{error} (in {source})") from None


def _units(path: str, value: Any) -> str | list[str]:
    """One kind as a string, several as a list in ``UNIT_KINDS`` order."""
    kinds = [value] if isinstance(value, str) else value
    if not _list_of(kinds, str) or any(k not in UNIT_KINDS for k in kinds):
        fail(path, f"expected {' or '.join(map(repr, UNIT_KINDS))} or a list of them, {got(value)}")
    kinds = [k for k in UNIT_KINDS if k in kinds]
    return kinds[0] if len(kinds) == 1 else kinds


def _exactly_one(path: str, first: Any, second: Any, what: str) -> None:
    if (first is None) == (second is None):
        fail(path, f"give exactly one: {what}; {'neither' if first is None else 'both'} given")


def _target(path: str, target: Any) -> dict[str, float]:
    metrics = tuple(TARGET_METRICS)
    if not isinstance(target, Mapping) or len(target) != 1:
        fail(path, f"expected a dict with exactly one key among {', '.join(metrics)} and a "
              f"float in (0, 1], e.g. {{'flops': 0.5}}; {got(target)}")
    ((metric, value),) = target.items()
    path = f"{path}.{metric}"
    if metric not in metrics:
        hint = did_you_mean(metric, metrics)
        fail(path, f"unknown metric; use one of {', '.join(metrics)}{hint}")
    if not _is_number(value):
        fail(path, f"expected a float in (0, 1], {got(value)}")
    if not 0 < value <= 1:
        fail(path, f"target.{metric}={value} is impossible: it must be in (0, 1], the fraction "
              f"of the original {TARGET_METRICS[metric].noun} to keep")
    return {metric: float(value)}


def _read_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        fail("spec", f"cannot load {path}: expected a .toml or .json file")
    data = read_config(path, SpecError, "spec")
    if path.name == "pyproject.toml":
        for key in ("tool", "fxprune", "compress"):
            data = data.get(key) if isinstance(data, dict) else None
        if data is None:
            fail("spec", f"{path} has no [tool.fxprune.compress] table; put the spec there")
    if isinstance(data, dict) and isinstance(data.get("calibration"), str):
        data["calibration"] = str(path.parent / data["calibration"])  # relative to the spec file
    return data
