"""The standard results file every benchmark writes: ``{"header": {...}, "rows": [...]}``.

The header says what produced the rows, so a table in the docs can name its run: git
commit, Python / torch / torchvision / Torch-Pruning versions, CPU model, torch threads,
the script's arguments and the date. Each benchmark has one default file,
``benchmarks/results/NAME.json``; ``benchmarks/make_docs.py`` builds the docs' tables from
those files. Paths are written relative to the repository (or as bare file names), never
as this machine's absolute paths.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_json_option(parser, "latency")
    >>> args = parser.parse_args(["--json"])
    >>> Path(args.json).relative_to(REPO).as_posix()
    'benchmarks/results/latency.json'
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
HEADER_KEYS = ("git_commit", "python", "torch", "torchvision", "torch_pruning", "cpu", "threads", "arguments",
               "date")


def default_path(name: str) -> Path:
    """Where benchmark ``name`` keeps its results.

    Example:
        >>> default_path("digits").name
        'digits.json'
    """
    return RESULTS / f"{name}.json"


def add_json_option(parser: argparse.ArgumentParser, name: str) -> None:
    """``--json [FILE]``: write the rows with the header; without FILE, to ``default_path(name)``.

    Example:
        >>> p = argparse.ArgumentParser(); add_json_option(p, "zoo_sweep")
        >>> p.parse_args(["--json", "zoo.json"]).json, p.parse_args([]).json
        ('zoo.json', None)
    """
    parser.add_argument("--json", nargs="?", const=str(default_path(name)), metavar="FILE",
                        help=f"write the rows and a header (commit, versions, CPU, arguments) to FILE "
                             f"(default: benchmarks/results/{name}.json)")


def portable(value: Any) -> Any:
    """``value`` with absolute paths made relative to the repository (else reduced to the file name).

    Example:
        >>> portable({"json": str(REPO / "benchmarks" / "results" / "x.json"), "n": 3})
        {'json': 'benchmarks/results/x.json', 'n': 3}
        >>> portable("/somewhere/else/out.json")
        'out.json'
    """
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value).resolve()
        return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name
    return value


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" (with uncommitted changes)" if dirty else "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def header(args: argparse.Namespace | dict, threads: int | None = None, **extra: Any) -> dict[str, Any]:
    """The standard header; ``extra`` adds benchmark-specific fields (e.g. the GPU).

    ``threads`` defaults to torch's current intra-op thread count.

    Example:
        >>> h = header({"models": "resnet18"}, threads=2)
        >>> [k for k in HEADER_KEYS if k not in h], h["arguments"], h["threads"]
        ([], {'models': 'resnet18'}, 2)
    """
    import torch

    arguments = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {
        "git_commit": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "torch_pruning": _version("torch-pruning"),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads() if threads is None else threads,
        "arguments": portable(arguments),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **portable(extra),
    }


def write(path: str | os.PathLike, rows: list[dict], head: dict[str, Any], **extra: Any) -> None:
    """Write ``{"header": head, "rows": rows, **extra}`` to ``path`` (folders are created).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "sub" / "r.json"
        >>> write(out, [{"model": "m", "ms": 1.5}], header({"models": "m"}))
        >>> load(out)["rows"]
        [{'model': 'm', 'ms': 1.5}]
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"header": portable(head), "rows": rows, **portable(extra)}, fh, indent=1, ensure_ascii=False)
        fh.write("\n")


def load(path: str | os.PathLike) -> dict[str, Any]:
    """A results file, checked for the standard shape; raises ValueError naming what is missing."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or not isinstance(data.get("header"), dict) or not isinstance(data.get("rows"),
                                                                                                list):
        raise ValueError(f"{path}: expected {{'header': {{...}}, 'rows': [...]}}; rerun the benchmark with --json")
    missing = [k for k in HEADER_KEYS if k not in data["header"]]
    if missing:
        raise ValueError(f"{path}: header lacks {', '.join(missing)}; rerun the benchmark with --json")
    return data

