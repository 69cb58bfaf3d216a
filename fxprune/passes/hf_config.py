"""Carry a pruned model's widths into its Hugging Face ``config``, and prove the config right.

``from_pretrained`` builds the model from ``config.json`` before it loads any weight, so
a pruned model saves correctly only if its config builds exactly its shapes. This pass
sets the fields the families use (``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``intermediate_size`` / ``n_inner`` / ``d_ff``, ``hidden_size``; a config's
``attribute_map`` routes them to ``n_head``, ``d_kv``...), then builds the class from the
new config on the meta device (no memory, no weights) and compares every tensor shape.
A width the config cannot express (one ``intermediate_size`` for layers of different
widths, a head size the family derives as ``hidden_size / num_attention_heads``) is
an error that names the field, never a checkpoint that fails to load.
"""
from __future__ import annotations

import torch

from ..errors import WriteBackError
from .layer_attrs import Heads, replace_int_attrs

INTERMEDIATE = ("intermediate_size", "n_inner", "d_ff", "ffn_dim", "ffn_hidden_size")
STACK_INTERMEDIATE = ("encoder_ffn_dim", "decoder_ffn_dim")  # encoder-decoders: one MLP width per stack
WIDTH_ATTRS = {"hidden_size": "hidden_size", "embed_dim": "hidden_size", "d_model": "hidden_size",
               "hidden_dim": "hidden_size", "intermediate_size": "intermediate",
               "intermediate_dim": "intermediate"}  # module attributes that copy a config width
# (hidden_dim, intermediate_dim: mixture-of-experts routers and stacked experts, e.g. Mixtral's)
GRAPH_HINT = "emit='graph' returns the pruned GraphModule, which carries every rewritten constant"
HINT = ("write the graph instead (emit='graph'), or prune uniformly: scope='local' removes the same "
        "share of every layer, and per-layer widths then agree")


def hf_config(model: torch.nn.Module):
    """The model's Hugging Face config, or None (duck-typed: transformers stays optional)."""
    config = getattr(model, "config", None)
    names = {c.__name__ for c in type(config).__mro__}
    return config if names & {"PretrainedConfig", "PreTrainedConfig"} else None


def update_config(model: torch.nn.Module, widths: dict[str, tuple[int, int]], heads: dict[str, Heads]) -> list[str]:
    """Set the config fields the pruned model now needs; return ``field=value`` strings.

    ``widths``: ``{group name: (channels before, after)}`` of every prunable group; those
    as wide as the config's MLP width are the MLPs.
    """
    config = hf_config(model)
    if config is None:
        return []
    changed = {}
    old_hidden = getattr(config, "hidden_size", None)
    try:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:  # speech models (Wav2Vec2) have no input embeddings to ask for
        embeddings = None
    if isinstance(embeddings, torch.nn.Embedding) and old_hidden is not None:
        if embeddings.embedding_dim != old_hidden:
            changed["hidden_size"] = embeddings.embedding_dim
    # a plan that keeps every head leaves the head fields alone: a fused projection's split
    # (Falcon's multi-query qkv, heads + 2 wide) is no head count to write back
    if any(h.query[0] != h.query[1] or h.key_value[0] != h.key_value[1] or h.head_dim[0] != h.head_dim[1]
           for h in heads.values()):
        changed["num_attention_heads"] = _uniform("num_attention_heads", {p: h.query[1] for p, h in heads.items()})
        if getattr(config, "num_key_value_heads", None) is not None:
            changed["num_key_value_heads"] = _uniform("num_key_value_heads",
                                                      {p: h.key_value[1] for p, h in heads.items()})
        head_dim = _uniform("head_dim", {p: h.head_dim[1] for p, h in heads.items()})
        explicit = getattr(config, "head_dim", None)
        derived = changed.get("hidden_size", old_hidden) // changed["num_attention_heads"]
        if (explicit if explicit is not None else derived) != head_dim:
            changed["head_dim"] = head_dim  # families that read config.head_dim take it; the check catches the rest
    mlp_widths = _intermediate(config)  # BART-like families have one per stack
    for field, old_width in mlp_widths:
        if old_width not in (old_hidden, None):
            new_width = _uniform(field, {name: new for name, (old, new) in widths.items() if old == old_width} or
                                 {"": old_width})
            if new_width != old_width:
                changed[field] = new_width
    changed = {name: value for name, value in changed.items() if getattr(config, name, None) != value}
    for name, value in changed.items():
        setattr(config, name, value)
    field, old_width = mlp_widths[0] if mlp_widths else (None, None)
    _sync_width_attrs(model, old_hidden, old_width, changed.get("hidden_size"), changed.get(field))
    return [f"{name}={value}" for name, value in changed.items()]


HANDLED = {"hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", *INTERMEDIATE,
           *STACK_INTERMEDIATE}  # the fields update_config sets from what they mean


def update_copied_fields(model: torch.nn.Module, original: torch.nn.Module, changed: list[str]) -> list[str]:
    """Config widths a module keeps under the same name (RWKV's attention blocks hold
    ``attention_hidden_size``, the width of their key/value/receptance): where the
    module's own tensors had a dim that wide and the plan shrank it, the field (and the
    attribute) take the new width, one value for every layer (else a WriteBackError).
    ``check_config`` then proves the rebuilt class has exactly these shapes.
    Returns ``field=value`` strings."""
    config = hf_config(model)
    if config is None:
        return []
    skip = HANDLED | {c.partition("=")[0] for c in changed}
    before = dict(original.named_modules())
    found: dict[str, dict[str, int]] = {}  # field -> {module path: width now}
    for path, module in model.named_modules():
        old_module = before.get(path)
        if old_module is None or type(old_module) is not type(module):
            continue
        for name, value in vars(module).items():
            # a field of the config itself (not an attribute_map alias such as Mixtral's
            # num_experts, whose meaning another pass knows) holding the same number
            if name in skip or name.startswith("_") or type(value) is not int or value <= 1 or \
                    name not in vars(config) or getattr(config, name) != value:
                continue
            wide = [(old, new) for key, tensor in _own_tensors(module)
                    for old, new in zip(getattr(old_module, key).shape, tensor.shape) if old == value]
            # the widths its cut dims now have (two different ones: _uniform names them), or
            # the width it kept (its tensors as wide and none cut: another layer's must agree)
            widths = sorted({new for old, new in wide if new != old}) or ([value] if wide else [])
            found.setdefault(name, {}).update({f"{path}[{i}]" if i else path: w for i, w in enumerate(widths)})
    out = []
    for name, per_module in found.items():
        old = getattr(config, name)
        if set(per_module.values()) <= {old}:  # no tensor as wide, or none of them cut
            continue
        width = _uniform(name, per_module)
        setattr(config, name, width)
        for module in model.modules():
            replace_int_attrs(module, {name: (old, width)})
        out.append(f"{name}={width}")
    return out


def _own_tensors(module: torch.nn.Module):
    yield from module.named_parameters(recurse=False)
    yield from module.named_buffers(recurse=False)


def update_layer_count(model: torch.nn.Module, layers: dict[str, tuple[int, list[int]]]) -> list[str]:
    """Whole layers left a layer list (``{list path: (old length, old indices kept)}``):
    set ``num_hidden_layers`` (through the config's ``attribute_map``: ``n_layer``,
    ``num_layers``) and filter every per-layer list of the config (``layer_types``, any
    list as long as the old layer count) to the layers kept. Returns ``field=value`` strings.
    """
    config = hf_config(model)
    old = getattr(config, "num_hidden_layers", None) if config is not None else None
    if not isinstance(old, int):
        return []
    counted = {path: kept for path, (length, kept) in layers.items() if length == old}
    if not counted:
        return []
    kept_sets = {tuple(kept) for kept in counted.values()}
    if len(kept_sets) > 1:
        shown = ", ".join(f"'{p}' keeps {len(k)}" for p, k in counted.items())
        raise WriteBackError(f"config.num_hidden_layers holds one layer count, but the plan leaves the layer lists "
                             f"with different layers ({shown}); remove the same layers from each, or {GRAPH_HINT}")
    kept = kept_sets.pop()
    changed = {"num_hidden_layers": len(kept)}
    for name, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == old and old > 1 and not name.startswith("_") \
                and name not in ("architectures",):
            changed[name] = type(value)(value[i] for i in kept)
    for name, value in changed.items():
        setattr(config, name, value)
    return [f"{name}={value}" for name, value in changed.items()]


def _intermediate(config) -> list[tuple[str, int | None]]:
    """``(field, MLP width)`` of the config's MLP-width fields: the first of the usual names,
    or each stack's (``encoder_ffn_dim``, ``decoder_ffn_dim``)."""
    for field in INTERMEDIATE:
        if hasattr(config, field):
            value = getattr(config, field)
            if value is None and field == "n_inner":  # GPT-2: None means 4 x hidden
                value = 4 * config.hidden_size
            return [(field, value)]
    return [(field, getattr(config, field)) for field in STACK_INTERMEDIATE
            if isinstance(getattr(config, field, None), int)]


def _uniform(field: str, per_layer: dict[str, int]) -> int:
    values = set(per_layer.values())
    if len(values) > 1:
        shown = ", ".join(f"{where}: {v}" for where, v in list(per_layer.items())[:6])
        raise WriteBackError(
            f"config.{field} holds one value for every layer, but the plan leaves layers with "
            f"{sorted(values)} ({shown}{', ...' if len(per_layer) > 6 else ''}); {HINT}")
    return values.pop()


def _sync_width_attrs(model, old_hidden, old_width, new_hidden, new_width) -> None:
    """Modules that copy a config width into an attribute (``LlamaMLP.intermediate_size``)."""
    widths = {"hidden_size": (old_hidden, new_hidden), "intermediate": (old_width, new_width)}
    for module in model.modules():
        replace_int_attrs(module, {attr: widths[kind] for attr, kind in WIDTH_ATTRS.items()})


def check_config(model: torch.nn.Module, changed: list[str]) -> None:
    """Build ``type(model)(model.config)`` on the meta device; every shape must match."""
    config = hf_config(model)
    if config is None:
        return
    try:
        with torch.device("meta"):
            rebuilt = type(model)(config)
    except Exception as exc:  # noqa: BLE001 - the family's own check, reported with the fields
        raise WriteBackError(
            f"{type(config).__name__}({', '.join(changed)}) does not build a {type(model).__name__}: "
            f"{type(exc).__name__}: {exc}; {HINT}") from exc
    want = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key in sorted(want.keys() | have.keys()):
        if want.get(key) != have.get(key):
            raise WriteBackError(
                f"the config cannot express the pruned model: {type(config).__name__}"
                f"({', '.join(changed) or 'unchanged'}) builds {key} as {want.get(key)}, the pruned "
                f"model has {have.get(key)} (from_pretrained would fail). Some families derive a "
                f"size from others (BERT's head size is hidden_size / num_attention_heads); {HINT}")


__all__ = ["hf_config", "update_config", "update_copied_fields", "update_layer_count", "check_config"]
