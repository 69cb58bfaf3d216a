"""Example inputs: positional arguments, keyword arguments, or both, nested as forward takes them.

Hugging Face models are called with keywords (``input_ids=..., attention_mask=...``),
torchvision classifiers with one tensor, its detectors with a list of images
(``([image],)``). :class:`ExampleInputs` holds any nesting of tensors in tuples, lists
and dicts (numbers, strings and None may sit among them), calls a model with them, and
lays them out as the flat positional values a captured graph's placeholders take (an
exported graph flattens ``(args, kwargs)`` with its input spec).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import AnalysisError


def describe_value(value) -> str:
    """A value for messages: tensors by their shape, containers by their items.

    >>> import torch
    >>> describe_value(([torch.zeros(3, 8, 8)], {"k": 2}))
    "([(3, 8, 8)], {'k': 2})"
    """
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe_value(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


@dataclass(frozen=True)
class ExampleInputs:
    """The inputs one forward call takes: ``model(*args, **kwargs)``.

    >>> import torch
    >>> inputs = as_example_inputs({"x": torch.zeros(2, 3)})
    >>> inputs.call(lambda x: x.sum(0)).shape
    torch.Size([3])
    >>> inputs.describe()
    'x=(2, 3)'
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def call(self, fn):
        """``fn(*args, **kwargs)``."""
        return fn(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor among the inputs, in call order."""
        return [t for t in tree_flatten((self.args, self.kwargs))[0] if isinstance(t, torch.Tensor)]

    def clone(self) -> "ExampleInputs":
        """A copy whose tensors are fresh (so an in-place op in the model cannot change ours)."""
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, self)

    def to(self, device) -> "ExampleInputs":
        return tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, self)

    def describe(self) -> str:
        """Shapes for messages: ``(1, 3, 224, 224)``, ``input_ids=(2, 8)`` or ``[(3, 64, 64)]``."""
        parts = [describe_value(a) for a in self.args] + [f"{k}={describe_value(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)

    def flat(self, gm: torch.fx.GraphModule) -> tuple:
        """The values of ``gm``'s placeholders, in order.

        An exported graph takes ``(args, kwargs)`` flattened by its input spec; a traced one
        takes its forward's parameters, keywords matched by name and defaults filled in.
        """
        spec = getattr(gm, "_in_spec", None)
        if spec is not None:
            from torch.fx._pytree import tree_flatten_spec

            return tuple(tree_flatten_spec((self.args, self.kwargs), spec))
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values, missing = list(self.args), []
        unknown = set(self.kwargs) - {n.target for n in placeholders}
        if len(values) > len(placeholders) or unknown:
            raise AnalysisError(
                f"the model takes {len(placeholders)} input(s) ({', '.join(n.target for n in placeholders)}) "
                f"but got {self.describe()}\n  fix: pass the inputs forward() takes, by position or by name")
        for node in placeholders[len(values):]:
            if node.target in self.kwargs:
                values.append(self.kwargs[node.target])
            elif node.args:  # the parameter's default value
                values.append(node.args[0])
            else:
                missing.append(node.target)
        if missing:
            raise AnalysisError(f"no example input for {', '.join(missing)} (the model takes "
                                f"{', '.join(n.target for n in placeholders)})\n"
                                "  fix: pass a value for every input forward() requires")
        return tuple(values)


torch.utils._pytree.register_dataclass(ExampleInputs)


def as_example_inputs(example_inputs) -> ExampleInputs:
    """Normalise what users pass: a tensor, a tuple/list of positional values, a dict of keywords.

    >>> import torch
    >>> as_example_inputs(torch.zeros(1, 3)).args[0].shape
    torch.Size([1, 3])
    """
    if isinstance(example_inputs, ExampleInputs):
        return example_inputs
    bad = bad_leaf(example_inputs)
    if bad is not None:
        raise AnalysisError(f"example_inputs{bad[0]} is a {type(bad[1]).__name__}; inputs may nest tensors in "
                            "tuples, lists and dicts, with numbers, strings or None among them: pass a "
                            "tensor there (or bake the object into the model)")
    if isinstance(example_inputs, torch.Tensor):
        return ExampleInputs((example_inputs,))
    if isinstance(example_inputs, (tuple, list)):
        return ExampleInputs(tuple(example_inputs))
    if isinstance(example_inputs, dict) and all(isinstance(k, str) for k in example_inputs):
        return ExampleInputs((), dict(example_inputs))
    raise AnalysisError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword inputs, "
        f"got {type(example_inputs).__name__}; pass e.g. (torch.randn(1, 3, 224, 224),) or "
        "{'input_ids': ids, 'attention_mask': mask}"
    )


_LEAVES = (torch.Tensor, int, float, bool, complex, str, type(None))


def bad_leaf(value, path: str = "") -> tuple[str, object] | None:
    """``(where, value)`` of the first value in ``value`` that is not a tensor, a number, a
    string or None, looking through tuples, lists and dicts; None when there is none.

    >>> import torch
    >>> bad_leaf(([torch.zeros(3)], {"scale": 2.0}))
    >>> bad_leaf(([torch.zeros(3), object()],))[0]
    '[0][1]'
    """
    if isinstance(value, (list, tuple)):
        items = enumerate(value)
    elif isinstance(value, dict):
        items = value.items()
    else:
        return None if isinstance(value, _LEAVES) else (path, value)
    for key, item in items:
        found = bad_leaf(item, f"{path}[{key!r}]" if isinstance(value, dict) else f"{path}[{key}]")
        if found is not None:
            return found
    return None


__all__ = ["ExampleInputs", "as_example_inputs", "bad_leaf"]
