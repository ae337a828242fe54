"""``reidkit`` / ``python -m reidkit``: dataset inspection, profiles, the reproduction driver."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from reidkit import __version__
from reidkit.config import PROFILES, CameraConfig, OverrideError, get_profile
from reidkit.core.device import resolve_device
from reidkit.core.io import CheckpointError, atomic_write_file
from reidkit.course.report import write_report
from reidkit.course.reproduce import main_reproduce, overrides_from_args
from reidkit.data.datasets import load_dataset
from reidkit.data.records import CorruptImageError, LayoutError, check_images
from reidkit.data.subset import subset_identities
from reidkit.data.transforms import ImageDataset
from reidkit.methods import REGISTRY, format_cost, method_class, resolve_run
from reidkit.nets.features import extract_features
from reidkit.nets.imagenet import REQUIRED, resolve_weights
from reidkit.nets.released import load_released
from reidkit.retrieval.protocol import rank_metrics, sysu30k_protocol
from reidkit.train.engine import fit
from reidkit.train.run_lock import RunLockedError


def _cmd_datasets(args) -> int:

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

    if args.json:
        print(json.dumps({k: p.to_dict() for k, p in PROFILES.items()}, indent=2, default=str))
    else:
        for name, p in PROFILES.items():
            print(f"{name:14s} {p.description}")
    return 0


def _cmd_reproduce(args) -> int:

    return main_reproduce(args)


def _prepare_train(args):
    """The resolved run (:class:`RunSpec`) of ``reidkit train``, its dataset read: every argument
    checked before any work. SYSU-30k is checked (never listed: 29.6M images) and its training
    folders are streamed by DGL; HHCL cannot use it (no cameras, no identities)."""

    overrides = overrides_from_args(args)
    if args.dataset:
        overrides["data.dataset"] = args.dataset
    if args.variant:
        overrides["dgl.variant"] = args.variant
    if args.memory:
        overrides["hhcl.memory"] = args.memory
    spec = resolve_run(args.profile, args.data_root, _check_device(args.device), overrides, method=args.method)
    prof, method = spec.profile, spec.method
    cls = method_class(method)
    sections = cls.sections   # the profile sections the method reads
    if args.variant and "dgl" not in sections:
        raise _UserError(f"--variant is DGL's (full | unary_only | supervised); this run's method is {method}")
    if args.memory and "hhcl" not in sections:
        raise _UserError(f"--memory is HHCL's (CM | CMhybrid | CMhybrid_v2); this run's method is {method}")
    if prof.camera != CameraConfig() and "camera" not in sections:
        raise _UserError(f"--camera-aware and camera.* are HHCL's; this run's method is {method}")
    _check_weights(prof)
    if spec.streamed and not cls.trains_on_bags:
        bag_methods = " or ".join(f"--method {n}" for n, c in REGISTRY.items() if c.trains_on_bags)
        raise _UserError("SYSU-30k's training images carry bag labels only (no cameras): train it with "
                         f"{bag_methods} (the sysu30k profile's method)")
    spec.dataset()
    return spec


def _check_weights(prof) -> None:
    """A profile that requires ImageNet weights stops here, before any data is read, when none is found
    (``MissingWeightsError`` lists where it looked and how to supply the file)."""

    if isinstance(prof.model.pretrained, str) and prof.model.pretrained.strip().lower() == REQUIRED:
        resolve_weights(prof.model.arch, REQUIRED)


def _cmd_train(args) -> int:

    user_errors = (OverrideError, LayoutError, CorruptImageError, CheckpointError, KeyError, ValueError,
                   FileNotFoundError, NotADirectoryError, RunLockedError)
    try:
        spec = _prepare_train(args)
    except _UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except user_errors as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if spec.profile.data.subset_ids is not None:
        print(spec.dataset().notes[-1])
    _print_cost(spec)
    cls = method_class(spec.method)
    try:
        res = fit(cls.from_spec(spec, epochs=args.epochs, iters=args.iters), args.out, device=spec.device,
                  seed=args.seed, selection=args.selection or cls.selection_for(spec.profile),
                  resume=not args.no_resume)
    except user_errors as exc:  # bad input found at start: the run stops before it trains
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    if res.test is not None:
        print(json.dumps({"method": res.method, "selected_epoch": res.best_epoch, "selection": res.selection,
                          **{k: v for k, v in res.test.items() if k != "cmc"}}))
    return 0


def _print_cost(spec) -> None:
    """The expected GPU memory and time per epoch of the run's method on its paper profile as
    defined (whatever this run's overrides cut), before the run starts; nothing where no figure can
    be derived (a sample profile, an uncached network, a method without a cost model)."""

    line = format_cost(PROFILES.get(spec.profile.name, spec.profile).replace(method=spec.method))
    if line:
        print(line, flush=True)


def _cmd_report(args) -> int:

    try:
        print(write_report(args.run_dir))
    except FileNotFoundError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


# --------------------------------------------------------------------------------------------
# evaluate / extract: any checkpoint reidkit.nets.backbones.load_released recognises


class _UserError(Exception):
    """A mistake in the command line or its inputs: one line on stderr, exit status 2."""


def _one_line(exc: BaseException) -> str:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(msg).split()) or type(exc).__name__


def _check_device(spec):
    """``--device`` as a ``torch.device``; a name torch does not know, or CUDA where there is none,
    is a ``_UserError``."""

    try:
        dev = resolve_device(spec)
    except (RuntimeError, ValueError) as exc:
        raise _UserError(f"bad --device {spec!r}: {_one_line(exc)}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _UserError(f"--device {spec}: CUDA is not available on this machine")
    return dev


def _open_weights_and_data(args):
    """(model, test_feature, dataset, device) for evaluate / extract; user errors -> _UserError."""

    dev = _check_device(args.device)
    try:
        kwargs = {"load_train": False} if args.dataset.lower() in ("sysu30k", "sysu") and args.split != "train" else {}
        ds = load_dataset(args.dataset, args.data_root, **kwargs)
    except (LayoutError, KeyError, FileNotFoundError, NotADirectoryError, ValueError) as exc:
        raise _UserError(_one_line(exc)) from exc
    try:
        model, feature = load_released(args.weights, device=dev)
    except (FileNotFoundError, CheckpointError) as exc:
        raise _UserError(_one_line(exc)) from exc
    return model, feature, ds, dev


def _show_progress() -> bool:
    """Progress bars for the long kernels: on a terminal, or forced by REIDKIT_PROGRESS=1 / 0."""

    flag = os.environ.get("REIDKIT_PROGRESS")
    return flag == "1" if flag in ("0", "1") else sys.stderr.isatty()


def _released_features(model, feature, records, dev, batch_size: int, desc: str, out=None, meta=None):
    """The checkpoint's test feature of ``records`` (its authors' transform, flip and forward)."""

    data = ImageDataset(records, feature.transform())
    return extract_features(model, data, device=dev, flip=feature.flip, amp=False, batch_size=batch_size,
                            forward_fn=feature.raw, desc=desc, out=out, meta=meta)


def _market_protocol(model, feature, ds, dev, args, prof) -> dict:
    """CMC / mAP / mINP (reidkit.retrieval.protocol.rank_metrics), optionally after k-reciprocal re-ranking."""

    if not ds.query or not ds.gallery:
        raise _UserError(f"dataset {ds.name!r} has no query or no gallery split to evaluate on")
    qf = _released_features(model, feature, ds.query, dev, args.batch_size, "query features")
    gf = _released_features(model, feature, ds.gallery, dev, args.batch_size, "gallery features")
    res = rank_metrics(qf, gf, ds.query, ds.gallery, device=dev, max_rank=prof.eval.max_rank,
                       rerank=prof.eval if args.rerank else None,
                       rerank_device="auto" if args.device in (None, "auto") else dev,  # auto: sized to free memory
                       show_progress=_show_progress())
    return {**res, "num_query": len(ds.query), "num_gallery": len(ds.gallery)}


def _sysu_protocol(model, feature, ds, dev, args) -> dict:
    """The SYSU-30k protocol with the gallery features streamed (reidkit.retrieval.protocol.sysu30k_protocol)."""

    if not ds.query or not ds.gallery:
        raise _UserError(f"dataset {ds.name!r} has no query or no gallery split to evaluate on")
    res = sysu30k_protocol(model, ds.query, ds.gallery, feature.transform(), dev, flip=feature.flip,
                           batch_size=args.batch_size, chunk=args.chunk, forward_fn=feature.raw,
                           show_progress=_show_progress())
    out = {k: float(res[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mAP_standard") if k in res}
    out.update(cmc=[float(v) for v in np.asarray(res.get("cmc", []))[:20]],
               num_query=len(ds.query), num_gallery=len(ds.gallery))
    return out


def _environment(dev) -> dict:

    env = {"reidkit": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "device": str(dev)}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def _eval_profile(args, feature):

    try:
        return get_profile(args.profile or feature.meta.get("profile") or "workshop")
    except (KeyError, ValueError) as exc:
        raise _UserError(_one_line(exc)) from exc


def _cmd_evaluate(args) -> int:
    args.split = "test"
    try:
        model, feature, ds, dev = _open_weights_and_data(args)
        prof = _eval_profile(args, feature)
        protocol = args.protocol if args.protocol != "auto" else ("sysu30k" if ds.name == "sysu30k" else "market")
        if protocol == "sysu30k" and args.rerank:
            raise _UserError("--rerank applies to the Market protocol only, not to the SYSU-30k protocol")
        metrics = (_sysu_protocol(model, feature, ds, dev, args) if protocol == "sysu30k"
                   else _market_protocol(model, feature, ds, dev, args, prof))
    except _UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"weights": str(args.weights), "layout": feature.layout, "dataset": ds.name, "protocol": protocol,
              "rerank": bool(args.rerank), "feature": {"dim": feature.dim, "flip": feature.flip,
                                                       "input_size": list(feature.input_size)},
              **metrics, "environment": _environment(dev)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        extra = f" mINP {100 * metrics['mINP']:.1f}" if "mINP" in metrics else ""
        print(f"{ds.name} ({protocol} protocol{', re-ranked' if args.rerank else ''}), {feature.layout} weights: "
              f"mAP {100 * metrics['mAP']:.1f}{extra} rank-1 {100 * metrics['rank1']:.1f} "
              f"rank-5 {100 * metrics['rank5']:.1f} rank-10 {100 * metrics['rank10']:.1f}")
    return 0


def _save_npz(out, feats, records) -> None:

    atomic_write_file(out, lambda fh: np.savez(
        fh, features=np.asarray(feats, dtype=np.float32),
        pids=np.array([r.pid for r in records], dtype=np.int64),
        camids=np.array([r.camid for r in records], dtype=np.int64),
        paths=np.array([str(r.path) for r in records])))


def _cmd_extract(args) -> int:

    try:
        if Path(args.out).suffix not in (".npy", ".npz"):
            raise _UserError(f"--out {args.out}: use a .npy (features + JSON sidecar) or .npz file name")
        model, feature, ds, dev = _open_weights_and_data(args)
        records = list(ds.splits()[args.split])
        if not records:
            raise _UserError(f"dataset {ds.name!r} has no {args.split} images")
    except _UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    desc = f"{args.split} features"
    if args.out.endswith(".npz"):
        feats = _released_features(model, feature, records, dev, args.batch_size, desc)
        _save_npz(args.out, feats, records)
    else:
        meta = {"weights": str(args.weights), "layout": feature.layout, "dataset": ds.name, "split": args.split,
                "pids": [int(r.pid) for r in records], "camids": [int(r.camid) for r in records],
                "paths": [str(r.path) for r in records]}
        feats = _released_features(model, feature, records, dev, args.batch_size, desc, out=args.out, meta=meta)
    print(f"{len(records)} x {feats.shape[1]} {feature.layout} features of {ds.name} {args.split} -> {args.out}")
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
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("extract", help="write a checkpoint's test features of one split to .npy / .npz",
                       epilog="example: reidkit extract --weights net_6.pth --dataset sysu30k --data-root "
                              "/data/SYSU-30k --split query --out query.npz")
    _add_weights_args(p)
    p.add_argument("--split", "-s", required=True, choices=["train", "query", "gallery"])
    p.add_argument("--out", "-o", required=True,
                   help=".npz (features, pids, camids, paths) or .npy (features; labels in the .json sidecar)")
    p.set_defaults(func=_cmd_extract)


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
    p.add_argument("--method", choices=list(REGISTRY), default=None,
                   help="the method to train (default: the profile's; sysu30k is dgl, the others hhcl); "
                        "supervised: HHCL's recipe with the true labels, the upper bound")
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
    p.set_defaults(func=_cmd_train)


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
    p.set_defaults(func=_cmd_datasets)

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
    p.set_defaults(func=_cmd_reproduce)

    _add_train_parser(sub)

    p = sub.add_parser("report", help="(re)write report.md of a run folder",
                       epilog="example: reidkit report runs/workshop-20261130-120000")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)

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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
