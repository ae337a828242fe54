"""Measured HHCL results on the embedded mini-MARS sample: direct transfer, Cluster-Contrast CM,
HHCL CMhybrid and CMhybrid_v2, several seeds, mean and spread of mAP and rank-1 on the test split.

    python benchmarks/results_hhcl.py [--profile workshop] [--seeds 1 2 3] [--run-dir RUN_DIR]

Each training run selects its epoch on the validation split held out from the training identities
(never on the test split). Prints JSON, then a markdown table. With ``--run-dir`` the table is also
written as ``RUN_DIR/results_hhcl/metrics.json`` so that ``report.md`` (``reidkit report RUN_DIR``)
shows it, and each run's per-epoch history (the curves that explain the ranking) is kept under it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reidkit.config import get_profile  # noqa: E402
from reidkit.core.device import seed_everything  # noqa: E402
from reidkit.core.io import atomic_write_json
from reidkit.data.datasets import load_dataset  # noqa: E402
from reidkit.hhcl.method import train_hhcl  # noqa: E402
from reidkit.nets.backbones import build_model  # noqa: E402
from reidkit.retrieval.protocol import evaluate_model

METHODS = {"Cluster-Contrast CM": "CM", "HHCL CMhybrid": "CMhybrid", "HHCL CMhybrid_v2": "CMhybrid_v2"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="workshop")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--work-dir", default="runs/results_hhcl", help="checkpoints of the training runs")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    prof = get_profile(args.profile)
    ds = load_dataset(prof.data.dataset)
    runs: dict[str, list[dict]] = {"direct transfer": []}
    histories: dict[str, dict] = {}
    t_all = time.time()
    for seed in args.seeds:
        seed_everything(seed)
        net = build_model(prof.model.arch, prof.model.pooling, prof.model.pretrained, device=args.device)
        runs["direct transfer"].append(evaluate_model(net, ds.query, ds.gallery, prof, args.device))
        for name, mode in METHODS.items():
            t0 = time.time()
            res = train_hhcl(prof, ds, out_dir=Path(args.work_dir) / f"{mode}-seed{seed}", device=args.device,
                             memory=mode, seed=seed, selection="val", log=lambda line: print(line, file=sys.stderr))
            runs.setdefault(name, []).append({**res.test, "selected_epoch": res.best_epoch,
                                              "seconds": time.time() - t0})
            histories[f"{mode}-seed{seed}"] = res.history
    summary = {}
    for name, rs in runs.items():
        m = np.array([r["mAP"] for r in rs]) * 100
        r1 = np.array([r["rank1"] for r in rs]) * 100
        summary[name] = {"mAP_mean": float(m.mean()), "mAP_std": float(m.std(ddof=1)) if len(m) > 1 else 0.0,
                         "rank1_mean": float(r1.mean()), "rank1_std": float(r1.std(ddof=1)) if len(r1) > 1 else 0.0,
                         "mAP_runs": m.round(2).tolist(), "rank1_runs": r1.round(2).tolist()}
    out = {"profile": prof.name, "dataset": ds.name, "seeds": args.seeds, "selection": "validation split",
           "wall_seconds": round(time.time() - t_all, 1), "summary": summary}
    print(json.dumps(out, indent=2))
    rows = [[name, f"{s['mAP_mean']:.1f} ± {s['mAP_std']:.1f}", f"{s['rank1_mean']:.1f} ± {s['rank1_std']:.1f}",
             ", ".join(f"{v:.1f}" for v in s["mAP_runs"])] for name, s in summary.items()]
    columns = ["method", "mAP (mean ± sd)", "rank-1 (mean ± sd)", "mAP per seed"]
    print("\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    if args.run_dir:
        d = Path(args.run_dir) / "results_hhcl"
        atomic_write_json(d / "histories.json", histories)
        atomic_write_json(d / "metrics.json", {
            **{k: v for k, v in out.items() if k != "summary"},
            "tables": {f"HHCL on {ds.name} test split ({len(args.seeds)} seeds, selection on validation)":
                       {"columns": columns, "rows": rows}}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
