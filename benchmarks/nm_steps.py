"""How far a longer distillation takes all-MiniLM-L6-v2 with 2:4 masks: fidelity along the way.

``nm_quality.py`` distils every method for the same 120 steps. This follows the best one-shot
model there, SparseGPT 2:4 on every encoder Linear, through a longer run, for a few recipes
(``--runs``), and measures it every ``--every`` steps:

* ``cosine``, ``spearman``: fidelity on the held-out ``minilm_eval.txt`` (as nm_quality.py);
* ``train_cosine``: the mean cosine on the training sentences themselves (the first
  ``TRAIN_PROBE`` of them, in training order: all of them take as long as the training); its gap to
  ``cosine`` says how much of what the distillation learns is those sentences (at step 0,
  before any training, the two agree).

A run is ``mask:lr:augment[:sentences]``: ``fixed`` (SparseGPT's mask, weights distilled),
``spartan`` or ``sr-ste`` (a mask learned from SparseGPT's, as nm_quality.py's ``*-sparsegpt``
rows), the AdamW lr, the share of tokens ``Corrupt`` replaces each step (0: the sentences as
they are) and, optionally, how many of the training sentences (``--train-text``) it trains
on (a seeded sample; default all): runs that differ only there show how held-out fidelity
grows with the amount of training text. The schedule (warm-up, cosine decay) spans all
``--steps``, so a row at step s is a model still mid-schedule, not what a run of s steps
would give.

    python benchmarks/nm_steps.py --jobs 2 --json        # the committed run (1,000 steps, 2 runs)
    python benchmarks/nm_steps.py --runs fixed:3e-4:0,fixed:3e-4:0.15 --steps 400 --every 100 --jobs 2 \
        --json benchmarks/results/nm_steps_text.json     # augmentation on the full text
    python benchmarks/nm_steps.py --train-text train --runs fixed:3e-4:0:330,fixed:3e-4:0:660 --steps 400 \
        --every 100 --jobs 2 --json benchmarks/results/nm_steps_data.json   # fewer sentences
    python benchmarks/nm_steps.py --steps 20 --every 10 --runs fixed:3e-4:0.15 --eval-sentences 64   # smoke
"""
from __future__ import annotations

import argparse
import copy
import random
import sys
import time

import torch

import minilm
import nm_quality as nq
from _results import add_json_option, header, write
from _tables import nm_steps as table
from _tables import show

from fxprune.regularize.spartan import Spartan
from fxprune.sparsity.masks import finalize
from fxprune.sparsity.nm import apply_nm

RUNS = ("fixed:3e-4:0", "spartan:3e-4:0")
MASKS = ("fixed", "spartan", "sr-ste")
STEPS, EVERY = 1000, 250
TRAIN_PROBE = 40 * minilm.BATCH  # training sentences train_cosine is measured on

_RUN: dict = {}  # set by main before the jobs fork


def parse_run(text: str) -> tuple[str, float, float, int | None]:
    """``"mask:lr:augment[:sentences]"`` -> (mask, lr, augment, sentences or None for all).

    Example:
        >>> parse_run("fixed:3e-4:0.15")
        ('fixed', 0.0003, 0.15, None)
        >>> parse_run("fixed:3e-4:0:330")
        ('fixed', 0.0003, 0.0, 330)
    """
    parts = text.split(":")
    try:
        mask, lr, augment = parts[0], float(parts[1]), float(parts[2])
        sentences = int(parts[3]) if len(parts) == 4 else None
    except (IndexError, ValueError):
        raise SystemExit(f"--runs: {text!r} is not mask:lr:augment[:sentences] (e.g. fixed:3e-4:0.15)") from None
    if len(parts) > 4 or mask not in MASKS or lr <= 0 or not 0 <= augment < 1 or (sentences is not None
                                                                                 and sentences < minilm.BATCH):
        raise SystemExit(f"--runs: {text!r}: mask one of {', '.join(MASKS)}, lr > 0, augment in [0, 1), "
                         f"sentences >= {minilm.BATCH}")
    return mask, lr, augment, sentences


def training_set(sentences: int | None) -> tuple[list[dict], list[tuple], int]:
    """The batches, teacher targets and sentence count a run trains on: all the training
    sentences, or a seeded sample of ``sentences`` of them (the same sample for every run of that size)."""
    run = _RUN
    everything = run["train_sentences"]
    if sentences is None or sentences >= len(everything):
        return run["batches"]["train"], run["targets"], len(everything)
    chosen = sorted(random.Random(0).sample(range(len(everything)), sentences))
    batches = minilm.make_batches(run["tokenizer"], [everything[i] for i in chosen], run["length"])
    return batches, nq.teacher_states(run["encoder"], batches), sentences


def run_job(spec: str) -> list[dict]:
    """One recipe from SparseGPT's model: train, measuring every ``every`` steps."""
    run = _RUN
    args = run["args"]
    torch.set_num_threads(args.threads)
    mask, lr, augment, sentences = parse_run(spec)
    batches = run["batches"]
    train_batches, targets, n_train = training_set(sentences)
    model = copy.deepcopy(run["start"]["masked" if mask == "fixed" else "baked"]).eval()
    schedule = None
    if mask == "spartan":
        schedule = Spartan(model, 2, 4, total_steps=args.steps, ignore=nq.IGNORE)
    elif mask == "sr-ste":
        apply_nm(model, 2, 4, ignore=nq.IGNORE, sr_ste=True, sr_ste_decay=nq.SR_STE_DECAY)
    corrupt = nq.Corrupt(run["encoder"], augment, run["vocab_size"], run["special_ids"]) if augment else None
    probe = min(n_train, TRAIN_PROBE)
    probe_batches = train_batches[:-(-probe // minilm.BATCH)]
    dense_probe = minilm.embed(run["encoder"], probe_batches, probe)
    rows, step, t0 = [], [0], time.perf_counter()

    def after_step():
        if schedule is not None:
            schedule.step()
        step[0] += 1
        if step[0] % args.every and step[0] != args.steps:
            return
        measure()

    def measure():
        baked = copy.deepcopy(model)
        finalize(baked)  # the masks as they stand (Spartan's hard top-k)
        cosine, spearman = minilm.similarity_metrics(minilm.embed(baked, batches["eval"], run["n_eval"]),
                                                     run["dense_eval"])
        train_cosine, _ = minilm.similarity_metrics(minilm.embed(baked, probe_batches, probe), dense_probe)
        rows.append({"run": spec, "mask": mask, "lr": lr, "augment": augment, "sentences": n_train, "step": step[0],
                     "cosine": round(cosine, 4), "spearman": round(spearman, 4),
                     "train_cosine": round(train_cosine, 4), "seconds": round(time.perf_counter() - t0)})
        print(f"{spec} step {step[0]}: cosine {rows[-1]['cosine']} (train {rows[-1]['train_cosine']})",
              file=sys.stderr, flush=True)

    measure()  # step 0: SparseGPT's one-shot model (the learned masks' too: they start as its mask)
    nq.train(model, train_batches, targets, n_train, args.steps, lr, after_step=after_step,
             corrupt=corrupt)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma list of mask:lr:augment (default {','.join(RUNS)})")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps per run (default {STEPS})")
    parser.add_argument("--every", type=int, default=EVERY, help=f"measure every N steps (default {EVERY})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in this many processes")
    parser.add_argument("--eval-sentences", type=int, help="measure on the first N held-out sentences")
    parser.add_argument("--stand-in", action="store_true", help="random-init BERT of MiniLM's shape (see nm_quality.py)")
    nq.add_train_text_option(parser)
    add_json_option(parser, "nm_steps")
    args = parser.parse_args(argv)
    runs = args.runs.split(",")
    for spec in runs:
        parse_run(spec)
    if args.steps < 1 or args.every < 1:
        parser.error("--steps and --every must be >= 1")
    # the shared set-up (SparseGPT, the teacher's targets) runs on every core; each run on --threads

    tokenizer, encoder, model_name, text, length, batches = nq.load(minilm.DATA, args.stand_in, args.eval_sentences,
                                                                      args.train_text)
    n_eval = len(text["eval"])
    masked = nq.one_shot(encoder, "2:4", "sparsegpt", [dict(b) for b in batches["calib"]])
    baked = copy.deepcopy(masked)
    finalize(baked)  # its zeros as weights: a learned mask starts on them (nm_quality.py's *-sparsegpt rows)
    _RUN.update(args=args, encoder=encoder, start={"masked": masked, "baked": baked}, batches=batches,
                n_eval=n_eval, train_sentences=text["train"], tokenizer=tokenizer, length=length,
                targets=nq.teacher_states(encoder, batches["train"]),
                dense_eval=minilm.embed(encoder, batches["eval"], n_eval),
                vocab_size=tokenizer.vocab_size, special_ids=tokenizer.all_special_ids)
    if args.jobs > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(args.jobs) as pool:
            parts = pool.map(run_job, runs, chunksize=1)
    else:
        parts = [run_job(spec) for spec in runs]
    rows = [row for part in parts for row in part]
    show(table(rows))
    if args.json:
        write(args.json, rows, header(args, threads=args.threads, batch=minilm.BATCH, length=length,
                                      model=model_name,
                                      distillation=nq.RECIPE, sentences={k: len(v) for k, v in text.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
