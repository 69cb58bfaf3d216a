"""benchmarks/minilm.py's measuring parts, on random embeddings and a tiny random BERT (no weights
package needed): the similarity metrics, and Torch-Pruning's recipe landing on a parameter count."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import _minilm_tp  # noqa: E402
import minilm  # noqa: E402


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_similarity_metrics_read_the_geometry_not_the_coordinates():
    gen = torch.Generator().manual_seed(0)
    dense = _unit(torch.randn(40, 16, generator=gen))
    assert minilm.similarity_metrics(dense, dense) == pytest.approx((1.0, 1.0))
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen))
    cosine, spearman = minilm.similarity_metrics(dense @ rotation, dense)
    assert cosine < 0.5 and spearman == pytest.approx(1.0)  # a rotation keeps every pairwise cosine
    noisy = _unit(dense + 0.5 * torch.randn(40, 16, generator=gen))
    cosine, spearman = minilm.similarity_metrics(noisy, dense)
    scipy_stats = pytest.importorskip("scipy.stats")
    rows, cols = np.triu_indices(40, k=1)
    expected = scipy_stats.spearmanr((noisy @ noisy.T).numpy()[rows, cols], (dense @ dense.T).numpy()[rows, cols])
    assert spearman == pytest.approx(expected.statistic, abs=1e-9) and 0.05 < spearman < 0.99
    assert cosine == pytest.approx(float((noisy * dense).sum(-1).mean()))


def test_torch_pruning_recipe_lands_on_encoder_params_and_keeps_the_hidden_size():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch_pruning")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    encoder = minilm.SentenceEncoder(transformers.BertModel(config)).eval()
    inputs = {"input_ids": torch.randint(1, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    dense = minilm.encoder_params(encoder)
    target = round(0.6 * dense)
    small, ratios = _minilm_tp.land(encoder, inputs, "magnitude", False, target, minilm.encoder_params, None)
    assert abs(minilm.encoder_params(small) - target) <= _minilm_tp.TOLERANCE * target
    assert minilm.encoder_params(encoder) == dense  # the original is untouched
    attention = small.bert.encoder.layer[0].attention.self
    assert attention.num_attention_heads < 4 and attention.all_head_size == attention.query.out_features
    assert small(**inputs)[0].shape == (4, 32) and ratios["tp_prunes"] >= 1
