"""The before/after report of a compression: cost table, per-group table and notes.

Measuring lives in :mod:`fxprune.measure`; this module puts the numbers of two models
side by side and renders them as text (``str(report)``), GitHub markdown
(``report.to_markdown()``) or a JSON-serialisable dict (``report.to_dict()``).

FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per
multiply-accumulate. Every rendering says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tabulate import tabulate
from torch import nn

from fxprune._util import format_si
from fxprune.measure import (
    FLOPS_CONVENTION,
    LatencySettings,
    count_flops,
    count_params,
    measure_latency,
    size_bytes,
)

# Re-exported so that `from fxprune.report import count_flops` keeps working.
__all__ = [
    "FLOPS_CONVENTION", "LatencySettings", "ModelStats", "Report", "build_report",
    "count_flops", "count_params", "group_row", "measure_latency", "measure_stats",
    "size_bytes",
]

GROUP_COLUMNS = ("group", "channels_before", "channels_after", "kept_ratio", "reason")
# one row per Linear/Conv layer when N:M masks were applied (fxprune.sparsity.nm)
SPARSITY_COLUMNS = ("layer", "pattern", "density", "kernel", "reason")

_MISSING = "-"


@dataclass
class ModelStats:
    """The cost of one model. Latencies are median milliseconds, ``None`` if not measured.

    Example::

        >>> ModelStats(flops=1200, params=220, bytes=2_000).latency_ms is None
        True
    """

    flops: int
    params: int
    bytes: int
    latency_ms: float | None = None
    latency_compiled_ms: float | None = None


def measure_stats(model: nn.Module, example_inputs) -> ModelStats:
    """FLOPs, parameters and checkpoint bytes of ``model`` (latency left unmeasured).

    Example::

        >>> import torch
        >>> measure_stats(nn.Linear(10, 20), torch.randn(3, 10)).flops
        1200
    """
    return ModelStats(flops=count_flops(model, example_inputs),
                      params=count_params(model), bytes=size_bytes(model))


def group_row(group_id, channels_before: int, channels_after: int,
              reason: str | None = None) -> dict:
    """One row of the per-group table; ``reason`` says why a frozen group was kept.

    Example::

        >>> group_row(3, 64, 32)
        {'group': 3, 'channels_before': 64, 'channels_after': 32, 'kept_ratio': 0.5, 'reason': None}
    """
    kept = channels_after / channels_before if channels_before else None
    return {"group": group_id, "channels_before": channels_before,
            "channels_after": channels_after, "kept_ratio": kept, "reason": reason}


def _normalize_row(row: Mapping) -> dict:
    """A caller's row in the canonical columns (``id`` is accepted for ``group``)."""
    missing = [k for k in ("channels_before", "channels_after") if k not in row]
    if missing or ("group" not in row and "id" not in row):
        raise ValueError(
            f"a group row needs 'group' (or 'id'), 'channels_before' and 'channels_after'; "
            f"got keys {sorted(row)}"
        )
    normalized = group_row(row.get("group", row.get("id")), row["channels_before"],
                           row["channels_after"], row.get("reason"))
    extra = {k: v for k, v in row.items() if k not in GROUP_COLUMNS and k != "id"}
    return {**normalized, **extra}


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    value = numerator / denominator
    return value if math.isfinite(value) else None


def _binary(value: float) -> str:
    for factor, prefix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= factor:
            return f"{value / factor:.2f} {prefix}"
    return f"{value:g} B"


def _fmt(value, formatter) -> str:
    return _MISSING if value is None else formatter(value)


# (label, ModelStats field, formatter) for each summary row.
_METRICS = (
    ("FLOPs", "flops", format_si),
    ("params", "params", format_si),
    ("size (state_dict)", "bytes", _binary),
    ("latency eager (ms)", "latency_ms", lambda v: f"{v:.3f}"),
    ("latency compiled (ms)", "latency_compiled_ms", lambda v: f"{v:.3f}"),
)


@dataclass
class Report:
    """Before/after costs of a compression, the per-group outcome and notes.

    ``str(report)`` renders plain tables, ``to_markdown()`` GitHub markdown and
    ``to_dict()`` a JSON-serialisable dict (``Report.from_dict`` reads it back).

    Example::

        >>> import torch
        >>> big, small = nn.Linear(16, 32), nn.Linear(16, 8)
        >>> report = build_report(big, small, (torch.randn(1, 16),))
        >>> print(report)                 # metric / before / after / ratio / reduction
        fxprune report
        ...
        params...544...136...0.25...4.00x...
        >>> Report.from_dict(report.to_dict()) == report
        True
    """

    before: ModelStats
    after: ModelStats
    groups: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    latency: LatencySettings | None = None
    sparsity: list[dict] = field(default_factory=list)

    def ratios(self) -> dict[str, float | None]:
        """after/before for each metric (``None`` where unmeasured or zero)."""
        return {name: _ratio(getattr(self.after, name), getattr(self.before, name))
                for _, name, _ in _METRICS}

    def reductions(self) -> dict[str, float | None]:
        """before/after for each metric: the reduction factor, or the speedup for latency."""
        return {name: _ratio(getattr(self.before, name), getattr(self.after, name))
                for _, name, _ in _METRICS}

    def _summary_rows(self) -> list[list[str]]:
        ratios, reductions = self.ratios(), self.reductions()
        rows = []
        for label, name, formatter in _METRICS:
            before, after = getattr(self.before, name), getattr(self.after, name)
            if name == "latency_compiled_ms" and before is None and after is None:
                continue  # only shown when compile timing was asked for
            rows.append([label, _fmt(before, formatter), _fmt(after, formatter),
                         _fmt(ratios[name], lambda v: f"{v:.3f}"),
                         _fmt(reductions[name], lambda v: f"{v:.2f}x")])
        return rows

    def _group_rows(self) -> list[list]:
        return [[str(row["group"]), str(row["channels_before"]), str(row["channels_after"]),
                 _fmt(row.get("kept_ratio"), lambda v: f"{v:.3f}"), row.get("reason") or ""]
                for row in self.groups]

    def _latency_line(self) -> str:
        if self.latency is None:
            return "latency: not measured"
        s = self.latency
        batch = "as given" if s.batch_size is None else str(s.batch_size)
        return (f"latency: median of {s.repeats} runs after {s.warmup} warmup, "
                f"device {s.device}, {s.threads} threads, batch {batch}, models timed alternately")

    def _render(self, tablefmt: str, heading: str, bullet: str) -> str:
        summary_headers = ["metric", "before", "after", "after/before", "reduction (before/after)"]
        parts = [f"{heading}fxprune report",
                 tabulate(self._summary_rows(), headers=summary_headers, tablefmt=tablefmt,
                          disable_numparse=True, colalign=("left",) + ("right",) * 4),
                 f"{FLOPS_CONVENTION}.\n{self._latency_line()}."]
        if self.groups:
            parts += [f"{heading}groups",
                      tabulate(self._group_rows(), headers=list(GROUP_COLUMNS), tablefmt=tablefmt,
                               disable_numparse=True, colalign=("left",) + ("right",) * 3 + ("left",))]
        if self.sparsity:
            rows = [[row["layer"], row["pattern"], _fmt(row["density"], lambda v: f"{v:.3f}"),
                     row["kernel"], row["reason"]] for row in self.sparsity]
            parts += [f"{heading}sparsity (measured density = non-zero weights / all weights)",
                      tabulate(rows, headers=list(SPARSITY_COLUMNS), tablefmt=tablefmt,
                               disable_numparse=True)]
        if self.notes:
            parts += [f"{heading}notes", "\n".join(f"{bullet}{note}" for note in self.notes)]
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self._render("simple", "", "- ")

    def to_markdown(self) -> str:
        """The report as GitHub markdown (tables in tabulate's ``"github"`` format).

        Example::

            >>> import torch
            >>> report = build_report(nn.Linear(16, 32), nn.Linear(16, 8), (torch.randn(1, 16),))
            >>> print(report.to_markdown())
            ### fxprune report
            ...
            | params ...
        """
        return self._render("github", "### ", "- ")

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of everything in the report.

        Example::

            >>> import torch
            >>> report = build_report(nn.Linear(16, 32), nn.Linear(16, 8), (torch.randn(1, 16),))
            >>> report.to_dict()["ratio"]["params"]
            0.25
        """
        return {
            "flops_convention": FLOPS_CONVENTION,
            "before": dataclasses.asdict(self.before),
            "after": dataclasses.asdict(self.after),
            "ratio": self.ratios(),
            "reduction": self.reductions(),
            "latency_settings": None if self.latency is None else dataclasses.asdict(self.latency),
            "groups": [dict(row) for row in self.groups],
            "sparsity": [dict(row) for row in self.sparsity],
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Report:
        """Read back what :meth:`to_dict` wrote (ratios are recomputed, not read).

        Example::

            >>> import json, torch
            >>> report = build_report(nn.Linear(16, 32), nn.Linear(16, 8), (torch.randn(1, 16),))
            >>> text = json.dumps(report.to_dict())
            >>> Report.from_dict(json.loads(text)).after.params
            136
        """
        settings = data.get("latency_settings")
        return cls(before=ModelStats(**data["before"]), after=ModelStats(**data["after"]),
                   groups=[dict(row) for row in data.get("groups", [])],
                   notes=list(data.get("notes", [])),
                   latency=None if settings is None else LatencySettings(**settings),
                   sparsity=[dict(row) for row in data.get("sparsity", [])])


def build_report(original: nn.Module, compressed: nn.Module, example_inputs, *,
                 latency: LatencySettings | None = None, group_rows: Iterable[Mapping] = (),
                 notes: Iterable[str] = (), sparsity_rows: Iterable[Mapping] = ()) -> Report:
    """Measure ``original`` and ``compressed`` on ``example_inputs`` and compare them.

    FLOPs, parameters and bytes are always measured; latency only when ``latency``
    settings are given, and then both models are timed alternately in one call (see
    :func:`fxprune.measure.measure_latency`). ``group_rows`` are dicts with ``group``
    (or ``id``), ``channels_before``, ``channels_after`` and optionally ``reason``
    (see :func:`group_row`); ``notes`` are free-form lines such as the fuse pass's;
    ``sparsity_rows`` are dicts with the keys of ``SPARSITY_COLUMNS``, one per layer.

    Example::

        >>> import torch
        >>> model, small = nn.Conv2d(3, 64, 3), nn.Conv2d(3, 32, 3)
        >>> report = build_report(model, small, (torch.randn(1, 3, 32, 32),),
        ...                       latency=LatencySettings(repeats=3),
        ...                       group_rows=[group_row(0, 64, 32)],
        ...                       notes=["fuse: folded 20 batchnorms"])
        >>> report.ratios()["flops"], report.groups[0]["kept_ratio"], report.after.latency_ms > 0
        (0.5, 0.5, True)
    """
    before = measure_stats(original, example_inputs)
    after = measure_stats(compressed, example_inputs)
    if latency is not None:
        timed = measure_latency([original, compressed], example_inputs, latency)
        before.latency_ms, after.latency_ms = timed.eager_ms
        if timed.compiled_ms is not None:
            before.latency_compiled_ms, after.latency_compiled_ms = timed.compiled_ms
    return Report(before=before, after=after,
                  groups=[_normalize_row(row) for row in group_rows],
                  notes=list(notes), latency=latency, sparsity=[dict(r) for r in sparsity_rows])
