"""Benchmark of the evaluation kernels; prints one JSON object to stdout.

Sections (each runs in a fresh subprocess, so its peak RSS is its own):

* ``market``: ``evaluate_rank`` at Market-1501 size (3,368 x 15,913) on distances from
  synthetic L2-normalised features (750 ids, pid-0 distractors, 6 cameras), against one
  ``np.argsort(distmat, axis=1)`` of the same matrix in the same process.
* ``rerank``: ``re_ranking`` at Market size (3,368 + 15,913), wall time and peak RSS
  (reported as unavailable if ``reidkit.retrieval.rerank.re_ranking`` cannot be imported).
* ``sysu``: ``sysu30k_evaluate`` at full SYSU-30k scale (1,000 queries x 478,731 gallery x
  2048-d), the gallery produced chunk by chunk by a callable (never held whole), with the fp32
  and with the bf16 screening (``precision``; both give identical results, checked here),
  against a plain float32 ``Q @ G_chunk.T`` over the same generated chunks. Generation time is
  measured inside the generator and **excluded** from all timings.
* ``sysu_wide``: ``sysu30k_evaluate`` with 28,310-d features (the MGN-style concatenated
  feature) at full SYSU size, gallery generated chunk by chunk (a block of random rows rotated
  per chunk, true matches in the first chunk), ``precision="auto"``; peak RSS target 3 GB.

Usage::

    python benchmarks/bench_eval.py [--quick] [--section {market,rerank,sysu,sysu_wide,all}]
                                    [--skip-rerank] [--repeat N]

``all`` runs every section, ``sysu_wide`` included (about three minutes at full size).
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
from proc_memory import peak_mb

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FULL = {
    "market": dict(num_q=3368, num_g=15913, num_ids=750, num_distractors=2793, dim=64),
    "sysu": dict(num_q=1000, num_g=478731, dim=2048, chunk=8192),
    "sysu_wide": dict(num_q=1000, num_g=478731, dim=28310, chunk=2048),
}
QUICK = {
    "market": dict(num_q=400, num_g=2000, num_ids=100, num_distractors=350, dim=64),
    "sysu": dict(num_q=100, num_g=20000, dim=256, chunk=4096),
    "sysu_wide": dict(num_q=200, num_g=20000, dim=28310, chunk=2048),
}


def market_data(num_q, num_g, num_ids, num_distractors, dim, seed=0):
    """Market-like features: identity centres + per-image noise, L2-normalised.

    Gallery: ``num_g - num_distractors`` images of the ``num_ids`` ids (pids 1..num_ids)
    plus distractors with pid 0; query: images of the same ids; 6 cameras, 0-based.
    The noise level gives a mAP in the range of a mid-training model."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    n_real = num_g - num_distractors
    g_pids = np.concatenate([rng.permutation(np.arange(n_real) % num_ids) + 1,
                             np.zeros(num_distractors, np.int64)])
    q_pids = rng.integers(1, num_ids + 1, num_q)
    noise = 1.1 / np.sqrt(dim)  # dim=64: mAP about 0.74, rank-1 about 0.97
    gf = rng.standard_normal((num_g, dim)).astype(np.float32) * noise
    gf[:n_real] += centres[g_pids[:n_real] - 1]
    gf[n_real:] += rng.standard_normal((num_distractors, dim)).astype(np.float32) / np.sqrt(dim)
    qf = centres[q_pids - 1] + rng.standard_normal((num_q, dim)).astype(np.float32) * noise
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    q_cams = rng.integers(0, 6, num_q)
    g_cams = rng.integers(0, 6, num_g)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


# ----------------------------------------------------------------------------------------------
# workers (one per subprocess)
# ----------------------------------------------------------------------------------------------


def work_market(cfg: dict, repeat: int) -> dict:
    from reidkit.retrieval.distances import pairwise_distance
    from reidkit.retrieval.market import evaluate_rank

    qf, gf, q_pids, g_pids, q_cams, g_cams = market_data(**cfg)
    distmat = pairwise_distance(qf, gf, device="cpu")
    del qf, gf
    evaluate_rank(distmat[:8], q_pids[:8], g_pids, q_cams[:8], g_cams, device="cpu")  # warm-up
    t_eval, t_sort = [], []
    for _ in range(repeat):  # interleaved, so both see the same machine load
        t0 = time.perf_counter()
        res = evaluate_rank(distmat, q_pids, g_pids, q_cams, g_cams, device="cpu")
        t_eval.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.argsort(distmat, axis=1)
        t_sort.append(time.perf_counter() - t0)
    return {
        "shape": list(distmat.shape),
        "backend": res["backend"],
        "evaluate_rank_s": min(t_eval),
        "argsort_s": min(t_sort),
        "ratio_eval_over_argsort": min(t_eval) / min(t_sort),
        "evaluate_rank_s_all": t_eval,
        "argsort_s_all": t_sort,
        "timing": f"min over {repeat} interleaved runs",
        "mAP": res["mAP"],
        "rank1": float(res["cmc"][0]),
        "mINP": res["mINP"],
        "num_valid_q": res["num_valid_q"],
        "peak_rss_mb": peak_mb(),
    }


def work_rerank(cfg: dict, repeat: int) -> dict:
    from reidkit.retrieval.distances import pairwise_distance

    try:
        from reidkit.retrieval.rerank import re_ranking
        from reidkit.retrieval.rerank import re_ranking as _check  # noqa: F401
    except Exception as exc:  # noqa: BLE001 (module of another helper, may not exist yet)
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    qf, gf, *_ = market_data(**cfg)
    q_g = pairwise_distance(qf, gf, device="cpu")
    q_q = pairwise_distance(qf, qf, device="cpu")
    g_g = pairwise_distance(gf, gf, device="cpu")
    del qf, gf
    rss_inputs = peak_mb()
    t0 = time.perf_counter()
    try:
        out = re_ranking(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3, device="cpu")
    except Exception as exc:  # noqa: BLE001
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}
    wall = time.perf_counter() - t0
    return {
        "available": True,
        "num_q": int(q_g.shape[0]),
        "num_g": int(q_g.shape[1]),
        "wall_s": wall,
        "peak_rss_mb": peak_mb(),
        "peak_rss_mb_after_inputs": rss_inputs,
        "output_shape": list(np.shape(out)),
        "targets": "wall <= 8 s, peak RSS < 3 GB (inputs included: g_g alone is 1 GB)",
    }


class TimedSysuGallery:
    """Re-creatable SYSU-like gallery generator that measures its own generation time.

    The first ``num_q`` items are the true matches (label = query label, camera 1), as in
    SYSU-30k's ImageFolder order; all others are distractors labelled -1000, camera 1."""

    def __init__(self, qf: np.ndarray, num_g: int, chunk: int, seed: int = 1):
        self.qf, self.num_g, self.chunk, self.seed = qf, num_g, chunk, seed
        self.gen_time = 0.0

    def __call__(self):
        rng = np.random.default_rng(self.seed)
        nq, dim = self.qf.shape
        for start in range(0, self.num_g, self.chunk):
            t0 = time.perf_counter()
            b = min(self.chunk, self.num_g - start)
            feats = rng.standard_normal((b, dim), dtype=np.float32)
            labels = np.full(b, -1000, dtype=np.int64)
            n_true = max(0, min(b, nq - start))
            if n_true:
                sl = slice(start, start + n_true)
                feats[:n_true] = self.qf[sl] + 0.2 * feats[:n_true]  # true match: cos about 0.11
                labels[:n_true] = np.arange(sl.start, sl.stop)
            feats /= np.linalg.norm(feats, axis=1, keepdims=True)
            cams = np.ones(b, dtype=np.int64)
            self.gen_time += time.perf_counter() - t0
            yield feats, labels, cams


def sysu_queries(num_q: int, dim: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    qf = rng.standard_normal((num_q, dim), dtype=np.float32)
    return qf / np.linalg.norm(qf, axis=1, keepdims=True)


def work_sysu_eval(cfg: dict, repeat: int) -> dict:
    import torch  # noqa: F401 (imported before timing, as in the matmul worker)

    from reidkit.retrieval.sysu import sysu30k_evaluate

    prec = cfg.get("precision", "auto")
    qf = sysu_queries(cfg["num_q"], cfg["dim"])
    warm = TimedSysuGallery(qf, 2 * cfg["num_q"], cfg["chunk"])
    sysu30k_evaluate(qf, np.arange(cfg["num_q"]), np.full(cfg["num_q"], 2), warm,
                     chunk_size=cfg["chunk"], device="auto", precision=prec)  # warm-up
    gallery = TimedSysuGallery(qf, cfg["num_g"], cfg["chunk"])
    t0 = time.perf_counter()
    res = sysu30k_evaluate(qf, np.arange(cfg["num_q"]), np.full(cfg["num_q"], 2), gallery,
                           chunk_size=cfg["chunk"], device="auto", precision=prec)
    total = time.perf_counter() - t0
    return {
        "total_s": total,
        "generation_s": gallery.gen_time,
        "wall_s": total - gallery.gen_time,
        "peak_rss_mb": peak_mb(),
        "device": res["device"],
        "precision": res["precision"],
        "passes": res["passes"],
        "unverified_comparisons": res["unverified_comparisons"],
        "rank1": res["rank1"],
        "mAP": res["mAP"],
        "mAP_standard": res["mAP_standard"],
        "ranks_sha1": __import__("hashlib").sha1(res["ranks"].tobytes()).hexdigest(),
        "num_gallery": res["num_gallery"],
    }


class WideSysuGallery(TimedSysuGallery):
    """Like :class:`TimedSysuGallery` for very wide features: one block of random unit rows is
    made once and every distractor chunk is that block again (no copy), so generating
    478,731 x 28,310 normals (minutes) is avoided; the first chunk holds the true matches."""

    def __call__(self):
        rng = np.random.default_rng(self.seed)
        nq, dim = self.qf.shape
        t0 = time.perf_counter()
        base = rng.standard_normal((self.chunk, dim), dtype=np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        self.gen_time += time.perf_counter() - t0
        for start in range(0, self.num_g, self.chunk):
            t0 = time.perf_counter()
            b = min(self.chunk, self.num_g - start)
            feats = base[:b]
            labels = np.full(b, -1000, dtype=np.int64)
            n_true = max(0, min(b, nq - start))
            if n_true:
                sl = slice(start, start + n_true)
                feats = feats.copy()
                feats[:n_true] = self.qf[sl] + 4.0 * feats[:n_true]  # true match: cos about 0.24
                feats[:n_true] /= np.linalg.norm(feats[:n_true], axis=1, keepdims=True)
                labels[:n_true] = np.arange(sl.start, sl.stop)
            cams = np.ones(b, dtype=np.int64)
            self.gen_time += time.perf_counter() - t0
            yield feats, labels, cams


def work_sysu_wide(cfg: dict, repeat: int) -> dict:
    import torch  # noqa: F401

    from reidkit.retrieval.sysu import sysu30k_evaluate

    qf = sysu_queries(cfg["num_q"], cfg["dim"])
    gallery = WideSysuGallery(qf, cfg["num_g"], cfg["chunk"])
    t0 = time.perf_counter()
    res = sysu30k_evaluate(qf, np.arange(cfg["num_q"]), np.full(cfg["num_q"], 2), gallery,
                           chunk_size=cfg["chunk"], device="auto", precision=cfg.get("precision", "auto"))
    total = time.perf_counter() - t0
    flops = 2.0 * cfg["num_q"] * cfg["num_g"] * cfg["dim"]
    wall = total - gallery.gen_time
    return {"total_s": total, "generation_s": gallery.gen_time, "wall_s": wall,
            "matmul_tflop": flops / 1e12, "effective_gflops": flops / wall / 1e9,
            "peak_rss_mb": peak_mb(), "device": res["device"], "precision": res["precision"],
            "passes": res["passes"], "rank1": res["rank1"], "mAP": res["mAP"],
            "num_gallery": res["num_gallery"]}


def work_sysu_matmul(cfg: dict, repeat: int) -> dict:
    import torch

    from reidkit.core.device import resolve_device

    dev = resolve_device("auto")
    qf = sysu_queries(cfg["num_q"], cfg["dim"])
    q = torch.from_numpy(qf).to(dev)
    for feats, _, _ in TimedSysuGallery(qf, 2 * cfg["num_q"], cfg["chunk"])():  # warm-up
        _ = q @ torch.from_numpy(feats).to(dev).T
    gallery = TimedSysuGallery(qf, cfg["num_g"], cfg["chunk"])
    t0 = time.perf_counter()
    checksum = 0.0
    for feats, _, _ in gallery():
        s = q @ torch.from_numpy(feats).to(dev).T
        checksum += float(s[0, 0])  # keep the product alive / synchronise
    total = time.perf_counter() - t0
    return {"total_s": total, "generation_s": gallery.gen_time,
            "wall_s": total - gallery.gen_time, "peak_rss_mb": peak_mb(), "device": str(dev)}


WORKERS = {"market": work_market, "rerank": work_rerank, "sysu_eval": work_sysu_eval,
           "sysu_matmul": work_sysu_matmul, "sysu_wide": work_sysu_wide}


def run_child(name: str, cfg: dict, repeat: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name,
           "--cfg", json.dumps(cfg), "--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"],
                "returncode": proc.returncode}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for a fast sanity run")
    ap.add_argument("--section", choices=["market", "rerank", "sysu", "sysu_wide", "all"], default="all")
    ap.add_argument("--skip-rerank", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats of the market section")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:  # inside a child process
        out = WORKERS[args.worker](json.loads(args.cfg), args.repeat)
        print(json.dumps(out))
        return

    sizes = QUICK if args.quick else FULL
    import torch

    from reidkit.core.device import cpu_description
    report: dict = {
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "cpu": cpu_description(), "python": platform.python_version(),
                    "numpy": np.__version__, "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(), "platform": platform.platform()},
        "peak_rss": "VmHWM of a fresh subprocess per section",
    }
    sections = ["market", "rerank", "sysu", "sysu_wide"] if args.section == "all" else [args.section]
    if args.skip_rerank and "rerank" in sections:
        sections.remove("rerank")
    if "market" in sections:
        report["market"] = run_child("market", sizes["market"], args.repeat)
    if "rerank" in sections:
        report["rerank"] = run_child("rerank", sizes["market"], 1)
    if "sysu" in sections:
        cfg = sizes["sysu"]
        ev32 = run_child("sysu_eval", dict(cfg, precision="fp32"), 1)
        ev = run_child("sysu_eval", dict(cfg, precision="auto"), 1)
        mm = run_child("sysu_matmul", cfg, 1)

        def ratio(a: dict) -> float | None:
            return a["wall_s"] / mm["wall_s"] if "wall_s" in a and "wall_s" in mm else None

        report["sysu"] = {
            "config": cfg,
            "generation_time": "excluded from all timings (measured inside the generator)",
            "evaluate_fp32": ev32,
            "evaluate_auto": ev,
            "path_that_ran_auto": ev.get("precision"),
            "identical_results": (ev.get("ranks_sha1") == ev32.get("ranks_sha1")
                                  and ev.get("mAP") == ev32.get("mAP")),
            "plain_matmul": mm,
            "ratio_eval_fp32_over_matmul": ratio(ev32),
            "ratio_eval_auto_over_matmul": ratio(ev),
            "targets": "fp32 ratio <= 1.5; bf16 ratio <= 0.5; peak RSS < 3 GB",
        }
    if "sysu_wide" in sections:
        report["sysu_wide"] = dict(run_child("sysu_wide", sizes["sysu_wide"], 1),
                                   config=sizes["sysu_wide"], targets="peak RSS <= 3 GB")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
