"""The op rule registry: how each graph node moves and couples channels.

Rules are keyed by the node's target: a module class for ``call_module`` (exact type,
never a guess from a parent class), a function object for ``call_function``, a method
name for ``call_method``. Built-in rules register themselves the same way a third
party does, with :func:`register_rule`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx

Rule = Callable[..., object]  # rule(ctx: context.RuleContext) -> the output's channel value

_RULES: dict[object, Rule] = {}


def register_rule(*targets) -> Callable[[Rule], Rule]:
    """Register ``rule(ctx)`` for module classes, functions or method names.

    The rule reads its inputs' channel maps from ``ctx`` and returns the output's
    (see :mod:`fxprune.channels.context`). A later registration for the same target
    replaces the earlier one, so users can override built-in rules.

    >>> import fxprune, torch
    >>> class Scale(torch.nn.Module):
    ...     def forward(self, x):
    ...         return 2 * x
    >>> @fxprune.register_rule(Scale)
    ... def scale_rule(ctx):
    ...     return ctx.tensor(0)      # channels pass through unchanged
    """
    if not targets:
        raise TypeError("register_rule needs at least one module class, function or method name")

    def decorate(rule: Rule) -> Rule:
        for target in targets:
            _RULES[target] = rule
        return rule

    return decorate


_WHEN_IMPORTED: dict[str, Callable[[], None]] = {}  # module name -> registers rules for its ops


def register_when_imported(module: str, register: Callable[[], None]) -> None:
    """Run ``register()`` (which calls :func:`register_rule`) once ``module`` is imported.

    For rules on an optional library's ops: a model that calls them has imported the
    library, so fxprune need not import it (torchvision alone adds about 2 s to
    ``import fxprune``, since it loads torch._dynamo)."""
    _WHEN_IMPORTED[module] = register


def _register_imported() -> None:
    import sys

    for module in [m for m in _WHEN_IMPORTED if m in sys.modules]:
        _WHEN_IMPORTED.pop(module)()


PLUGIN_GROUP = "fxprune.plugins"
_plugins_loaded = False


def load_plugins() -> list[str]:
    """Import every ``fxprune.plugins`` entry point once (they register their rules).

    A package declares ``[project.entry-points."fxprune.plugins"] name = "pkg.rules"``;
    the target is imported, and if it is callable it is called with no arguments.
    Returns the names loaded by this call.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return []
    _plugins_loaded = True
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=PLUGIN_GROUP):
        target = ep.load()
        if callable(target):
            target()
        loaded.append(ep.name)
    return loaded


def rule_key(node: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> object:
    """The registry key of a node: module class, function, or method name."""
    if node.op == "call_module":
        return type(modules[node.target])
    return node.target


def lookup_rule(node: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> Rule | None:
    key = rule_key(node, modules)
    if key not in _RULES and _WHEN_IMPORTED:
        _register_imported()
    return _RULES.get(key)


def op_name(target) -> str:
    """The bare name of an op in any spelling: ``"mean"`` for ``torch.mean``, ``"mean"``
    (method) and ``aten.mean.dim``; a module class's name."""
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", str(target))


def describe_target(node: torch.fx.Node, modules: dict[str, torch.nn.Module]) -> str:
    """A readable name for what a node calls (for reasons and error messages)."""
    key = rule_key(node, modules)
    if node.op == "call_module":
        return f"module '{node.target}' ({key.__module__}.{key.__qualname__})"
    if node.op == "call_method":
        return f"method Tensor.{node.target}"
    if isinstance(key, torch._ops.OpOverload):
        return f"ATen op {key}"
    module = getattr(key, "__module__", None) or ""
    name = getattr(key, "__qualname__", None) or getattr(key, "__name__", None) or str(key)
    return f"function {module + '.' if module else ''}{name}"
