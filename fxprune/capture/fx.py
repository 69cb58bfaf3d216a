"""The torch.fx front end: ``symbolic_trace`` with user leaf modules and readable errors.

Fast (about 0.1-0.2 ms a node), module-level and readable, but it cannot take code that
branches on values or shapes (every Hugging Face transformers 5 model, timm's "same"
padding): :mod:`fxprune.capture.export` takes those. The captured GraphModule shares the
caller's submodules (copying a large model would cost more than the whole analysis) but
owns its graph; nothing here runs the model.
"""
from __future__ import annotations

import copy
import functools
import os
import traceback
from typing import Iterable, Sequence

import torch
import torch.fx

from .._util import first_line
from ..errors import TraceError
from .mha import LEAF_REASON, MhaCall, mha_forward

_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(__file__))


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer plus user leaf modules and a record of where it is."""

    def __init__(self, leaf_modules: Sequence = (), attention_calls: dict | None = None):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.fx_module_path: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None  # the innermost module that raised
        # nn.MultiheadAttention calls to trace through, by (path, call index) (see .mha)
        self.attention_calls = attention_calls or {}
        self.attention_seen: dict[str, int] = {}
        self.inlining: torch.nn.Module | None = None

    def is_user_leaf(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or qualname in self.leaf_names

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if self.is_user_leaf(m, qualname):
            return True
        if m is self.inlining:
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.fx_module_path.append((path, type(m).__name__))
        inlining, call = self.inlining, None
        if isinstance(m, torch.nn.MultiheadAttention) and not self.is_user_leaf(m, path):
            index = self.attention_seen[path] = self.attention_seen.get(path, -1) + 1
            call = self.attention_calls.get((path, index))
            if isinstance(call, MhaCall):
                self.inlining, forward = m, functools.partial(mha_forward, m, call)
        try:
            out = super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.fx_module_path[-1]
            raise
        finally:
            self.inlining = inlining
            self.fx_module_path.pop()
        if isinstance(call, str):  # the call stays whole: its rule reports why
            out.node.meta[LEAF_REASON] = call
        return out


def _user_frame(tb) -> traceback.FrameSummary | None:
    """The innermost frame of the traceback that is the user's code, not torch's or ours."""
    frames = [f for f in traceback.extract_tb(tb)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_OWN_DIR)]
    return frames[-1] if frames else None


def trace(model: torch.nn.Module, *, leaf_modules: Iterable = (), concrete_args: dict | None = None,
          attention_calls: dict | None = None) -> torch.fx.GraphModule:
    """Trace ``model`` with ``torch.fx``; raise :class:`TraceError` if it can't.

    ``leaf_modules``: module classes or qualified names to keep as single calls (give
    them a rule with :func:`fxprune.register_rule`). ``concrete_args``: values to bake
    in for arguments that control flow depends on. ``attention_calls``: from
    :func:`fxprune.capture.mha.plan_calls`; the ``nn.MultiheadAttention`` calls it plans
    are traced through as functional ops, the others stay whole with the reason in
    ``node.meta``. Without it every ``nn.MultiheadAttention`` stays whole.

    >>> import torch, fxprune
    >>> gm = fxprune.trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> [n.op for n in gm.graph.nodes]
    ['placeholder', 'call_module', 'call_module', 'output']
    """
    if isinstance(model, torch.fx.GraphModule):
        gm = torch.fx.GraphModule(model, copy.deepcopy(model.graph), model.__class__.__name__)
        gm.training = model.training
        return gm
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}")
    tracer = _Tracer(tuple(leaf_modules), attention_calls)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # torch.fx raises many types; all mean "cannot trace"
        raise _trace_error(model, tracer, exc) from exc
    gm = torch.fx.GraphModule(model, graph, model.__class__.__name__)
    gm.training = model.training
    return gm


def _trace_error(model, tracer: _Tracer, exc: Exception) -> TraceError:
    where = tracer.failed_in or ("", type(model).__name__)
    path = where[0] or "<root>"
    frame = _user_frame(exc.__traceback__)
    line = f"{frame.filename}:{frame.lineno}: {frame.line}" if frame else "(no user source line found)"
    first = first_line(exc)
    return TraceError(
        f"cannot trace {type(model).__name__} with torch.fx: {first}\n"
        f"  in module '{path}' ({where[1]})\n"
        f"  at {line}\n"
        "  fix: mark that module a leaf (leaf_modules=[...]) and register a channel rule for it, "
        "pass concrete_args={...} for the argument the control flow depends on, "
        "or capture with torch.export instead (capture=\"export\")"
    )
