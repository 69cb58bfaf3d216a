"""Sparsity that keeps shapes: weight masks on ``nn.Module`` layers and their kernels.

- ``masks``: the masking mechanism (``torch.nn.utils.parametrize``) shared by the others.
- ``nm``: N:M fine-grained structured sparsity (fixed masks or SR-STE) and ``finalize``.
- ``calibrated``: N:M masks chosen on calibration inputs, layer after layer, by
  ``wanda`` (``|W| * ||X||``) or ``sparsegpt`` (inverse Hessian, error compensation).
- ``block``: block sparsity.
- ``semi_structured``: 2:4 weights onto the CUDA sparse kernels (``to_semi_structured``).
- ``report``: the report's per-layer sparsity rows.

Structured pruning, which removes channels, is ``fxprune.passes.prune``.
"""
