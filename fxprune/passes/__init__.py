"""Graph rewrites on a traced ``torch.fx.GraphModule``.

- ``prune``: remove a plan's channels from every tensor and op they live in.
- ``verify``: the zero-invariance oracle that checks a plan before it is trusted.
- ``fuse``: fold BatchNorms into the convolutions and linears before them.
- ``gates``: insert L0 hard-concrete gates (``L0Gate``) into a graph, and fold them out.

What to prune is decided in ``fxprune.select``; weight masks that keep shapes
(N:M, blocks) live in ``fxprune.sparsity``.
"""
