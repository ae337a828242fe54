"""Measured results of the DGL training side on the embedded mini-MARS sample.

For each seed (default 1, 2, 3) and each model:

* ``DGL full``: the full model (CPU variant on the workshop / smoke profiles);
* ``DGL unary-only``: the unary-only variant (ft_net, greedy balanced assignment);
* ``supervised``: the same network as DGL full, trained with the true identities;
* ``direct transfer``: the ImageNet network without re-ID training (does not depend on the seed);

it reports, on the sample's test split, the Market-protocol mAP and rank-1, and the SYSU-30k-protocol
rank-1 on the sample (each query against the gallery plus all training images as distractors,
label -1000, streamed through ``sysu30k_evaluate``). Mean and sample standard deviation over seeds.

Prints one JSON object, then a markdown table. Usage::

    python benchmarks/results_dgl.py [--profile workshop] [--seeds 1 2 3] [--run-dir DIR] [--json OUT]

Checkpoints go to ``--run-dir`` (default: a temporary folder), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("DGL full", "DGL unary-only", "supervised", "direct transfer")
VARIANT = {"DGL full": "full", "DGL unary-only": "unary_only", "supervised": "supervised"}


def _scores(model, ds, prof, device, variant):
    from reidkit.dgl.evaluate import evaluate_weak, extract_weak_features, sample_sysu_protocol

    market, qf, gf = evaluate_weak(model, ds.query, ds.gallery, prof, device, variant=variant, return_features=True)
    tf = extract_weak_features(model, ds.train, prof, device, variant=variant)
    sysu = sample_sysu_protocol(qf, [r.pid for r in ds.query], [r.camid for r in ds.query], gf,
                                [r.pid for r in ds.gallery], [r.camid for r in ds.gallery], tf)
    return {"mAP": market["mAP"], "rank1": market["rank1"], "sysu_rank1": sysu["rank1"], "sysu_mAP": sysu["mAP"]}


def run(profile: str, seeds, run_dir: Path, device: str = "auto") -> dict:
    from reidkit.config import get_profile
    from reidkit.core.device import cpu_description, resolve_device, seed_everything
    from reidkit.data.datasets import load_dataset
    from reidkit.dgl.method import train_dgl
    from reidkit.nets.backbones import build_model

    prof = get_profile(profile)
    dev = resolve_device(device)
    ds = load_dataset(prof.data.dataset)
    per_seed: dict[str, list[dict]] = {m: [] for m in MODELS}
    timing: dict[str, float] = {}
    t0 = time.time()
    seed_everything(prof.seed)
    net = build_model(prof.model.arch, prof.model.pooling, prof.model.pretrained,
                      last_stride=prof.model.last_stride, device=dev)
    direct = _scores(net, ds, prof, dev, "full")
    timing["direct transfer"] = time.time() - t0
    for seed in seeds:
        per_seed["direct transfer"].append(dict(direct, seed=seed))
        for name, variant in VARIANT.items():
            t1 = time.time()
            res = train_dgl(prof, ds, run_dir / f"seed{seed}" / variant, variant=variant, device=dev, seed=seed,
                            evaluate=False, log=lambda s: print(s, file=sys.stderr, flush=True))
            scores = _scores(res.model, ds, prof, dev, variant)
            scores.update(seed=seed, final_pseudo_acc=res.history[-1].get("pseudo_acc"),
                          train_seconds=sum(h["t_epoch"] for h in res.history))
            per_seed[name].append(scores)
            timing[f"{name} seed {seed}"] = time.time() - t1
            print(f"{name} seed {seed}: {json.dumps({k: v for k, v in scores.items()})}", file=sys.stderr, flush=True)
    summary = {}
    for name, rows in per_seed.items():
        summary[name] = {}
        for key in ("mAP", "rank1", "sysu_rank1", "sysu_mAP"):
            vals = np.array([r[key] for r in rows], dtype=float)
            summary[name][key] = {"mean": float(vals.mean()),
                                  "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                                  "values": vals.tolist()}
    return {"profile": prof.name, "seeds": list(seeds), "device": str(dev), "torch_threads": _threads(),
            "host": platform.node(), "cpu_count": os.cpu_count(), "cpu": cpu_description(), "wall_seconds": time.time() - t0,
            "timing_seconds": timing, "summary": summary, "per_seed": per_seed}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def markdown(result: dict) -> str:
    lines = [f"DGL on the mini-MARS sample, profile `{result['profile']}`, seeds {result['seeds']} "
             f"(mean ± std; {result['device']}, wall {result['wall_seconds'] / 60:.1f} min)", "",
             "| model | supervision | mAP | rank-1 | SYSU-protocol rank-1 |", "|---|---|---|---|---|"]
    sup = {"DGL full": "weak (bags)", "DGL unary-only": "weak (bags)", "supervised": "full labels",
           "direct transfer": "none (ImageNet)"}
    for name, s in result["summary"].items():
        cells = [f"{100 * s[k]['mean']:.1f} ± {100 * s[k]['std']:.1f}" for k in ("mAP", "rank1", "sysu_rank1")]
        lines.append(f"| {name} | {sup[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="workshop")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--run-dir", type=Path, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    os.environ.setdefault("REIDKIT_PROGRESS", "0")
    if args.run_dir is None:
        with tempfile.TemporaryDirectory(prefix="results_dgl_") as tmp:
            result = run(args.profile, args.seeds, Path(tmp), args.device)
    else:
        result = run(args.profile, args.seeds, args.run_dir, args.device)
    text = json.dumps(result, indent=2)
    print(text)
    print()
    print(markdown(result))
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
