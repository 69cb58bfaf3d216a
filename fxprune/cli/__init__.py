"""The ``fxprune`` command: ``graph | compress | report | check | demo``.

Every user error prints one line, ``fxprune: error: ...``, on stderr and exits 2;
``check`` exits 1 when a limit is exceeded. Run ``fxprune COMMAND --help`` for examples.

Your own code (a score from ``register_score``, a target metric, an op rule) reaches
the command line in one of two ways: ``--plugin my_scores.py`` (or ``--plugin
mypkg.scores``; repeatable) imports it before the command runs, e.g.
``fxprune compress torchvision:resnet18 --flops 0.5 --score mine --plugin my_scores.py``;
or an installed package declares it once as an entry point in the ``fxprune.plugins``
group (``[project.entry-points."fxprune.plugins"] mine = "mypkg.scores"``), which
fxprune loads by itself.

Example:
    >>> import json, pathlib, tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "groups.json"
    >>> main(["graph", "torchvision:resnet18", "--input", "1,3,32,32", "--format", "json", "-o", str(out)])
    0
    >>> json.loads(out.read_text())["schema"]
    'fxprune.graph/1'
"""
from __future__ import annotations

import argparse
import sys

from fxprune.cli.commands import cmd_check, cmd_compress, cmd_demo, cmd_graph, cmd_report
from fxprune.errors import FxpruneError
from fxprune.measure import LatencySettings
from fxprune.models import load_plugin
from fxprune.select.branch_score import BRANCH_SCORES
from fxprune.spec import ATTENTION_UNITS, CAPTURES, EMITS, UNIT_KINDS, VERIFY

MODEL_HELP = ("model reference: torchvision:NAME, timm:NAME, package.module:factory, "
              "path/to/file.py:factory, or a file saved by `fxprune compress -o` / torch.save")
INPUT_HELP = ("input shape, e.g. 1,3,224,224 (several inputs: '1,8;1,4'); default: the "
              "model's own (torchvision: 1,3,224,224; saved by fxprune: as compressed)")


def _units(text: str) -> str | list[str]:
    """``--units``: one kind, ``both`` (channels and branches) or a comma list of kinds."""
    kinds = ["channels", "branches"] if text == "both" else [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in UNIT_KINDS or k == "experts"]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kind {bad[0] if bad else text!r}: use channels, branches, "
                                         "layers, both, or a comma list such as channels,layers")
    return kinds[0] if len(kinds) == 1 else kinds


def _command(sub, name: str, help_text: str, examples: str, func):
    parser = sub.add_parser(name, help=help_text, description=help_text,
                            epilog="examples:\n" + examples,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def _model_args(parser, optional: bool = False) -> None:
    parser.add_argument("model", nargs="?" if optional else None, metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--input", metavar="SHAPE", help=INPUT_HELP)
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="import MODULE (mypkg.scores) or FILE.py first, for the scores, "
                             "metrics or rules it registers; repeatable")


def _units_arg(parser) -> None:
    parser.add_argument("--attention-units", choices=ATTENTION_UNITS, default=None,
                        help="one unit of an attention group: a whole head (default; with grouped-query "
                             "attention a key/value head and its query heads), query_slots (the same "
                             "query head of every key/value group) or head_dim (a position in every head)")


def _capture_arg(parser) -> None:
    parser.add_argument("--capture", choices=CAPTURES, default=None,
                        help="front end: auto (default: torch.fx, falling back to torch.export, then "
                             "parts), fx, export, parts (the learnable submodules, e.g. a detector's "
                             "backbone and heads)")


def _latency_args(parser) -> None:
    # defaults come from LatencySettings, the one definition of how latency is measured
    default = LatencySettings()
    parser.add_argument("--device", default=default.device,
                        help=f"latency device: cpu, cuda, cuda:N (default {default.device})")
    parser.add_argument("--threads", type=int, default=default.threads,
                        help=f"CPU threads while timing (default {default.threads})")
    parser.add_argument("--repeats", type=int, default=default.repeats,
                        help=f"timed runs; the median is shown (default {default.repeats})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxprune", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Structured pruning for PyTorch on torch.fx: inspect channel groups, "
                    "compress, report costs and check size budgets.",
        epilog="examples:\n  fxprune demo\n  fxprune graph torchvision:resnet18\n"
               "  fxprune compress torchvision:resnet18 --flops 0.5 -o small.pt\n"
               "  fxprune report small.pt\n  fxprune check small.pt --budget budget.toml\n\n"
               "Run `fxprune COMMAND --help` for each command's options.")
    from fxprune import __version__
    parser.add_argument("--version", action="version", version=f"fxprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _command(sub, "graph", "Show the channel dependency groups: id, channels, producers, "
                 "consumers, prunable or frozen and why.",
                 "  fxprune graph torchvision:resnet18\n"
                 "  fxprune graph torchvision:resnet18 --input 1,3,64,64 --format json -o groups.json\n"
                 "  fxprune graph mypkg.models:build_net --input 1,3,32,32 --format dot | dot -Tsvg > g.svg\n"
                 "  fxprune graph small.pt --format mermaid\n"
                 "  fxprune graph timm:mobilevit_xs --input 1,3,256,256 --capture export", cmd_graph)
    _model_args(p)
    _capture_arg(p)
    _units_arg(p)
    p.add_argument("--format", choices=("text", "json", "dot", "mermaid"), default="text",
                   help="text (default, a terminal table), json (stable, for tools), dot "
                        "(Graphviz), mermaid (flowchart for markdown)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")

    p = _command(sub, "compress", "Prune a model as a spec (or the flags) say; save it and its report.",
                 "  fxprune compress torchvision:resnet18 --flops 0.5 -o small.pt\n"
                 "  fxprune compress torchvision:resnet18 --spec spec.toml -o small.pt --report report.json\n"
                 "  fxprune compress mypkg.models:build_net --input 1,3,32,32 --ratio 0.3 --score bn_scale\n"
                 "  fxprune compress torchvision:resnet50 --flops 0.6 --nm 2:4 --latency\n"
                 "  fxprune compress torchvision:resnet18 --flops 0.5 --score activation --calibration calib.pt\n\n"
                 "spec.toml holds Spec fields, e.g.:\n"
                 "  input_shape = [1, 3, 224, 224]\n  score = \"magnitude\"\n  scope = \"local\"\n  round_to = 8\n"
                 "  [target]\n  flops = 0.5\n"
                 "Flags override the spec's fields; --flops/--params/--ratio replace its goal.",
                 cmd_compress)
    _model_args(p)
    _capture_arg(p)
    _units_arg(p)
    p.add_argument("--emit", choices=EMITS, default=None,
                   help="the saved model: graph (a torch.fx GraphModule), module (your own class, "
                        "pruned), auto (default: graph for fx captures, module for export and parts ones)")
    p.add_argument("--verify", choices=VERIFY, default=None,
                   help="values (default): check the pruned model against the original with the removed "
                        "units masked, on the example inputs; shapes: only re-propagate shapes")
    p.add_argument("--spec", metavar="FILE", help="spec file: .toml, .json or pyproject.toml "
                                                  "([tool.fxprune.compress])")
    p.add_argument("-o", "--output", metavar="FILE", help="save the compressed model (torch.save; "
                   "reload with torch.load(FILE, weights_only=False) or pass it to any fxprune command)")
    p.add_argument("--report", metavar="FILE", help="write the report as JSON (with the plan)")
    goal = p.add_mutually_exclusive_group()
    goal.add_argument("--flops", type=float, metavar="F", help="keep this fraction of the FLOPs, in (0, 1]")
    goal.add_argument("--params", type=float, metavar="F", help="keep this fraction of the parameters, in (0, 1]")
    goal.add_argument("--ratio", type=float, metavar="R", help="remove this fraction of every prunable group, in (0, 1)")
    p.add_argument("--score", help="channel importance: auto (default: activation with --calibration, "
                   "else magnitude), magnitude, bn_scale, group_lasso, l0, activation or taylor (need "
                   "--calibration), or one registered by a --plugin; with --nm it also picks the masks: "
                   "magnitude, activation (Wanda) or sparsegpt (need --calibration)")
    p.add_argument("--calibration", metavar="FILE", help="input batches for --score activation/taylor: "
                   "a list saved with torch.save([batch, ...], FILE), each batch a tensor, a tuple "
                   "or a dict of tensors")
    p.add_argument("--nm", metavar="N:M", help="N:M semi-structured sparsity on top, e.g. 2:4; alone "
                   "(no --flops/--params/--ratio) it masks without removing channels")
    p.add_argument("--scope", choices=("local", "latency", "global"),
                   help="how channels compete: local (default; every group loses the same share, "
                        "widths on multiples of 8-64: fast and deterministic), latency (times each "
                        "group's kernels and keeps the result only if it runs faster; slower to run), "
                        "global (ranked across groups by score per FLOP; thins cheap early layers)")
    p.add_argument("--units", type=_units, metavar="KINDS",
                   help="what competes for the budget: channels (default), branches (whole residual "
                        "blocks: depth), layers (whole entries of a layer list), both (channels and "
                        "branches), or a comma list, e.g. channels,layers (docs/depth.md)")
    p.add_argument("--branch-score", choices=BRANCH_SCORES,
                   help="how branches rank (default output_norm: |f(x)| / |x| over the inputs; "
                        "angular_distance over runs of --branch-run; calibration_loss: SLEB)")
    p.add_argument("--branch-run", type=int, metavar="N",
                   help="branches per run for --branch-score angular_distance (default 1)")
    p.add_argument("--round-to", type=int, metavar="K",
                   help="kept channel counts are multiples of K (default 8; 1: exact counts)")
    p.add_argument("--latency", action="store_true", help="also measure latency before/after (the "
                   "spec's [latency] settings; default: "
                   f"{LatencySettings().device}, {LatencySettings().threads} threads)")
    p.add_argument("--markdown", action="store_true", help="print the report as GitHub markdown")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar on stderr (it shows only on a terminal anyway) and no notes")

    p = _command(sub, "report", "What a model costs: FLOPs, parameters, size, measured latency "
                 "and a per-layer table.",
                 "  fxprune report torchvision:resnet18\n"
                 "  fxprune report small.pt --no-latency --json > cost.json\n"
                 "  fxprune report torchvision:mobilenet_v3_small --threads 4 --repeats 50 --layers 0",
                 cmd_report)
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--layers", type=int, default=30, metavar="N",
                   help="show the first N layers (default 30, 0: all)")
    _latency_args(p)

    p = _command(sub, "check", "Check size budgets from [tool.fxprune.budget] in pyproject.toml "
                 "(or --budget FILE). Exit 0: all limits hold, 1: a limit is exceeded, 2: usage "
                 "or load error.",
                 "  fxprune check                      # ./pyproject.toml [tool.fxprune.budget]\n"
                 "  fxprune check small.pt --budget budget.toml\n"
                 "  fxprune check torchvision:resnet18 --max-params 12M --max-flops 4G\n\n"
                 "[tool.fxprune.budget]\n  model = \"torchvision:resnet18\"\n  input = [1, 3, 224, 224]\n"
                 "  max_params = \"12M\"      # k M G T = 10^3 ...\n  max_flops = \"4G\"\n"
                 "  max_size = \"50MB\"       # B kB MB GB KiB MiB GiB\n  max_latency_ms = 40\n"
                 "  [tool.fxprune.budget.latency]   # required with max_latency_ms\n"
                 "  device = \"cpu\"\n  threads = 2", cmd_check)
    _model_args(p, optional=True)
    p.add_argument("--budget", metavar="FILE", help="TOML file with the budget (default: the "
                   "nearest pyproject.toml)")
    for name in ("params", "flops", "size", "latency-ms"):
        p.add_argument(f"--max-{name}", metavar="LIMIT", help=f"override max_{name.replace('-', '_')}")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")

    p = _command(sub, "demo", "A first run with no download and no GPU: train a small CNN on "
                 "scikit-learn's digits with L1 on BatchNorm scales, compress it to half "
                 "of its FLOPs, fine-tune, print accuracy and the before/after report.",
                 "  fxprune demo\n  fxprune demo --epochs 5 --finetune 1 --flops 0.25", cmd_demo)
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.add_argument("--finetune", type=int, default=5, help="fine-tuning epochs after pruning (default 5)")
    p.add_argument("--flops", type=float, default=0.5, help="fraction of FLOPs to keep (default 0.5)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the demo's 8x8 images are too small to split)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fxprune`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        for ref in getattr(args, "plugin", ()):
            load_plugin(ref)
        return int(args.func(args) or 0)
    except (FxpruneError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"fxprune: error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fxprune ... | head`: the reader left, not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("fxprune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
