"""Every sparse-training example runs end to end (one epoch) and prunes what it promises."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from fxprune.measure import count_flops

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the examples pin one thread


@pytest.mark.parametrize("name", ["train_group_lasso", "train_l0", "train_lp_decay", "train_dwf",
                                  "train_bn_l1", "train_targeted"])
def test_example_trains_and_compresses(name, capsys):
    module = importlib.import_module(name)
    common = sys.modules["digits_common"]
    seen = {}
    original = common.compress_and_finetune

    def spy(model, data, score, **kw):
        seen["dense"] = count_flops(model, common.EXAMPLE)
        small = original(model, data, score, epochs=1)
        seen["small"] = count_flops(small, common.EXAMPLE)
        return small

    module.compress_and_finetune = spy
    try:
        module.main(epochs=1)
    finally:
        module.compress_and_finetune = original
    out = capsys.readouterr().out
    assert "epoch 0: test acc" in out and "after 1 fine-tuning epochs" in out
    # the default target is 8x fewer FLOPs, within the promised 2 %
    assert seen["small"] == pytest.approx(seen["dense"] / 8, rel=0.02)


def test_prune_minilm_example_shrinks_a_bert_encoder_and_saves_it(tmp_path):
    """The README's MiniLM recipe, on a tiny random BERT (the real weights are an extra)."""
    pytest.importorskip("transformers")
    import prune_minilm
    from hf_models import tiny_models

    model, inputs, width = tiny_models()["bert"]
    encoder = sum(p.numel() for p in model.encoder.parameters())
    result = prune_minilm.prune_encoder(model, inputs, [inputs, inputs], keep=0.75)
    kept = sum(p.numel() for p in result.model.encoder.parameters()) / encoder
    assert abs(kept - 0.75) < 0.02 and result.model.config.intermediate_size < width
    assert result.model.config.num_attention_heads == model.config.num_attention_heads
    result.model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(prune_minilm.embed(reloaded, inputs), prune_minilm.embed(result.model, inputs))


def test_ssl_depth_example_runs_and_the_pruned_model_matches(capsys):
    """The depth-wise SSL example, one short epoch: the table, and pruned == trained."""
    import train_ssl_depth

    (row,) = train_ssl_depth.main(seeds=1, epochs=1, width=8, blocks=2)
    assert "blocks removed" in capsys.readouterr().out
    assert row["pruned acc %"] == row["SSL acc %"] and row["max |pruned - trained|"] == 0.0
    assert row["dense acc %"] > 15  # above chance (10%) after one epoch
