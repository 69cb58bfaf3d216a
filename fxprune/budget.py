"""Size budgets for CI: limits on parameters, FLOPs, checkpoint size and latency.

A budget lives in ``pyproject.toml`` (or any TOML file) as ``[tool.fxprune.budget]``::

    [tool.fxprune.budget]
    model = "torchvision:resnet18"     # any model reference `fxprune` accepts
    input = [1, 3, 224, 224]           # or "1,3,224,224"
    max_params = "12M"                 # k, M, G, T: powers of 1000
    max_flops = "4G"                   # 2 FLOPs per multiply-accumulate
    max_size = "50MB"                  # bytes of torch.save(state_dict): B, kB, MB, GB, KiB, MiB, GiB
    max_latency_ms = 40                # or "40ms", "0.04s"

    [tool.fxprune.budget.latency]      # required with max_latency_ms: how the limit was measured
    device = "cpu"                     # and threads; the other fields of
    threads = 2                        # fxprune.measure.LatencySettings are optional

A value holds when ``measured <= limit``.

Example:
    >>> parse_count("1.2G", "max_flops")
    1200000000
    >>> parse_size("20MB", "max_size")
    20000000
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from tabulate import tabulate

from fxprune._util import format_si, read_config
from fxprune.errors import FxpruneError
from fxprune.measure import LatencySettings, count_flops, count_params, measure_latency, size_bytes

LIMITS = ("max_params", "max_flops", "max_size", "max_latency_ms")
_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_COUNT = re.compile(rf"^\s*{_NUMBER}\s*([kKMGT]?)\s*$")
_SIZE = re.compile(rf"^\s*{_NUMBER}\s*([kKMGT]?i?B?)\s*$")
_TIME = re.compile(rf"^\s*{_NUMBER}\s*(ms|s|us|µs)?\s*$")
_SI = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


class BudgetError(FxpruneError):
    """A budget is missing or malformed; the message names the field."""


def _number(value: Any, pattern: re.Pattern, field_name: str, example: str):
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, (int, float)):
        if value < 0:
            raise BudgetError(f"{field_name}: must be >= 0, got {value}")
        return float(value), ""
    match = pattern.match(value) if isinstance(value, str) else None
    if match is None:
        raise BudgetError(f"{field_name}: cannot parse {value!r}; {example}")
    return float(match[1]), match[2] or ""


def parse_count(value: Any, field_name: str = "limit") -> int:
    """A count with an optional SI suffix: ``5M`` -> 5000000, ``1.2G``, ``300k``.

    Example:
        >>> parse_count("300k")
        300000
    """
    number, suffix = _number(value, _COUNT, field_name,
                             "use a number with an optional k, M, G or T suffix, e.g. '5M' or '1.2G'")
    return int(round(number * _SI[suffix]))


def parse_size(value: Any, field_name: str = "limit") -> int:
    """Bytes: ``20MB`` (10^6), ``1.5MiB`` (2^20), ``800kB``, ``1GB``, or a plain number of bytes.

    Example:
        >>> parse_size("1.5MiB")
        1572864
    """
    example = "use a number with a unit B, kB, MB, GB, KiB, MiB or GiB, e.g. '20MB'"
    number, unit = _number(value, _SIZE, field_name, example)
    prefix, binary = unit.rstrip("B").rstrip("i"), "i" in unit
    if unit and not unit.endswith("B"):
        raise BudgetError(f"{field_name}: cannot parse {value!r}; {example}")
    factor = 1024 ** " KMGT".index(prefix.upper() if prefix else " ") if binary else _SI[prefix]
    return int(round(number * factor))


def parse_ms(value: Any, field_name: str = "limit") -> float:
    """Milliseconds: ``40``, ``"40ms"``, ``"0.04s"``, ``"800us"``.

    Example:
        >>> parse_ms("0.04s")
        40.0
    """
    number, unit = _number(value, _TIME, field_name,
                           "use milliseconds, or a number with ms, s or us, e.g. '40ms'")
    return number * {"": 1.0, "ms": 1.0, "s": 1e3, "us": 1e-3, "µs": 1e-3}[unit]


_PARSERS = {"max_params": parse_count, "max_flops": parse_count, "max_size": parse_size,
            "max_latency_ms": parse_ms}


@dataclass
class Budget:
    """Limits to hold (None: not checked), the model and input to check them on.

    Example:
        >>> Budget.from_dict({"max_params": "5M", "max_size": "20MB"}).max_params
        5000000
    """

    model: str | None = None
    input_shape: list | None = None
    max_params: int | None = None
    max_flops: int | None = None
    max_size: int | None = None
    max_latency_ms: float | None = None
    latency: LatencySettings | None = None
    source: str = "arguments"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "arguments") -> Budget:
        """Validate a ``[tool.fxprune.budget]`` table; errors name the field."""
        prefix = "tool.fxprune.budget" if "pyproject" in source else "budget"
        known = ("model", "input", "input_shape", *LIMITS, "latency")
        for key in data:
            if key not in known:
                raise BudgetError(f"{prefix}.{key}: unknown field in {source}; known fields: "
                                  f"{', '.join(known)}")
        limits = {k: _PARSERS[k](data[k], f"{prefix}.{k}") for k in LIMITS if data.get(k) is not None}
        if not limits:
            raise BudgetError(f"{prefix}: no limit in {source}; set at least one of {', '.join(LIMITS)}")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise BudgetError(f"{prefix}.model: expected a model reference string such as "
                              f"'torchvision:resnet18', got {model!r}")
        shape = data.get("input", data.get("input_shape"))
        if shape is not None:
            shape = _shape(shape, f"{prefix}.input")
        latency = None
        if "max_latency_ms" in limits or data.get("latency") is not None:
            latency = _latency(data.get("latency"), prefix, source)
        return cls(model=model, input_shape=shape, latency=latency, source=source, **limits)

    def limits(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in LIMITS if getattr(self, k) is not None}


def _shape(value: Any, field_name: str) -> list:
    from fxprune.models import parse_shape
    if isinstance(value, str):
        try:
            return parse_shape(value)
        except FxpruneError as error:
            raise BudgetError(f"{field_name}: {error}") from None
    ok = isinstance(value, list) and value and (
        all(isinstance(d, int) and d > 0 for d in value)
        or all(isinstance(s, list) and s and all(isinstance(d, int) and d > 0 for d in s) for s in value))
    if not ok:
        raise BudgetError(f"{field_name}: expected a shape such as [1, 3, 224, 224] or "
                          f"\"1,3,224,224\", got {value!r}")
    return value


def _latency(table: Any, prefix: str, source: str) -> LatencySettings:
    if not isinstance(table, Mapping) or "device" not in table or "threads" not in table:
        raise BudgetError(f"{prefix}.latency: a latency limit must state how it was measured: add a "
                          f"table with device and threads to {source}, e.g. "
                          f"[tool.fxprune.budget.latency] device = \"cpu\" threads = 2")
    try:
        return LatencySettings.from_dict(table, where=prefix)
    except FxpruneError as error:
        raise BudgetError(str(error)) from None


def load_budget(path: str | Path) -> Budget:
    """The budget in ``path``: ``[tool.fxprune.budget]`` of a pyproject.toml, or of any TOML
    file (a file without that table may hold the fields at top level or under ``[budget]``).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "pyproject.toml"
        >>> _ = path.write_text("[tool.fxprune.budget]\\nmax_params = 12000000\\nmax_size = '50MB'\\n")
        >>> load_budget(path).max_params
        12000000
    """
    path = Path(path)
    data = read_config(path, BudgetError, "budget")
    table = data.get("tool", {}).get("fxprune", {}).get("budget")
    if table is None and path.name != "pyproject.toml":
        table = data.get("budget", data if any(k in data for k in LIMITS) else None)
    if not isinstance(table, Mapping):
        raise BudgetError(f"{path} has no [tool.fxprune.budget] table; add one "
                          "(see examples/ci/pyproject.toml) or pass --budget FILE")
    return Budget.from_dict(table, source=str(path))


def find_pyproject(start: str | Path = ".") -> Path | None:
    """The nearest pyproject.toml in ``start`` or its parents."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder / "pyproject.toml"
    return None


@dataclass
class CheckRow:
    name: str
    limit: float
    measured: float
    ok: bool
    label: str


@dataclass
class BudgetResult:
    """Measured values against limits. ``ok`` is True when every limit holds."""

    rows: list[CheckRow] = field(default_factory=list)
    latency: LatencySettings | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def table(self) -> str:
        """A terminal table: check, limit, measured, result, then a one-line verdict."""
        body = [[r.label, _fmt(r.name, r.limit), _fmt(r.name, r.measured),
                 f"{r.measured / r.limit:.0%}" if r.limit else "-", "pass" if r.ok else "FAIL"]
                for r in self.rows]
        text = tabulate(body, headers=["check", "limit", "measured", "of limit", "result"],
                        colalign=("left", "right", "right", "right", "left"), disable_numparse=True)
        failed = [r.name for r in self.rows if not r.ok]
        verdict = (f"PASS: {len(self.rows)} of {len(self.rows)} limits hold" if not failed else
                   f"FAIL: {len(failed)} of {len(self.rows)} limits exceeded ({', '.join(failed)})")
        return f"{text}\n{verdict}"

    def to_dict(self) -> dict:
        return {"ok": self.ok,
                "checks": [{"name": r.name, "limit": r.limit, "measured": r.measured, "ok": r.ok}
                           for r in self.rows],
                "latency_settings": None if self.latency is None else vars(self.latency).copy()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _fmt(name: str, value: float) -> str:
    if name == "max_latency_ms":
        return f"{value:.3f} ms"
    if name == "max_size":
        return format_si(value, "B", digits=3)
    return f"{int(value):,}" if value < 1000 else f"{format_si(value, digits=3, space=False)} ({int(value):,})"


def check_budget(model: torch.nn.Module, example_inputs, budget: Budget) -> BudgetResult:
    """Measure what ``budget`` limits on ``model`` and compare (a value holds when <= limit).

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3))
        >>> result = check_budget(model, (torch.randn(1, 3, 32, 32),), Budget(max_params=1_000))
        >>> result.ok, [row.measured for row in result.rows]
        (True, [516.0])
    """
    limits = budget.limits()
    needs_inputs = any(k in limits for k in ("max_flops", "max_latency_ms"))
    if needs_inputs and example_inputs is None:
        raise BudgetError("max_flops and max_latency_ms need an input shape: set input = "
                          "[1, 3, 224, 224] in the budget or pass --input")
    measured: dict[str, float] = {}
    if "max_params" in limits:
        measured["max_params"] = count_params(model)
    if "max_flops" in limits:
        measured["max_flops"] = count_flops(model, example_inputs)
    if "max_size" in limits:
        measured["max_size"] = size_bytes(model)
    settings = None
    if "max_latency_ms" in limits:
        settings = budget.latency or LatencySettings()
        timed = measure_latency([model], example_inputs, settings)
        measured["max_latency_ms"] = (timed.compiled_ms or timed.eager_ms)[0]
    labels = {"max_params": "params", "max_flops": "FLOPs", "max_size": "size (state_dict)"}
    if settings is not None:
        threads = f"{settings.threads} thread{'s' if settings.threads != 1 else ''}"
        compiled = ", compiled" if settings.compile else ""
        labels["max_latency_ms"] = f"latency ({settings.device}, {threads}{compiled})"
    rows = [CheckRow(k, float(v), float(measured[k]), measured[k] <= v, labels[k]) for k, v in limits.items()]
    return BudgetResult(rows=rows, latency=settings)
