"""Benchmark of the clustering step: kNN, k-reciprocal Jaccard distance and DBSCAN.

Usage::

    python benchmarks/bench_cluster.py                      # N = 3000, 12936 (Market), 32621 (MSMT17)
    python benchmarks/bench_cluster.py --sizes 3000,12936
    python benchmarks/bench_cluster.py --quick              # N = 3000 only, quick sanity run
    python benchmarks/bench_cluster.py --sizes 3000 --rerank  # + re-ranking at Market size

Prints one JSON document. Every (size, step) runs in a **fresh subprocess** that first generates the
features; the peak resident memory is then reset (``/proc/self/clear_refs``) and read after the step.
``peak_rss_mb`` is the process's high-water mark during the step, libraries (torch alone maps about
0.5 GB) and input features included; ``rss_before_mb`` is the resident size just before the step and
``peak_over_before_mb`` the difference, i.e. what the step itself added.

Data: synthetic, cluster-structured, L2-normalised float32 2048-d features: about N/17 identities of
4-30 members (noise norm 0.5-1.0 around the identity centre), centres grouped around shared
"super-centres" so that different identities are correlated as in real re-ID features, plus 8%
isolated points.

Steps timed per size:

* ``bruteforce_knn``: a plain exact torch kNN (row chunks of ``X X^T`` + ``topk``, k = 30), the
  reference cost of "just finding the neighbours";
* ``knn``: :func:`reidkit.retrieval.knn.knn` with ``backend="auto"`` (k = 30, self-search) and
  ``precision="auto"`` (the direct fp32 search, see ``knn``); ``knn_exact``: the canonical fp32
  answer (fp32 screen + exact re-scoring); ``knn_bf16``: the bf16 screen, which must equal
  ``knn_exact`` bit for bit (``knn_bf16_identical_to_knn_exact``);
* ``jaccard``: :func:`reidkit.retrieval.jaccard.jaccard_distance` (k1 = 30, k2 = 6), **including** its kNN,
  ``precision="auto"``; ``jaccard_exact`` and ``jaccard_bf16``: the same on the two canonical kNN
  paths (``jaccard_bf16_identical_to_jaccard_exact``);
* ``dbscan``: :func:`reidkit.hhcl.clustering.dbscan_labels` on the sparse Jaccard matrix (eps 0.6,
  min_samples 4); ``peak_rss_jaccard_plus_dbscan_mb`` covers both steps.

``jaccard_over_bruteforce_knn`` = jaccard time / brute-force kNN time (issue 12's goal: <= 0.25);
``jaccard_bf16_over_bruteforce_knn`` the same with the bf16 screen.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from proc_memory import peak_mb, reset_peak, rss_mb

ROOT = Path(__file__).resolve().parents[1]


def make_features(n: int, dim: int = 2048, seed: int = 0, cluster_mean: int = 17,
                  outlier_frac: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """Cluster-structured unit features and their identity labels (-1 = isolated point).

    Identity centres are ``0.7 * super-centre + N(0, 1/dim)`` (about 10 identities per super-centre),
    members are ``centre + noise`` with per-identity noise norm in [0.5, 1], isolated points are
    random unit vectors plus ``0.4 * super-centre``; everything is L2-normalised at the end.
    """
    rng = np.random.default_rng(seed)
    n_out = int(round(outlier_frac * n))
    n_cl = n - n_out
    k = max(1, n_cl // cluster_mean)
    sizes = rng.integers(4, 2 * cluster_mean - 3, size=k).astype(np.int64)
    sizes = np.maximum(1, np.round(sizes * n_cl / sizes.sum()).astype(np.int64))
    sizes[-1] = max(1, sizes[-1] + n_cl - sizes.sum())
    n_cl = int(sizes.sum())
    n_out = n - n_cl
    n_super = max(1, k // 10)
    supers = rng.standard_normal((n_super, dim), dtype=np.float32)
    supers /= np.linalg.norm(supers, axis=1, keepdims=True)
    cent = 0.7 * supers[rng.integers(0, n_super, k)] + rng.standard_normal((k, dim), dtype=np.float32) / np.sqrt(dim)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), sizes)
    noise = rng.uniform(0.5, 1.0, k)[labels].astype(np.float32) / np.float32(np.sqrt(dim))
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n_cl, 4096):  # in chunks: no float64 N x d temporaries
        e = min(s + 4096, n_cl)
        x[s:e] = cent[labels[s:e]] + rng.standard_normal((e - s, dim), dtype=np.float32) * noise[s:e, None]
    xo = rng.standard_normal((n_out, dim), dtype=np.float32)
    x[n_cl:] = xo / np.linalg.norm(xo, axis=1, keepdims=True) + 0.4 * supers[rng.integers(0, n_super, n_out)]
    labels = np.concatenate([labels, -np.ones(n_out, np.int64)])
    perm = rng.permutation(n)
    x, labels = x[perm], labels[perm]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


# ------------------------------------------------------------------------------------ child side
def bruteforce_knn(x, k: int, chunk_rows: int = 1024):
    """Plain exact kNN: for each chunk of rows, all squared distances then ``topk``."""
    import torch

    sq = (x * x).sum(1)
    out = []
    for s in range(0, x.shape[0], chunk_rows):
        d = torch.addmm(sq[s:s + chunk_rows, None] + sq[None, :], x[s:s + chunk_rows], x.T, beta=1.0, alpha=-2.0)
        out.append(torch.topk(d, k, dim=1, largest=False).indices)
    return torch.cat(out)


STEPS = ("bruteforce_knn", "knn", "knn_exact", "knn_bf16", "jaccard_exact", "jaccard_bf16", "jaccard_dbscan")
MARKET_QG = (3368, 15913)


def run_rerank_child(nq: int, ng: int, repeats: int) -> dict:
    """Re-ranking of a Market-sized query x gallery problem (inputs as torchreid passes them)."""
    import torch

    sys.path.insert(0, str(ROOT))
    from reidkit.retrieval.rerank import re_ranking

    x, _ = make_features(nq + ng, seed=1)
    qf, gf = torch.from_numpy(x[:nq]), torch.from_numpy(x[nq:])

    def sqdist(a, b):  # torchreid's compute_distance_matrix(..., 'euclidean'): squared, via addmm
        out = torch.empty(a.shape[0], b.shape[0])
        bn = (b * b).sum(1)
        for s in range(0, a.shape[0], 2048):
            e = min(s + 2048, a.shape[0])
            torch.addmm(bn[None, :], a[s:e], b.T, beta=1.0, alpha=-2.0, out=out[s:e])
            out[s:e].add_((a[s:e] * a[s:e]).sum(1, keepdim=True))
        return out.numpy()

    qg, qq, gg = sqdist(qf, gf), sqdist(qf, qf), sqdist(gf, gf)
    del x, qf, gf
    res: dict = {"n_query": nq, "n_gallery": ng, "inputs_mb": round((qg.nbytes + qq.nbytes + gg.nbytes) / 2**20, 1),
                 "rss_before_mb": round(rss_mb(), 1)}
    best, peak = float("inf"), 0.0
    for _ in range(repeats):
        reset_peak()
        t0 = time.perf_counter()
        out, info = re_ranking(qg, qq, gg, k1=20, k2=6, lambda_value=0.3, return_info=True)
        best = min(best, time.perf_counter() - t0)
        peak = max(peak, peak_mb())
        del out
    res.update({"time_s": round(best, 3), "peak_rss_mb": round(peak, 1),
                "peak_over_before_mb": round(peak - res["rss_before_mb"], 1), "device": info["device"]})
    res.update({k: round(v, 3) for k, v in info.items() if k.startswith("time_") and k != "time_total_s"})
    return res


def run_child(n: int, step: str, eps: float, repeats: int) -> dict:
    """Run one step for one size in this (fresh) process and return its measurements."""
    import torch

    sys.path.insert(0, str(ROOT))
    for mod in ("sklearn.cluster", "sklearn.metrics"):  # import cost is not part of the DBSCAN timing
        importlib.import_module(mod)

    from reidkit.hhcl.clustering import cluster_stats, dbscan_labels
    from reidkit.retrieval.jaccard import jaccard_distance
    from reidkit.retrieval.knn import knn

    x, gt = make_features(n)
    xt = torch.from_numpy(x)
    res: dict = {"rss_before_mb": round(rss_mb(), 1)}

    def timed(fn):
        best, out, peak = float("inf"), None, 0.0
        for _ in range(repeats):
            out = None
            reset_peak()
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
            peak = max(peak, peak_mb())
        return out, round(best, 3), round(peak, 1)

    if step == "bruteforce_knn":
        with torch.no_grad():
            _, res["time_s"], res["peak_rss_mb"] = timed(lambda: bruteforce_knn(xt, 30))
    elif step in ("knn", "knn_exact", "knn_bf16"):
        prec = {"knn": "auto", "knn_exact": "exact", "knn_bf16": "bf16"}[step]
        r, res["time_s"], res["peak_rss_mb"] = timed(lambda: knn(xt, 30, precision=prec))
        res["backend"], res["precision"] = r.backend, r.precision
        res["sha1"] = hashlib.sha1(r.indices.tobytes() + r.sq_dists.tobytes()).hexdigest()
    elif step in ("jaccard_exact", "jaccard_bf16"):
        prec = step.split("_")[1]
        (jd, info), res["time_s"], res["peak_rss_mb"] = timed(
            lambda: jaccard_distance(xt, 30, 6, return_info=True, precision=prec))
        res.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items()
                    if k.startswith("time_") or k in ("knn_backend", "knn_precision")})
        res["sha1"] = hashlib.sha1(jd.indices.tobytes() + jd.data.tobytes()).hexdigest()
    elif step == "jaccard_dbscan":
        (jd, info), res["time_s"], res["peak_rss_mb"] = timed(lambda: jaccard_distance(xt, 30, 6, return_info=True))
        res.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in info.items()
                    if k.startswith("time_") or k in ("knn_backend", "knn_precision", "device", "v_nnz")})
        res["sha1"] = hashlib.sha1(jd.indices.tobytes() + jd.data.tobytes()).hexdigest()
        res["stored_pairs"] = int(jd.nnz)
        res["stored_pairs_per_row"] = round(jd.nnz / n, 1)
        # DBSCAN right after the Jaccard, without resetting the peak: the Jaccard + DBSCAN peak
        t0 = time.perf_counter()
        labels = dbscan_labels(jd, eps, 4)
        db = {"time_s": round(time.perf_counter() - t0, 3), "eps": eps, "min_samples": 4}
        res["peak_rss_jaccard_plus_dbscan_mb"] = round(peak_mb(), 1)
        reset_peak()
        dbscan_labels(jd, eps, 4)
        db["peak_rss_mb"] = round(peak_mb(), 1)
        st = cluster_stats(labels, gt)
        db.update({k: (round(v, 4) if isinstance(v, float) else v) for k, v in st.items()})
        res["dbscan"] = db
    else:
        raise ValueError(step)
    res["peak_over_before_mb"] = round(res["peak_rss_mb"] - res["rss_before_mb"], 1)
    return res


# ------------------------------------------------------------------------------------ parent side
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=None, help="comma-separated N values (default 3000,12936,32621)")
    ap.add_argument("--quick", action="store_true", help="N = 3000 only, one repeat")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per step (best is kept; default 1)")
    ap.add_argument("--eps", type=float, default=0.6)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--step", choices=STEPS + ("rerank",), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rerank", action="store_true",
                    help="also time re_ranking on a Market-sized problem (3368 x 15913, ~1.3 GB of inputs)")
    args = ap.parse_args(argv)
    repeats = args.repeats or 1
    if args.child is not None:
        if args.step == "rerank":
            print(json.dumps(run_rerank_child(*MARKET_QG, repeats)))
        else:
            print(json.dumps(run_child(args.child, args.step, args.eps, repeats)))
        return 0
    if args.sizes:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    else:
        sizes = [3000] if args.quick else [3000, 12936, 32621]
    import torch

    from reidkit.core.device import cpu_description
    report = {
        "benchmark": "reidkit clustering step (kNN, k-reciprocal Jaccard, DBSCAN)",
        "quick": args.quick,
        "repeats": repeats,
        "cpu_count": os.cpu_count(),
        "cpu": cpu_description(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
        "results": [],
    }
    for n in sizes:
        entry: dict = {"n": n, "dim": 2048}
        for step in STEPS:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(n), "--step", step,
                   "--eps", str(args.eps), "--repeats", str(repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                entry[step] = {"error": proc.stderr[-2000:]}
                continue
            entry[step] = json.loads(proc.stdout.strip().splitlines()[-1])
        jd = entry.get("jaccard_dbscan", {})
        if "dbscan" in jd:
            entry["dbscan"] = jd.pop("dbscan")
            entry["peak_rss_jaccard_plus_dbscan_mb"] = jd.pop("peak_rss_jaccard_plus_dbscan_mb")
            entry["jaccard"] = entry.pop("jaccard_dbscan")
        for key, step in (("jaccard_over_bruteforce_knn", "jaccard"),
                          ("jaccard_exact_over_bruteforce_knn", "jaccard_exact"),
                          ("jaccard_bf16_over_bruteforce_knn", "jaccard_bf16"),
                          ("knn_over_bruteforce_knn", "knn"), ("knn_exact_over_bruteforce_knn", "knn_exact"),
                          ("knn_bf16_over_bruteforce_knn", "knn_bf16")):
            try:
                entry[key] = round(entry[step]["time_s"] / entry["bruteforce_knn"]["time_s"], 3)
            except (KeyError, ZeroDivisionError):
                pass
        # the bf16 screen must give the canonical fp32 answer ("exact") bit for bit; the default
        # direct fp32 search orders numerically tied neighbours by its own rounding, so it is
        # compared for the record only
        for a, b in (("knn_exact", "knn_bf16"), ("jaccard_exact", "jaccard_bf16"), ("knn", "knn_exact"),
                     ("jaccard", "jaccard_exact")):
            if "sha1" in entry.get(a, {}) and "sha1" in entry.get(b, {}):
                entry[f"{b}_identical_to_{a}"] = entry[a]["sha1"] == entry[b]["sha1"]
        report["results"].append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)  # progress while the rest runs
    if args.rerank:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "0", "--step", "rerank",
               "--repeats", str(repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        report["rerank_market"] = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0
                                   else {"error": proc.stderr[-2000:]})
    report["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
