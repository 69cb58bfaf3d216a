"""benchmarks/nm_quality.py's distillation on a tiny random BERT (no weights package needed):
the layer-wise loss, and a fixed-mask distillation that keeps its masks, trains only the
encoder and brings the layers closer to the dense teacher."""
import copy
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import minilm  # noqa: E402
import nm_quality  # noqa: E402

from fxprune.sparsity.nm import apply_nm, check_nm  # noqa: E402


@pytest.fixture
def tiny():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16, initializer_range=0.1)
    torch.manual_seed(0)
    encoder = minilm.SentenceEncoder(transformers.BertModel(config)).eval()
    mask = torch.ones(8, 8, dtype=torch.long)
    mask[:, 6:] = 0  # padding the losses must leave out
    batches = [{"input_ids": torch.randint(1, 64, (8, 8)), "attention_mask": mask} for _ in range(2)]
    return encoder, batches


def test_states_are_the_forward_embedding_and_every_layer(tiny):
    encoder, batches = tiny
    emb, hiddens = encoder.states(**batches[0])
    forward_emb, last = encoder(**batches[0])
    assert len(hiddens) == 2 and torch.equal(hiddens[-1], last) and torch.allclose(emb, forward_emb)


def test_layer_loss_is_zero_on_the_teacher_and_ignores_padding(tiny):
    encoder, batches = tiny
    target = nm_quality.teacher_states(encoder, batches)[0]
    assert float(nm_quality.layer_loss(target, target, batches[0]["attention_mask"], 8)) == 0.0
    emb, hiddens = target
    moved = [h.clone() for h in hiddens]
    moved[0][:, 6:] += 5.0  # only padding moves
    assert float(nm_quality.layer_loss((emb, moved), target, batches[0]["attention_mask"], 8)) == 0.0
    moved[0][0, 0, 0] += 1.0  # one entry of a real token of the first layer: half the relative error of that layer
    tokens = batches[0]["attention_mask"].unsqueeze(-1).float()
    expected = 1.0 / float(((hiddens[0] ** 2) * tokens).sum()) / 2
    loss = nm_quality.layer_loss((emb, moved), target, batches[0]["attention_mask"], 8)
    assert float(loss) == pytest.approx(expected)


def test_fixed_mask_distillation_keeps_masks_trains_the_encoder_only_and_gets_closer(tiny):
    encoder, batches = tiny
    targets = nm_quality.teacher_states(encoder, batches)
    masked = copy.deepcopy(encoder)
    apply_nm(masked, 2, 4, ignore=nm_quality.IGNORE)

    def loss(model):
        with torch.no_grad():
            return sum(float(nm_quality.layer_loss(model.states(**b), t, b["attention_mask"], 8))
                       for b, t in zip(batches, targets))

    trained = nm_quality.distill(masked, batches, targets, 16, steps=20, lr=1e-2)
    assert loss(trained) < 0.7 * loss(masked)
    assert all(check_nm(m.weight, 2, 4) for n, m in trained.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("bert.encoder."))
    assert torch.equal(trained.bert.embeddings.word_embeddings.weight, encoder.bert.embeddings.word_embeddings.weight)
    assert not trained.bert.embeddings.word_embeddings.weight.requires_grad  # no gradient computed for it
    # the schedule warms up over the first 10% of the steps and decays to 0 by the last
    opt = nm_quality.train(copy.deepcopy(masked), batches, targets, 16, steps=10, lr=1e-2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_corrupt_replaces_real_tokens_only_and_targets_the_teacher_on_them(tiny):
    encoder, batches = tiny
    special = [0, 1]  # as a tokenizer's all_special_ids: never drawn, never replaced
    batch = {**batches[0], "input_ids": batches[0]["input_ids"].clone()}
    batch["input_ids"][:, 0] = 1
    original = batch["input_ids"].clone()
    corrupt = nm_quality.Corrupt(encoder, 0.5, 64, special, seed=0)
    fresh, target = corrupt(batch)
    assert torch.equal(batch["input_ids"], original)  # the stored batch is left as it was
    changed = fresh["input_ids"] != original
    assert changed.any() and not changed[:, 0].any() and not changed[:, 6:].any()  # special, padding
    assert 0.2 < float(changed[:, 1:6].float().mean()) < 0.6  # about half, minus draws of the same token
    assert not torch.isin(fresh["input_ids"][changed], torch.tensor(special)).any()
    emb, hiddens = encoder.states(**fresh)
    assert torch.equal(target[0], emb) and all(torch.equal(a, b) for a, b in zip(target[1], hiddens))
    again, _ = corrupt(batch)  # a fresh corruption each call
    assert not torch.equal(again["input_ids"], fresh["input_ids"])
    # the training loop distils towards it: the masked model moves towards the teacher on new inputs
    masked = copy.deepcopy(encoder)
    apply_nm(masked, 2, 4, ignore=nm_quality.IGNORE)
    targets = nm_quality.teacher_states(encoder, batches)
    trained = nm_quality.distill(masked, batches, targets, 16, steps=20, lr=1e-2, corrupt=corrupt)
    with torch.no_grad():
        def loss(model):
            return sum(float(nm_quality.layer_loss(model.states(**b), t, b["attention_mask"], 8))
                       for b, t in zip(batches, targets))
        assert loss(trained) < 0.8 * loss(masked)


def test_nm_steps_reads_its_runs():
    import nm_steps
    assert nm_steps.parse_run("sr-ste:1e-3:0") == ("sr-ste", 1e-3, 0.0, None)
    assert nm_steps.parse_run("fixed:3e-4:0:330") == ("fixed", 3e-4, 0.0, 330)
    for bad in ("fixed:3e-4", "magnitude:3e-4:0", "fixed:-1:0", "fixed:3e-4:1.5", "fixed:x:0", "fixed:3e-4:0:8",
                "fixed:3e-4:0:x", "fixed:3e-4:0:330:1"):
        with pytest.raises(SystemExit, match="--runs"):
            nm_steps.parse_run(bad)


def test_distillation_text_options_and_the_written_sentences_stay_apart_from_the_held_out_ones():
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks" / "data"))
    import make_minilm_extra

    parser = argparse.ArgumentParser()
    nm_quality.add_train_text_option(parser)
    assert parser.parse_args([]).train_text == ("train", "extra")
    assert parser.parse_args(["--train-text", "train"]).train_text == ("train",)
    with pytest.raises(SystemExit):
        parser.parse_args(["--train-text", "train,eval"])  # held-out text never trains
    assert make_minilm_extra.clean(["A  cat.", "a cat.", "", "The dog.", "A bird."], {"the dog."}) == \
        ["A cat.", "A bird."]
    # the committed files: no extra line repeats another split's, none repeats itself
    split = {name: minilm.read_sentences(minilm.DATA, name) for name in ("eval", "calib", "train", "extra")}
    folded = {name: [s.casefold() for s in lines] for name, lines in split.items()}
    assert len(set(folded["extra"])) == len(folded["extra"]) > 10_000
    assert not set(folded["extra"]) & (set(folded["eval"]) | set(folded["calib"]) | set(folded["train"]))


def test_a_data_folder_without_the_extra_text_names_the_file_and_the_way_out(tmp_path):
    for name in ("eval", "calib", "train"):
        (tmp_path / f"minilm_{name}.txt").write_text("One sentence.\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"minilm_extra\.txt is missing.*--train-text train"):
        minilm.read_sentences(tmp_path, "extra")
    assert minilm.read_sentences(tmp_path, "train") == ["One sentence."]
