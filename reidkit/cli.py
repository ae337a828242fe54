"""``reidkit`` / ``python -m reidkit``: the command line's arguments. Parsing needs the standard
library and :mod:`reidkit.config` alone, so ``--help``, ``profiles`` and a mistyped argument answer at
once; the commands themselves (:mod:`reidkit.commands`, PyTorch and the kit: about 5 s of imports)
load only when one runs."""

from __future__ import annotations

import argparse
import json
import sys

from reidkit import __version__, config
from reidkit.config import PROFILES


def _cmd_profiles(args) -> int:

    if args.json:
        print(json.dumps({k: p.to_dict() for k, p in PROFILES.items()}, indent=2, default=str))
    else:
        for name, p in PROFILES.items():
            print(f"{name:14s} {p.description}")
    return 0


def _add_weights_args(p) -> None:
    p.add_argument("--weights", "-w", required=True,
                   help="checkpoint: the kit's model_best.pt / checkpoint.pt, HHCL / Cluster-Contrast "
                        "model_best.pth.tar or SYSU-30k net_6.pth")
    p.add_argument("--dataset", "-d", required=True, help="market1501 | dukemtmcreid | msmt17 | mars | "
                   "mini-mars | sysu30k | folder")
    p.add_argument("--data-root", default=None, help="dataset folder (omit for the embedded mini-mars sample)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=64)


def _add_eval_parsers(sub) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint: Market protocol, or SYSU-30k's (streamed)",
                       epilog="example: reidkit evaluate --weights runs/x/model_best.pt --dataset mini-mars --json")
    _add_weights_args(p)
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (the profile's eval settings)")
    p.add_argument("--json", action="store_true", help="print the metrics and the environment as JSON")
    p.add_argument("--protocol", choices=["auto", "market", "sysu30k"], default="auto",
                   help="auto: SYSU-30k's for the sysu30k dataset, the Market protocol otherwise")
    p.add_argument("--profile", default=None, help="profile for the eval settings (default: the checkpoint's)")
    p.add_argument("--chunk", type=int, default=8192, help="gallery rows per streamed chunk (SYSU-30k protocol)")
    p.set_defaults(func='evaluate')

    p = sub.add_parser("extract", help="write a checkpoint's test features of one split to .npy / .npz",
                       epilog="example: reidkit extract --weights net_6.pth --dataset sysu30k --data-root "
                              "/data/SYSU-30k --split query --out query.npz")
    _add_weights_args(p)
    p.add_argument("--split", "-s", required=True, choices=["train", "query", "gallery"])
    p.add_argument("--out", "-o", required=True,
                   help=".npz (features, pids, camids, paths) or .npy (features; labels in the .json sidecar)")
    p.set_defaults(func='extract')


EXAMPLES = """examples, one per command:
  reidkit datasets --dataset market1501 /data                  identities / images / cameras per split
  reidkit profiles                                             the run profiles and what each reproduces
  reidkit reproduce --profile workshop                         the six notebooks headless, then report.md
  reidkit train --profile market1501 --data-root /data --out runs/hhcl        HHCL (the profile's method)
  reidkit train --method dgl --variant full --profile smoke --out runs/dgl    DGL on weak bag labels
  reidkit evaluate --weights runs/hhcl/model_best.pt --dataset market1501 --data-root /data --json
  reidkit extract --weights net_6.pth --dataset sysu30k --data-root /data --split query --out q.npz
  reidkit report runs/workshop-20261130-120000                 rewrite report.md of a run folder
Errors in the arguments or the data exit with status 2 and one line naming what is wrong."""


def _add_train_parser(sub) -> None:

    p = sub.add_parser("train", help="train HHCL (unsupervised) or DGL (weak bag labels); under torchrun, one "
                       "process per device", epilog="examples: reidkit train --profile workshop --out runs/hhcl | "
                       "reidkit train --method dgl --variant full --profile smoke --out runs/dgl | "
                       "reidkit train --profile sysu30k --data-root /data/SYSU-30k --out runs/sysu")
    p.add_argument("--profile", default="workshop")
    p.add_argument("--method", choices=list(config.METHODS), default=None,   # read when the parser is built
                   help="the method to train (default: the profile's; sysu30k is dgl, the others hhcl); "
                        "supervised: HHCL's recipe with the true labels, the upper bound; softmax: a classifier "
                        "on the true labels, the classic supervised baseline")
    p.add_argument("--variant", choices=["full", "unary_only", "supervised"], default=None,
                   help="DGL's variant (default: the profile's dgl.variant, full)")
    p.add_argument("--iters", type=int, default=None, help="DGL: at most N iterations per epoch")
    p.add_argument("--data-root", default=None)
    p.add_argument("--dataset", default=None, help="override the profile's dataset")
    p.add_argument("--out", required=True,
                   help="output folder (checkpoint.pt, model_best.pt, history.json, train.log)")
    p.add_argument("--memory", choices=["CM", "CMhybrid", "CMhybrid_v2"], default=None)
    p.add_argument("--camera-aware", action="store_true",
                   help="HHCL's camera-aware recipe (camera centring, CA-Jaccard, camera proxies, balanced "
                        "sampler); each part alone with --set camera.<part>=...; recorded in the checkpoint")
    p.add_argument("--selection", choices=["val", "test", "last"], default=None,
                   help="model selection: a validation split of the training ids (HHCL's default), the test "
                        "set (the papers' practice) or the last epoch (DGL's default, as its reference)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a profile value, e.g. --set hhcl.iters=400 (JSON values)")
    p.add_argument("--subset-ids", type=int, default=None, metavar="N",
                   help="keep N training and N test identities (same as --set data.subset_ids=N)")
    p.set_defaults(func='train')


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="reidkit", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"reidkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("datasets", help="parse a dataset folder and print identities / images / cameras per split",
                       epilog="example: reidkit datasets --dataset msmt17 /data --json")
    p.add_argument("root", nargs="?", default=None, help="dataset folder or a parent of it (omit for mini-mars)")
    p.add_argument("--dataset", "-d", required=True,
                   help="market1501 | dukemtmcreid | msmt17 | mars | mini-mars | sysu30k | folder")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--verify", dest="verify", action="store_true", default=None, help="decode every image")
    g.add_argument("--no-verify", dest="verify", action="store_false", help="do not decode images")
    p.add_argument("--verify-limit", type=int, default=200_000,
                   help="decode images by default only up to this many (default 200,000)")
    p.add_argument("--subset-ids", type=int, default=None, metavar="N",
                   help="show the identity subset of N training and N test identities (reidkit.data.subset)")
    p.add_argument("--subset-seed", type=int, default=0, help="seed of the subset's id choice (default 0)")
    p.set_defaults(func='datasets')

    p = sub.add_parser("profiles", help="list the run profiles", epilog="example: reidkit profiles --json")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_profiles)

    p = sub.add_parser("reproduce", help="run the notebooks in order with papermill and write report.md",
                       epilog="example: reidkit reproduce --profile market1501 --data-root /data --set hhcl.epochs=1")
    p.add_argument("--profile", default="workshop")
    p.add_argument("--data-root", default=None, help="folder holding the dataset (default: embedded sample)")
    p.add_argument("--run-dir", default=None, help="run folder (default runs/<profile>-<timestamp>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--notebooks", nargs="*", default=None, help="only these (e.g. 01 02)")
    p.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    p.add_argument("--force", action="store_true", help="rerun notebooks already complete")
    p.add_argument("--subset-ids", type=int, default=None, metavar="N",
                   help="keep N training and N test identities of the dataset (same as --set data.subset_ids=N)")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a profile value, e.g. --set hhcl.epochs=2 (JSON values); recorded in run.json")
    p.add_argument("--camera-aware", action="store_true",
                   help="HHCL's camera-aware recipe (docs/cameras.md); recorded in run.json and report.md")
    p.set_defaults(func='reproduce')

    _add_train_parser(sub)

    p = sub.add_parser("report", help="(re)write report.md of a run folder",
                       epilog="example: reidkit report runs/workshop-20261130-120000")
    p.add_argument("run_dir")
    p.set_defaults(func='report')

    _add_eval_parsers(sub)
    return parser


def _line_buffered_stdout() -> None:
    """Flush stdout at every newline when it is a file or a pipe (SLURM logs, ``| tee``), so that a
    killed run keeps every line it printed; a terminal is line-buffered already."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and not sys.stdout.isatty():
        try:
            reconfigure(line_buffering=True)
        except (ValueError, OSError):   # a closed or unusual stream: leave it as it is
            pass


def main(argv: list[str] | None = None) -> int:
    _line_buffered_stdout()
    args = build_parser().parse_args(argv)
    if callable(args.func):   # profiles: the configuration alone
        return int(args.func(args) or 0)
    # a run-time-only import: the commands' modules (PyTorch, torchvision, scikit-learn) load once the
    # arguments are parsed and a command that needs them runs
    from reidkit import commands

    return int(getattr(commands, f"cmd_{args.func}")(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
