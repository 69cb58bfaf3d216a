"""Spec: the configuration of ``fxprune.compress``; validation and loading.

Every error is a SpecError whose message starts with the field path and says the fix.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import re
from fnmatch import fnmatch
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn

import torch

from fxprune.errors import SpecError

try:  # stdlib from Python 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    tomllib = None

SCORES = ("magnitude", "bn_scale", "taylor", "group_lasso", "l0")
SCOPES = ("global", "local", "latency")
DEVICES = ("cpu", "cuda")
TARGET_METRICS = {"flops": "FLOPs", "params": "parameters", "latency": "latency"}
_CODE_ONLY = ("example_inputs", "calib_inputs", "loss_fn")  # cannot live in a file
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _fail(path: str, message: str) -> NoReturn:
    raise SpecError(f"{path}: {message}")


def _got(value: Any) -> str:
    text = repr(value)
    return f"got {type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _did_you_mean(name: Any, known: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(name), known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_keys(path: str, data: Mapping[Any, Any], known: list[str]) -> None:
    for key in data:
        if key not in known:
            _fail(f"{path}.{key}", f"unknown field {key!r}; known fields: "
                  f"{', '.join(known)}{_did_you_mean(key, known)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(path: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, f"expected an int >= {minimum}, {_got(value)}")
    if value < minimum:
        _fail(path, f"must be an int >= {minimum}, got {value}")
    return value


def _bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(path, f"expected a bool (true or false), {_got(value)}")
    return value


def _choice(path: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        hint = _did_you_mean(value, allowed) if isinstance(value, str) else ""
        _fail(path, f"must be one of {', '.join(map(repr, allowed))}; {_got(value)}{hint}")
    return value


def _fraction(path: str, value: Any, closed: bool, meaning: str) -> float:
    interval = "(0, 1]" if closed else "(0, 1)"
    if not _is_number(value):
        _fail(path, f"expected a float in {interval}, {_got(value)}")
    if not (0 < value < 1 or (closed and value == 1)):
        _fail(path, f"{value} is out of range: it must be in {interval}, {meaning}")
    return float(value)


def _list_of(value: Any, kind: type | tuple[type, ...]) -> bool:
    """A non-empty list or tuple whose items are all ``kind``."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, kind) for v in value)


def _tensors(path: str, value: Any, hint: str) -> tuple[torch.Tensor, ...]:
    value = (value,) if isinstance(value, torch.Tensor) else value
    if not _list_of(value, torch.Tensor):
        _fail(path, f"expected a non-empty tuple of torch.Tensor, {_got(value)}; {hint}")
    return tuple(value)


def _shape(path: str, value: Any, nested: bool = True) -> list[int] | list[list[int]]:
    if nested and _list_of(value, (list, tuple)):
        return [_shape(f"{path}[{i}]", v, False) for i, v in enumerate(value)]
    if not isinstance(value, (list, tuple)) or not value:
        _fail(path, f"expected a non-empty list of ints like [1, 3, 224, 224], {_got(value)}")
    return [_int(f"{path}[{i}]", d, 1) for i, d in enumerate(value)]


def _nm(path: str, value: Any) -> str:
    match = _NM.match(value) if isinstance(value, str) else None
    if match is None or not 0 < int(match[1]) < int(match[2]):
        _fail(path, f"expected a string 'N:M' with integers 0 < N < M, e.g. '2:4', {_got(value)}")
    return f"{int(match[1])}:{int(match[2])}"


@dataclass
class LatencySpec:
    """How latency is measured, for the report and ``target={"latency": ...}``.

    Fields (the ``[latency]`` table of a spec file):
        device: "cpu" (default) or "cuda".
        batch_size: batch to time at (int >= 1); None (default): the example inputs' batch.
        threads: torch CPU threads while timing (int >= 1, default 2), fixed so that
            timings compare across machines.
        warmup: untimed runs first (int >= 0, default 5).
        repeats: timed runs (int >= 1, default 20).
        compile: time the model after ``torch.compile`` (default False).

    Example:
        >>> LatencySpec(device="cpu", repeats=50).repeats
        50
    """

    device: str = "cpu"
    batch_size: int | None = None
    threads: int = 2
    warmup: int = 5
    repeats: int = 20
    compile: bool = False

    def __post_init__(self) -> None:
        _choice("spec.latency.device", self.device, DEVICES)
        if self.batch_size is not None:
            _int("spec.latency.batch_size", self.batch_size, 1)
        for name, minimum in (("threads", 1), ("warmup", 0), ("repeats", 1)):
            _int(f"spec.latency.{name}", getattr(self, name), minimum)
        _bool("spec.latency.compile", self.compile)

    def to_settings(self):
        """The measurement settings (``fxprune.measure.LatencySettings``) this section asks for."""
        from .measure import LatencySettings

        return LatencySettings(**dataclasses.asdict(self))


@dataclass
class Spec:
    """What ``fxprune.compress`` should do. Validated on construction.

    Inputs, exactly one of:
        example_inputs: tuple of tensors to trace with (one tensor is wrapped); Python only.
        input_shape: the input's shape, ``[1, 3, 224, 224]``, or a list of shapes for
            several inputs; ``make_example_inputs()`` draws float32 normal tensors.
    Goal, exactly one of:
        ratio: fraction of channels to remove from every prunable group, in (0, 1), or
            ``{group id or fnmatch module-name pattern: ratio}`` (keys stored as str).
        target: ``{"flops" | "params" | "latency": fraction of the original to keep}``,
            one key, value in (0, 1].
    Options:
        score: channel importance, one of ``SCORES`` (default "magnitude").
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
        fuse: fold batch norms into the convolutions afterwards (default True).
        nm: None (default) or "N:M" semi-structured sparsity on top, e.g. "2:4".
        latency: a LatencySpec, or a dict (the ``[latency]`` table of a file).
        calib_inputs, loss_fn: needed by score="taylor", Python only: a batch and
            ``loss_fn(model(*calib_inputs)) -> scalar tensor``.
        seed: int >= 0 for every random draw (default 0).

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
    score: str = "magnitude"
    scope: str = "local"
    round_to: int = 8
    max_ratio: float = 0.9
    ignore: list[str] = field(default_factory=list)
    fuse: bool = True
    nm: str | None = None
    latency: LatencySpec = field(default_factory=LatencySpec)
    calib_inputs: tuple[torch.Tensor, ...] | None = field(default=None, repr=False, compare=False)
    loss_fn: Callable[[Any], torch.Tensor] | None = field(default=None, repr=False, compare=False)
    seed: int = 0

    def __post_init__(self) -> None:
        _choice("spec.score", self.score, SCORES)
        _choice("spec.scope", self.scope, SCOPES)
        _int("spec.round_to", self.round_to, 1)
        self.max_ratio = _fraction("spec.max_ratio", self.max_ratio, True,
                                   "the most a single group may lose")
        ignore = self.ignore
        if not isinstance(ignore, (list, tuple)) or not all(isinstance(p, str) for p in ignore):
            _fail("spec.ignore", f"expected a list of module-name patterns, {_got(self.ignore)}")
        self.ignore = list(self.ignore)
        _bool("spec.fuse", self.fuse)
        self.nm = None if self.nm is None else _nm("spec.nm", self.nm)
        if isinstance(self.latency, Mapping):
            _check_keys("spec.latency", self.latency, [f.name for f in fields(LatencySpec)])
            self.latency = LatencySpec(**self.latency)
        elif not isinstance(self.latency, LatencySpec):
            _fail("spec.latency", f"expected a LatencySpec or a dict of its fields, {_got(self.latency)}")
        _int("spec.seed", self.seed, 0)
        if self.example_inputs is not None:
            self.example_inputs = _tensors("spec.example_inputs", self.example_inputs,
                                           "in a TOML/JSON file give spec.input_shape instead")
        if self.input_shape is not None:
            self.input_shape = _shape("spec.input_shape", self.input_shape)
        _exactly_one("spec.example_inputs, spec.input_shape", self.example_inputs, self.input_shape,
                     "example_inputs (a tuple of tensors) or input_shape (e.g. [1, 3, 224, 224])")
        _exactly_one("spec.ratio, spec.target", self.ratio, self.target, "ratio (fraction of "
                     "channels to remove, e.g. 0.3 or {'layer4.*': 0.5}) or target (fraction of "
                     "the original to keep, e.g. {'flops': 0.5})")
        self.ratio = None if self.ratio is None else self._check_ratio()
        self.target = None if self.target is None else _target("spec.target", self.target)
        self._check_taylor()

    def _check_ratio(self) -> float | dict[str, float]:
        def one(path: str, value: Any) -> float:
            value = _fraction(path, value, False, "the fraction of channels to remove")
            if value > self.max_ratio:
                _fail(path, f"{value} exceeds spec.max_ratio={self.max_ratio}, the most a single "
                      "group may lose; lower the ratio or raise max_ratio")
            return value

        if not isinstance(self.ratio, Mapping):
            if not _is_number(self.ratio):
                _fail("spec.ratio", "expected a float in (0, 1) or a dict {group id or module "
                      f"pattern: float}}, {_got(self.ratio)}")
            return one("spec.ratio", self.ratio)
        if not self.ratio:
            _fail("spec.ratio", "an empty dict prunes nothing; map group ids or module-name "
                  "patterns to ratios, e.g. {'layer4.*': 0.5}")
        for key in self.ratio:
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                _fail("spec.ratio", f"keys are group ids or module-name patterns, {_got(key)}")
        return {str(k): one(f"spec.ratio[{str(k)!r}]", v) for k, v in self.ratio.items()}

    def _check_taylor(self) -> None:
        if self.calib_inputs is not None:
            self.calib_inputs = _tensors("spec.calib_inputs", self.calib_inputs,
                                         "pass a batch of real inputs, e.g. calib_inputs=(images,)")
        if self.loss_fn is not None and not callable(self.loss_fn):
            _fail("spec.loss_fn", f"expected a callable, output -> scalar, {_got(self.loss_fn)}")
        missing = [f"spec.{n}" for n in ("calib_inputs", "loss_fn") if getattr(self, n) is None]
        if self.score == "taylor" and missing:
            _fail(", ".join(missing), "score='taylor' needs a calibration batch (calib_inputs: "
                  "tuple of tensors) and a loss function (loss_fn: model output -> scalar tensor); "
                  "a file cannot hold them, pass them in Python: Spec(..., calib_inputs=(x,), "
                  "loss_fn=fn) or Spec.load(path, calib_inputs=(x,), loss_fn=fn)")

    @property
    def nm_pair(self) -> tuple[int, int] | None:
        """``nm`` as a pair of ints, or None.

        Example:
            >>> Spec(input_shape=[1, 4], ratio=0.5, nm="2:4").nm_pair
            (2, 4)
        """
        return None if self.nm is None else tuple(int(x) for x in self.nm.split(":"))

    def make_example_inputs(self) -> tuple[torch.Tensor, ...]:
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
                shapes = [list(t.shape) for t in self.example_inputs]
                value = shapes[0] if len(shapes) == 1 else shapes
            if isinstance(value, LatencySpec):
                value = {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
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
            _fail("spec", f"expected a table/dict of settings, {_got(data)}")
        known = [f.name for f in fields(cls)]
        _check_keys("spec", data, known)
        _check_keys("spec", overrides, known)
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
            _check_keys("spec", overrides, [f.name for f in fields(cls)])
            return dataclasses.replace(source, **overrides) if overrides else source
        if isinstance(source, Mapping):
            return cls.from_dict(source, **overrides)
        if not isinstance(source, (str, os.PathLike)):
            _fail("spec", f"expected a Spec, a dict or a .toml/.json path, {_got(source)}")
        data = _read_file(Path(source))
        try:
            return cls.from_dict(data, **overrides)
        except SpecError as error:
            raise SpecError(f"{error} (in {source})") from None


def check_ignore(patterns: list[str], names: list[str]) -> None:
    """Raise a SpecError for the first ``spec.ignore`` pattern that matches none of ``names``
    (the model's module names), naming the closest ones: a typo would otherwise ignore nothing.

    Example:
        >>> check_ignore(["layer1.*"], ["conv1", "layer1", "layer1.0"])
        >>> check_ignore(["layr1.*"], ["conv1", "layer1", "layer1.0"])
        Traceback (most recent call last):
        ...
        fxprune.errors.SpecError: spec.ignore: pattern 'layr1.*' matches no module of the model; closest module names: 'layer1.0', 'layer1'; patterns are fnmatch patterns on module names, e.g. 'layer1.*' (list them with `fxprune graph MODEL`)
    """
    for pattern in patterns:
        if not any(fnmatch(name, pattern) for name in names):
            close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
            hint = (f"closest module names: {', '.join(map(repr, close))}" if close
                    else f"module names look like {', '.join(map(repr, names[:3]))}")
            _fail("spec.ignore", f"pattern {pattern!r} matches no module of the model; {hint}; "
                  "patterns are fnmatch patterns on module names, e.g. 'layer1.*' (list them "
                  "with `fxprune graph MODEL`)")


def _exactly_one(path: str, first: Any, second: Any, what: str) -> None:
    if (first is None) == (second is None):
        _fail(path, f"give exactly one: {what}; {'neither' if first is None else 'both'} given")


def _target(path: str, target: Any) -> dict[str, float]:
    metrics = tuple(TARGET_METRICS)
    if not isinstance(target, Mapping) or len(target) != 1:
        _fail(path, f"expected a dict with exactly one key among {', '.join(metrics)} and a "
              f"float in (0, 1], e.g. {{'flops': 0.5}}; {_got(target)}")
    ((metric, value),) = target.items()
    path = f"{path}.{metric}"
    if metric not in metrics:
        hint = _did_you_mean(metric, metrics)
        _fail(path, f"unknown metric; use one of {', '.join(metrics)}{hint}")
    if not _is_number(value):
        _fail(path, f"expected a float in (0, 1], {_got(value)}")
    if not 0 < value <= 1:
        _fail(path, f"target.{metric}={value} is impossible: it must be in (0, 1], the fraction "
              f"of the original {TARGET_METRICS[metric]} to keep")
    return {metric: float(value)}


def _read_file(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        _fail("spec", f"cannot load {path}: expected a .toml or .json file")
    if suffix == ".toml" and tomllib is None:
        _fail("spec", f"cannot load {path}: reading TOML needs Python >= 3.11; use JSON")
    if not path.is_file():
        _fail("spec", f"spec file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as error:  # TOML/JSON/Unicode decode errors are ValueErrors
        _fail("spec", f"cannot parse {path}: {error}")
    if path.name == "pyproject.toml":
        for key in ("tool", "fxprune", "compress"):
            data = data.get(key) if isinstance(data, dict) else None
        if data is None:
            _fail("spec", f"{path} has no [tool.fxprune.compress] table; put the spec there")
    return data
