"""Hypothesis strategies for random CNN DAGs that torch.fx can trace.

An :class:`Arch` is a plain description (a seed, a list of :class:`Step`, a head);
:func:`build` turns it into a :class:`RandomNet`. Keeping the description separate
from the module makes hypothesis shrink to readable counterexamples, and
:func:`to_source` prints a standalone script that rebuilds the failing model.

The network keeps a *pool* of live tensors (all ``N x C x 8 x 8``). Every step reads
pool entries and appends its outputs; the structure is fixed at construction, so
``forward`` is a Python loop over a constant list and traces to a straight-line graph.
At the end every tensor no step consumed is concatenated (so no branch is dead) and
fed to the head, which outputs ``N x 5``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

INPUT_SHAPE = (2, 3, 8, 8)
OUT_FEATURES = 5
MAX_CHANNELS = 24  # no single tensor grows past this (concat is skipped instead)

# sigmoid (f(0) != 0) ends zero-invariance: the oracle must then skip the group, and
# fxprune must say so.
ACTIVATIONS = ("relu", "silu", "sigmoid")
ACTIVATION_FORMS = ("module", "function", "method")
ADD_VARIANTS = ("operator", "torch_add")
SHUFFLE_VARIANTS = ("const_channels", "size_channels")
SE_VARIANTS = ("x_times_s", "s_times_x", "torch_mul")
GAP_VARIANTS = ("adaptive_flatten", "mean", "module_flatten")
FLATTEN_VARIANTS = ("torch_flatten", "method_flatten", "view", "reshape")
SMALL_POOLS = ("adaptive2", "avg4", "max4", "adaptive1")
# The same operation in the spellings users write: a module call, or torch.nn.functional with
# the module's own parameters (timm's norm+activation layers call F.batch_norm that way).
LAYER_FORMS = ("module", "functional")
FC_FORMS = ("module", "functional")
# Grouped-query attention as Hugging Face writes it (repeat_kv: expand + reshape) or through
# SDPA's own enable_gqa.
ATTENTION_GQA_FORMS = ("repeat", "enable_gqa")
# analyze()'s attention_units: "query_slots" only changes a block with fewer key/value heads
# than query heads, so it is drawn only for architectures that have one (attention_units()).
ATTENTION_UNITS = ("heads", "head_dim")
GQA_ATTENTION_UNITS = ("query_slots",)


@dataclass(frozen=True)
class Step:
    op: str
    inputs: tuple[int, ...]
    params: tuple = ()

    def __repr__(self) -> str:
        return f"Step({self.op!r}, {self.inputs}, {self.params})"


@dataclass(frozen=True)
class Arch:
    seed: int
    steps: tuple[Step, ...]
    head: tuple  # ("gap", variant) or ("flat", pool, flatten variant)
    channels: tuple[int, ...] = field(default=(), compare=False)  # pool channel counts (info only)

    def __repr__(self) -> str:
        steps = ",\n    ".join(repr(s) for s in self.steps)
        return f"Arch(seed={self.seed}, head={self.head},\n  steps=(\n    {steps},\n  ))"


def _divisors(n: int) -> list[int]:
    return [d for d in range(2, n + 1) if n % d == 0]


def _newest_first(draw, indices: list[int]) -> int:
    """One of ``indices`` (ascending), usually the newest; shrinks to the newest."""
    k = draw(st.one_of(st.just(0), st.integers(0, len(indices) - 1)))
    return indices[len(indices) - 1 - k]


# The pool entries each op can read (an op with none is skipped).
ELIGIBLE = {
    "add": lambda pool, j: pool.count(pool[j]) > 1,
    "split": lambda pool, j: pool[j] >= 2,
    "gconv": lambda pool, j: pool[j] >= 2,
    "shuffle": lambda pool, j: pool[j] % 2 == 0,
}


OPS = ("conv", "conv_bn", "act", "add", "cat", "split", "gconv", "dwconv", "shuffle", "se", "ln", "attn", "tconv")
# (also "gqa": an attention step that always has several key/value heads, each serving 2-3 query heads)


@st.composite
def _step(draw, pool: list[int], ops: tuple[str, ...] = OPS) -> tuple[Step, list[int]] | None:
    """One step on a pool with channel counts ``pool``; returns it and its output channels."""
    op = draw(st.sampled_from(ops))
    eligible = [j for j in range(len(pool)) if ELIGIBLE.get(op, lambda p, j: True)(pool, j)]
    if not eligible:
        return None
    i = _newest_first(draw, eligible)
    c = pool[i]
    if op == "conv":
        out, k, bias = draw(st.integers(2, 12)), draw(st.sampled_from((1, 3))), draw(st.booleans())
        return Step(op, (i,), (out, k, bias)), [out]
    if op == "conv_bn":
        out, k = draw(st.integers(2, 12)), draw(st.sampled_from((1, 3)))
        return Step(op, (i,), (out, k, draw(st.sampled_from(LAYER_FORMS)))), [out]
    if op == "ln":
        return Step(op, (i,), ()), [c]
    if op == "act":
        return Step(op, (i,), (draw(st.sampled_from(ACTIVATIONS)), draw(st.sampled_from(ACTIVATION_FORMS)))), [c]
    if op == "add":
        j = _newest_first(draw, [j for j, cj in enumerate(pool) if cj == c and j != i])
        return Step(op, (i, j), (draw(st.sampled_from(ADD_VARIANTS)),)), [c]
    if op == "cat":
        n = draw(st.integers(2, 3))
        ids = (i,) + tuple(_newest_first(draw, list(range(len(pool)))) for _ in range(n - 1))  # repeats allowed
        total = sum(pool[j] for j in ids)
        if total > MAX_CHANNELS:
            return None
        return Step(op, ids), [total]
    if op == "split":
        if c % 2 == 0 and draw(st.booleans()):
            return Step(op, (i,), ("chunk", 2)), [c // 2, c // 2]
        if draw(st.booleans()):  # torch.split(x, [s, x.shape[1] - s], 1): a size read off a shape
            first = draw(st.integers(1, c - 1))
            return Step(op, (i,), ("shape_split", first)), [first, c - first]
        parts = draw(st.integers(2, min(3, c)))
        cuts = sorted(draw(st.lists(st.integers(1, c - 1), min_size=parts - 1, max_size=parts - 1,
                                    unique=True)))
        sizes = tuple(b - a for a, b in zip([0] + cuts, cuts + [c]))
        return Step(op, (i,), ("split", sizes)), list(sizes)
    if op == "gconv":
        g = draw(st.sampled_from(_divisors(c)))
        out = g * draw(st.integers(1, max(1, 12 // g)))
        return Step(op, (i,), (out, draw(st.sampled_from((1, 3))), g)), [out]
    if op == "tconv":  # a stride-1 transposed conv (keeps 8 x 8), grouped or not, maybe dilated
        g = draw(st.sampled_from([1] + _divisors(c)))
        out, k, dilation = g * draw(st.integers(1, max(1, 12 // g))), draw(st.sampled_from((1, 3))), draw(
            st.sampled_from((1, 2)))
        return Step(op, (i,), (out, k, g, dilation, draw(st.sampled_from(LAYER_FORMS)))), [out]
    if op == "dwconv":
        mult = draw(st.sampled_from((1, 2))) if 2 * c <= MAX_CHANNELS else 1
        return Step(op, (i,), (mult, draw(st.sampled_from((3, 1))))), [c * mult]
    if op == "shuffle":
        return Step(op, (i,), (2, draw(st.sampled_from(SHUFFLE_VARIANTS)))), [c]
    if op == "attn":
        heads = draw(st.sampled_from((1, 2, 4)))
        kv_heads = draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0]))
    if op == "gqa":  # an "attn" step with grouped queries over several key/value heads
        op, heads = "attn", draw(st.sampled_from((4, 6)))
        kv_heads = draw(st.sampled_from([h for h in (2, 3) if heads % h == 0]))
    if op == "attn":
        head_dim = draw(st.sampled_from((2, 4)))
        gqa = draw(st.sampled_from(ATTENTION_GQA_FORMS)) if kv_heads < heads else "repeat"
        return Step(op, (i,), (heads, kv_heads, head_dim, draw(st.booleans()), gqa)), [c]
    if op == "se":
        hidden = draw(st.integers(1, 4))
        return Step(op, (i,), (hidden, draw(st.sampled_from(SE_VARIANTS)))), [c]
    raise AssertionError(op)


def gqa_blocks(arch: "Arch") -> list[tuple[int, Step]]:
    """``(step index, step)`` of every attention block with fewer key/value than query heads."""
    return [(n, s) for n, s in enumerate(arch.steps) if s.op == "attn" and s.params[1] < s.params[0]]


def attention_units(arch: "Arch") -> st.SearchStrategy[str]:
    """The ``attention_units`` choices that apply to ``arch``: query slots need a GQA block,
    and where there is one they are drawn half the time."""
    if gqa_blocks(arch):
        return st.one_of(st.sampled_from(GQA_ATTENTION_UNITS), st.sampled_from(ATTENTION_UNITS))
    return st.sampled_from(ATTENTION_UNITS)


@st.composite
def architectures(draw, min_steps: int = 3, max_steps: int = 8, ops: tuple[str, ...] = OPS,
                  ensure: str | None = None) -> Arch:
    """Random DAG descriptions: ``min_steps..max_steps`` steps drawn from ``ops`` (some may
    be skipped); with ``ensure`` (an op every pool can take, such as ``"attn"``), one step of
    that op is added where the draw has none, so no example misses what a test is about."""
    seed = draw(st.integers(0, 2**16))
    pool = [INPUT_SHAPE[1]]
    steps = []
    for _ in range(draw(st.integers(min_steps, max_steps))):
        drawn = draw(_step(pool, ops))
        if drawn is None:
            continue
        step, outs = drawn
        steps.append(step)
        pool.extend(outs)
    if ensure and not any(s.op == ensure for s in steps):
        step, outs = draw(_step(pool, (ensure,)))
        steps.append(step)
        pool.extend(outs)
    if draw(st.booleans()):
        head = ("gap", draw(st.sampled_from(GAP_VARIANTS)), draw(st.sampled_from(FC_FORMS)))
    else:
        head = ("flat", draw(st.sampled_from(SMALL_POOLS)), draw(st.sampled_from(FLATTEN_VARIANTS)),
                draw(st.sampled_from(FC_FORMS)))
    return Arch(seed, tuple(steps), head, tuple(pool))


def _randomize_batchnorm(bn: nn.BatchNorm2d) -> None:
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.rand(n) * 2 - 1)
        bn.running_var.copy_(torch.rand(n) * 1.5 + 0.5)
        bn.weight.copy_(torch.rand(n) + 0.5)
        bn.bias.copy_(torch.rand(n) - 0.5)


def _pooled_size(pool: str) -> int:
    return {"adaptive2": 4, "avg4": 4, "max4": 4, "adaptive1": 1}[pool]


class RandomNet(nn.Module):
    """A fixed random DAG; ``forward`` unrolls ``self.arch.steps`` (fx-traceable)."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.layers = nn.ModuleDict()
        pool = [INPUT_SHAPE[1]]
        consumed: set[int] = set()
        for n, step in enumerate(arch.steps):
            consumed.update(step.inputs)
            pool.extend(self._make(f"s{n}", step, pool))
        self.leaves = [j for j in range(len(pool)) if j not in consumed]
        width = sum(pool[j] for j in self.leaves)
        if arch.head[0] == "gap":
            if arch.head[1] == "module_flatten":
                self.layers["gap"] = nn.AdaptiveAvgPool2d(1)
            self.layers["fc"] = nn.Linear(width, OUT_FEATURES)
        else:
            self.layers["fc"] = nn.Linear(width * _pooled_size(arch.head[1]), OUT_FEATURES)

    def _make(self, name: str, step: Step, pool: list[int]) -> list[int]:
        c = pool[step.inputs[0]]
        p = step.params
        if step.op == "conv":
            out, k, bias = p
            self.layers[name] = nn.Conv2d(c, out, k, padding=k // 2, bias=bias)
            return [out]
        if step.op == "conv_bn":
            out, k, _form = p
            self.layers[name] = nn.Conv2d(c, out, k, padding=k // 2, bias=False)
            bn = self.layers[name + "_bn"] = nn.BatchNorm2d(out)
            _randomize_batchnorm(bn)
            return [out]
        if step.op == "ln":
            self.layers[name] = nn.LayerNorm(c)
            with torch.no_grad():
                self.layers[name].weight.uniform_(0.5, 1.5)
                self.layers[name].bias.uniform_(-0.5, 0.5)
            return [c]
        if step.op == "act":
            if p[1] == "module":
                self.layers[name] = {"relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid}[p[0]]()
            return [c]
        if step.op == "add":
            return [c]
        if step.op == "cat":
            return [sum(pool[j] for j in step.inputs)]
        if step.op == "split":
            if p[0] == "shape_split":
                return [p[1], c - p[1]]
            return [c // 2, c // 2] if p[0] == "chunk" else list(p[1])
        if step.op == "gconv":
            out, k, g = p
            self.layers[name] = nn.Conv2d(c, out, k, padding=k // 2, groups=g)
            return [out]
        if step.op == "tconv":
            out, k, g, dilation, _form = p
            self.layers[name] = nn.ConvTranspose2d(c, out, k, padding=dilation * (k // 2), groups=g, dilation=dilation)
            return [out]
        if step.op == "dwconv":
            mult, k = p
            self.layers[name] = nn.Conv2d(c, c * mult, k, padding=k // 2, groups=c)
            return [c * mult]
        if step.op == "shuffle":
            return [c]
        if step.op == "attn":  # a residual attention block over the 64 positions
            heads, kv_heads, head_dim = p[0], p[1], p[2]
            self.layers[name + "_q"] = nn.Linear(c, heads * head_dim)
            self.layers[name + "_k"] = nn.Linear(c, kv_heads * head_dim)
            self.layers[name + "_v"] = nn.Linear(c, kv_heads * head_dim)
            self.layers[name + "_o"] = nn.Linear(heads * head_dim, c)
            if p[3]:  # rotary tables, as a model registers them
                angle = torch.arange(64.0)[:, None] * (0.5 ** torch.arange(head_dim // 2.0))
                angle = torch.cat([angle, angle], -1)
                self.register_buffer(f"{name}_cos", angle.cos(), persistent=False)
                self.register_buffer(f"{name}_sin", angle.sin(), persistent=False)
            return [c]
        if step.op == "se":
            hidden = p[0]
            self.layers[name + "_reduce"] = nn.Conv2d(c, hidden, 1)
            self.layers[name + "_expand"] = nn.Conv2d(hidden, c, 1)
            return [c]
        raise AssertionError(step.op)

    def forward(self, x):
        pool = [x]
        for n, step in enumerate(self.arch.steps):
            pool.extend(self._run(f"s{n}", step, pool))
        leaves = [pool[j] for j in self.leaves]
        y = leaves[0] if len(leaves) == 1 else torch.cat(leaves, dim=1)
        return self._head(y)

    def _run(self, name: str, step: Step, pool: list):
        x = pool[step.inputs[0]]
        p = step.params
        op = step.op
        if op == "conv" or op == "gconv" or op == "dwconv":
            return [self.layers[name](x)]
        if op == "tconv":
            t = self.layers[name]
            if p[4] == "module":
                return [t(x)]
            return [F.conv_transpose2d(x, t.weight, t.bias, 1, t.padding, 0, t.groups, t.dilation)]
        if op == "conv_bn":
            conv, bn = self.layers[name], self.layers[name + "_bn"]
            if p[2] == "module":
                return [bn(conv(x))]
            y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
            return [F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)]
        if op == "ln":  # a ConvNeXt-style channel layer norm, functional, with the module's parameters
            ln = self.layers[name]
            y = F.layer_norm(x.permute(0, 2, 3, 1), ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            return [y.permute(0, 3, 1, 2).contiguous()]
        if op == "act":
            kind, form = p
            if form == "module":
                return [self.layers[name](x)]
            if form == "method" and kind != "silu":  # there is no Tensor.silu
                return [x.relu() if kind == "relu" else x.sigmoid()]
            return [{"relu": F.relu, "silu": F.silu, "sigmoid": torch.sigmoid}[kind](x)]
        if op == "add":
            y = pool[step.inputs[1]]
            return [x + y if p[0] == "operator" else torch.add(x, y)]
        if op == "cat":
            return [torch.cat([pool[j] for j in step.inputs], dim=1)]
        if op == "split":
            if p[0] == "shape_split":
                parts = torch.split(x, [p[1], x.shape[1] - p[1]], dim=1)
                return [parts[0], parts[1]]
            parts = x.chunk(p[1], dim=1) if p[0] == "chunk" else torch.split(x, list(p[1]), dim=1)
            return [parts[j] for j in range(p[1] if p[0] == "chunk" else len(p[1]))]
        if op == "shuffle":
            g = p[0]
            if p[1] == "const_channels":
                c = self._channels_of(step)
                y = x.view(x.size(0), g, c // g, x.size(2), x.size(3))
                return [torch.transpose(y, 1, 2).contiguous().view(x.size(0), c, x.size(2), x.size(3))]
            b, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
            y = x.view(b, g, c // g, h, w).transpose(1, 2).contiguous()
            return [y.view(b, -1, h, w)]
        if op == "attn":
            return [x + self._attention(name, x, p)]
        if op == "se":
            s = F.adaptive_avg_pool2d(x, 1)
            s = torch.sigmoid(self.layers[name + "_expand"](F.relu(self.layers[name + "_reduce"](s))))
            if p[1] == "x_times_s":
                return [x * s]
            if p[1] == "s_times_x":
                return [s * x]
            return [torch.mul(x, s)]
        raise AssertionError(op)

    def _attention(self, name: str, x, p):
        heads, kv_heads, head_dim, rotary, gqa = p
        b, c = x.shape[0], x.shape[1]
        tokens = x.flatten(2).transpose(1, 2)  # [B, 64, C]

        def split_heads(t, n):
            return t.view(b, 64, n, head_dim).transpose(1, 2)

        q = split_heads(self.layers[name + "_q"](tokens), heads)
        k = split_heads(self.layers[name + "_k"](tokens), kv_heads)
        v = split_heads(self.layers[name + "_v"](tokens), kv_heads)
        if rotary:
            cos, sin = getattr(self, f"{name}_cos"), getattr(self, f"{name}_sin")
            q, k = _rotate(q, cos, sin, head_dim), _rotate(k, cos, sin, head_dim)
        if kv_heads < heads and gqa == "repeat":
            r = heads // kv_heads
            k = k[:, :, None].expand(b, kv_heads, r, 64, head_dim).reshape(b, heads, 64, head_dim)
            v = v[:, :, None].expand(b, kv_heads, r, 64, head_dim).reshape(b, heads, 64, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, scale=0.5, enable_gqa=kv_heads < heads)
        out = self.layers[name + "_o"](out.transpose(1, 2).reshape(b, 64, heads * head_dim))
        return out.transpose(1, 2).reshape(b, c, 8, 8)

    def _channels_of(self, step: Step) -> int:
        return self.arch.channels[step.inputs[0]]

    def _fc(self, y):
        fc = self.layers["fc"]
        return fc(y) if self.arch.head[-1] == "module" else F.linear(y, fc.weight, fc.bias)

    def _head(self, y):
        head = self.arch.head
        if head[0] == "gap":
            if head[1] == "adaptive_flatten":
                y = F.adaptive_avg_pool2d(y, 1).flatten(1)
            elif head[1] == "mean":
                y = y.mean((2, 3))
            else:
                y = torch.flatten(self.layers["gap"](y), 1)
            return self._fc(y)
        pool, flat = head[1], head[2]
        if pool == "adaptive2":
            y = F.adaptive_avg_pool2d(y, 2)
        elif pool == "avg4":
            y = F.avg_pool2d(y, 4)
        elif pool == "max4":
            y = F.max_pool2d(y, 4)
        else:
            y = F.adaptive_avg_pool2d(y, 1)
        if flat == "torch_flatten":
            y = torch.flatten(y, 1)
        elif flat == "method_flatten":
            y = y.flatten(1)
        elif flat == "view":
            y = y.view(y.size(0), -1)
        else:
            y = y.reshape(y.shape[0], -1)
        return self._fc(y)


def _rotate(t, cos, sin, head_dim: int):
    """Rotary embedding as Llama writes it: ``t * cos + rotate_half(t) * sin``."""
    half = head_dim // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
    return t * cos + rotated * sin


def build(arch: Arch) -> RandomNet:
    """The module an :class:`Arch` describes, with weights from ``arch.seed``; in eval mode."""
    torch.manual_seed(arch.seed)
    return RandomNet(arch).eval()


def example_input(seed: int = 0, batch: int = INPUT_SHAPE[0]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch,) + INPUT_SHAPE[1:], generator=g)
