"""Which ATen ops an fx node runs: recorded while its shapes are recorded.

An fx node may call anything: ``torch.erf``, ``Tensor.square``, ``F.threshold``, a wrapped
Python function, a module without parameters. What it *is* shows in the ATen ops it runs
(below autograd, so composite functions arrive decomposed: ``torch.square`` runs
``aten.pow.Tensor_Scalar``). The shape recorder runs each such node under
:class:`AtenCallRecorder` and keeps the result in ``node.meta["fxprune.aten"]``; the
analysis then classifies the node by the ops' own tags (``torch.Tag.pointwise``) instead
of by a hand list of spellings (:mod:`fxprune.channels.rules.pointwise`).

A call is *closed* when every tensor its ops read is one of the node's own tensor inputs,
a result of an earlier op in the same call, or a single number: a function that adds a
tensor from elsewhere (a global of width C) could not follow its input's channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ATEN_CALLS = "fxprune.aten"  # node.meta key


@dataclass(frozen=True)
class AtenCalls:
    """The ATen ops one node ran (``"aten.erf.default"``, in order) and whether the call
    was closed over its own inputs (see the module docstring)."""

    ops: tuple[str, ...]
    closed: bool
    returns_input: bool = False  # no op ran and an input came back (``conj`` of a real tensor)


class AtenCallRecorder(TorchDispatchMode):
    """Record the ATen ops run inside the ``with`` block, given the call's tensor inputs.

    >>> import torch
    >>> x = torch.randn(3)
    >>> with AtenCallRecorder([x]) as rec:
    ...     _ = torch.square(x).clamp_min(0)
    >>> rec.result()
    AtenCalls(ops=('aten.pow.Tensor_Scalar', 'aten.clamp_min.default'), closed=True, returns_input=False)
    """

    def __init__(self, inputs):
        super().__init__()
        self._inputs = {id(t) for t in inputs if isinstance(t, torch.Tensor)}
        self._known = set(self._inputs)
        self._keep = list(inputs)  # ids stay unique while the tensors live
        self._ops: list[str] = []
        self._closed = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and id(t) not in self._known and t.numel() > 1:
                self._closed = False
        self._ops.append(str(func))
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._known.add(id(t))
                self._keep.append(t)
        return out

    def result(self, output=None) -> AtenCalls:
        """What ran; ``output``: what the call returned."""
        returns_input = not self._ops and isinstance(output, torch.Tensor) and id(output) in self._inputs
        return AtenCalls(tuple(self._ops), self._closed, returns_input)


def records_calls(node: torch.fx.Node, module: torch.nn.Module | None) -> bool:
    """Nodes worth classifying by their ATen ops: function and method calls, and calls of
    modules that hold no parameters or buffers (a module's own weights are bound by its
    rule; a parameter-free module is a function)."""
    if node.op in ("call_function", "call_method"):
        return True
    return (node.op == "call_module" and module is not None
            and next(iter(module.parameters()), None) is None and next(iter(module.buffers()), None) is None)


__all__ = ["AtenCalls", "AtenCallRecorder", "ATEN_CALLS", "records_calls"]
