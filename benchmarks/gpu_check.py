"""The GPU, measured (issue 17): one prepared run of every paper-scale CUDA path, each beside the
CPU's result or the derived figure of ``gpu_cost``.

Items (each in its own ``try``/``except`` with a time budget; the JSON is rewritten after every
item and after each of its steps, so a run killed half-way keeps what it measured):

a. HHCL, market1501 profile (ResNet-50, batch 256 = 16 x 16, ghost BN 64), fp32 and bf16 AMP on
   a fixed seed: images/s and peak GPU memory beside ``gpu_cost``'s derived figures (~21 / ~11 GB,
   minutes per epoch); the two loss curves and their agreement within a stated tolerance; one
   network's fp32 features of 128 images on the device against the CPU's (the kit's extraction
   path: uint8 batches normalised on the device, BatchNorm folded).
b. Clustering at MSMT17's N = 32,621 (2048-d synthetic features): kNN + Jaccard + DBSCAN on the
   torch GPU path (fp32 direct, exact, bf16 screen), faiss-gpu when it is there; time, and
   equality with the CPU's exact result (same neighbours, same Jaccard matrix, same labels).
c. Re-ranking at Market size (3,368 + 15,913): the device ``re_ranking`` chose, time, peak
   memory, and equality with the CPU (largest difference; identical mAP / CMC).
d. SYSU-30k search, 1,000 x 478,731 x 2048 and the 28,310-d released feature, streamed: the bf16
   tensor-core screen with exact re-check against a bare fp32 product on the same GPU (goal
   <= 0.5x); ranks equal to the CPU's.
e. DGL on sysu30k: MGN (28,310-way heads) on bags streamed from a SYSU-layout tree: images/s of
   the loader alone (the profile's workers), of the GPU alone, and of both; whether decoding keeps
   the GPU busy, beside ``gpu_cost``'s derived decode rate.
f. torchrun with one process (nccl on CUDA), both methods: a clean exit, and a run killed after
   its first epoch and resumed, against one uninterrupted run (default flags, then the
   deterministic ones: which of them makes it exact).
g. The paper-profile dry runs of ``tests/cli/test_paper_dryrun.py`` (train, resume, evaluate on each
   tree; ``reproduce`` where papermill is installed) on the device.

``--dry-run`` runs the same code on the CPU at tiny sizes (``tests/benchmarks/test_gpu_check.py``, part of
``make test``). On the device (no venv)::

    PYTHONPATH=. python3 benchmarks/gpu_check.py --out-dir $OUT     # or: make gpu-check GPU_PY=python3

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out-dir`` (default ``benchmarks/out``).
``--only a,c`` reruns some items; ``--budget-scale`` stretches or shrinks every item's budget.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# the kit, the tests' shared trees (tests/trees.py) and the dry-run cases (tests/cli/test_paper_dryrun.py)
for _p in (ROOT, ROOT / "tests", ROOT / "tests" / "cli", HERE):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

# --- the kit: every name this check uses, in one block (docs/architecture.md, "Where things moved")
# --- test helpers and benchmark data (tests/trees.py, benchmarks/bench_eval.py)
from bench_eval import market_data, sysu_queries  # noqa: E402
from market_trees import synthetic_market_tree  # noqa: E402
from trees import PAPER_TREES, build_tree, market1501_tree, sysu30k_tree  # noqa: E402

from reidkit import cli as reidkit_cli  # noqa: E402
from reidkit.config import get_profile  # noqa: E402
from reidkit.core.device import amp_dtype, cpu_description, exact_fp32_matmul, resolve_device, seed_everything  # noqa: E402
from reidkit.core.io import atomic_write_json, torch_load  # noqa: E402
from reidkit.data.datasets import load_dataset  # noqa: E402
from reidkit.dgl.method import DGL  # noqa: E402
from reidkit.hhcl.clustering import dbscan_labels  # noqa: E402
from reidkit.hhcl.method import HHCL  # noqa: E402
from reidkit.methods import gpu_cost  # noqa: E402
from reidkit.nets.backbones import build_model  # noqa: E402
from reidkit.nets.ghost_bn import apply_ghost_bn  # noqa: E402
from reidkit.retrieval.distances import pairwise_distance  # noqa: E402
from reidkit.retrieval.jaccard import jaccard_distance  # noqa: E402
from reidkit.retrieval.knn import faiss_available, faiss_gpu_available, knn  # noqa: E402
from reidkit.retrieval.market import evaluate_rank  # noqa: E402
from reidkit.retrieval.protocol import extract_records  # noqa: E402
from reidkit.retrieval.rerank import re_ranking  # noqa: E402
from reidkit.retrieval.sysu import sysu30k_evaluate  # noqa: E402

ITEMS = "abcdefg"
TITLES = {
    "a": "HHCL market1501 profile: fp32 vs bf16 AMP, images/s, peak memory, loss curves",
    "b": "kNN + Jaccard + DBSCAN at N = 32,621 (MSMT17), GPU vs the CPU's exact result",
    "c": "re-ranking at Market size on the GPU vs the CPU",
    "d": "SYSU-30k search streamed: bf16 screen + exact re-check vs a bare fp32 product; ranks vs the CPU",
    "e": "DGL on sysu30k: MGN on streamed bags, decode rate vs GPU rate",
    "f": "torchrun with one process, both methods: clean exit; resume after a kill vs an uninterrupted run",
    "g": "the paper-profile dry runs of tests/cli/test_paper_dryrun.py on the device",
}
SEED = 1
#: relative agreement of the fp32 and AMP loss curves (item a): first iteration, and the mean of the
#: last quarter of the iterations (the runs diverge slowly: same batches, bf16 rounding of activations)
LOSS_TOL = {"first": 0.02, "tail_mean": 0.05}
#: re-ranking GPU vs CPU: largest absolute difference of the re-ranked distances allowed
RERANK_ATOL = 1e-5

#: sizes of the real run (one H200) and of the dry run (CPU, seconds); budgets in seconds
FULL = {
    "a": dict(budget=110, batch=256, instances=16, ghost=64, iters=60, warmup=8, ids=96, per_id=32,
              agree_images=128, sets={}),
    "b": dict(budget=95, n=32_621, dim=2048, ids=1_041, precisions=("auto", "exact", "bf16")),
    "c": dict(budget=45, num_q=3368, num_g=15913, num_ids=750, num_distractors=2793, dim=2048),
    "d": dict(budget=85, nq=1000, ng=478_731, dim=2048, chunk=8192, wide_dim=28_310, wide_chunk=2048,
              wide_nq=1000, wide_ng=478_731, wide_cpu_rows=16_384, repeat=3),
    "e": dict(budget=50, folders=100, per_folder=8, classes=28_310, compute_iters=15, sets={}),
    "f": dict(budget=150, modes=(("hhcl", "default", True), ("hhcl", "deterministic", True),
                                 ("dgl", "default", True), ("dgl", "deterministic", True))),
    "g": dict(budget=110, trees=tuple(PAPER_TREES), sets=(), reproduce=("market1501",)),
}
DRY = {
    # loss_tol: the tail of three iterations at batch 8 is one loss after two updates of a small
    # random network, which bf16 rounding moves by 2-6% (5.7% at one CPU thread, 1.6% at two); the
    # first iteration (same weights, same batch) keeps the device's bound
    "a": dict(budget=60, batch=8, instances=4, ghost=4, iters=3, warmup=1, ids=4, per_id=8, agree_images=16,
              loss_tol={"first": LOSS_TOL["first"], "tail_mean": 0.25},
              sets={"data__height": 64, "data__width": 32, "data__workers": 0,
                    "data__test_batch_size": 16}),
    "b": dict(budget=40, n=1500, dim=64, ids=100, precisions=("auto", "exact", "bf16")),
    "c": dict(budget=30, num_q=120, num_g=600, num_ids=40, num_distractors=100, dim=64),
    "d": dict(budget=40, nq=40, ng=6000, dim=64, chunk=1024, wide_dim=28_310, wide_chunk=512,
              wide_nq=8, wide_ng=2048, wide_cpu_rows=1024, repeat=1),
    "e": dict(budget=60, folders=4, per_folder=4, classes=64, compute_iters=2,
              sets={"data__height": 64, "data__width": 32, "data__workers": 0, "dgl__ids_per_batch": 4,
                    "dgl__images_per_id": 2}),
    "f": dict(budget=90, modes=(("hhcl", "default", True), ("dgl", "default", False))),
    "g": dict(budget=150, trees=("market1501", "sysu30k"),
              sets=("data.height=64", "data.width=32", "data.test_batch_size=16"), reproduce=()),
}
#: the cuts of the torchrun runs (item f): the dry-run trees, a few iterations, random weights
F_SETS = ["model.pretrained=false", "data.workers=0", "data.test_batch_size=16", "hhcl.iters=3",
          "hhcl.batch_size=8", "hhcl.num_instances=4", "hhcl.eval_step=1", "cluster.eps=0.7",
          "dgl.ids_per_batch=4", "dgl.images_per_id=2"]
F_DRY_SETS = ["data.height=64", "data.width=32"]
#: what the deterministic mode of item f sets (the flags that make a CUDA run repeatable)
DETERMINISTIC_FLAGS = ["CUBLAS_WORKSPACE_CONFIG=:4096:8", "torch.backends.cudnn.deterministic=True",
                       "torch.backends.cudnn.benchmark=False",
                       "torch.use_deterministic_algorithms(True, warn_only=True)"]


# ----------------------------------------------------------------------------------------------
# budget, environment, report

class OutOfBudget(Exception):
    """An item's time budget is spent: what it measured so far stays in the report."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def require(self, seconds: float, what: str) -> None:
        """Raise :class:`OutOfBudget` unless ``seconds`` are left for ``what``."""
        if self.left() < seconds:
            raise OutOfBudget(f"{what} not started: {self.left():.0f} s of the item's budget left, "
                              f"needs about {seconds:.0f} s")


@contextlib.contextmanager
def _alarm(seconds: float):
    """A hard stop: :class:`OutOfBudget` raised in the main thread after ``seconds`` (when a C call
    returns). No-op where SIGALRM does not exist."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def fire(signum, frame):
        raise OutOfBudget(f"hard time limit of {seconds:.0f} s reached")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "unknown"))
    except Exception:  # noqa: BLE001 (absent, or a broken binary)
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def faiss_state() -> dict:
    """faiss as this python sees it: version, GPU support, and why not."""
    try:
        import faiss  # optional dependency: faiss-cpu or faiss-gpu, absent on the device image

        version = str(getattr(faiss, "__version__", "unknown"))
    except Exception as exc:  # noqa: BLE001
        return {"version": None, "gpu": False, "why": f"import faiss failed: {type(exc).__name__}: {exc}"}
    gpu = faiss_gpu_available()
    why = None if gpu else ("faiss has no GPU support (a faiss-cpu build)" if not hasattr(faiss, "StandardGpuResources")
                            else "faiss-gpu sees no GPU")
    return {"version": version, "gpu": gpu, "why": why}


def environment(dev: torch.device) -> dict:
    """The versions every measurement is read against."""
    cuda = dev.type == "cuda"
    props = torch.cuda.get_device_properties(dev) if cuda else None
    return {
        "device": str(dev),
        "gpu": props.name if cuda else None,
        "gpu_memory_gb": round(props.total_memory / 1e9, 1) if cuda else None,
        "compute_capability": f"{props.major}.{props.minor}" if cuda else None,
        "driver": _driver_version() if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch": torch.__version__,
        "faiss": faiss_state()["version"],
        "numpy": np.__version__,
        "scipy": _version("scipy"),
        "sklearn": _version("sklearn"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "host_cpu": cpu_description(),  # item e's decoding and every CPU comparison ran on it
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


class Report:
    """``gpu_check.json`` (rewritten after every step) and ``gpu_check.md`` (at the end of each item)."""

    def __init__(self, out_dir: Path, dry_run: bool, env: dict, name: str = "gpu_check"):
        self.json_path, self.md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {
            "check": "issue 17: the GPU, measured", "dry_run": dry_run, "started": _now(), "env": env,
            "gpu_cost_basis": "reidkit.train.gpu_cost: derived from FLOPs and activation bytes, A100 80GB rates",
            "items": {}}

    def save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_json(self.json_path, self.data)

    def write_md(self) -> None:
        d = self.data
        env = d["env"]
        lines = [f"# GPU check{' (dry run on the CPU: sizes cut, figures not comparable)' if d['dry_run'] else ''}",
                 "", f"{env.get('gpu') or env['device']} | driver {env.get('driver')} | CUDA {env.get('cuda')} | "
                 f"torch {env['torch']} | faiss {env.get('faiss')} | {d['started']}", "",
                 "| item | status | s | what | summary |", "|---|---|---|---|---|"]
        for key, it in d["items"].items():
            lines.append(f"| {key} | {it['status']} | {it.get('wall_s', 0):.0f} | {it['title']} | "
                         f"{_md_cell(it.get('summary') or it.get('reason') or '')} |")
        for key, it in d["items"].items():
            if it.get("reason") or it.get("error"):
                lines += ["", f"**{key}**: {_md_cell(it.get('reason') or '')} {_md_cell(it.get('error') or '')}"]
        table = gpu_table(d)
        if table:
            lines += ["", "## For docs/reproduce.md's GPU table: measured beside derived", "", *table]
        self.md_path.write_text("\n".join(lines) + "\n")


def _fig(v, fmt: str = "{:g}") -> str:
    return "n/a" if v is None else fmt.format(v)


def gpu_table(d: dict) -> list[str]:
    """The rows of docs/reproduce.md's GPU table that the check measures, each figure as
    ``measured / derived``: market1501 from item a (fp32 and, in brackets, bf16 AMP), sysu30k from
    item e (fp32, streamed bags). Empty when neither item has measured anything."""
    items, gpu = d["items"], d["env"].get("gpu") or d["env"]["device"]
    rows = []
    a = items.get("a", {})
    if a.get("measured", {}).get("fp32"):
        m, ref, cmp_ = a["measured"], a["reference"], a["comparison"]
        cells = {}
        for run in ("fp32", "amp"):
            got, want = m.get(run) or {}, ref[run]
            cells[run] = (f"{_fig(got.get('peak_reserved_gb'))} / {_fig(want['memory_gb'])} GB",
                          f"{_fig(got.get('img_s'), '{:,.0f}')} / {_fig(want['decode_img_s'], '{:,.0f}')}",
                          f"{_fig((cmp_.get(run) or {}).get('epoch_minutes_measured'), '{:.2f}')} / "
                          f"{_fig(want['epoch_minutes'], '{:.2f}')} min")
        rows.append(f"| market1501 | {gpu} | ResNet-50, {m['fp32'].get('batch')} | "
                    + " | ".join(f"{f} ({b})" for f, b in zip(cells["fp32"], cells["amp"])) + " |")
    e = items.get("e", {})
    if e.get("measured", {}).get("streamed_img_s"):
        m, ref = e["measured"], e["reference"]
        epoch = ref["epoch_minutes"] * ref["decode_img_s"] / m["streamed_img_s"]   # the same images at the measured rate
        rows.append(f"| sysu30k | {gpu} | MGN, {ref['batch']} | {_fig(m.get('peak_reserved_gb'))} / "
                    f"{_fig(ref['memory_gb'])} GB | {m['streamed_img_s']:,.0f} streamed, {m['compute_img_s']:,.0f} "
                    f"GPU alone / {ref['decode_img_s']:,} | {epoch:.1f} / {ref['epoch_minutes']:g} min |")
    if not rows:
        return []
    return ["| profile | measured on | network, batch | peak GPU memory fp32 (AMP) | training images/s fp32 (AMP) "
            "| per epoch fp32 (AMP) |", "|---|---|---|---|---|---|", *rows, "",
            "Each cell: measured / derived (gpu_cost, one A100 80GB). Memory is the caching allocator's peak "
            "(reserved), without the CUDA context; per epoch counts training and extraction at the measured "
            "rates, not the CPU clustering (item b times it)."]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _md_cell(s: str) -> str:
    return str(s).replace("|", "/").replace("\n", " ")[:600]


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _fresh_peak(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gb(dev: torch.device) -> dict:
    """Peak GPU memory since :func:`_fresh_peak` (allocated by tensors; reserved by the caching
    allocator, closer to what nvidia-smi shows less the CUDA context); None on the CPU."""
    if dev.type != "cuda":
        return {"peak_allocated_gb": None, "peak_reserved_gb": None}
    return {"peak_allocated_gb": round(torch.cuda.max_memory_allocated(dev) / 1e9, 3),
            "peak_reserved_gb": round(torch.cuda.max_memory_reserved(dev) / 1e9, 3)}


def _timed(dev: torch.device, fn: Callable, *args, **kwargs) -> tuple[Any, float]:
    _sync(dev)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(dev)
    return out, time.perf_counter() - t0


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


class Ctx:
    """What every item shares: the device, the sizes, a scratch folder, the report."""

    def __init__(self, dev: torch.device, sizes: dict, scratch: Path, report: Report, dry_run: bool):
        self.dev, self.sizes, self.scratch, self.report, self.dry_run = dev, sizes, scratch, report, dry_run
        self.budget: Budget = Budget(0)
        self.total: Budget = Budget(float("inf"))   # the whole run's budget (--total-budget)
        self.procs: list[subprocess.Popen] = []     # torchrun launches, killed if an item stops early

    def log(self, msg: str) -> None:
        print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# a. HHCL on the market1501 profile, fp32 and bf16 AMP

def _hhcl_profile(amp: bool, S: dict):
    return get_profile("market1501").replace(model__pretrained=False, hhcl__amp=amp, hhcl__batch_size=S["batch"],
                                             hhcl__num_instances=S["instances"], hhcl__ghost_bn=S["ghost"],
                                             **S["sets"])


def _hhcl_run(ctx: Ctx, ds, amp: bool, S: dict) -> dict:
    """``iters`` iterations of HHCL's own step (the memory built from the tree's identities as
    pseudo-labels, so both precisions see the same batches), timed after ``warmup``."""
    dev = ctx.dev
    prof = _hhcl_profile(amp, S)
    method = HHCL(prof, ds)
    method.prepare(dev, "last", SEED, ctx.log)
    recs = method.train_recs
    _, labels = np.unique([r.pid for r in recs], return_inverse=True)
    _fresh_peak(dev)
    seed_everything(SEED)
    model = method.build_model(dev)
    ghost_layers = apply_ghost_bn(model, method.ghost_bn)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, _sched = method.optimizer(model)
    feats, t_extract = _timed(dev, extract_records, model, recs, prof, dev, "features")
    eseed = SEED * 10_007
    method.mem = method._memory(feats, labels, eseed, dev)
    method.use_amp = amp_dtype(prof, dev)
    loader = method._loader(labels, np.arange(len(recs)), eseed, dev)
    model.train()
    losses, step_s, wait_s = [], [], []
    batches = iter(loader)
    for _ in range(S["iters"]):
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:  # the sampler restarts, as the method's own loop does
            batches = iter(loader)
            batch = next(batches)
        t1 = time.perf_counter()
        step = method.step(model, batch, opt, dev)
        losses.append(float(step["loss"]))  # synchronises
        wait_s.append(t1 - t0)
        step_s.append(time.perf_counter() - t0)
    w = S["warmup"]
    timed, waits = sum(step_s[w:]), sum(wait_s[w:])
    images = S["batch"] * (S["iters"] - w)
    out = {"precision": "bf16 autocast" if method.use_amp is not None else "fp32",
           "autocast_dtype": str(method.use_amp), "batch": S["batch"], "ghost_bn": S["ghost"],
           "ghost_bn_layers": ghost_layers, "input": [prof.data.height, prof.data.width],
           "workers": prof.data.workers, "train_images": len(recs), "iters": S["iters"], "warmup": w,
           "img_s": round(images / timed, 1) if timed else None,
           "img_s_compute_only": round(images / (timed - waits), 1) if timed > waits else None,
           "loader_wait_share": round(waits / timed, 3) if timed else None,
           "extract_img_s": round(len(recs) / t_extract, 1), "losses": [round(v, 5) for v in losses],
           **_peak_gb(dev)}
    del model, opt, method, feats, loader, batches
    _fresh_peak(dev)
    return out


#: the device's fp32 features against the CPU's (item a): least cosine allowed. cuDNN runs fp32
#: convolutions in TF32 by default on tensor-core GPUs (PyTorch's default, and the references'),
#: which moves a ResNet-50 feature by about 1e-3 of its length
AGREE_MIN_COS = 0.99


def _extract_agreement(ctx: Ctx, ds, S: dict) -> dict:
    """One network's fp32 features of the first ``agree_images`` training images, extracted on the
    device and on the CPU through the kit's own path (uint8 batches normalised on the device, the
    BatchNorm folded for the fp32 forward): how far apart they land."""
    prof = _hhcl_profile(False, S)
    recs = list(ds.train[: S["agree_images"]])
    seed_everything(SEED)
    model = build_model(prof.model.arch, prof.model.pooling, False, last_stride=prof.model.last_stride,
                        device="cpu")
    cpu = torch.device("cpu")
    fd, t_dev = _timed(ctx.dev, extract_records, model.to(ctx.dev), recs, prof, ctx.dev, "agreement", amp=False)
    fc, t_cpu = _timed(cpu, extract_records, model.to(cpu), recs, prof, cpu, "agreement", amp=False)
    a, b = fd.astype(np.float64), fc.astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"images": len(recs), "min_cos": round(float(cos.min()), 6),
            "mean_one_minus_cos": float(f"{float((1 - cos).mean()):.3g}"),
            "max_abs_diff": float(f"{float(np.abs(fd - fc).max()):.3g}"),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) if ctx.dev.type == "cuda" else None,
            "device_s": round(t_dev, 3), "cpu_s": round(t_cpu, 3)}


def item_a(ctx: Ctx, res: dict) -> None:
    S = ctx.sizes["a"]
    paper = get_profile("market1501")
    derived = {"fp32": gpu_cost(paper), "amp": gpu_cost(paper.replace(hhcl__amp=True))}
    res["reference"] = {k: {f: v[f] for f in ("memory_gb", "epoch_minutes", "decode_img_s", "basis")}
                        for k, v in derived.items()}
    res["reference"]["note"] = "decode_img_s is also the derived training rate (images/s) of the A100 figure"
    tree = ctx.scratch / "a-market"
    synthetic_market_tree(tree, train_ids=S["ids"], test_ids=2, train_per_id=S["per_id"], query_per_id=1,
                          gallery_per_id=2, distractors=0)
    ds = load_dataset("market1501", tree)
    runs = res["measured"]
    for name, amp in (("fp32", False), ("amp", True)):
        ctx.budget.require(10 if ctx.dry_run else 30, f"the {name} run")
        ctx.log(f"a: {name} run")
        runs[name] = _hhcl_run(ctx, ds, amp, S)
        ctx.report.save()
    n_train, iters = 12_936, paper.hhcl.iters
    cmp = {}
    for name in runs:
        r, d = runs[name], derived[name]
        train_min = iters * paper.hhcl.batch_size / r["img_s"] / 60 if r["img_s"] else None
        extract_min = n_train / r["extract_img_s"] / 60
        cmp[name] = {"img_s_over_derived": _ratio(r["img_s"], d["decode_img_s"]),
                     "peak_reserved_over_derived_memory": _ratio(r["peak_reserved_gb"], d["memory_gb"]),
                     "epoch_minutes_measured": round(train_min + extract_min, 2) if train_min else None,
                     "epoch_minutes_derived": d["epoch_minutes"],
                     "epoch_note": f"{iters} x {paper.hhcl.batch_size} at the measured rate + extraction of "
                                   f"{n_train:,} images at the measured forward rate (Jaccard/DBSCAN: item b)"}
    la, lf = np.array(runs["amp"]["losses"]), np.array(runs["fp32"]["losses"])
    q = max(1, len(lf) // 4)
    tol = S.get("loss_tol", LOSS_TOL)
    first = abs(la[0] - lf[0]) / abs(lf[0])
    tail = abs(la[-q:].mean() - lf[-q:].mean()) / abs(lf[-q:].mean())
    cmp["loss_agreement"] = {"first_rel_diff": round(float(first), 5), "tail_mean_rel_diff": round(float(tail), 5),
                             "max_rel_diff": round(float(np.max(np.abs(la - lf) / np.abs(lf))), 5),
                             "tolerance": tol,
                             "agree": bool(first <= tol["first"] and tail <= tol["tail_mean"])}
    res["comparison"] = cmp
    res["checks"] = {"losses_finite": bool(np.isfinite(la).all() and np.isfinite(lf).all()),
                     "loss_curves_agree": cmp["loss_agreement"]["agree"]}
    if ctx.dev.type == "cuda":  # a CPU without native bf16 runs the AMP profile in fp32 (amp_dtype)
        res["checks"]["amp_ran_in_bf16"] = runs["amp"]["autocast_dtype"] == str(torch.bfloat16)
    ctx.budget.require(8 if ctx.dry_run else 15, "the extraction agreement")
    ctx.log("a: extraction, device vs CPU")
    agree = runs["extract_vs_cpu"] = _extract_agreement(ctx, ds, S)
    res["checks"]["features_agree_with_cpu"] = agree["min_cos"] >= AGREE_MIN_COS
    res["summary"] = (f"fp32 {runs['fp32']['img_s']} img/s, {runs['fp32']['peak_reserved_gb']} GB "
                      f"(derived {derived['fp32']['decode_img_s']} img/s, {derived['fp32']['memory_gb']} GB); "
                      f"AMP {runs['amp']['img_s']} img/s, {runs['amp']['peak_reserved_gb']} GB "
                      f"(derived {derived['amp']['decode_img_s']}, {derived['amp']['memory_gb']} GB); "
                      f"loss curves agree: {cmp['loss_agreement']['agree']}; fp32 features vs the CPU's: "
                      f"min cos {agree['min_cos']}")


# ----------------------------------------------------------------------------------------------
# b. kNN + Jaccard + DBSCAN at N = 32,621

def clustered_features(n: int, dim: int, ids: int, seed: int = 0) -> np.ndarray:
    """L2-normalised features around ``ids`` random identity centres (about n / ids images each)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = rng.standard_normal((n, dim), dtype=np.float32) * np.float32(0.8 / np.sqrt(dim))
    x += centres[np.arange(n) % ids]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _csr_equal(a, b) -> bool:
    return (a.shape == b.shape and np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
            and np.array_equal(a.data, b.data))


def _cluster(x, cfg, device, precision: str, backend: str = "torch") -> tuple[Any, np.ndarray, dict]:
    dist, info = jaccard_distance(x, k1=cfg.k1, k2=cfg.k2, device=device, precision=precision, backend=backend,
                                  return_info=True)
    t0 = time.perf_counter()
    labels = np.asarray(dbscan_labels(dist, eps=cfg.eps, min_samples=cfg.min_samples))
    info = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()}
    info["time_dbscan_s"] = round(time.perf_counter() - t0, 4)
    return dist, labels, info


def item_b(ctx: Ctx, res: dict) -> None:
    S, dev = ctx.sizes["b"], ctx.dev
    cfg = get_profile("msmt17").cluster
    x = clustered_features(S["n"], S["dim"], S["ids"])
    m = res["measured"]
    m["setup"] = {"n": S["n"], "dim": S["dim"], "identities": S["ids"], "k1": cfg.k1, "k2": cfg.k2, "eps": cfg.eps,
                  "min_samples": cfg.min_samples, "features": "synthetic, L2-normalised, identity centres + noise"}
    ctx.log("b: CPU reference (exact)")
    (ref_dist, ref_labels, ref_info), t = _timed(torch.device("cpu"), _cluster, x, cfg, "cpu", "exact")
    m["cpu_exact"] = {"wall_s": round(t, 3), "clusters": int(ref_labels.max() + 1), "outliers": int((ref_labels < 0).sum()),
                      "pairs_below_1": int(ref_dist.nnz), **ref_info}
    ctx.report.save()
    checks = res["checks"]
    for prec in S["precisions"]:
        ctx.budget.require(5 if ctx.dry_run else 12, f"the {prec} run on {dev}")
        ctx.log(f"b: {dev} precision={prec}")
        _fresh_peak(dev)
        (dist, labels, info), t = _timed(dev, _cluster, x, cfg, dev, prec)
        same_j, same_l = _csr_equal(dist, ref_dist), bool(np.array_equal(labels, ref_labels))
        m[f"device_{prec}"] = {"wall_s": round(t, 3), "vs_cpu_exact": _ratio(t, m["cpu_exact"]["wall_s"]),
                               "jaccard_identical": same_j, "labels_identical": same_l,
                               "clusters": int(labels.max() + 1), **info, **_peak_gb(dev)}
        if prec != "auto":  # fp32 direct search: near-tied neighbours may come in either order
            checks[f"{prec}_jaccard_identical"], checks[f"{prec}_labels_identical"] = same_j, same_l
        ctx.report.save()
    ctx.budget.require(5 if ctx.dry_run else 15, "the neighbour comparison")
    ref_idx = knn(x, cfg.k1, device="cpu", precision="exact").indices
    nb = m["neighbours"] = {"k": cfg.k1}
    for prec in S["precisions"]:
        idx = knn(x, cfg.k1, device=dev, precision=prec).indices
        rows = float((idx == ref_idx).all(axis=1).mean())
        nb[prec] = {"identical": bool(np.array_equal(idx, ref_idx)), "rows_identical": round(rows, 6)}
        if prec != "auto":
            checks[f"{prec}_neighbours_identical"] = nb[prec]["identical"]
    fs = faiss_state()
    if fs["gpu"] or (dev.type == "cpu" and faiss_available()):
        ctx.log("b: faiss")
        (fd, fl, finfo), t = _timed(dev, _cluster, x, cfg, dev, "auto", "faiss")
        fidx = knn(x, cfg.k1, device=dev, backend="faiss")
        m["faiss"] = {"backend": fidx.backend, "wall_s": round(t, 3), "labels_identical": bool(np.array_equal(fl, ref_labels)),
                      "neighbour_rows_identical": round(float((fidx.indices == ref_idx).all(axis=1).mean()), 6),
                      **finfo}
    else:
        m["faiss"] = {"skipped": f"{fs['why']}. faiss-gpu cannot travel to the device: the faiss-gpu-cu12 "
                                 "1.14.1.post1 wheel alone is 48.4 MB and needs CUDA 12's cuBLAS and runtime "
                                 "wheels (nvidia-cublas-cu12, hundreds of MB) beside the image's CUDA 13, over the "
                                 "64 MiB a call carries; pip found no faiss-gpu-cu13-cuvs wheel for the "
                                 "manylinux_2_17/2_28 cp312 platforms"}
    ctx.report.save()
    best = min((m[f"device_{p}"]["wall_s"] for p in S["precisions"] if f"device_{p}" in m), default=None)
    res["summary"] = (f"CPU exact {m['cpu_exact']['wall_s']} s; {dev}: "
                      + ", ".join(f"{p} {m[f'device_{p}']['wall_s']} s (labels identical "
                                  f"{m[f'device_{p}']['labels_identical']})" for p in S["precisions"])
                      + f"; best {_ratio(best, m['cpu_exact']['wall_s'])}x the CPU; faiss: "
                      + ("ran" if "backend" in m["faiss"] else "skipped"))


# ----------------------------------------------------------------------------------------------
# c. re-ranking at Market size

def item_c(ctx: Ctx, res: dict) -> None:
    S, dev = ctx.sizes["c"], ctx.dev
    ev = get_profile("market1501").eval
    qf, gf, q_pids, g_pids, q_cams, g_cams = market_data(S["num_q"], S["num_g"], S["num_ids"],
                                                         S["num_distractors"], S["dim"])
    q_g = pairwise_distance(qf, gf, device=dev)
    q_q = pairwise_distance(qf, qf, device=dev)
    g_g = pairwise_distance(gf, gf, device=dev)
    kw = dict(k1=ev.rerank_k1, k2=ev.rerank_k2, lambda_value=ev.rerank_lambda, return_info=True)
    m = res["measured"]
    m["setup"] = {"num_q": S["num_q"], "num_g": S["num_g"], "dim": S["dim"], **{k: v for k, v in kw.items()
                                                                               if k != "return_info"}}
    ctx.log("c: re-ranking, device auto")
    _fresh_peak(dev)
    (out_d, info_d), t_d = _timed(dev, re_ranking, q_g, q_q, g_g, device="auto", **kw)
    m["auto"] = {"device_chosen": info_d["device"], "wall_s": round(t_d, 3), **_peak_gb(dev),
                 **{k: round(v, 4) for k, v in info_d.items() if k.startswith("time_")}}
    ctx.report.save()
    ctx.budget.require(5 if ctx.dry_run else 15, "the CPU run")
    ctx.log("c: re-ranking on the CPU")
    (out_c, info_c), t_c = _timed(torch.device("cpu"), re_ranking, q_g, q_q, g_g, device="cpu", **kw)
    m["cpu"] = {"wall_s": round(t_c, 3), **{k: round(v, 4) for k, v in info_c.items() if k.startswith("time_")}}
    diff = float(np.max(np.abs(out_d - out_c)))
    r_d = evaluate_rank(out_d, q_pids, g_pids, q_cams, g_cams, device="cpu")
    r_c = evaluate_rank(out_c, q_pids, g_pids, q_cams, g_cams, device="cpu")
    same_rank = bool(r_d["mAP"] == r_c["mAP"] and np.array_equal(r_d["cmc"], r_c["cmc"]))
    res["comparison"] = {"max_abs_diff": diff, "bit_identical": bool(np.array_equal(out_d, out_c)),
                         "atol": RERANK_ATOL, "mAP_auto": r_d["mAP"], "mAP_cpu": r_c["mAP"],
                         "metrics_identical": same_rank, "auto_over_cpu": _ratio(t_d, t_c)}
    res["checks"] = {"within_atol": diff <= RERANK_ATOL, "metrics_identical": same_rank,
                     "gpu_chosen_when_available": (info_d["device"].startswith("cuda") or dev.type == "cpu")}
    res["summary"] = (f"auto chose {info_d['device']}: {t_d:.2f} s, peak {m['auto']['peak_allocated_gb']} GB; "
                      f"CPU {t_c:.2f} s; max |diff| {diff:.2e}, metrics identical {same_rank}")


# ----------------------------------------------------------------------------------------------
# d. SYSU-30k search

def _sysu_gallery(qf: torch.Tensor, ng: int, chunk: int, seed: int, noise: float, reuse_block: bool):
    """A SYSU-like gallery on ``qf``'s device: the first ``nq`` rows are the true matches (label = the
    query's, camera 1), the rest distractors (label -1000). Without ``reuse_block`` every row is
    drawn (the whole gallery is held); with it one ``chunk``-row block is drawn and every chunk is
    that block again (the 28,310-d gallery would be 54 GB). Returns a callable of chunks."""
    nq, dim = qf.shape
    dev = qf.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    labels = np.full(ng, -1000, dtype=np.int64)
    labels[:nq] = np.arange(nq)
    cams = np.ones(ng, dtype=np.int64)
    if reuse_block:
        block = torch.randn(chunk, dim, generator=gen, device=dev)
        block /= block.norm(dim=1, keepdim=True)
        first = block.clone()
        first[:nq] = qf + noise * block[:nq]
        first[:nq] /= first[:nq].norm(dim=1, keepdim=True)

        def chunks():
            for s in range(0, ng, chunk):
                e = min(s + chunk, ng)
                yield (first if s == 0 else block)[: e - s], labels[s:e], cams[s:e]
        return chunks
    g = torch.empty(ng, dim, device=dev)
    for s in range(0, ng, 65536):
        g[s:s + 65536] = torch.randn(min(65536, ng - s), dim, generator=gen, device=dev)
    g[:nq] = qf + noise * g[:nq]
    g /= g.norm(dim=1, keepdim=True)

    def whole():
        for s in range(0, ng, chunk):
            yield g[s:s + chunk], labels[s:s + chunk], cams[s:s + chunk]
    return whole


def _bare_product(q: torch.Tensor, gallery, dtype: torch.dtype, dev: torch.device, repeat: int) -> float:
    """Best of ``repeat`` passes of a plain ``q @ chunk.T`` over the gallery (exact fp32 products, no
    TF32; or bf16 inputs), the chunks already on the device."""
    qd = q.to(dtype)
    best = float("inf")
    with exact_fp32_matmul():
        for _ in range(repeat):
            _sync(dev)
            t0 = time.perf_counter()
            for feats, _, _ in gallery():
                _ = qd @ feats.to(dtype).T
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
    return best


def _on_cpu(gallery, rows: int | None = None):
    """The same chunks on the host (copied once, outside any timing), optionally the first ``rows``."""
    chunks, n = [], 0
    for feats, labels, cams in gallery():
        if rows is not None and n >= rows:
            break
        take = len(labels) if rows is None else min(len(labels), rows - n)
        chunks.append((feats[:take].cpu(), labels[:take], cams[:take]))
        n += take
    return lambda: iter(chunks)


def _prefix(gallery, rows: int):
    def chunks():
        n = 0
        for feats, labels, cams in gallery():
            if n >= rows:
                return
            take = min(len(labels), rows - n)
            yield feats[:take], labels[:take], cams[:take]
            n += take
    return chunks


def _sysu_eval(q, nq: int, gallery, chunk: int, device, precision: str) -> dict:
    return sysu30k_evaluate(q, np.arange(nq), np.full(nq, 2), gallery, chunk_size=chunk, device=device,
                            precision=precision)


def _sysu_summary(r: dict, t: float) -> dict:
    return {"wall_s": round(t, 3), "precision": r["precision"], "device": r["device"], "passes": r["passes"],
            "unverified_comparisons": r["unverified_comparisons"], "rank1": r["rank1"], "mAP": r["mAP"],
            "num_gallery": r["num_gallery"]}


def _same_ranks(a: dict, b: dict) -> bool:
    return bool(np.array_equal(a["ranks"], b["ranks"]) and a["mAP"] == b["mAP"])


def item_d(ctx: Ctx, res: dict) -> None:
    S, dev = ctx.sizes["d"], ctx.dev
    m, checks = res["measured"], res["checks"]
    cpu = torch.device("cpu")
    # 2048-d, the whole gallery on the device (generation outside every timing)
    q = torch.from_numpy(sysu_queries(S["nq"], S["dim"])).to(dev)
    gallery = _sysu_gallery(q, S["ng"], S["chunk"], seed=1, noise=0.2, reuse_block=False)
    m["setup"] = {"nq": S["nq"], "ng": S["ng"], "dim": S["dim"], "chunk": S["chunk"],
                  "wide": {"nq": S["wide_nq"], "ng": S["wide_ng"], "dim": S["wide_dim"], "chunk": S["wide_chunk"],
                           "cpu_rows": S["wide_cpu_rows"]},
                  "gallery": "generated on the device before timing; true matches first (as SYSU-30k's order)"}
    _sysu_eval(q, S["nq"], _prefix(gallery, 2 * S["chunk"]), S["chunk"], dev, "bf16")  # warm-up
    ctx.log("d: bare products")
    m["bare_fp32_s"] = round(_bare_product(q, gallery, torch.float32, dev, S["repeat"]), 4)
    m["bare_bf16_s"] = round(_bare_product(q, gallery, torch.bfloat16, dev, S["repeat"]), 4)
    ctx.report.save()
    results = {}
    for prec in ("bf16", "fp32"):
        ctx.budget.require(3 if ctx.dry_run else 8, f"the {prec} evaluation")
        ctx.log(f"d: sysu30k_evaluate {prec} on {dev}")
        _fresh_peak(dev)
        results[prec], t = _timed(dev, _sysu_eval, q, S["nq"], gallery, S["chunk"], dev, prec)
        m[f"eval_{prec}"] = {**_sysu_summary(results[prec], t), **_peak_gb(dev),
                             "over_bare_fp32": _ratio(t, m["bare_fp32_s"])}
        ctx.report.save()
    checks["bf16_equals_fp32_screen"] = _same_ranks(results["bf16"], results["fp32"])
    checks["every_comparison_verified"] = results["bf16"]["unverified_comparisons"] == 0
    m["goal"] = "eval_bf16 / bare_fp32 <= 0.5"
    res["goals"] = {"bf16_eval_at_most_half_of_bare_fp32": bool((m["eval_bf16"]["over_bare_fp32"] or 9) <= 0.5)}
    # the 28,310-d released feature: one drawn block reused, the device's full-size run timed
    ctx.budget.require(5 if ctx.dry_run else 15, "the 28,310-d run")
    qw = torch.from_numpy(sysu_queries(S["wide_nq"], S["wide_dim"])).to(dev)
    wide = _sysu_gallery(qw, S["wide_ng"], S["wide_chunk"], seed=2, noise=4.0, reuse_block=True)
    ctx.log("d: 28,310-d")
    m["wide_bare_fp32_s"] = round(_bare_product(qw, wide, torch.float32, dev, 1), 4)
    _fresh_peak(dev)
    rw, t = _timed(dev, _sysu_eval, qw, S["wide_nq"], wide, S["wide_chunk"], dev, "auto")
    m["wide_eval_auto"] = {**_sysu_summary(rw, t), **_peak_gb(dev), "over_bare_fp32": _ratio(t, m["wide_bare_fp32_s"])}
    ctx.report.save()
    # the CPU's ranks: the wide feature on a prefix of the gallery, both devices on the same rows
    ctx.budget.require(5 if ctx.dry_run else 12, "the 28,310-d CPU comparison")
    pre = _prefix(wide, S["wide_cpu_rows"])
    rw_d = _sysu_eval(qw, S["wide_nq"], pre, S["wide_chunk"], dev, "auto")
    rw_c, t = _timed(cpu, _sysu_eval, qw.cpu(), S["wide_nq"], _on_cpu(wide, S["wide_cpu_rows"]), S["wide_chunk"],
                     "cpu", "auto")
    m["wide_cpu_prefix"] = _sysu_summary(rw_c, t)
    checks["wide_ranks_equal_cpu_on_prefix"] = _same_ranks(rw_d, rw_c)
    ctx.report.save()
    ctx.budget.require(5 if ctx.dry_run else 25, "the 2048-d CPU run")
    ctx.log("d: 2048-d on the CPU")
    host = _on_cpu(gallery)
    rc, t = _timed(cpu, _sysu_eval, q.cpu(), S["nq"], host, S["chunk"], "cpu", "auto")
    m["eval_cpu"] = _sysu_summary(rc, t)
    checks["ranks_equal_cpu"] = _same_ranks(results["bf16"], rc)
    res["summary"] = (f"bf16 screen {m['eval_bf16']['wall_s']} s = {m['eval_bf16']['over_bare_fp32']}x a bare fp32 "
                      f"product ({m['bare_fp32_s']} s; goal 0.5x); fp32 screen {m['eval_fp32']['wall_s']} s; CPU "
                      f"{m['eval_cpu']['wall_s']} s, ranks equal {checks['ranks_equal_cpu']}; 28,310-d "
                      f"{m['wide_eval_auto']['wall_s']} s ({m['wide_eval_auto']['over_bare_fp32']}x bare fp32)")


# ----------------------------------------------------------------------------------------------
# e. DGL on sysu30k, streamed bags

def item_e(ctx: Ctx, res: dict) -> None:
    S, dev = ctx.sizes["e"], ctx.dev
    tree = sysu30k_tree(ctx.scratch / "e-sysu", folders=S["folders"], per_folder=S["per_folder"], test_ids=2,
                        distractors=2)
    paper = get_profile("sysu30k")
    derived = gpu_cost(paper)
    res["reference"] = {k: derived[k] for k in ("memory_gb", "epoch_minutes", "decode_img_s", "batch", "basis")}
    prof = paper.replace(model__pretrained=False, **S["sets"])
    method = DGL(prof, data_root=str(tree))
    method.prepare(dev, "last", SEED, ctx.log)
    method.source.num_classes = method.num_classes = S["classes"]  # the real heads: one class per folder
    seed_everything(SEED)
    _fresh_peak(dev)
    model = method.build_model(dev)
    apply_ghost_bn(model, method.ghost_bn)
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, _ = method.optimizer(model)
    m = res["measured"]
    m["setup"] = {"bags": 3 * S["folders"], "bag_size": method.bag_size, "batch": method.batch_size,
                  "classes": S["classes"], "workers": prof.data.workers, "input": [prof.data.height, prof.data.width],
                  "network": method.network}
    # 1. the loader alone: decode + augmentation of one pass of the stream, the profile's workers
    entry: dict = {}
    loader, _ = method.begin_epoch(0, SEED * 10_007, model, dev, entry, ctx.log)
    ctx.log("e: loader alone")
    t0, n, first = time.perf_counter(), 0, None
    for batch in loader:
        first = first or batch
        n += len(batch["img"])
    m["loader_img_s"] = round(n / (time.perf_counter() - t0), 1)
    m["images_per_pass"] = n
    ctx.report.save()
    # 2. the GPU alone: one batch, stepped repeatedly
    ctx.budget.require(5 if ctx.dry_run else 10, "the compute-only steps")
    ctx.log(f"e: the {dev} alone ({n} images streamed at {m['loader_img_s']} img/s)")
    model.train()
    method.step(model, first, opt, dev)  # warm-up (cuDNN's algorithm choice)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(S["compute_iters"]):
        step = method.step(model, first, opt, dev)
    _sync(dev)
    m["compute_img_s"] = round(S["compute_iters"] * method.batch_size / (time.perf_counter() - t0), 1)
    m["loss"] = step["loss"]
    m.update(_peak_gb(dev))
    ctx.report.save()
    # 3. both: one more pass of the stream, each batch stepped
    ctx.budget.require(5 if ctx.dry_run else 10, "the streamed pass")
    ctx.log(f"e: streamed pass ({m['compute_img_s']} img/s alone)")
    loader, _ = method.begin_epoch(1, SEED * 10_007 + 1, model, dev, entry, ctx.log)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        method.step(model, batch, opt, dev)
        n += len(batch["img"])
    _sync(dev)
    m["streamed_img_s"] = round(n / (time.perf_counter() - t0), 1)
    busy = m["streamed_img_s"] / m["compute_img_s"]
    res["comparison"] = {"gpu_busy_share": round(busy, 3),
                         "decode_keeps_up": bool(m["loader_img_s"] >= m["compute_img_s"]),
                         "compute_over_derived_rate": _ratio(m["compute_img_s"], derived["decode_img_s"]),
                         "loader_over_derived_decode_rate": _ratio(m["loader_img_s"], derived["decode_img_s"]),
                         "note": "the derived rate (decode_img_s) is the A100 training rate the decoding must reach"}
    res["checks"] = {"loss_finite": bool(np.isfinite(m["loss"])), "streamed_whole_pass": n > 0}
    res["summary"] = (f"loader {m['loader_img_s']} img/s ({prof.data.workers} workers), GPU alone "
                      f"{m['compute_img_s']} img/s, streamed {m['streamed_img_s']} img/s (busy {busy:.0%}); "
                      f"derived rate {derived['decode_img_s']} img/s")


# ----------------------------------------------------------------------------------------------
# f. torchrun, one process: clean exit, resume after a kill

def train_worker(argv: list[str]) -> int:
    """``gpu_check.py --train-worker [--deterministic] [--group] -- TRAIN ARGS``: the process torchrun
    starts. ``--group`` joins a one-rank process group itself (nccl on CUDA, gloo on the CPU: the
    kit creates none for a world of one), checks it with an all-reduce, and destroys it at the end."""
    import torch.distributed as dist

    split = argv.index("--") if "--" in argv else len(argv)
    flags, train_args = argv[:split], argv[split + 1:]
    if "--deterministic" in flags:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    group = "--group" in flags and int(os.environ.get("WORLD_SIZE", "1")) == 1
    if group:
        cuda = "--device" in train_args and train_args[train_args.index("--device") + 1].startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        t = torch.ones(4, device="cuda" if cuda else "cpu")
        dist.all_reduce(t)
        print(f"gpu_check worker: {dist.get_backend()} group of {dist.get_world_size()}, all_reduce "
              f"{float(t.sum()):g}", flush=True)
    rc = reidkit_cli.main(train_args)
    if group:
        dist.barrier()
        dist.destroy_process_group()
        print("gpu_check worker: process group destroyed", flush=True)
    return rc


def _torchrun(worker_flags: list[str], train_args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """``torchrun --standalone --nproc-per-node 1 gpu_check.py --train-worker FLAGS -- TRAIN ARGS`` in
    its own session (so a kill takes the agent and its worker), output into ``log``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", "1",
           str(Path(__file__).resolve()), "--train-worker", *worker_flags, "--", *train_args]
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        _kill(proc)
        return -9


def _history_len(out: Path) -> int:
    try:
        return len(json.loads((out / "history.json").read_text()))
    except (OSError, ValueError):
        return 0


def _weights_diff(a: Path, b: Path) -> dict:
    sa, sb = torch_load(a / "checkpoint.pt")["model"], torch_load(b / "checkpoint.pt")["model"]
    worst, unequal = 0.0, 0
    for k, v in sa.items():
        if not torch.is_floating_point(v):
            unequal += int(not torch.equal(v, sb[k]))
            continue
        d = float((v.float() - sb[k].float()).abs().max()) if v.numel() else 0.0
        worst = max(worst, d)
        unequal += int(d > 0)
    return {"max_abs_diff": worst, "tensors_differing": unequal, "tensors": len(sa), "bit_exact": unequal == 0}


def _failure_excerpt(log_text: str, head: int = 2500, tail: int = 600) -> str:
    """A failed torchrun's log, kept short: the worker's first traceback (its cause; torchrun's own
    ``ChildFailedError`` report, which fills the end of the log, names none) and the last lines."""
    start = log_text.find("Traceback")
    start = log_text.rfind("\n", 0, start) + 1 if start >= 0 else -1   # from its line's start ([rank0]: ...)
    if start < 0 or len(log_text) - start <= head + tail:
        return log_text[max(start, 0):][-(head + tail):]
    return log_text[start:start + head] + "\n[...]\n" + log_text[-tail:]


def _clean(log_text: str, rc: int) -> dict:
    return {"rc": rc, "traceback": "Traceback" in log_text,
            "group_not_destroyed_warning": "NOT been destroyed" in log_text or "destroy_process_group() was not called"
            in log_text, "group_destroyed_marker": "process group destroyed" in log_text}


def item_f(ctx: Ctx, res: dict) -> None:
    S, dev = ctx.sizes["f"], ctx.dev
    trees = {"hhcl": market1501_tree(ctx.scratch / "f-market"), "dgl": sysu30k_tree(ctx.scratch / "f-sysu")}
    profile = {"hhcl": "market1501", "dgl": "sysu30k"}
    sets = F_SETS + (F_DRY_SETS if ctx.dry_run else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "REIDKIT_PROGRESS": "0", "REIDKIT_OFFLINE": "1", "OMP_NUM_THREADS": "1" if ctx.dry_run else "4"}
    m = res["measured"]
    m["note"] = ("one process: the kit's init_distributed creates no process group for WORLD_SIZE 1 (its DDP "
                 "path needs two GPUs; NCCL refuses two ranks on one GPU), so the worker joins a one-rank "
                 f"{'nccl' if dev.type == 'cuda' else 'gloo'} group itself, all-reduces on it, and destroys it")
    m["deterministic_flags"] = DETERMINISTIC_FLAGS
    for method, mode, resume in S["modes"]:  # resume False: the clean-exit run alone, one epoch
        key = f"{method}_{mode}"
        ctx.budget.require(20 if ctx.dry_run else 35, f"{key}")
        ctx.log(f"f: {key}")
        flags = ["--group"] + (["--deterministic"] if mode == "deterministic" else [])
        run_env = {**env, **({"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if mode == "deterministic" else {})}
        args = ["train", "--profile", profile[method], "--data-root", str(trees[method]), "--device", str(dev.type),
                "--epochs", "2" if resume else "1", *sum((["--set", s] for s in sets), [])]
        if method == "dgl":
            args += ["--iters", "3"]
        base = ctx.scratch / f"f-{key}"
        base.mkdir()
        r = m[key] = {}
        def launch(out: str, log: str) -> subprocess.Popen:
            ctx.procs.append(_torchrun(flags, args + ["--out", str(base / out)], base / log, run_env))
            return ctx.procs[-1]

        # the uninterrupted run: also the clean-exit check
        t0 = time.perf_counter()
        rc = _wait(launch("whole", "whole.log"), ctx.budget.left())
        text = (base / "whole.log").read_text()
        r["uninterrupted"] = {**_clean(text, rc), "wall_s": round(time.perf_counter() - t0, 1),
                              "epochs": _history_len(base / "whole"), "log_tail": _failure_excerpt(text) if rc else ""}
        ctx.report.save()
        if rc != 0 or not resume:
            continue
        # killed once the first epoch is on disk, then resumed to the same end
        proc = launch("killed", "killed.log")
        deadline = time.perf_counter() + ctx.budget.left()
        while proc.poll() is None and _history_len(base / "killed") < 1 and time.perf_counter() < deadline:
            time.sleep(0.05)
        killed_at = _history_len(base / "killed")
        _kill(proc)
        rc2 = _wait(launch("killed", "resumed.log"), ctx.budget.left())
        text2 = (base / "resumed.log").read_text()
        log = (base / "killed" / "train.log").read_text() if (base / "killed" / "train.log").is_file() else ""
        r["resumed"] = {"killed_after_epochs": killed_at, "kill_rc": proc.returncode, **_clean(text2, rc2),
                        "resumed_from_checkpoint": "resumed from" in log, "epochs": _history_len(base / "killed"),
                        "log_tail": _failure_excerpt(text2) if rc2 else ""}
        if rc2 == 0:
            r["weights_vs_uninterrupted"] = _weights_diff(base / "whole", base / "killed")
        ctx.report.save()
    checks = res["checks"]
    for key, r in m.items():
        if not isinstance(r, dict) or "uninterrupted" not in r:
            continue
        u = r["uninterrupted"]
        checks[f"{key}_clean_exit"] = bool(u["rc"] == 0 and not u["traceback"] and not u["group_not_destroyed_warning"]
                                           and u["group_destroyed_marker"])
        if "resumed" in r:
            checks[f"{key}_resumed"] = bool(r["resumed"]["rc"] == 0 and r["resumed"]["resumed_from_checkpoint"]
                                            and r["resumed"]["epochs"] == 2)
    exact = {k: r["weights_vs_uninterrupted"]["bit_exact"] for k, r in m.items()
             if isinstance(r, dict) and "weights_vs_uninterrupted" in r}
    which = {}
    for method in ("hhcl", "dgl"):
        d, x = exact.get(f"{method}_default"), exact.get(f"{method}_deterministic")
        which[method] = ("exact with the default flags" if d else
                         "exact only with the deterministic flags" if x else
                         "not exact with either" if d is not None and x is not None else "not measured")
    res["comparison"] = {"resume_bit_exact": exact, "what_makes_it_exact": which,
                         "deterministic_flags": DETERMINISTIC_FLAGS}
    res["summary"] = (", ".join(f"{k}: clean exit {checks.get(k + '_clean_exit')}, resume bit-exact {exact.get(k)}"
                                for k in m if isinstance(m[k], dict) and "uninterrupted" in m[k]))


# ----------------------------------------------------------------------------------------------
# g. the paper-profile dry runs on the device

def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = reidkit_cli.main(args)
        except SystemExit as exc:  # argparse
            rc = int(exc.code or 0)
    return rc, out.getvalue(), err.getvalue()


def item_g(ctx: Ctx, res: dict) -> None:
    S, dev = ctx.sizes["g"], ctx.dev
    try:
        from test_paper_dryrun import CUTS, PROFILE_OF  # optional: the test module imports pytest
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"tests/cli/test_paper_dryrun.py could not be imported ({type(exc).__name__}: {exc}): "
                           "its CUTS and PROFILE_OF are what this item runs") from exc
    sets = sum((["--set", s] for s in [*CUTS, *S["sets"]]), [])
    m, checks = res["measured"], res["checks"]
    os.environ.setdefault("REIDKIT_PROGRESS", "0")
    for key in S["trees"]:
        ctx.budget.require(8 if ctx.dry_run else 15, f"the {key} tree")
        ctx.log(f"g: {key}")
        data = build_tree(key, ctx.scratch / f"g-{key}")
        out = ctx.scratch / f"g-{key}-run"
        train = ["train", "--profile", PROFILE_OF[key], "--data-root", str(data), "--out", str(out), "--device",
                 str(dev.type)]
        r = m[key] = {}
        for step, args in (("train_1_epoch", [*train, "--epochs", "1", *sets]),
                           ("resume_to_2", [*train, "--epochs", "2", *sets]),
                           ("evaluate", ["evaluate", "--weights", str(out / "model_best.pt"), "--dataset",
                                         PAPER_TREES[key][0], "--data-root", str(data), "--device", str(dev.type),
                                         "--json"])):
            t0 = time.perf_counter()
            rc, so, se = _cli(args)
            r[step] = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 2), "stderr_tail": se[-800:] if rc else ""}
            if rc == 0 and step != "evaluate":
                last = so.strip().splitlines()[-1] if so.strip() else "{}"
                r[step]["result"] = json.loads(last) if last.startswith("{") else last
            if rc == 0 and step == "evaluate":
                r[step]["rank1"] = json.loads(so).get("rank1")
            ctx.report.save()
            if rc != 0:
                break
        checks[f"{key}_ok"] = all(v["rc"] == 0 for v in r.values()) and len(r) == 3
    reproduce = m["reproduce"] = {}
    try:
        import papermill  # optional: reidkit reproduce runs the notebooks through it; absent on the device

        pm = str(papermill.__version__)
    except Exception as exc:  # noqa: BLE001
        pm = None
        reproduce["skipped"] = (f"papermill not importable ({type(exc).__name__}: {exc}): `reidkit reproduce` runs "
                                "the notebooks with papermill and a Jupyter kernel (ipykernel, jupyter_client, pyzmq), "
                                "none of which the device image holds; train / resume / evaluate ran instead")
    for key in S["reproduce"] if pm else ():
        ctx.budget.require(30, f"reproduce on {key}")
        run_dir = ctx.scratch / f"g-{key}-reproduce"
        t0 = time.perf_counter()
        data = build_tree(key, ctx.scratch / f"g-{key}-reproduce-data")
        rc, _, se = _cli(["reproduce", "--profile", PROFILE_OF[key], "--data-root", str(data), "--run-dir",
                          str(run_dir), "--device", str(dev.type), "--notebooks", "01", *sets])
        reproduce[key] = {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
                          "report_md": (run_dir / "report.md").is_file(), "stderr_tail": se[-800:] if rc else ""}
        checks[f"reproduce_{key}_ok"] = rc == 0 and reproduce[key]["report_md"]
    res["summary"] = (", ".join(f"{k}: {'ok' if checks.get(k + '_ok') else 'failed'}" for k in S["trees"] if k in m)
                      + ("; reproduce skipped: papermill absent" if not pm else ""))


# ----------------------------------------------------------------------------------------------

ITEM_FUNCS = {"a": item_a, "b": item_b, "c": item_c, "d": item_d, "e": item_e, "f": item_f, "g": item_g}


def run_item(ctx: Ctx, key: str, scale: float) -> None:
    S = ctx.sizes[key]
    budget = min(S["budget"] * scale, ctx.total.left() - 5)
    res = ctx.report.data["items"][key] = {
        "item": key, "title": TITLES[key], "status": "running", "budget_s": budget, "env": ctx.report.data["env"],
        "sizes": {k: v for k, v in S.items() if k != "budget"}, "measured": {}, "reference": {}, "comparison": {},
        "checks": {}, "goals": {}, "reason": None, "error": None}
    ctx.report.save()
    ctx.budget = Budget(budget)
    t0 = time.perf_counter()
    ctx.log(f"item {key}: {TITLES[key]} (budget {budget:.0f} s)")
    try:
        if ctx.total.left() < 15:
            raise OutOfBudget(f"not started: the run's total budget is spent ({ctx.total.left():.0f} s left)")
        with _alarm(budget * 1.5 + 15):
            ITEM_FUNCS[key](ctx, res)
        res["status"] = "ok" if all(res["checks"].values()) else "failed"
        if res["status"] == "failed":
            res["reason"] = "checks failed: " + ", ".join(k for k, v in res["checks"].items() if not v)
    except OutOfBudget as exc:
        res["status"], res["reason"] = "partial", f"time budget: {exc}"
    except Exception as exc:  # noqa: BLE001 (one item's failure must not lose the others)
        res["status"], res["reason"] = "error", f"{type(exc).__name__}: {exc}"
        res["error"] = traceback.format_exc()[-3000:]
    finally:
        for proc in ctx.procs:
            _kill(proc)
        ctx.procs.clear()
    if res["status"] == "partial" and not res["measured"]:
        res["status"] = "skipped"
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    gc.collect()
    if ctx.dev.type == "cuda":
        torch.cuda.empty_cache()
    ctx.report.save()
    ctx.report.write_md()
    ctx.log(f"item {key}: {res['status']} in {res['wall_s']:.0f} s | {res.get('summary') or res['reason']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--train-worker"]:
        return train_worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes")
    ap.add_argument("--out-dir", default=str(HERE / "out"), help="where gpu_check.json / .md go (benchmarks/out)")
    ap.add_argument("--only", default=ITEMS, help="items to run, e.g. a,c (default: all)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every item's time budget")
    ap.add_argument("--total-budget", type=float, default=None,
                    help="seconds for the whole run (default 510, dry run unlimited): later items get what is left")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (trees, runs)")
    args = ap.parse_args(argv)
    only = [k for k in ITEMS if k in args.only.replace(",", "")]
    dev = resolve_device(args.device or ("cpu" if args.dry_run else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    name = "gpu_check_dryrun" if args.dry_run else "gpu_check"
    report = Report(Path(args.out_dir), args.dry_run, environment(dev), name)
    report.data["faiss"] = faiss_state()
    report.data["items_asked"] = only
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = Ctx(dev, DRY if args.dry_run else FULL, scratch, report, args.dry_run)
    total = args.total_budget if args.total_budget is not None else (float("inf") if args.dry_run else 510.0)
    ctx.total = Budget(total)
    report.data["total_budget_s"] = total if total != float("inf") else None
    t0 = time.perf_counter()
    try:
        for key in only:
            run_item(ctx, key, args.budget_scale)
    finally:
        report.data["wall_s"] = round(time.perf_counter() - t0, 1)
        report.save()
        report.write_md()
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    statuses = {k: report.data["items"][k]["status"] for k in only}
    print(json.dumps({"json": str(report.json_path), "md": str(report.md_path), "wall_s": report.data["wall_s"],
                      "status": statuses}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
