"""fxprune: structured pruning for PyTorch as a torch.fx compiler."""
