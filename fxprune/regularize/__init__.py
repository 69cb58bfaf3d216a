"""Training-time sparsity regularisers, applied around any ``torch.optim`` optimizer.

* ``GroupLasso``: channel group lasso, ``penalty()`` or proximal ``prox_()``;
* ``LpDecay``: decoupled Lp weight decay for any p > 0 (element-wise or per channel);
* ``factorize`` / ``collapse``: deep weight factorization (L2 on D factors = L_{2/D});
* ``BNScaleL1``: network slimming, L1 on BatchNorm scales;
* ``ProxSparse``: 2:4 masks learned by the proximal step of ``sum |w_i w_j w_k|`` on
  every group of 4 inputs (Liu et al. 2025);
* ``Spartan``: N:M masks learned through a Sinkhorn soft top-k, hard in the forward
  pass, soft in the gradients, on an annealed schedule (Tai et al. 2022);
* ``SRigL``: dynamic sparse training with constant fan-in, drop/regrow and neuron
  ablation (Lasby et al. 2024);
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
from fxprune.regularize.proxsparse import ProxSparse
from fxprune.regularize.spartan import Spartan
from fxprune.regularize.srigl import SRigL
from fxprune.regularize.targeted import TargetedGroupLasso

__all__ = [
    "BNScaleL1",
    "ChannelSlices",
    "ChannelTable",
    "DeepFactorization",
    "GroupLasso",
    "LpDecay",
    "ParamSlice",
    "ProxSparse",
    "SRigL",
    "Spartan",
    "TargetedGroupLasso",
    "branch_slices_from_graph",
    "channel_slices_from_graph",
    "collapse",
    "factorize",
    "lp_decay_params",
]
