"""Peak memory of writing a pruned checkpoint shard by shard (``fxprune.save_pruned``).

A Llama-3-shaped checkpoint (random bfloat16 weights, nothing downloaded) is first written
in ``--shards`` safetensors shards (one row per count) to a temporary folder, one shard at a time, with the
index and config.json that ``save_pretrained`` writes. A fresh process then analyses the
model built on the meta device from that config.json, plans half the key/value heads and
half the MLP neurons of every layer, and writes the pruned checkpoint with
``save_pruned``. Its memory is read from ``/proc/self/status``:

* base RSS   -- resident memory before ``save_pruned`` (interpreter, torch, the graph);
* peak RSS   -- the high-water mark during ``save_pruned`` alone (``VmHWM``, reset just
                before it through ``/proc/self/clear_refs``);
* added      -- peak minus base: what writing the checkpoint cost, to compare with the
                largest source shard and the whole model.

Memory-mapped pages of the shard being read count as resident, so the added memory
is at most a source shard plus its pruned copy.

    python benchmarks/shards.py --json             # llama-1b in 4 and 8 shards (3 GB on disk, about 3 min)
    python benchmarks/shards.py --model 8b --shards 8
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from _results import add_json_option, header, write
from _tables import shards as table
from _tables import show
from llm_scale import SHAPES, build

MB = 2 ** 20


def status(field: str) -> int:
    """A memory field of this process (``VmRSS``, ``VmHWM``) in bytes (Linux)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}; this benchmark needs Linux")


def save_random_checkpoint(name: str, shards: int, folder: Path) -> dict:
    """Write the model's state dict as ``shards`` safetensors files of about equal size,
    random bfloat16 values made one shard at a time, and the config and index beside them."""
    import torch
    from safetensors.torch import save_file

    model, _, config = build(name)  # meta device: shapes only
    config.save_pretrained(folder)
    tensors = dict(model.state_dict())
    tensors.pop("lm_head.weight", None) if config.tie_word_embeddings else None
    sizes = {k: t.numel() * 2 for k, t in tensors.items()}
    per_shard, groups, current, total = math.ceil(sum(sizes.values()) / shards), [], [], 0
    for key in tensors:  # contiguous runs of keys, closed when they reach an equal share
        current.append(key)
        total += sizes[key]
        if total >= per_shard * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    weight_map, generator = {}, torch.Generator().manual_seed(0)
    for i, keys in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        data = {k: torch.randn(tensors[k].shape, generator=generator, dtype=torch.bfloat16) * 0.02 for k in keys}
        save_file(data, folder / file, metadata={"format": "pt"})
        del data
        weight_map.update(dict.fromkeys(keys, file))
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return {"shards": len(groups), "model_mb": round(sum(sizes.values()) / MB),
            "largest_shard_mb": round(max(sum(sizes[k] for k in g) for g in groups) / MB)}


def plan_half(graph) -> dict[int, list[int]]:
    """Half the key/value heads and half the MLP neurons of every layer (the first halves)."""
    plan = {}
    for g in graph.prunable_groups:
        keys = g.slices([0], "out")
        if any(k.endswith(("self_attn.k_proj.weight", "mlp.gate_proj.weight")) for k in keys):
            plan[g.id] = list(range(g.size // 2))
    return plan


def prune_checkpoint(source: Path, dest: Path) -> dict:
    """Runs in its own process: meta analysis, then ``save_pruned`` with its memory measured."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import fxprune

    torch.set_num_threads(2)
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).eval()
    t0 = time.perf_counter()
    graph = fxprune.analyze(model, {"input_ids": torch.zeros(1, 16, dtype=torch.long, device="meta")},
                            capture="export")
    plan = plan_half(graph)
    t1 = time.perf_counter()
    gc.collect()
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS: the peak below is save_pruned's own
    fxprune.save_pruned(graph, plan, source, dest)
    t2 = time.perf_counter()
    peak = status("VmHWM")
    written = [p.stat().st_size for p in dest.glob("*.safetensors")]
    return {"analysis_s": round(t1 - t0, 1), "save_s": round(t2 - t1, 1), "base_rss_mb": round(base / MB),
            "peak_rss_mb": round(peak / MB), "added_mb": round((peak - base) / MB),
            "pruned_mb": round(sum(written) / MB), "largest_pruned_shard_mb": round(max(written) / MB)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="1b", choices=sorted(SHAPES), help="Llama-3 shape (llm_scale.py's)")
    ap.add_argument("--shards", default="4,8", help="comma-separated: shard counts, one checkpoint and row each")
    ap.add_argument("--dir", help="where the two checkpoints go (default: a temporary folder, removed after)")
    ap.add_argument("--child", nargs=2, metavar=("SOURCE", "DEST"), help=argparse.SUPPRESS)
    add_json_option(ap, "shards")
    args = ap.parse_args(argv)
    if args.child:  # the measured process: one JSON line for the parent
        print(json.dumps(prune_checkpoint(Path(args.child[0]), Path(args.child[1]))))
        return 0
    rows = []
    for shards in [int(n) for n in args.shards.split(",")]:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            source, dest = Path(tmp) / "source", Path(tmp) / "pruned"
            source.mkdir()
            row = {"model": f"llama-{args.model}", **save_random_checkpoint(args.model, shards, source)}
            print(f"  saved {row['model']} in {row['shards']} shards", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, __file__, "--child", str(source), str(dest)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                return done.returncode
            rows.append({**row, **json.loads(done.stdout.strip().splitlines()[-1])})
    show(table(rows))
    if args.json:
        write(args.json, rows, header(args, threads=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
