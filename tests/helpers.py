"""Shared test helpers: non-trivial random weights and half-of-every-group plans."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

import fxprune
from fxprune.passes.verify import check_zero_invariance, output_error


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make every parameter matter: zero-initialised heads, 1e-6 layer scales and default
    BatchNorm statistics would let a wrong rule pass the oracle unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and (p.abs().max() < 1e-3 or (p.ndim == 1 and "bias" not in name)):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif p.numel() and "bias" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def unit_scale(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give ``model`` weights under which every part of it matters, in place; returns it.

    Library initialisations hide errors: Hugging Face's weights of std 0.02 make attention
    logits ~1e-3, so zeroing every query of a tiny BERT moves its output by 7e-5 relative,
    under the oracle's 1e-4; unit norm scales, zero biases and default BatchNorm statistics
    (mean 0, variance 1) make a norm indexed with the wrong channels compute the same thing.
    Here every matrix or conv weight is N(0, 1/fan_in) (activations keep unit scale, so
    attention logits are O(1)), embeddings and other tables N(0, 1), norm scales and other
    1-D parameters U(0.5, 1.5), biases N(0, 0.2), BatchNorm running means N(0, 0.5) and
    variances U(0.5, 1.5). Deterministic in ``seed``.

    >>> net = unit_scale(nn.Sequential(nn.Linear(400, 300), nn.LayerNorm(300)))
    >>> round(float(net[0].weight.std() * 400 ** 0.5), 1), bool(net[0].bias.abs().max() > 0.1)
    (1.0, True)
    >>> bool((net[1].weight - 1).abs().max() > 0.3)
    True
    """
    g = torch.Generator().manual_seed(seed)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.numel() or p.is_meta:
                continue
            if p.ndim >= 2 and id(p) not in tables and "weight" in name.rsplit(".", 1)[-1]:
                fan_in = _fan_in(model, name, p)
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif p.ndim >= 2:  # embedding tables, class tokens, position tables: unit entries
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.rsplit(".", 1)[-1].endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            else:  # norm scales, layer scales, PReLU slopes: away from 1 and from 0
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _fan_in(model: nn.Module, name: str, p: torch.Tensor) -> int:
    """Inputs summed into one output: dims 1.. of a linear or conv weight, but dim 0 of
    transformers' Conv1D (GPT-2), which stores its weight as (in, out)."""
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    if type(owner).__name__ == "Conv1D":
        return p.shape[0]
    return p[0].numel()


def half_plan(graph, groups=None) -> dict[int, list[int]]:
    """About half of every given group (every other unit first), never emptying a layer."""
    groups = graph.prunable_groups if groups is None else groups
    order = [(g.id, u) for g in groups for u in range(0, g.size, 2)]
    order += [(g.id, u) for g in groups for u in range(1, g.size, 2)]
    return fxprune.feasible_plan(graph, order, {g.id: g.size // 2 for g in groups})


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert now.keys() == snapshot.keys()
    for k, v in snapshot.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), f"{k} was mutated"


def prune_and_check(model: nn.Module, inputs, *, expect_prunable: int = 1, capture: str = "auto") -> tuple:
    """The standard proof on one model: analyze, prune half of every prunable group (the
    output shape holds), and half of every zero-invariant group (the oracle holds).
    Returns (graph, pruned model, oracle error)."""
    model = model.eval()
    before = state_snapshot(model)
    graph = fxprune.analyze(model, inputs, capture=capture)
    prunable = graph.prunable_groups
    assert len(prunable) >= expect_prunable, str(graph)
    inputs = graph.example_inputs
    with torch.no_grad():
        reference = inputs.call(model)
        small_all = fxprune.prune(graph, half_plan(graph)).eval()
        output_error(reference, inputs.call(small_all))  # raises if the output structure/shape differs
    zi_groups = [g for g in prunable if g.zero_invariant]
    error = 0.0
    small = small_all
    if zi_groups:
        plan = half_plan(graph, zi_groups)
        assert plan, "no unit of a zero-invariant group could be removed"
        small = fxprune.prune(graph, plan)
        error = check_zero_invariance(model, graph, plan, small)
        assert error < 1e-4
    assert_state_unchanged(model, before)
    return graph, small, error


def assert_generate_matches_greedy_decoding(model, prompt: torch.Tensor, steps: int) -> None:
    """generate() with its KV cache, at lengths the example inputs never had, gives the tokens
    of greedy decoding that runs the whole sequence at every step without a cache."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=steps, do_sample=False, use_cache=True)
        sequence = prompt
        for _ in range(steps):
            step = model(input_ids=sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    assert generated.shape == (prompt.shape[0], prompt.shape[1] + steps)
    assert torch.equal(generated, sequence)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["randomize", "unit_scale", "half_plan", "prune_and_check", "state_snapshot", "assert_state_unchanged",
           "count_params", "copy", "assert_generate_matches_greedy_decoding"]


def branch_oracle_error(model: nn.Module, graph) -> float | None:
    """The oracle's error when every other zero-invariant residual branch is removed
    (``check_zero_invariance``, no tolerance); None when the graph has no such branch. A
    branch nested in one already chosen, or holding one, is skipped: removing the outer
    one removes it anyway."""
    def ancestors(branch) -> set[int]:
        out = set()
        while branch.parent is not None:
            out.add(branch.parent)
            branch = fxprune.unit(graph, branch.parent)
        return out

    chosen: dict[int, set[int]] = {}
    for branch in [b for b in graph.branches if b.zero_invariant][::2]:
        above = ancestors(branch)
        if not above & set(chosen) and not any(branch.id in up for up in chosen.values()):
            chosen[branch.id] = above
    if not chosen:
        return None
    return check_zero_invariance(model, graph, {bid: [0] for bid in sorted(chosen)}, tolerance=float("inf"))
