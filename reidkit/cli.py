"""``reidkit`` / ``python -m reidkit``: dataset inspection, profiles, the reproduction driver."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_datasets(args) -> int:
    from reidkit.data.datasets import LayoutError, check_images, load_dataset
    from reidkit.data.subset import subset_identities

    try:
        ds = load_dataset(args.dataset, args.root)
        if args.subset_ids is not None:
            ds = subset_identities(ds, args.subset_ids, args.subset_seed)
    except (LayoutError, KeyError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    records = [r for recs in ds.splits().values() for r in recs]
    verify = args.verify if args.verify is not None else len(records) <= args.verify_limit
    errors = check_images((r.path for r in records), "checking images") if verify else []
    if args.json:
        out = {"dataset": ds.name, "root": str(ds.root), "splits": ds.stats_dict(), "notes": ds.notes,
               "images_checked": verify, "unreadable": [e.path for e in errors]}
        print(json.dumps(out, indent=2))
    else:
        print(ds.table())
        if not verify and args.verify is None:
            print(f"note: images not decoded ({len(records):,} > {args.verify_limit:,}); pass --verify to check them")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 3 if errors else 0


def _cmd_profiles(args) -> int:
    from reidkit.config import PROFILES

    if args.json:
        print(json.dumps({k: p.to_dict() for k, p in PROFILES.items()}, indent=2, default=str))
    else:
        for name, p in PROFILES.items():
            print(f"{name:14s} {p.description}")
    return 0


def _cmd_reproduce(args) -> int:
    from reidkit.reproduce import main_reproduce

    return main_reproduce(args)


def _cmd_train(args) -> int:
    from reidkit.config import OverrideError, apply_overrides, get_profile
    from reidkit.data.datasets import LayoutError
    from reidkit.data.subset import load_profile_dataset
    from reidkit.reproduce import overrides_from_args

    try:
        overrides = overrides_from_args(args)
        if args.dataset:
            overrides["data.dataset"] = args.dataset
        prof = apply_overrides(get_profile(args.profile), overrides)
        ds = load_profile_dataset(prof, args.data_root)
    except (OverrideError, LayoutError, KeyError, ValueError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    if prof.data.subset_ids is not None:
        print(ds.notes[-1])
    from reidkit.train import train_hhcl

    res = train_hhcl(prof, ds, out_dir=args.out, device=args.device, memory=args.memory, seed=args.seed,
                     selection=args.selection, resume=not args.no_resume, epochs=args.epochs)
    if res.test is not None:
        print(json.dumps({"selected_epoch": res.best_epoch, "selection": res.selection,
                          **{k: v for k, v in res.test.items() if k != "cmc"}}))
    return 0


def _cmd_report(args) -> int:
    from reidkit.reproduce import write_report

    print(write_report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from reidkit import __version__

    parser = argparse.ArgumentParser(prog="reidkit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"reidkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("datasets", help="parse a dataset folder and print identities / images / cameras per split")
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
    p.set_defaults(func=_cmd_datasets)

    p = sub.add_parser("profiles", help="list the run profiles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_profiles)

    p = sub.add_parser("reproduce", help="run the notebooks in order with papermill and write report.md")
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
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("train", help="train HHCL / Cluster-Contrast; under torchrun, one process per device")
    p.add_argument("--profile", default="workshop")
    p.add_argument("--data-root", default=None)
    p.add_argument("--dataset", default=None, help="override the profile's dataset")
    p.add_argument("--out", required=True, help="output folder (checkpoint.pt, model_best.pt, history.json)")
    p.add_argument("--memory", choices=["CM", "CMhybrid", "CMhybrid_v2"], default=None)
    p.add_argument("--selection", choices=["val", "test", "last"], default="val",
                   help="model selection: a validation split of the training ids (default), the test set "
                        "(the papers' practice) or the last epoch")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="override a profile value, e.g. --set hhcl.iters=400 (JSON values)")
    p.add_argument("--subset-ids", type=int, default=None, metavar="N",
                   help="keep N training and N test identities (same as --set data.subset_ids=N)")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("report", help="(re)write report.md of a run folder")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
