"""What a model costs: FLOPs, parameters, bytes on disk and latency.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts **2 FLOPs
per multiply-accumulate** (a ``Linear(10, 20)`` on a batch of 3 is 2*3*10*20 = 1200
FLOPs). Latency is measured in one process with the models timed alternately, so that
clock and thermal drift hit every model the same way; it works on CPU and on CUDA.

Nothing here mutates the caller's models: training flags are restored after a forward
and a model is only moved to another device as a copy.

The rendering of these numbers lives in :mod:`fxprune.report`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from fxprune import _util
from fxprune._check import check_bool, check_int, check_keys, did_you_mean, fail, got
from fxprune.capture.inputs import ExampleInputs, as_example_inputs
from fxprune.errors import SpecError

FLOPS_CONVENTION = (
    "FLOPs counted by torch.utils.flop_counter.FlopCounterMode: "
    "2 FLOPs per multiply-accumulate"
)

_DEVICES = ("cpu", "cuda")


def module_calls(model: nn.Module, names, example_inputs, *, eval_mode: bool = False
                 ) -> dict[str, list[tuple[tuple, dict]]]:
    """``(args, kwargs)`` of every call of each named submodule during one forward of
    ``model`` on ``example_inputs`` (a tensor or a tuple), under ``inference_mode``; with
    ``eval_mode`` the forward runs in eval mode and training flags are put back after.
    A module never called as a module (a weight read by a parent's fused op) has no calls.
    """
    calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in names}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, kwargs, name=name: calls[name].append((args, kwargs)), with_kwargs=True)
        for name in calls]
    try:
        with contextlib.ExitStack() as stack:
            if eval_mode:
                stack.enter_context(_util.eval_mode(model))
            stack.enter_context(torch.inference_mode())
            as_example_inputs(example_inputs).call(model)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


def count_flops(model: nn.Module, example_inputs) -> int:
    """FLOPs of one forward pass of ``model`` on ``example_inputs``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` under ``torch.no_grad()``
    with the model in eval mode (its training flags are restored afterwards). The
    convention is **2 FLOPs per multiply-accumulate**; ops the counter has no formula
    for (elementwise, norms, pooling) count 0.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs.

    Example::

        >>> count_flops(nn.Linear(10, 20), torch.randn(3, 10))  # 2 * 3 * 10 * 20
        1200
    """
    inputs = as_example_inputs(example_inputs)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), _util.eval_mode(model), _no_mha_fastpath(), counter:
        inputs.call(model)
    return int(counter.get_total_flops())


@contextlib.contextmanager
def _no_mha_fastpath():
    """In eval mode under no_grad, ``nn.MultiheadAttention`` calls one fused kernel that the
    counter has no formula for (0 FLOPs); its plain path is what a traced graph runs."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, each tensor counted once.

    Tied weights (one ``Parameter`` registered under several names, e.g. an embedding
    shared with the output projection) count once.

    Example::

        >>> count_params(nn.Linear(10, 20))  # 10 * 20 weights + 20 biases
        220
    """
    seen: set[int] = set()
    total = 0
    for _, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size of the checkpoint on disk.

    Example::

        >>> size_bytes(nn.Linear(1000, 1000)) > 4 * 1000 * 1000
        True
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@dataclass(frozen=True)
class LatencySettings:
    """How latency is measured: the one definition used by ``Spec.latency`` (exported as
    ``fxprune.LatencySpec``), ``measure_latency``, budgets and the CLI.

    Fields (the ``[latency]`` table of a spec file, ``[tool.fxprune.budget.latency]``):
        device: ``"cpu"`` (default), ``"cuda"`` or ``"cuda:N"``.
        batch_size: ``None`` (default) times the example inputs as given; an integer
            repeats or cuts the batch dimension (dim 0) of every tensor input to that size.
        threads: CPU threads (``torch.set_num_threads``) while timing, default 2, fixed
            so that timings compare across machines; restored after.
        warmup: untimed runs per model before timing (default 5).
        repeats: timed runs per model; the median is reported (default 20).
        compile: also time each model under ``torch.compile`` (default False).
        compile_backend: backend given to ``torch.compile`` (``"inductor"`` default).

    Every field is validated on construction; a bad value raises ``SpecError`` whose
    message starts with the field (``latency.repeats: ...``). ``from_dict`` also checks
    the keys and puts the table's place in front (``spec.latency.repeats: ...``).

    Example::

        >>> LatencySettings(threads=4, repeats=50).device
        'cpu'
        >>> LatencySettings.from_dict({"device": "cuda:1"}, where="spec").device
        'cuda:1'
    """

    device: str = "cpu"
    batch_size: int | None = None
    threads: int = 2
    warmup: int = 5
    repeats: int = 20
    compile: bool = False
    compile_backend: str = "inductor"

    def __post_init__(self) -> None:
        _check_device("latency.device", self.device)
        if self.batch_size is not None:
            check_int("latency.batch_size", self.batch_size, 1)
        for name, minimum in (("threads", 1), ("warmup", 0), ("repeats", 1)):
            check_int(f"latency.{name}", getattr(self, name), minimum)
        check_bool("latency.compile", self.compile)
        if not isinstance(self.compile_backend, str) or not self.compile_backend:
            fail("latency.compile_backend", "expected a torch.compile backend name such as "
                 f"'inductor', {got(self.compile_backend)}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "") -> LatencySettings:
        """Settings from a table; errors start with ``where.latency.FIELD``.

        Example::

            >>> LatencySettings.from_dict({"repets": 3}, where="budget")
            Traceback (most recent call last):
            ...
            fxprune.errors.SpecError: budget.latency.repets: unknown field 'repets'; known fields: device, batch_size, threads, warmup, repeats, compile, compile_backend; did you mean 'repeats'?
        """
        path = f"{where}.latency" if where else "latency"
        if not isinstance(data, Mapping):
            fail(path, f"expected a LatencySpec or a dict of its fields, {got(data)}")
        check_keys(path, data, [f.name for f in fields(cls)])
        try:
            return cls(**data)
        except SpecError as error:
            if not where:
                raise
            raise SpecError(f"{where}.{error}") from None


def _check_device(path: str, device: Any) -> None:
    kind, colon, index = device.partition(":") if isinstance(device, str) else (None, "", "")
    if kind in _DEVICES and (not colon or (kind == "cuda" and index.isdigit())):
        return
    hint = did_you_mean(device, _DEVICES) if isinstance(device, str) else ""
    fail(path, f"must be one of 'cpu', 'cuda' or 'cuda:N' (N: a GPU index); {got(device)}{hint}")


@dataclass(frozen=True)
class LatencyResult:
    """Median milliseconds per forward, one entry per model, in the order given.

    ``compiled_ms`` is ``None`` unless the settings asked for ``compile=True``.

    Example::

        >>> big, small = nn.Linear(256, 256), nn.Linear(256, 16)
        >>> result = measure_latency([small, big], torch.randn(8, 256), LatencySettings(repeats=3))
        >>> speedup = result.eager_ms[1] / result.eager_ms[0]
        >>> len(result.eager_ms), result.compiled_ms
        (2, None)
    """

    eager_ms: list[float]
    compiled_ms: list[float] | None
    settings: LatencySettings

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "eager_ms": list(self.eager_ms),
            "compiled_ms": None if self.compiled_ms is None else list(self.compiled_ms),
            "settings": vars(self.settings).copy(),
        }


def _check_device_available(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(
            f"latency.device={device!r} but torch.cuda.is_available() is False; use device='cpu'"
        )


def _resize_batch(inputs: ExampleInputs, batch_size: int | None) -> ExampleInputs:
    """Repeat or cut dim 0 of every tensor input to ``batch_size``."""
    if batch_size is None:
        return inputs

    def resize(x):
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] > 0:
            copies = -(-batch_size // x.shape[0])  # ceil division
            return x.repeat(copies, *([1] * (x.dim() - 1)))[:batch_size]
        return x

    return tree_map(resize, inputs)


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` itself when it already lives on ``device``, else a copy moved there."""
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device == device for t in tensors):
        return model
    return copy.deepcopy(model).to(device)


def device_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs a thunk once and returns its wall time in milliseconds."""
    if device.type == "cuda":
        def time_cuda(run: Callable[[], object]) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
        return time_cuda

    def time_cpu(run: Callable[[], object]) -> float:
        begin = time.perf_counter()
        run()
        return (time.perf_counter() - begin) * 1e3
    return time_cpu


def cuda_graph(fn: Callable[[], object], *, warmup: int = 3) -> Callable[[], None]:
    """``fn`` captured once in a CUDA graph; returns the graph's replay.

    A replay launches the captured kernels with no Python or dispatcher work, so timing
    it measures the GPU alone (what ``torch.compile(mode="reduce-overhead")`` gives a
    deployed model). ``fn`` first runs ``warmup`` times on a side stream, as capture
    requires; its tensors must keep their addresses between replays.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def round_robin(runners: Sequence[Callable[[], object]], settings: LatencySettings,
                 timer: Callable[[Callable[[], object]], float]) -> list[float]:
    """Median ms of each runner; every repeat runs each runner once, in a fixed order."""
    for _ in range(settings.warmup):
        for run in runners:
            run()
    samples: list[list[float]] = [[] for _ in runners]
    for _ in range(settings.repeats):
        for run, times in zip(runners, samples):
            times.append(timer(run))
    return [statistics.median(times) for times in samples]


def measure_latency(models: Sequence[nn.Module], example_inputs,
                    settings: LatencySettings | None = None) -> LatencyResult:
    """Median forward latency (ms) of each model, measured alternately in one process.

    Each repeat runs every model once in a fixed order (round-robin), so that drift in
    clock speed or background load affects all models equally. Forwards run under
    ``torch.inference_mode()`` in eval mode (training flags are restored afterwards);
    a model on another device is copied, never moved. On CUDA the time of each forward
    is taken with ``torch.cuda.Event`` between two synchronizations; on CPU with
    ``time.perf_counter``. With ``settings.compile`` each model is also compiled with
    ``torch.compile`` and timed in the same rotation; compilation happens in warmup
    and is not timed (``warmup`` must then be at least 1).

    Example::

        >>> original, pruned = nn.Conv2d(3, 64, 3), nn.Conv2d(3, 32, 3)
        >>> result = measure_latency([original, pruned], torch.randn(1, 3, 64, 64),
        ...                          LatencySettings(threads=2, repeats=5))
        >>> [ms > 0 for ms in result.eager_ms]    # [ms of original, ms of pruned]
        [True, True]
    """
    settings = settings if settings is not None else LatencySettings()
    if isinstance(models, nn.Module):
        models = [models]
    if not models:
        raise SpecError("measure_latency needs at least one model, got an empty sequence")
    if settings.compile and settings.warmup < 1:
        raise SpecError("latency.warmup must be >= 1 when latency.compile is true "
                        "(the first call compiles and must not be timed)")
    _check_device_available(settings.device)
    device = torch.device(settings.device)
    inputs = _resize_batch(as_example_inputs(example_inputs), settings.batch_size).to(device)

    placed = [_on_device(m, device) for m in models]
    callables: list[Callable] = list(placed)
    if settings.compile:
        callables += [torch.compile(m, backend=settings.compile_backend) for m in placed]
    runners = [lambda f=f: inputs.call(f) for f in callables]

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with contextlib.ExitStack() as stack:
            for model in placed:
                stack.enter_context(_util.eval_mode(model))
            stack.enter_context(torch.inference_mode())
            medians = round_robin(runners, settings, device_timer(device))
    finally:
        torch.set_num_threads(previous_threads)

    eager = medians[:len(placed)]
    compiled = medians[len(placed):] if settings.compile else None
    return LatencyResult(eager_ms=eager, compiled_ms=compiled, settings=settings)
