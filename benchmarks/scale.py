"""Activation scores of a model larger than memory: ``fxprune.score_checkpoint`` on a
Llama-3.2-1B-shaped checkpoint, layer by layer, in one and in two processes.

A checkpoint with random bfloat16 weights (nothing downloaded; ``shards.py``'s writer, 4
shards) goes to a temporary folder (``--dir``, default the system's, never the repository).
Fresh processes then build the model on the meta device in bfloat16 from its config.json,
analyse it (``torch.export``) and score every channel group with ``score="activation"``
on ``--batches`` batches of ``--seq`` random token ids, reading each weight from the
checkpoint when the graph needs it. Per row:

* scores (s)   -- ``score_checkpoint``'s wall time (the slowest rank's with 2 processes);
* tokens/s     -- calibration tokens over that time: the throughput;
* base / peak  -- resident memory before ``score_checkpoint`` and its high-water mark during
                  it (``VmHWM``, reset just before through ``/proc/self/clear_refs``), per
                  process (the larger rank's with 2);
* added        -- peak minus base, against the checkpoint's size (goal: at most 25%);
* allocator    -- glibc's default, and a last row with a fixed mmap threshold
                  (``MALLOC_MMAP_THRESHOLD_``): the default keeps freed weights resident;
* equal        -- on ``--equal-model`` (default: two layers of the 1B shape, which loads
                  whole in about 1.3 GB): the largest difference between these scores and
                  ``score_groups(graph, "activation")`` on the model loaded with
                  ``from_pretrained`` in bfloat16.

With 2 processes (gloo, the way ``torchrun`` starts them) each rank runs half the batches
and the sums are added over ranks; each still reads every weight.

    python benchmarks/scale.py --json                 # about 4 minutes on 2 threads
    python benchmarks/scale.py --model 8b --batches 8 --seq 128 --processes 1,2,4
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _results import add_json_option, header, write
from _tables import scale as table
from _tables import show
from llm_scale import SHAPES
from shards import MB, save_random_checkpoint, status


# glibc raises its mmap threshold (up to 32 MB) each time a large block is freed, after
# which freed weights stay in the heap and count as resident; a fixed threshold returns
# them to the system: the row with it shows what the scores themselves hold
FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def meta_graph(source: Path, seq: int):
    """The checkpoint's model built on the meta device in bfloat16 (its dtype), analysed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import fxprune

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    return fxprune.analyze(model, {"input_ids": torch.zeros(1, seq, dtype=torch.long, device="meta")},
                           capture="export"), config


def calibration(batches: int, seq: int, vocab: int) -> list[dict]:
    import torch

    return [{"input_ids": torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(i))}
            for i in range(batches)]


def score_child(source: Path, batches: int, seq: int, rank: int, world: int, port: int) -> dict:
    """Runs in its own process (one rank): analysis, then ``score_checkpoint`` measured."""
    import gc

    import torch
    import torch.distributed as dist

    import fxprune

    torch.set_num_threads(1)  # one thread per process: 1 and 2 processes compare like for like
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    t0 = time.perf_counter()
    graph, config = meta_graph(source, seq)
    data = calibration(batches, seq, config.vocab_size)
    t1 = time.perf_counter()
    gc.collect()
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS: the peak below is score_checkpoint's own
    if world > 1:
        dist.barrier()  # the ranks start together: the slowest one's time is the run's
    t2 = time.perf_counter()
    scores = fxprune.score_checkpoint(graph, source, data)
    t3 = time.perf_counter()
    peak = status("VmHWM")
    if world > 1:
        dist.destroy_process_group()
    return {"analysis_s": round(t1 - t0, 1), "scores_s": round(t3 - t2, 1), "base_rss_mb": round(base / MB),
            "peak_rss_mb": round(peak / MB), "added_mb": round((peak - base) / MB), "groups": len(scores)}


def equal_child(source: Path, batches: int, seq: int) -> dict:
    """Runs in its own process: layer-by-layer scores against the model loaded whole."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    import fxprune
    from fxprune.select.score import score_groups

    torch.set_num_threads(1)
    graph, config = meta_graph(source, seq)
    data = calibration(batches, seq, config.vocab_size)
    layerwise = fxprune.score_checkpoint(graph, source, data)
    del graph
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    whole = score_groups(fxprune.analyze(model, data[0], capture="export"), "activation", calibration=data)
    same_groups = layerwise.keys() == whole.keys()
    diff = max(float(np.abs(layerwise[g] - whole[g]).max() / max(np.abs(whole[g]).max(), 1e-30)) for g in whole)
    return {"equal": same_groups and all(np.array_equal(layerwise[g], whole[g]) for g in whole),
            "max_rel_diff": diff, "groups": len(whole)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_children(args_list: list[list[str]], env: dict | None = None) -> list[dict]:
    """Start every child at once (the ranks of one run), wait, and parse their JSON lines."""
    procs = [subprocess.Popen([sys.executable, __file__, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, **(env or {})}) for a in args_list]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            sys.stderr.write(stderr)
            raise SystemExit(f"a measured process failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(SHAPES), help="Llama-3 shape (llm_scale.py's)")
    ap.add_argument("--equal-model", default="1b-2layers", choices=sorted(SHAPES),
                    help="the shape loaded whole to check equality with the in-memory scores")
    ap.add_argument("--processes", default="1,2", help="comma-separated process counts, one row each")
    ap.add_argument("--batches", type=int, default=4, help="calibration batches")
    ap.add_argument("--seq", type=int, default=32, help="tokens per batch (batch size 1)")
    ap.add_argument("--dir", help="where the checkpoints go (default: a temporary folder, removed after)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    add_json_option(ap, "scale")
    args = ap.parse_args(argv)
    if args.child:  # a measured process: one JSON line for the parent
        kind, source, *rest = args.child
        if kind == "equal":
            result = equal_child(Path(source), args.batches, args.seq)
        else:
            rank, world, port = map(int, rest)
            result = score_child(Path(source), args.batches, args.seq, rank, world, port)
        print(json.dumps(result))
        return 0
    common = ["--batches", str(args.batches), "--seq", str(args.seq)]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        source = Path(tmp) / "measured"
        source.mkdir()
        saved = save_random_checkpoint(args.model, 4, source)
        print(f"  saved llama-{args.model} ({saved['model_mb']} MB)", file=sys.stderr, flush=True)
        worlds = [(int(n), {}) for n in args.processes.split(",")] + [(1, FIXED_THRESHOLD)]
        for world, env in worlds:
            port = free_port()
            ranks = run_children([["--child", "score", str(source), str(r), str(world), str(port), *common]
                                  for r in range(world)], env)
            slowest = max(ranks, key=lambda r: r["scores_s"])
            largest = max(ranks, key=lambda r: r["added_mb"])
            rows.append({"model": f"llama-{args.model}", "processes": world, "checkpoint_mb": saved["model_mb"],
                         "batches": args.batches, "seq": args.seq, "analysis_s": slowest["analysis_s"],
                         "scores_s": slowest["scores_s"],
                         "tokens_per_s": round(args.batches * args.seq / slowest["scores_s"], 1),
                         "base_rss_mb": largest["base_rss_mb"], "peak_rss_mb": largest["peak_rss_mb"],
                         "added_mb": largest["added_mb"], "groups": slowest["groups"],
                         "allocator": " ".join(f"{k}={v}" for k, v in env.items()) or "glibc default"})
            print(f"  scored with {world} process(es)", file=sys.stderr, flush=True)
        for path in source.glob("*.safetensors"):
            path.unlink()  # room for the second checkpoint
        source = Path(tmp) / "equality"
        source.mkdir()
        small = save_random_checkpoint(args.equal_model, 4, source)
        (ranks,) = run_children([["--child", "score", str(source), "0", "1", "0", *common]])
        (equal,) = run_children([["--child", "equal", str(source), *common]])
        rows.append({"model": f"llama-{args.equal_model}", "processes": 1, "checkpoint_mb": small["model_mb"],
                     "batches": args.batches, "seq": args.seq, **{k: ranks[k] for k in
                     ("analysis_s", "scores_s", "base_rss_mb", "peak_rss_mb", "added_mb", "groups")},
                     "tokens_per_s": round(args.batches * args.seq / ranks["scores_s"], 1),
                     "equal": equal["equal"], "max_rel_diff": equal["max_rel_diff"], "allocator": "glibc default"})
    show(table(rows))
    if args.json:
        write(args.json, rows, header(args, threads=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
