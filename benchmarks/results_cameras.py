"""Camera-aware HHCL measured on a real cross-camera dataset: direct transfer, Cluster-Contrast (CM),
HHCL (CMhybrid), HHCL with each camera-aware part alone, HHCL with the full recipe, and the
supervised upper bound, on the same engine, network and budget, over several seeds.

    python benchmarks/results_cameras.py --data-root ../shared/data/cuhk03-dev \
        [--profile laptop] [--subset-ids 150] [--seeds 1 2 3] [--set hhcl.epochs=8 ...] \
        [--rows hhcl,full] [--out benchmarks/out/cameras.json]
    python benchmarks/results_cameras.py --merge seed1.json seeds23.json --out benchmarks/out/cameras.json

Every run selects its last epoch (no labels are used for model selection). For each run it records
mAP, rank-1, the pseudo-labels' cross-camera join rate, the share of identities whose cameras
one cluster joins (first and last epoch) and the share joined in a cluster they lead (its largest
identity: a few clusters of many people cannot fake it), and the wall time. Prints one JSON line
per run as it finishes, then the summary JSON and a markdown table (mean +- std over the seeds).
The JSON file is rewritten after every run, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reidkit.config import CAMERA_AWARE_RECIPE, apply_overrides, parse_set  # noqa: E402
from reidkit.core.device import seed_everything  # noqa: E402
from reidkit.core.io import atomic_write_json  # noqa: E402
from reidkit.data.subset import load_profile_dataset  # noqa: E402
from reidkit.hhcl.method import train_hhcl  # noqa: E402
from reidkit.hhcl.supervised import train_supervised  # noqa: E402
from reidkit.nets.backbones import build_model  # noqa: E402
from reidkit.retrieval.protocol import evaluate_model  # noqa: E402

#: row name -> (method, overrides on top of the common ones)
ROWS: dict[str, tuple[str, dict]] = {
    "direct": ("direct", {}),
    "cc": ("hhcl", {"hhcl.memory": "CM"}),
    "hhcl": ("hhcl", {}),
    "centre": ("hhcl", {"camera.centre": True}),
    "cajaccard": ("hhcl", {"camera.jaccard": "ca"}),
    "proxies": ("hhcl", {"camera.proxies": True, "camera.balanced": True}),
    "full": ("hhcl", dict(CAMERA_AWARE_RECIPE)),
    "supervised": ("supervised", {}),
    "softmax": ("softmax", {}),
}
LABELS = {"direct": "ImageNet features (no training)", "cc": "Cluster-Contrast (CM)", "hhcl": "HHCL (CMhybrid)",
          "centre": "HHCL + camera centring", "cajaccard": "HHCL + CA-Jaccard",
          "proxies": "HHCL + camera proxies (CAP, balanced sampler)", "full": "HHCL + full camera-aware recipe",
          "supervised": "supervised (true labels, same recipe)",
          "softmax": "supervised softmax classifier (true labels, same network and budget, random batches)"}


def label_quality(history: list[dict]) -> dict:
    """The pseudo-labels' scores of the first epoch (ImageNet features) and of the last one."""
    if not history:
        return {}
    first, last = history[0].get("labels") or {}, history[-1].get("labels") or {}
    return {"clusters": history[-1].get("clusters"), "ari": last.get("ari"),
            "cross_camera_join_rate": last.get("cross_camera_join_rate"),
            "ids_joined_across_share": last.get("ids_joined_across_share"),
            "ids_joined_across_leading_share": last.get("ids_joined_across_leading_share"),
            "ids_joined_across_share_epoch0": first.get("ids_joined_across_share")}


def run_one(row: str, seed: int, prof, ds, work: Path, device: str) -> dict:
    method, extra = ROWS[row]
    p = apply_overrides(prof, extra)
    t0 = time.time()
    if method == "direct":
        seed_everything(seed)
        net = build_model(p.model.arch, p.model.pooling, p.model.pretrained, device=device)
        res = evaluate_model(net, ds.query, ds.gallery, p, device)
        out = {"mAP": res["mAP"], "rank1": res["rank1"]}
    else:
        train = train_hhcl if method == "hhcl" else partial(train_supervised, method=method)
        r = train(p, ds, out_dir=work / f"{row}-seed{seed}", device=device, seed=seed, selection="last",
                  resume=False, log=lambda line: print(line, file=sys.stderr))
        out = {"mAP": r.test["mAP"], "rank1": r.test["rank1"], **label_quality(r.history)}
    return {"row": row, "seed": seed, **out, "seconds": round(time.time() - t0, 1)}


def summarise(runs: list[dict]) -> dict:
    out = {}
    for row in ROWS:
        rs = [r for r in runs if r["row"] == row]
        if not rs:
            continue
        s = {"label": LABELS[row], "seeds": [r["seed"] for r in rs], "n": len(rs)}
        for k in ("mAP", "rank1", "cross_camera_join_rate", "ids_joined_across_share_epoch0",
                  "ids_joined_across_share", "ids_joined_across_leading_share", "seconds"):
            v = [r[k] for r in rs if r.get(k) is not None]
            if v:
                s[k] = float(np.mean(v))
                s[k + "_std"] = float(np.std(v))
        out[row] = s
    return out


def table(summary: dict) -> str:
    def pm(s, k, scale=100.0):
        return f"{scale * s[k]:.1f} ± {scale * s[k + '_std']:.1f}" if k in s else "-"
    lines = ["| run | seeds | mAP (%) | rank-1 (%) | cross-camera pairs joined (%) | ids joined across cameras, "
             "first -> last epoch (%) | ... in a cluster they lead, last epoch (%) | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summary.values():
        joined = (f"{pm(s, 'ids_joined_across_share_epoch0')} -> {pm(s, 'ids_joined_across_share')}"
                  if "ids_joined_across_share" in s else "-")
        lines.append(f"| {s['label']} | {s['n']} | {pm(s, 'mAP')} | {pm(s, 'rank1')} | "
                     f"{pm(s, 'cross_camera_join_rate')} | {joined} | "
                     f"{pm(s, 'ids_joined_across_leading_share')} | {s.get('seconds', 0):.0f} |")
    return "\n".join(lines)


def merge(files: list[str], out: Path) -> int:
    """One result file (and table) from several, e.g. seed 1 of every row and seeds 2-3 of some. A
    file that is itself a merge (its ``meta`` a list) can be merged again."""
    docs = [json.loads(Path(f).read_text()) for f in files]
    runs = [r for d in docs for r in d["runs"]]
    for d in docs:
        if isinstance(d["meta"], list):
            continue   # a merge: its runs were backfilled when it was written
        work = Path(d["meta"].get("work_dir", ""))
        for r in d["runs"]:
            hist = work / f"{r['row']}-seed{r['seed']}" / "history.json"
            # only HHCL rows cluster: their pseudo-labels have scores
            if "ids_joined_across_share_epoch0" not in r and ROWS[r["row"]][0] == "hhcl" and hist.is_file():
                r.update(label_quality(json.loads(hist.read_text())))  # results written before this field
    seen = {(r["row"], r["seed"]) for r in runs}
    if len(seen) != len(runs):
        raise SystemExit("the files repeat a (row, seed) run")
    runs.sort(key=lambda r: (list(ROWS).index(r["row"]), r["seed"]))
    summary = summarise(runs)
    metas = [m for d in docs for m in (d["meta"] if isinstance(d["meta"], list) else [d["meta"]])]
    atomic_write_json(out, {"meta": metas, "runs": runs, "summary": summary})
    print(table(summary))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", help="a Market-layout two-camera dataset (e.g. cuhk03-dev)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="no training: merge the runs of these result files into --out and print the table")
    ap.add_argument("--dataset", default="market1501")
    ap.add_argument("--profile", default="laptop")
    ap.add_argument("--subset-ids", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows: " + ", ".join(ROWS))
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--work-dir", default="runs/results_cameras")
    ap.add_argument("--out", default="benchmarks/out/cameras.json")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))
    if not args.data_root:
        ap.error("--data-root is required (or --merge)")
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {"data.dataset": args.dataset, "data.subset_ids": args.subset_ids, **parse_set(args.set)}
    prof = apply_overrides(args.profile, overrides)
    ds = load_profile_dataset(prof, args.data_root)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    meta = {"profile": args.profile, "overrides": overrides, "data_root": str(args.data_root),
            "work_dir": str(args.work_dir),
            "train_images": len(ds.train), "query": len(ds.query), "gallery": len(ds.gallery),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    runs: list[dict] = []
    for seed in args.seeds:
        for row in rows:
            runs.append(run_one(row, seed, prof, ds, Path(args.work_dir), args.device))
            print(json.dumps(runs[-1]), flush=True)
            atomic_write_json(Path(args.out), {"meta": meta, "runs": runs, "summary": summarise(runs)})
    summary = summarise(runs)
    print(json.dumps({"meta": meta, "summary": summary}, indent=1))
    print(table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
