"""What each ``reidkit`` command does once :mod:`reidkit.cli` has parsed its arguments: dataset
inspection, the reproduction driver, training, checkpoint evaluation and feature extraction, the
report. Every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from reidkit import __version__
from reidkit.config import PROFILES, CameraConfig, OverrideError, get_profile
from reidkit.core.device import cpu_name, resolve_device
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


def cmd_datasets(args) -> int:

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


def cmd_reproduce(args) -> int:

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
    if args.memory and not cls.uses_memory:
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


def cmd_train(args) -> int:

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


def cmd_report(args) -> int:

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
           "device": str(dev), "cpu": cpu_name()}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def _eval_profile(args, feature):

    try:
        return get_profile(args.profile or feature.meta.get("profile") or "workshop")
    except (KeyError, ValueError) as exc:
        raise _UserError(_one_line(exc)) from exc


def cmd_evaluate(args) -> int:
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


def cmd_extract(args) -> int:

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
