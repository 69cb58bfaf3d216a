"""Training-time sparsity regularisers, applied around any ``torch.optim`` optimizer.

* ``GroupLasso``: channel group lasso, ``penalty()`` or proximal ``prox_()``;
* ``LpDecay``: decoupled Lp weight decay for any p > 0 (element-wise or per channel);
* ``factorize`` / ``collapse``: deep weight factorization (L2 on D factors = L_{2/D});
* ``BNScaleL1``: network slimming, L1 on BatchNorm scales;
* ``TargetedGroupLasso``: proximal group lasso on just the channels a compress spec's
  budget removes, growing until they are zero (pruning them is then lossless).

Channels are ``ChannelSlices`` (the parameter slices one channel owns), built by hand
or from an analysis with ``channel_slices_from_graph(model, graph)``; residual branches
are groups too (``branch_slices_from_graph``: every weight of a block, for depth-wise
sparsity), and ``GroupLasso`` takes either.

Example:
    >>> import torch
    >>> from fxprune.regularize import ChannelSlices, GroupLasso
    >>> lin = torch.nn.Linear(4, 3)
    >>> chans = [ChannelSlices([(lin.weight, 0, [c]), (lin.bias, 0, [c])]) for c in range(3)]
    >>> lasso = GroupLasso(chans, lam=1e-3)
"""

from fxprune.regularize.bn_l1 import BNScaleL1
from fxprune.regularize.branches import branch_slices_from_graph
from fxprune.regularize.channels import (
    ChannelSlices,
    ChannelTable,
    ParamSlice,
    channel_slices_from_graph,
)
from fxprune.regularize.dwf import DeepFactorization, collapse, factorize
from fxprune.regularize.group_lasso import GroupLasso
from fxprune.regularize.lp_decay import LpDecay, lp_decay_params
from fxprune.regularize.targeted import TargetedGroupLasso

__all__ = [
    "BNScaleL1",
    "ChannelSlices",
    "ChannelTable",
    "DeepFactorization",
    "GroupLasso",
    "LpDecay",
    "ParamSlice",
    "TargetedGroupLasso",
    "branch_slices_from_graph",
    "channel_slices_from_graph",
    "collapse",
    "factorize",
    "lp_decay_params",
]
