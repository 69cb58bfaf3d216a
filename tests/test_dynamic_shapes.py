"""Dynamic batch and sequence dims under torch.export (fxprune/capture/dynamic.py).

An exported graph takes the batch sizes and lengths the model takes: calibration batches
padded each to its own length are accepted, a pruned graph runs at another length and
equals the masked original there, and scores of sentences padded to their own lengths
equal those of the same sentences padded to one length. A model export cannot keep
dynamic is captured with static shapes, and says so.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.capture.dynamic import dynamic_dims
from fxprune.errors import SpecError
from fxprune.passes.verify import zeroed_copy
from fxprune.select.calibration import as_calibration, graph_batches
from fxprune.select.score import score_groups
from helpers import half_plan

pytest.importorskip("transformers")
from hf_models import tiny_models  # noqa: E402

pytestmark = pytest.mark.dynamic_shapes  # fxprune's default capture (tests/conftest.py)

MODELS = tiny_models()
PAD = 0
SENTENCE_LENGTHS = ([3, 7, 5], [8, 4, 6])  # two batches of three sentences


def _tokens(batch: int, length: int, seed: int, real: list[int] | None = None) -> dict:
    """``input_ids`` and ``attention_mask`` of ``batch`` sentences padded to ``length``;
    ``real`` gives each sentence's own length (default: all of it)."""
    ids = torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(real or []):
        ids[row, n:], mask[row, n:] = PAD, 0
    return {"input_ids": ids, "attention_mask": mask}


def _sentences(seed: int, lengths: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 100, (n,), generator=g) for n in lengths]


def _padded(sentences: list[torch.Tensor], length: int | None = None, mask: bool = True) -> dict:
    """The sentences padded to ``length`` (default: the longest), with the attention mask
    marking the padding (``mask=False``: every position marked real)."""
    length = length or max(len(s) for s in sentences)
    ids = torch.full((len(sentences), length), PAD, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, s in enumerate(sentences):
        ids[row, :len(s)], attention[row, :len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": attention if mask else torch.ones_like(ids)}


def _last_hidden(output) -> torch.Tensor:
    return output["last_hidden_state"] if "last_hidden_state" in output else output["logits"]


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_an_exported_graph_and_its_pruned_graph_take_other_batch_sizes_and_lengths(name):
    model, inputs, _ = MODELS[name]
    graph = fxprune.analyze(model, inputs, capture="export")
    assert {k: sorted(v) for k, v in dynamic_dims(graph.gm).items()} == {k: [0, 1] for k in inputs}
    assert graph.capture_notes == [f"dynamic dims (any size): {', '.join(f'{k}[0, 1]' for k in inputs)}"]
    # calibration batches of other (batch, length) pass the check and feed the scores
    batches = [_tokens(3, 5, 1), _tokens(1, 13, 2), _tokens(4, 9, 3)]
    batches = [{k: v for k, v in b.items() if k in inputs} for b in batches]
    checked = list(graph_batches(graph, as_calibration(batches, graph.model_inputs)))
    assert [b.kwargs["input_ids"].shape for b in checked] == [(3, 5), (1, 13), (4, 9)]
    assert score_groups(graph, "activation", calibration=batches)
    # the pruned graph at another length equals the original with the plan zeroed there
    plan = half_plan(graph, [g for g in graph.prunable_groups if g.zero_invariant])
    assert plan
    small = fxprune.prune(graph, plan)
    other = _tokens(3, 13, 4, real=[13, 9, 4] if "attention_mask" in inputs else None)
    other = {k: v for k, v in other.items() if k in inputs}
    with torch.no_grad():
        want = _last_hidden(zeroed_copy(model, graph, plan).eval()(**other))
        got = _last_hidden(small(**other))
        untouched = _last_hidden(model(**other))
    assert got.shape == untouched.shape == (3, 13, untouched.shape[-1])
    scale = want.abs().max()
    assert (got - want).abs().max() / scale < 1e-5
    assert (untouched - want).abs().max() / scale > 1e-3  # the plan changes the output: a real check


@pytest.mark.parametrize("score", ["activation", "taylor"])
def test_scores_of_sentences_padded_to_their_own_lengths_equal_those_padded_to_one_length(score):
    model, inputs, _ = MODELS["bert"]
    graph = fxprune.analyze(model, inputs, capture="export")
    sentences = [_sentences(seed, lengths) for seed, lengths in enumerate(SENTENCE_LENGTHS)]
    own = [_padded(batch) for batch in sentences]  # lengths 7 and 8
    one = [_padded(batch, 12) for batch in sentences]
    assert [b["input_ids"].shape[1] for b in own] == [7, 8]
    by_own, by_one = score_groups(graph, score, calibration=own), score_groups(graph, score, calibration=one)
    assert by_own.keys() == by_one.keys() and by_own
    for gid in by_own:
        np.testing.assert_allclose(by_own[gid], by_one[gid], rtol=1e-4, atol=1e-6 * by_one[gid].max())
    # without the mask the padding counts, and the scores move: the comparison above can fail
    unmasked = score_groups(graph, score, calibration=[_padded(b, 12, mask=False) for b in sentences])
    assert any(not np.allclose(unmasked[gid], by_one[gid], rtol=1e-3) for gid in by_one)


def test_calibration_refuses_dims_the_graph_takes_equal_with_different_sizes():
    model, inputs, _ = MODELS["bert"]
    graph = fxprune.analyze(model, inputs, capture="export")
    ragged = {"input_ids": torch.randint(1, 100, (2, 12)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.raises(SpecError, match=r"spec\.calibration\[1\]: shapes input_ids=\(2, 12\), attention_mask="
                                        r"\(2, 8\) do not fit .*attention_mask dim 1 is 8 but input_ids dim 1 "
                                        r"is 12; the graph takes them equal"):
        score_groups(graph, "activation", calibration=[inputs, ragged])


@torch.library.custom_op("fxprune_test::fixed_length_scale", mutates_args=())
def fixed_length_scale(x: torch.Tensor) -> torch.Tensor:
    """Scales x: a kernel whose shape function needs every size known (as some compiled
    extensions' do), so torch.export cannot keep a dim of x dynamic."""
    return x * 2


@fixed_length_scale.register_fake
def _(x):
    if not all(isinstance(size, int) for size in x.shape):
        raise NotImplementedError("fixed_length_scale needs static sizes")
    return torch.empty_like(x)


class FixedLength(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(fixed_length_scale(x))))


def test_a_model_export_cannot_keep_dynamic_is_captured_with_static_shapes_and_a_note():
    model, x = FixedLength().eval(), torch.randn(2, 5, 8)
    graph = fxprune.analyze(model, x, capture="export")
    assert dynamic_dims(graph.gm) == {}
    assert not hasattr(x, "_dynamo_weak_dynamic_indices")  # the failed export marked an alias, not x
    (note,) = graph.capture_notes
    assert note.startswith("static shapes: torch.export could not keep the batch and sequence dims dynamic "
                           "(NotImplementedError: fixed_length_scale needs static sizes)")
    assert [g.size for g in graph.prunable_groups] == [16]  # the analysis is the same as ever
    with pytest.raises(SpecError, match=r"spec\.calibration\[1\]: .*x dim 1 is 6, the graph takes 5 "
                                        r"\(a static dim\); its dims of any size: none, "):
        score_groups(graph, "activation", calibration=[x, torch.randn(2, 6, 8)])
