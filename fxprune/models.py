"""Model references for the command line: turn ``torchvision:resnet18`` into a model.

Accepted forms (every ``fxprune`` command takes them):

* ``torchvision:NAME`` - ``torchvision.models.get_model(NAME, weights=None)``;
* ``timm:NAME`` - ``timm.create_model(NAME, pretrained=False)`` when timm is installed;
* ``package.module:factory`` - a callable returning the model (or a module instance);
  ``path/to/file.py:factory`` works too. The current directory is importable;
* a file written by ``fxprune compress -o`` or ``torch.save(model, path)``.

Random weights only: nothing is ever downloaded.

Example:
    >>> model, shape = load_model("torchvision:resnet18")
    >>> shape
    [1, 3, 224, 224]
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch

from fxprune.errors import FxpruneError

FORMS = ("torchvision:NAME", "timm:NAME", "package.module:factory", "path/to/model.pt")
INPUT_SHAPE_ATTR = "fxprune_input_shape"  # stored on models saved by `fxprune compress`

# torchvision classification models whose default input is not 224x224.
_TORCHVISION_SIZES = {"inception_v3": 299}


class ModelLoadError(FxpruneError):
    """A model reference could not be resolved; the message says what was tried."""


def _fail(ref: str, tried: str) -> ModelLoadError:
    return ModelLoadError(f"cannot load model {ref!r}: {tried}; accepted forms: {', '.join(FORMS)}")


def parse_shape(text: str) -> list[int] | list[list[int]]:
    """``"1,3,224,224"`` -> ``[1, 3, 224, 224]``; ``"1,8;1,4"`` -> two inputs.

    Example:
        >>> parse_shape("1, 3, 32, 32")
        [1, 3, 32, 32]
    """
    shapes = []
    for part in str(text).split(";"):
        try:
            dims = [int(d) for d in part.split(",")]
        except ValueError:
            dims = []
        if not dims or min(dims) < 1:
            raise FxpruneError(f"input shape {text!r}: expected positive integers separated by "
                               "commas, e.g. 1,3,224,224 (several inputs: 1,8;1,4)")
        shapes.append(dims)
    return shapes[0] if len(shapes) == 1 else shapes


def load_model(ref: str) -> tuple[torch.nn.Module, list | None]:
    """The model a reference names, in eval mode, and its default input shape (or None).

    Example:
        >>> model, shape = load_model("torchvision:mobilenet_v3_small")
    """
    if not isinstance(ref, str) or not ref.strip():
        raise _fail(str(ref), "empty reference")
    ref = ref.strip()
    if os.path.isfile(ref):
        model, shape = _from_file(ref)
    elif ref.startswith("torchvision:"):
        model, shape = _from_torchvision(ref, ref.split(":", 1)[1])
    elif ref.startswith("timm:"):
        model, shape = _from_timm(ref, ref.split(":", 1)[1])
    elif ":" in ref:
        model, shape = _from_factory(ref)
    else:
        raise _fail(ref, _bare_hint(ref))
    if not isinstance(model, torch.nn.Module):
        raise _fail(ref, f"it gave a {type(model).__name__}, not a torch.nn.Module")
    return model.eval(), shape


def _bare_hint(ref: str) -> str:
    looks_like_file = ref.endswith((".pt", ".pth", ".pkl", ".bin"))
    hint = f"no file {ref!r} exists" if looks_like_file else f"no file named {ref!r} and no ':' in it"
    try:
        import torchvision
        if ref in torchvision.models.list_models():
            hint += f"; did you mean torchvision:{ref}?"
    except Exception:  # torchvision missing or broken: no hint
        pass
    return hint


def _from_file(path: str) -> tuple[torch.nn.Module, list | None]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # unpickling errors come in many types
        raise _fail(path, f"torch.load failed: {type(error).__name__}: {error}".splitlines()[0]) from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), torch.nn.Module):
        obj = obj["model"]
    if isinstance(obj, dict):
        raise _fail(path, "the file holds a dict (a state_dict?), not a model; save the whole model "
                          "with torch.save(model, path) or give package.module:factory")
    shape = getattr(obj, INPUT_SHAPE_ATTR, None)
    return obj, list(shape) if shape else None


def _from_torchvision(ref: str, name: str):
    try:
        import torchvision
    except ImportError:
        raise _fail(ref, "torchvision is not installed (pip install torchvision)") from None
    names = torchvision.models.list_models()
    if name not in names:
        import difflib
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
        raise _fail(ref, f"torchvision has no model {name!r}{hint}")
    model = torchvision.models.get_model(name, weights=None)
    classification = name in torchvision.models.list_models(module=torchvision.models)
    size = _TORCHVISION_SIZES.get(name, 224)
    return model, [1, 3, size, size] if classification else None


def _from_timm(ref: str, name: str):
    try:
        import timm
    except ImportError:
        raise _fail(ref, "timm is not installed (pip install timm)") from None
    try:
        model = timm.create_model(name, pretrained=False)
    except Exception as error:  # timm raises RuntimeError for unknown names
        raise _fail(ref, f"timm.create_model failed: {error}".splitlines()[0]) from None
    size = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    shape = size.get("input_size")
    return model, [1, *shape] if shape else None


def _from_factory(ref: str):
    module_name, _, attr = ref.rpartition(":")
    if not module_name or not attr:
        raise _fail(ref, "expected package.module:factory")
    try:
        module = _import(module_name)
    except FxpruneError:
        raise
    except ImportError as error:
        raise _fail(ref, f"cannot import {module_name!r} ({error})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _fail(ref, f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, torch.nn.Module):
        return obj, getattr(obj, INPUT_SHAPE_ATTR, None)
    if not callable(obj):
        raise _fail(ref, f"{attr!r} is a {type(obj).__name__}, not a callable returning a model")
    model = obj()
    return model, getattr(model, INPUT_SHAPE_ATTR, None) or getattr(obj, INPUT_SHAPE_ATTR, None)


def load_plugin(ref: str):
    """Import ``ref``, a module (``mypkg.scores``, importable from the current folder) or
    a file (``path/to/my_scores.py``), for what it registers: scores
    (``fxprune.select.score.register_score``), target metrics (``register_metric``) or
    op rules (``fxprune.register_rule``). The CLI's ``--plugin`` calls it.

    Example:
        >>> load_plugin("my_scores.py")   # doctest: +SKIP
    """
    try:
        return _import(ref)
    except ModelLoadError:
        raise FxpruneError(f"--plugin {ref!r}: no such file") from None
    except ImportError as error:
        raise FxpruneError(f"--plugin {ref!r}: cannot import it ({error}); give a module importable "
                           "from the current folder (mypkg.scores) or a file (path/to/scores.py)") from None


def _import(module_name: str):
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise _fail(module_name, f"no file {module_name!r}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        known = sys.modules.get(path.stem)
        # torch.save pickles the file's classes by module name, so register it; never shadow
        # an importable module of that name, but a model file loaded before may be replaced
        if known is None or getattr(known, "_fxprune_model_file", False):
            module._fxprune_model_file = True
            sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: local modules are importable
    return importlib.import_module(module_name)
