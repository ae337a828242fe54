"""Scaling curves: time and peak memory against N for the clustering step and the SYSU-30k search,
each beside the bare kNN product of the same size; prints one JSON object and draws a PNG.

Curves (every point runs in a **fresh subprocess**; ``peak_rss_mb`` is its VmHWM, i.e. everything
the process ever held: libraries, the input features and the step):

* ``cluster``: ``reidkit.retrieval.jaccard.jaccard_distance`` (k1 30, k2 6; its own kNN included) then
  ``reidkit.hhcl.clustering.dbscan_labels`` (eps 0.6, min_samples 4) at N = 3k, 13k, 33k, 100k on
  synthetic cluster-structured unit features, 2048-d as ResNet-50 (``bench_cluster.make_features``).
  Comparison: ``knn_product``, a plain fp32 brute-force kNN (row blocks of ``X X^T`` + ``topk``,
  k = 30) in its own fresh process.
* ``sysu``: ``reidkit.retrieval.sysu.sysu30k_evaluate`` with 1,000 queries against 10k, 100k and 479k
  gallery rows (2048-d), the gallery generated chunk by chunk (8,192 rows; generation time measured
  inside the generator and excluded). Comparison: ``product``, the bare fp32 ``Q G^T`` over the
  same chunks with a running top-50.

The kNN of the Jaccard step is whatever ``reidkit.retrieval.jaccard`` does by default (``precision="auto"``,
``device="auto"``): its public API only, so a faster path there shows up here unchanged.

Growth exponents: least squares of log(time) on log(N) over the measured points (``time ~ N^b``);
the goal is the clustering step's b no larger than the kNN product's, and peak RSS at N = 100,000
under 6 GB.

Usage::

    python benchmarks/bench_scaling.py [--quick] [--sizes 3000,13000] [--gallery-sizes 10000,100000]
                                       [--skip-cluster] [--skip-sysu] [--png PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from proc_memory import status_mb

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

FULL = {"sizes": [3000, 13000, 33000, 100000], "gallery_sizes": [10000, 100000, 478731], "dim": 2048,
        "queries": 1000}
QUICK = {"sizes": [1000, 3000], "gallery_sizes": [5000, 20000], "dim": 256, "queries": 100}
K1, K2, EPS, MIN_SAMPLES, KNN_K, SYSU_CHUNK, SYSU_TOPK = 30, 6, 0.6, 4, 30, 8192, 50
PEAK_GOAL_MB, PEAK_GOAL_N = 6144, 100000


# ------------------------------------------------------------------------------------ children
def warm_up_cluster(dim: int) -> None:
    """Imports (scikit-learn is imported lazily by DBSCAN) and first-call costs, on 400 points,
    before the timed step: the curve is the step's growth, not start-up."""
    import importlib

    import torch
    from bench_cluster import make_features

    from reidkit.hhcl.clustering import dbscan_labels
    from reidkit.retrieval.jaccard import jaccard_distance

    for mod in ("sklearn.cluster", "sklearn.metrics"):
        importlib.import_module(mod)
    x, _ = make_features(400, dim=dim, seed=9)
    dbscan_labels(jaccard_distance(torch.from_numpy(x), K1, K2), EPS, MIN_SAMPLES)


def child_cluster(n: int, dim: int) -> dict:
    import torch
    from bench_cluster import make_features

    from reidkit.hhcl.clustering import cluster_stats, dbscan_labels
    from reidkit.retrieval.jaccard import jaccard_distance

    warm_up_cluster(dim)
    x, gt = make_features(n, dim=dim)
    xt = torch.from_numpy(x)
    rss_before = status_mb("VmRSS")
    t0 = time.perf_counter()
    jd, info = jaccard_distance(xt, K1, K2, return_info=True)
    t1 = time.perf_counter()
    labels = dbscan_labels(jd, EPS, MIN_SAMPLES)
    t2 = time.perf_counter()
    st = cluster_stats(labels, gt)
    keep = ("knn_backend", "knn_precision", "precision", "device")
    return {"n": n, "dim": dim, "time_s": t2 - t0, "jaccard_s": t1 - t0, "dbscan_s": t2 - t1,
            "peak_rss_mb": status_mb("VmHWM"), "rss_before_mb": rss_before, "features_mb": x.nbytes / 2**20,
            "stored_pairs_per_row": jd.nnz / n, "clusters": st.get("num_clusters", st.get("clusters")),
            **{k: info[k] for k in keep if k in info},
            **{k: round(v, 3) for k, v in info.items() if k.startswith("time_") and isinstance(v, float)}}


def bruteforce_knn(x, k: int, block: int = 2048):
    """fp32 brute force: for each block of rows, the scores against all rows, then ``topk``."""
    import torch

    out = torch.empty(x.shape[0], k, dtype=torch.int64)
    with torch.no_grad():
        for s in range(0, x.shape[0], block):
            out[s:s + block] = torch.topk(x[s:s + block] @ x.T, k, dim=1).indices
    return out


def child_knn(n: int, dim: int) -> dict:
    import torch
    from bench_cluster import make_features

    bruteforce_knn(torch.from_numpy(make_features(400, dim=dim, seed=9)[0]), KNN_K)  # warm-up
    x, _ = make_features(n, dim=dim)
    xt = torch.from_numpy(x)
    rss_before = status_mb("VmRSS")
    t0 = time.perf_counter()
    bruteforce_knn(xt, KNN_K)
    return {"n": n, "dim": dim, "time_s": time.perf_counter() - t0, "peak_rss_mb": status_mb("VmHWM"),
            "rss_before_mb": rss_before, "k": KNN_K}


class Gallery:
    """Re-iterable SYSU-like gallery: the first ``nq`` rows are the queries' true matches (label =
    query index, camera 1), the rest distractors (label -1000); generation time is accumulated."""

    def __init__(self, qf: np.ndarray, num_g: int, chunk: int = SYSU_CHUNK, seed: int = 1):
        self.qf, self.num_g, self.chunk, self.seed, self.gen_s = qf, num_g, chunk, seed, 0.0

    def __call__(self):
        rng = np.random.default_rng(self.seed)
        nq, dim = self.qf.shape
        for s in range(0, self.num_g, self.chunk):
            t0 = time.perf_counter()
            e = min(s + self.chunk, self.num_g)
            f = rng.standard_normal((e - s, dim), dtype=np.float32)
            lab = np.full(e - s, -1000, np.int64)
            m = max(0, min(e, nq) - s)  # true matches in this chunk
            if m:
                f[:m] = self.qf[s:s + m] * np.float32(0.12 * np.sqrt(dim)) + f[:m]  # cosine ~0.12: mid ranks
                lab[:m] = np.arange(s, s + m)
            f /= np.linalg.norm(f, axis=1, keepdims=True)
            cams = np.ones(e - s, np.int64)
            self.gen_s += time.perf_counter() - t0
            yield f, lab, cams


def sysu_queries(nq: int, dim: int) -> np.ndarray:
    q = np.random.default_rng(0).standard_normal((nq, dim), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def child_sysu(num_g: int, dim: int, nq: int) -> dict:
    from reidkit.retrieval.sysu import sysu30k_evaluate

    qf = sysu_queries(nq, dim)
    # warm-up: torch's import (sysu30k_evaluate imports it lazily) and first-call costs are start-up
    sysu30k_evaluate(qf, np.arange(nq), np.full(nq, 2), Gallery(qf, 2 * SYSU_CHUNK), chunk_size=SYSU_CHUNK)
    gallery = Gallery(qf, num_g)
    rss_before = status_mb("VmRSS")
    t0 = time.perf_counter()
    res = sysu30k_evaluate(qf, np.arange(nq), np.full(nq, 2), gallery, chunk_size=SYSU_CHUNK, device="auto")
    total = time.perf_counter() - t0
    return {"num_g": num_g, "queries": nq, "dim": dim, "time_s": total - gallery.gen_s,
            "generation_s": gallery.gen_s, "peak_rss_mb": status_mb("VmHWM"), "rss_before_mb": rss_before,
            "device": res["device"], "passes": res["passes"], "rank1": res["rank1"], "mAP": res["mAP"]}


def child_sysu_product(num_g: int, dim: int, nq: int) -> dict:
    import torch

    qf = sysu_queries(nq, dim)
    q = torch.from_numpy(qf)
    torch.topk(q @ q.T, min(SYSU_TOPK, nq), dim=1)  # warm-up
    gallery = Gallery(qf, num_g)
    rss_before = status_mb("VmRSS")
    best_s = best_i = None
    t0 = time.perf_counter()
    with torch.no_grad():
        for start, (f, _, _) in zip(range(0, num_g, SYSU_CHUNK), gallery()):
            s, i = torch.topk(q @ torch.from_numpy(f).T, min(SYSU_TOPK, f.shape[0]), dim=1)
            i += start
            if best_s is not None:  # running top-k over the chunks
                s, pos = torch.topk(torch.cat([best_s, s], 1), SYSU_TOPK, dim=1)
                i = torch.gather(torch.cat([best_i, i], 1), 1, pos)
            best_s, best_i = s, i
    total = time.perf_counter() - t0
    return {"num_g": num_g, "queries": nq, "dim": dim, "time_s": total - gallery.gen_s,
            "generation_s": gallery.gen_s, "peak_rss_mb": status_mb("VmHWM"), "rss_before_mb": rss_before,
            "topk": SYSU_TOPK}


CHILDREN = {"cluster": child_cluster, "knn": child_knn, "sysu": child_sysu, "sysu_product": child_sysu_product}


# ------------------------------------------------------------------------------------ parent
def code_version() -> dict:
    """Short md5 of the kernels' modules as a point starts (another helper may be changing them)."""
    import hashlib

    return {name: hashlib.md5((ROOT / name).read_bytes()).hexdigest()[:8] for name in KERNEL_FILES}


#: the modules whose code the curves measure (a test checks that each exists)
KERNEL_FILES = ("reidkit/retrieval/knn.py", "reidkit/retrieval/exact.py", "reidkit/retrieval/jaccard.py",
                "reidkit/retrieval/sysu.py", "reidkit/hhcl/clustering.py")


def run_child(kind: str, *args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *map(str, args)]
    started, version = time.strftime("%H:%M:%S"), code_version()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip()[-1500:], "returncode": proc.returncode}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.update(process_wall_s=time.perf_counter() - t0, started=started, code_md5=version,
               loadavg_1min_after=round(os.getloadavg()[0], 2))
    print(json.dumps({kind: out}), file=sys.stderr, flush=True)  # progress while the rest runs
    return out


def growth_exponent(ns, values) -> float | None:
    """Least-squares slope of log(value) on log(n) (``value ~ n^b``); None under two points."""
    pts = [(n, v) for n, v in zip(ns, values) if v and v > 0]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def curve(points: list[dict], key_n: str) -> dict:
    ok = [p for p in points if "time_s" in p]
    ns = [p[key_n] for p in ok]
    return {"n": ns, "time_s": [p["time_s"] for p in ok], "peak_rss_mb": [p["peak_rss_mb"] for p in ok],
            "time_exponent": growth_exponent(ns, [p["time_s"] for p in ok]),
            "peak_rss_exponent": growth_exponent(ns, [p["peak_rss_mb"] - p["rss_before_mb"] + 1 for p in ok]),
            "points": points}


def draw(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series = [("cluster", "Jaccard + DBSCAN", "C0", "o-"), ("knn_product", "fp32 kNN product (N x N)", "C0", "o--"),
              ("sysu", f"sysu30k_evaluate ({report['config']['queries']} queries)", "C3", "s-"),
              ("sysu_product", "Q G^T + top-50", "C3", "s--")]
    for key, label, colour, style in series:
        c = report.get("curves", {}).get(key)
        if not c or not c["n"]:
            continue
        b = c["time_exponent"]
        axes[0].loglog(c["n"], c["time_s"], style, color=colour,
                       label=f"{label}: ~N**{b:.2f}" if b is not None else label)
        axes[1].loglog(c["n"], [v / 1024 for v in c["peak_rss_mb"]], style, color=colour, label=label)
    axes[1].axhline(PEAK_GOAL_MB / 1024, color="grey", lw=0.8, ls=":", label="6 GB goal")
    for ax, title, ylab in ((axes[0], "time", "seconds"), (axes[1], "peak RSS (VmHWM, fresh process)", "GiB")):
        ax.set_title(title)
        ax.set_xlabel("N (features; gallery rows for SYSU)")
        ax.set_ylabel(ylab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = report["machine"]
    cpu = m.get("cpu") or {}
    fig.suptitle(f"reidkit scaling, {cpu.get('model', 'CPU')}, {m['cpus']} cores (bf16: {cpu.get('bf16') or 'none'}), "
                 f"torch threads {m['torch_threads']}")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def measure(cfg: dict, skip_cluster: bool, skip_sysu: bool) -> dict:
    """All points, smallest work first (the SYSU curve, then the clustering sizes ascending)."""
    curves: dict = {}
    if not skip_sysu:
        ev, pr = [], []
        for g in cfg["gallery_sizes"]:
            pr.append(run_child("sysu_product", g, cfg["dim"], cfg["queries"]))
            ev.append(run_child("sysu", g, cfg["dim"], cfg["queries"]))
        curves["sysu"], curves["sysu_product"] = curve(ev, "num_g"), curve(pr, "num_g")
    if not skip_cluster:
        cl, kn = [], []
        for n in cfg["sizes"]:
            kn.append(run_child("knn", n, cfg["dim"]))
            cl.append(run_child("cluster", n, cfg["dim"]))
        curves["cluster"], curves["knn_product"] = curve(cl, "n"), curve(kn, "n")
    return curves


def verdicts(curves: dict) -> dict:
    out: dict = {}
    for name, ref in (("cluster", "knn_product"), ("sysu", "sysu_product")):
        a, b = curves.get(name, {}).get("time_exponent"), curves.get(ref, {}).get("time_exponent")
        if a is not None and b is not None:
            out[f"{name}_exponent_minus_{ref}"] = a - b
            out[f"{name}_grows_no_faster_than_{ref}"] = bool(a <= b + 0.05)  # 0.05: fit noise
    cl = curves.get("cluster", {})
    for p in cl.get("points", []):
        if p.get("n") == PEAK_GOAL_N and "peak_rss_mb" in p:
            out["cluster_peak_rss_mb_at_100k"] = p["peak_rss_mb"]
            out["cluster_100k_within_6GB"] = bool(p["peak_rss_mb"] <= PEAK_GOAL_MB)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small N and 256-d features (smoke use)")
    ap.add_argument("--sizes", help="comma-separated N of the clustering curve")
    ap.add_argument("--gallery-sizes", help="comma-separated gallery sizes of the SYSU curve")
    ap.add_argument("--skip-cluster", action="store_true")
    ap.add_argument("--skip-sysu", action="store_true")
    ap.add_argument("--png", default=None,
                    help="the figure (default benchmarks/out/scaling.png; with --quick benchmarks/out/quick/, "
                         "so that a smoke run never replaces the committed curves)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        print(json.dumps(CHILDREN[kind](*map(int, rest))))
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    if args.sizes:
        cfg["sizes"] = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.gallery_sizes:
        cfg["gallery_sizes"] = [int(s) for s in args.gallery_sizes.split(",") if s.strip()]
    import torch

    from reidkit.core.device import cpu_description
    report: dict = {
        "benchmark": "reidkit scaling curves", "quick": args.quick, "config": cfg,
        "settings": {"k1": K1, "k2": K2, "eps": EPS, "min_samples": MIN_SAMPLES, "knn_k": KNN_K,
                     "sysu_chunk": SYSU_CHUNK},
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_description(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "cuda": torch.cuda.is_available(),
                    "loadavg_at_start": [round(v, 2) for v in os.getloadavg()]},
        "peak_rss": "VmHWM of a fresh subprocess per point (libraries and input features included)",
    }
    report["curves"] = measure(cfg, args.skip_cluster, args.skip_sysu)
    report["verdicts"] = verdicts(report["curves"])
    report["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    png = Path(args.png) if args.png else HERE / "out" / ("quick" if args.quick else "") / "scaling.png"
    draw(report, png)
    report["png"] = str(png)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
