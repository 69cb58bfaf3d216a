"""capture="auto" falls back to torch.export when the fx graph traces but cannot run,
and an error blames the example inputs only when the model itself fails on them."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from helpers import prune_and_check, randomize


@torch.fx.wrap
def remember(seen: list, t):
    """Appends to a list argument: fine eagerly, impossible in an fx graph (its args are immutable)."""
    seen.append(t.shape)
    return t


class ListMutating(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        seen = []
        return self.b(torch.relu(self.a(remember(seen, x))))


def test_auto_falls_back_to_export_when_the_fx_graph_cannot_run():
    graph, _, error = prune_and_check(randomize(ListMutating()), torch.randn(3, 4))
    assert graph.capture == "export" and error < 1e-5


def test_forcing_fx_names_the_graph_not_the_inputs():
    with pytest.raises(fxprune.TraceError, match=r"torch.fx graph of ListMutating cannot run on the example "
                                                 r"inputs although the model does: node 'remember'") as info:
        fxprune.analyze(ListMutating(), torch.randn(3, 4), capture="fx")
    assert 'capture="export"' in str(info.value) and "do not fit" not in str(info.value)


@pytest.mark.parametrize("capture", ["auto", "fx"])
def test_inputs_the_model_rejects_are_blamed_with_the_models_own_error(capture):
    with pytest.raises(fxprune.AnalysisError, match=r"example inputs \(3, 5\) do not fit the model: node .*; "
                                                    r"calling ListMutating itself raises RuntimeError: mat1 and mat2"):
        fxprune.analyze(ListMutating(), torch.randn(3, 5), capture=capture)
