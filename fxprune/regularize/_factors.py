"""The parametrization modules behind ``factorize`` (see ``dwf.py``).

``ElementwiseFactors``: ``w = u_1 * ... * u_D`` with a balanced right inverse.
``ChannelScaling``: ``w = v * s[channel]``, ``s`` the product of the shared
``ChannelScales`` factors; entries outside every channel are left as they are.
"""

from __future__ import annotations

import functools

import torch


class ElementwiseFactors(torch.nn.Module):
    """Parametrization ``w = u_1 * ... * u_D`` (element-wise) with a balanced inverse.

    Example:
        >>> from torch.nn.utils import parametrize
        >>> lin = torch.nn.Linear(4, 2)
        >>> parametrize.register_parametrization(lin, "weight", ElementwiseFactors(3))
        ...                                      # doctest: +ELLIPSIS
        ParametrizedLinear(...)
    """

    def __init__(self, depth: int, min_magnitude: float = 1e-3):
        super().__init__()
        self.depth = depth
        self.min_magnitude = min_magnitude

    def forward(self, *factors: torch.Tensor) -> torch.Tensor:
        return functools.reduce(torch.mul, factors)

    def right_inverse(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        others = w.abs().pow(1.0 / self.depth).clamp_min(self.min_magnitude)
        first = w / others.pow(self.depth - 1)
        return (first,) + tuple(others.clone() for _ in range(self.depth - 1))


class ChannelScales(torch.nn.Module):
    """The D-1 per-channel scalar factors shared by all the slices of each channel.

    Example:
        >>> ChannelScales(torch.tensor([2.0, 3.0]), count=2)()
        tensor([4., 9.], grad_fn=<MulBackward0>)
    """

    def __init__(self, init: torch.Tensor, count: int):
        super().__init__()
        self.factors = torch.nn.ParameterList(
            [torch.nn.Parameter(init.clone()) for _ in range(count)])

    def forward(self) -> torch.Tensor:
        return functools.reduce(torch.mul, list(self.factors))


class ChannelScaling(torch.nn.Module):
    """Parametrization ``w = v * s[channel]`` for the channel slices of one parameter.

    ``slices`` holds ``(dim, index, channel)``: positions ``index`` along ``dim``
    belong to channels ``channel``.

    Example:
        >>> scales = ChannelScales(torch.tensor([2.0]), count=1)
        >>> scaling = ChannelScaling(scales, [(0, torch.tensor([1]), torch.tensor([0]))])
        >>> scaling(torch.ones(2, 2)).detach()
        tensor([[1., 1.],
                [2., 2.]])
    """

    def __init__(self, scales: ChannelScales, slices: list[tuple[int, torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.scales = scales
        self.dims = [dim for dim, _, _ in slices]
        for i, (_, index, channel) in enumerate(slices):
            self.register_buffer(f"index{i}", index, persistent=False)
            self.register_buffer(f"channel{i}", channel, persistent=False)

    def scale_like(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scales()
        out = torch.ones((), dtype=w.dtype, device=w.device)
        for i, dim in enumerate(self.dims):
            index, channel = getattr(self, f"index{i}"), getattr(self, f"channel{i}")
            vec = torch.ones(w.shape[dim], dtype=w.dtype, device=w.device)
            vec = vec.index_copy(0, index, s[channel].to(w.dtype))
            shape = [1] * w.dim()
            shape[dim] = -1
            out = out * vec.view(shape)
        return out

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.scale_like(v)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            s = self.scale_like(w).expand_as(w)
            return torch.where(s != 0, w / torch.where(s != 0, s, torch.ones_like(s)), w)
