"""ProxSparse (Liu et al. 2025, "ProxSparse: Regularized Learning of Semi-Structured
Sparsity Masks for Pretrained LLMs"): a 2:4 mask learned by proximal gradient.

On every group of 4 consecutive inputs of a weight (the groups of ``nm_mask``) the
regularizer is

    R(w) = sum_{i<j<k} |w_i w_j w_k|

which is zero exactly when at most 2 of the 4 are non-zero. After each optimizer step
``prox_()`` replaces each group ``y`` by the proximal point of ``lr * lam * R``:

    argmin_x 1/2 ||x - y||^2 + lr * lam * R(x)

R is symmetric in signs, so x keeps y's signs and the problem is solved on ``z = |y|``
over x >= 0, where the optimum is one of three candidates (the lowest objective wins):

* 2-sparse: the two largest ``z`` kept as they are (R = 0);
* 3-sparse: the three largest, by cyclic soft thresholding
  ``x_a = max(0, z_a - lr*lam * x_b x_c)`` to a fixed point;
* dense: the same with ``x_a = max(0, z_a - lr*lam * e2(x without a))``, ``e2`` the sum
  of the pairwise products.

A large ``lam`` drives every group to 2 non-zeros; the final mask is the top 2 of every 4
of the learned weights (``masks``), applied as the paper does to the original weights
(``apply_masks(weights="original")``, nothing else changes) or to the trained ones.
The prox is elementwise and deterministic, so after a DDP-synchronised step every
replica computes the same weights. Under FSDP2 (``Shard(0)``: whole rows, so whole groups
of 4, on each rank) every rank applies it to its own rows; the weights are read where the
layers hold them at each step, so it may be built before or after ``fully_shard``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import Iterable

import torch
from torch import nn

from fxprune.errors import SpecError
from fxprune.regularize._common import check_lam, lr_of, warn_on_weight_decay
from fxprune.sharding import AFTER_TRAINING, check_rows_sharded, check_unsharded, full, local, total_over
from fxprune.sparsity.masks import density, input_dim_of
from fxprune.sparsity.nm import NMMask, NMResult, apply_nm, nm_mask

M = 4
ITERS = 20  # cyclic soft-thresholding sweeps at most; stops earlier at a fixed point
TOL = 1e-7


def group_objective(x: torch.Tensor, y: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """``1/2 ||x - y||^2 + lam * R(x)`` of each group (last dim 4).

    Example:
        >>> group_objective(torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.zeros(4), 2.0)
        tensor(3.5000)
    """
    a = x.abs()
    e3 = sum(a[..., i] * a[..., j] * a[..., k] for i in range(M) for j in range(i + 1, M) for k in range(j + 1, M))
    return 0.5 * (x - y).square().sum(-1) + lam * e3


_OTHERS = [[b for b in range(M) if b != a] for a in range(M)]


def _cyclic(z: torch.Tensor, support: torch.Tensor | None, lam: torch.Tensor) -> torch.Tensor:
    """Cyclic soft thresholding of ``1/2||x - z||^2 + lam e3(x)`` over x >= 0 on ``support``.

    ``z`` and ``support`` are [4, groups] (one contiguous row per coordinate; ``support``
    None: all four), ``lam`` [groups]. Each group stops at its own fixed point (its first
    sweep that moves no coordinate by more than TOL), so its result does not depend on
    which other groups run with it (one process, or each rank's rows under FSDP2)."""
    x = z.clone() if support is None else z * support
    out = x.clone()
    # a transformer has millions of groups and runs this every step: the e2 of the other
    # three is written out (3 products) instead of taken from sums over all four, finished
    # groups are held by a `where` and dropped from the working set only once at least half
    # of it is done (gathering every sweep cost more than the sweeps themselves)
    moving = torch.arange(z.shape[1], device=z.device)
    alive = torch.ones(z.shape[1], dtype=torch.bool, device=z.device)
    for _ in range(ITERS):
        before = x.clone()
        for a in range(M):
            b, c, d = _OTHERS[a]
            pairs = x[b] * (x[c] + x[d]) + x[c] * x[d]  # e2 of the other three
            xa = torch.clamp_(z[a] - lam * pairs, min=0)
            x[a] = xa if support is None else xa * support[a]
        x = torch.where(alive, x, before)  # finished groups keep their fixed point
        alive &= (x - before).abs().amax(0) > TOL
        left = int(alive.sum())
        if left == 0:
            break
        if 2 * left <= alive.numel():
            out[:, moving] = x
            keep = alive
            moving, x, z, lam, alive = moving[keep], x[:, keep], z[:, keep], lam[keep], alive[keep]
            support = None if support is None else support[:, keep]
    out[:, moving] = x
    return out


def prox_24(y: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """The proximal point of ``lam * sum_{i<j<k} |x_i x_j x_k|`` at each group ``y[..., :4]``.

    ``lam`` is a float or a tensor broadcasting to ``y.shape[:-1]``. Groups with at most
    2 non-zeros are their own proximal point (R and its neighbourhood vanish there).

    Example:
        >>> prox_24(torch.tensor([3.0, 0.0, -2.0, 0.0]), 5.0)   # already 2-sparse: kept
        tensor([ 3.,  0., -2.,  0.])
        >>> prox_24(torch.tensor([4.0, 3.0, -2.0, 1.0]), 10.0)  # strong: 2-sparse
        tensor([4., 3., -0., 0.])
    """
    if y.shape[-1] != M:
        raise SpecError(f"prox_24 takes groups of 4 in the last dim, got shape {tuple(y.shape)}")
    work = torch.promote_types(y.dtype, torch.float32)
    flat = y.detach().reshape(-1, M).to(work)
    lam = torch.as_tensor(lam, dtype=work, device=y.device).expand(y.shape[:-1]).reshape(-1)
    out = flat.clone()
    dense = (flat != 0).sum(-1) > 2  # the only groups the prox moves
    if dense.any():
        z = flat[dense].abs()
        lam_d = lam[dense]
        order = z.argsort(dim=-1, descending=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(M, device=y.device).expand_as(order))
        zt = z.T.contiguous()
        # every candidate and objective in the [4, groups] layout, the lowest objective kept
        # by `where` (ties to the sparser candidate, as the candidates are listed above)
        best = zt * (rank < 2).T
        low = _objective_t(best, zt, lam_d)
        for candidate in (_cyclic(zt, (rank < 3).T.to(work), lam_d), _cyclic(zt, None, lam_d)):
            value = _objective_t(candidate, zt, lam_d)
            better = value < low
            best, low = torch.where(better, candidate, best), torch.where(better, value, low)
        x = best.T
        out[dense] = torch.sign(flat[dense]) * x
    return out.reshape(y.shape).to(y.dtype)


def _objective_t(x: torch.Tensor, z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``group_objective`` of groups laid out as [4, groups] with x >= 0 (e3 written out)."""
    e3 = x[0] * x[1] * (x[2] + x[3]) + x[2] * x[3] * (x[0] + x[1])
    return 0.5 * (x - z).square().sum(0) + lam * e3


def _to_groups(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as [groups, 4] along its input dim (dim 1), the N:M grouping."""
    return weight.movedim(1, -1).reshape(-1, M)


def _from_groups(groups: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return groups.reshape(like.movedim(1, -1).shape).movedim(-1, 1)


class ProxSparse:
    """2:4 masks learned by the proximal step of ``R(w) = sum_{i<j<k} |w_i w_j w_k|``.

    Args:
        model: the layers regularized are its Linear/Conv weights whose input dim is a
            multiple of 4 (the others are listed in ``skipped``).
        lam: strength (>= 0); the step uses ``lr * lam`` with each weight's lr.
        optimizer: gives the lr when ``prox_`` gets none; ``attach`` hooks onto it.
        ignore: fnmatch patterns of module names left alone.
        keep_original: keep a copy of the weights as they are now, which
            ``apply_masks(weights="original")`` masks (the paper's final model).

    Use: train as usual and call ``prox_()`` after every ``optimizer.step()`` (or
    ``attach(optimizer)`` once), then ``apply_masks()``.

    Example:
        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(8, 8))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> prox = ProxSparse(net, lam=1e4, optimizer=opt)
        >>> net(torch.randn(4, 8)).square().mean().backward(); opt.step(); prox.prox_()
        >>> prox.two_sparse_fraction()
        1.0
        >>> [r.density for r in prox.apply_masks().masked]
        [0.5]
    """

    def __init__(self, model: nn.Module, lam: float, optimizer: torch.optim.Optimizer | None = None,
                 ignore: str | Iterable[str] = (), keep_original: bool = True):
        if not isinstance(model, nn.Module):
            raise SpecError(f"ProxSparse: model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.lam, self.optimizer = model, check_lam(lam), optimizer
        patterns = (ignore,) if isinstance(ignore, str) else tuple(ignore)
        self.layers: dict[str, nn.Module] = {}
        self.skipped: dict[str, str] = {}
        for name, module in model.named_modules():
            if input_dim_of(module) is None:
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in patterns):
                self.skipped[name] = "ignored"
            elif module.weight.shape[1] % M:
                self.skipped[name] = f"input channels ({module.weight.shape[1]}) not a multiple of 4"
            else:
                self.layers[name] = module
        if not self.layers:
            raise SpecError("ProxSparse: no Linear/Conv weight with an input dim that is a multiple of 4 "
                            f"to regularize (skipped: {self.skipped or 'none found'})")
        self.original = {n: m.weight.detach().clone() for n, m in self.layers.items()} if keep_original else None
        warn_on_weight_decay(self.weights, optimizer, "ProxSparse")

    @property
    def weights(self) -> list[torch.Tensor]:
        """The regularized weights as the layers hold them now (sharded DTensors under FSDP2)."""
        return [m.weight for m in self.layers.values()]

    @torch.no_grad()
    def prox_(self, lr: float | None = None) -> None:
        """The proximal step of ``lr * lam * R`` on every regularized weight; call after
        ``optimizer.step()``. ``lr`` defaults to each weight's lr in the optimizer."""
        for w, lr_w in zip(self.weights, lr_of(self.weights, lr, self.optimizer)):
            if lr_w * self.lam:
                check_rows_sharded(w, "ProxSparse")
                piece = local(w)  # whole rows on each rank, so whole groups of 4
                piece.copy_(_from_groups(prox_24(_to_groups(piece.detach()), lr_w * self.lam), piece))

    def attach(self, optimizer: torch.optim.Optimizer | None = None):
        """Run ``prox_()`` after every ``optimizer.step()``; returns the hook handle.

        Example:
            >>> w = nn.Linear(4, 2); opt = torch.optim.SGD(w.parameters(), lr=0.1)
            >>> handle = ProxSparse(w, lam=1.0).attach(opt)
        """
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is None:
            raise SpecError("ProxSparse.attach: pass the optimizer whose steps the prox follows")
        self.optimizer = optimizer
        warn_on_weight_decay(self.weights, optimizer, "ProxSparse")
        return optimizer.register_step_post_hook(lambda *_: self.prox_())

    def penalty(self) -> torch.Tensor:
        """``lam * sum R(w)`` over every group (for logging: the step uses the prox).

        Example:
            >>> lin = nn.Linear(4, 1, bias=False); _ = lin.weight.data.fill_(2.0)
            >>> ProxSparse(lin, lam=0.5).penalty()
            tensor(16.)
        """
        with torch.no_grad():
            total = total_over([w.detach() for w in self.weights],
                               lambda w: group_objective(_to_groups(w), _to_groups(w), 1.0).sum())
        return self.lam * total

    def two_sparse_fraction(self) -> float:
        """Fraction of groups of 4 with at most 2 non-zeros: 1.0 once R is 0 everywhere."""
        with torch.no_grad():
            weights = [w.detach() for w in self.weights]
            sparse = total_over(weights, lambda w: ((_to_groups(w) != 0).sum(-1) <= 2).sum())
            return float(sparse) / sum(w.numel() // M for w in weights)

    def masks(self) -> dict[str, torch.Tensor]:
        """The final 2:4 mask of each layer: the top 2 of every 4 learned weights."""
        return {name: nm_mask(full(m.weight.detach()), 2, M) for name, m in self.layers.items()}

    def apply_masks(self, weights: str = "original") -> NMResult:
        """Register the final masks on the model (``finalize`` bakes them), IN PLACE.

        ``weights="original"``: the masks are applied to the weights as they were when
        ProxSparse was built (the paper: the mask is what is learned); ``"trained"``: to
        the weights as trained.
        """
        if weights not in ("original", "trained"):
            raise SpecError(f"apply_masks: weights must be 'original' or 'trained', got {weights!r}")
        check_unsharded(self.model, "ProxSparse.apply_masks", fix="masks() is whole on every rank: "
                        + AFTER_TRAINING + " with those masks")
        if weights == "original" and self.original is None:
            raise SpecError("apply_masks(weights='original') needs ProxSparse(..., keep_original=True); "
                            "or apply them to the trained weights: apply_masks(weights='trained')")
        masks = self.masks()
        if weights == "original":
            with torch.no_grad():
                for name, module in self.layers.items():
                    module.weight.copy_(self.original[name])
        by_module = {id(m): masks[n] for n, m in self.layers.items()}
        skip = [n for n in self.skipped] + [n for n, m in self.model.named_modules()
                                            if input_dim_of(m) is not None and id(m) not in by_module]
        result = apply_nm(self.model, 2, M, ignore=skip)  # the pass registers magnitude masks ...
        for name, module in self.layers.items():  # ... which take the learned ones instead
            holder = next(p for p in module.parametrizations["weight"] if isinstance(p, NMMask))
            holder.mask.copy_(by_module[id(module)])
        result.rows = [replace(r, density=density(self.model.get_submodule(r.name).weight.detach()))
                       if r.status == "masked" else r for r in result.rows]
        return result


__all__ = ["ProxSparse", "prox_24", "group_objective"]
