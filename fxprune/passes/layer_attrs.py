"""Layer attributes that must follow their sliced tensors when a plan is written back.

A layer's Python code reads sizes from attributes (``nn.Linear.out_features``,
``Conv2d.groups``, a Hugging Face attention's ``num_key_value_groups``). After the
write-back slices the tensors, these set the attributes again:

- :func:`sync_layer_sizes`: PyTorch's own layers, from their new tensor shapes (and, for
  a grouped convolution, from the ``groups`` the prune pass wrote into the graph);
- :func:`attention_heads`: the head counts each attention module's reshapes now have,
  read from the analysis, and :func:`sync_head_attrs` sets them by the names attention
  modules use for them;
- :func:`renumber_layers`: once whole layers leave a layer list, the position each
  remaining layer's modules store (a Hugging Face attention's ``layer_idx``, which indexes
  the KV cache) follows the layer's new position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx

from ..channels.heads import head_reshapes

# Names attention modules give their sizes (Hugging Face families, timm, torchvision, ...).
HEAD_COUNT = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_attn_heads")
KV_HEAD_COUNT = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
KV_GROUPS = ("num_key_value_groups", "n_rep")
HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim", "d_kv", "head_size")
QUERY_WIDTH = ("all_head_size", "inner_dim", "split_size")
ATTENTION_ATTRS = HEAD_COUNT + KV_HEAD_COUNT + KV_GROUPS + HEAD_DIM + QUERY_WIDTH

_CONV = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_CONV_TRANSPOSE = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
_NORM_BY_FEATURES = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.instancenorm._InstanceNorm)


@dataclass
class Heads:
    """Head counts of one attention module before and after the plan."""

    path: str
    query: tuple[int, int]  # (before, after) heads of the widest head reshape: the queries
    key_value: tuple[int, int]  # (before, after) of the narrowest: keys/values (== query without GQA)
    head_dim: tuple[int, int]


def attention_heads(graph, shape_after) -> dict[str, Heads]:
    """``{module path: Heads}`` for every module that owns a head-splitting reshape.

    ``shape_after(node name)`` gives a node's shape after the plan. The owner is the
    innermost module on the reshape's ``nn_module_stack`` that names a head attribute.
    """
    found: dict[str, list[tuple[int, int, int, int]]] = {}
    # the analysis found them already unless it ran with head_dim units
    splits = graph.state.head_reshapes or head_reshapes(graph.gm)
    modules = dict(graph.model.named_modules()) if graph.model is not None else {}
    for node in graph.gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.name not in splits or not hasattr(meta, "shape") or len(meta.shape) < 2:
            continue
        before = tuple(meta.shape)
        source = getattr(node.all_input_nodes[0].meta.get("tensor_meta"), "shape", None) if node.all_input_nodes else None
        if before[-1] not in splits[node.name] or not source or source[-1] != before[-2] * before[-1]:
            continue  # not a split of the channel dim into (heads, head_dim): fused qkv, repeat_kv
        owner = _owner(node, modules)
        if owner is not None:
            after = shape_after(node.name)
            found.setdefault(owner, []).append((before[-2], after[-2], before[-1], after[-1]))
    heads = {}
    for path, splits_of_module in found.items():
        widest = max(splits_of_module, key=lambda s: (s[0], s[1]))
        narrowest = min(splits_of_module, key=lambda s: (s[0], s[1]))
        heads[path] = Heads(path, widest[:2], narrowest[:2], widest[2:])
    return heads


def _owner(node: torch.fx.Node, modules: dict) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):  # fully qualified names in both front ends
        if any(hasattr(modules.get(path), name) for name in ATTENTION_ATTRS):
            return path
    return None


def sync_head_attrs(model: torch.nn.Module, heads: dict[str, Heads]) -> None:
    """Set each attention module's head attributes (by name, where the old value matches)."""
    for path, h in heads.items():
        module = model.get_submodule(path)
        (q0, q1), (kv0, kv1), (d0, d1) = h.query, h.key_value, h.head_dim
        wanted = {**{n: (q0, q1) for n in HEAD_COUNT}, **{n: (kv0, kv1) for n in KV_HEAD_COUNT},
                  **{n: (q0 // kv0, q1 // max(kv1, 1)) for n in KV_GROUPS},
                  **{n: (d0, d1) for n in HEAD_DIM}, **{n: (q0 * d0, q1 * d1) for n in QUERY_WIDTH}}
        replace_int_attrs(module, wanted)


LAYER_INDEX = ("layer_idx", "layer_id", "layer_index")  # a module's position in its layer list


def renumber_layers(model: torch.nn.Module, layers: dict[str, tuple[int, list[int]]]) -> None:
    """``layers``: ``{list path: (old length, old indices kept)}`` after the entries went.
    Every module inside a kept entry whose layer-index attribute holds the entry's old
    position gets its new one (the KV cache is indexed by it).

    >>> class Attn(torch.nn.Module):
    ...     def __init__(self, i):
    ...         super().__init__()
    ...         self.layer_idx = i
    >>> net = torch.nn.ModuleList([Attn(0), Attn(2)])  # entry 1 was deleted
    >>> renumber_layers(net, {"": (3, [0, 2])})
    >>> [m.layer_idx for m in net]
    [0, 1]
    """
    for path, (_, kept) in layers.items():
        container = model.get_submodule(path)
        for new, old in enumerate(kept):
            for module in container[new].modules():
                replace_int_attrs(module, {name: (old, new) for name in LAYER_INDEX})


def replace_int_attrs(module: torch.nn.Module, wanted: dict[str, tuple[int, int]]) -> None:
    """``{attribute: (old, new)}``: set each integer attribute that still holds ``old``
    (a name that means something else in this module keeps its value)."""
    for name, (old, new) in wanted.items():
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value == old and new is not None:
            setattr(module, name, new)


def sync_layer_sizes(model: torch.nn.Module, pruned: torch.fx.GraphModule) -> None:
    """Set PyTorch layers' size attributes from their (already sliced) tensors.

    Under the fx front end the pruned graph calls the same layers by path, and the prune
    pass already updated their copies there: those attributes are copied as they are.
    """
    graph_modules = dict(pruned.named_modules())
    groups = _conv_groups(pruned)
    for path, module in model.named_modules():
        twin = graph_modules.get(path) if path else None
        if twin is not None and type(twin) is type(module) and path:
            _copy_sizes(twin, module)
            continue
        if isinstance(module, torch.nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, _CONV):
            module.groups = groups.get(f"{path}.weight", module.groups)
            module.out_channels = module.weight.shape[0]
            module.in_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, _CONV_TRANSPOSE):  # weight: (in, out // groups, *kernel)
            module.groups = groups.get(f"{path}.weight", module.groups)
            module.in_channels = module.weight.shape[0]
            module.out_channels = module.weight.shape[1] * module.groups
        elif isinstance(module, _NORM_BY_FEATURES) and module.weight is not None:
            module.num_features = module.weight.shape[0]
        elif isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)) and module.weight is not None:
            module.normalized_shape = tuple(module.weight.shape)
        elif isinstance(module, torch.nn.GroupNorm) and module.weight is not None:
            module.num_channels = module.weight.shape[0]
        elif isinstance(module, torch.nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape
        elif isinstance(module, torch.nn.PReLU):
            module.num_parameters = module.weight.numel()
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 linear
            module.nx, module.nf = module.weight.shape


def _copy_sizes(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    for name, value in vars(src).items():
        if not name.startswith("_") and isinstance(value, (int, tuple)) and not isinstance(value, bool):
            setattr(dst, name, value)


def _conv_groups(gm: torch.fx.GraphModule) -> dict[str, int]:
    """``{weight key: groups}`` of the convolutions in an ATen graph (after the prune pass)."""
    where = {"conv1d": 6, "conv2d": 6, "conv3d": 6, "convolution": 8,  # position of ``groups``
             "conv_transpose1d": 6, "conv_transpose2d": 6, "conv_transpose3d": 6}
    out = {}
    for node in gm.graph.nodes:
        index = where.get(getattr(getattr(node.target, "overloadpacket", None), "__name__", ""))
        if node.op == "call_function" and index is not None and len(node.args) > index:
            weight = node.args[1]
            if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                out[weight.target] = int(node.args[index])
    return out


__all__ = ["Heads", "attention_heads", "sync_head_attrs", "sync_layer_sizes", "replace_int_attrs", "ATTENTION_ATTRS",
           "renumber_layers", "LAYER_INDEX"]
