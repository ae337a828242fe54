"""Exact k-nearest neighbours and the k-reciprocal distances built on them.

This module holds three kernels that all start from "who are my nearest neighbours?":

* :func:`knn` -- exact kNN under squared Euclidean distance, on faiss (GPU or CPU) or on torch
  (blocked matrix products + ``topk``, CPU or CUDA).
* :func:`jaccard_distance` -- the k-reciprocal Jaccard distance that HHCL / cluster-contrast feed
  to DBSCAN every epoch (Zhong et al., CVPR'17, train-set-only variant of the CC code).
* :func:`re_ranking` -- k-reciprocal re-ranking of a query x gallery distance matrix, with the
  torchreid semantics.

Both k-reciprocal kernels share **one** implementation of the algorithm (:func:`_kreciprocal_encoding`
and :func:`_minsum_triples`); they differ only in where the neighbour table and the distances come
from and in two small conventions (how many columns a "k-neighbourhood" has, and clipping).

The k-reciprocal idea in one paragraph
--------------------------------------
``j`` is a *k-reciprocal* neighbour of ``i`` when each is in the other's k-NN list. Such pairs are much
more reliable than one-sided neighbours. The reciprocal set ``R(i)`` is then *expanded* with the
(smaller) reciprocal sets of its members when those mostly lie inside ``R(i)`` (the "2/3 rule"),
encoded as a sparse probability vector ``V[i]`` (Gaussian kernel of the distances, normalised to
sum 1), smoothed by averaging the vectors of the first ``k2`` neighbours ("query expansion"), and two
points are compared by the weighted Jaccard similarity of their vectors::

    m_ij = sum_k min(V_ik, V_jk)        d_J(i, j) = 1 - m_ij / (2 - m_ij)

(``2 - m`` is ``sum_k max(V_ik, V_jk)`` because both rows sum to 1.)

Why this implementation is sparse
---------------------------------
The reference code stores ``V``, its expanded copy and the result as dense N x N float32 arrays and
loops over rows in Python (minutes and ~10 GB on MSMT17). But every row of ``V`` has only tens to a
few hundred non-zeros, and ``m_ij > 0`` only when the supports of rows ``i`` and ``j`` overlap. So:

1. reciprocity, expansion and query expansion are sparse set algebra on the N x k neighbour table
   (``scipy.sparse`` products and element-wise products, O(N k^2), tens of milliseconds);
2. the min-sum is computed from an *inverted index* (the CSC form of ``V``): for every column ``k``,
   every pair of rows that both have ``k`` in their support contributes ``min(V_ik, V_jk)`` to
   ``m_ij``. The pairs are generated in vectorised chunks and summed with ``index_add_`` into a
   dense accumulator covering a block of rows (torch, on the chosen device); only pairs with ``i < j``
   are enumerated and the result is mirrored, because ``m`` is symmetric;
3. the result is a ``scipy.sparse.csr_matrix`` holding every pair with distance < 1 (the diagonal is
   always stored, even when it is exactly 0). An absent entry means distance 1, which DBSCAN with
   ``eps < 1`` treats exactly like the dense matrix.

Devices
-------
Every kernel takes ``device="auto"`` (CUDA when available). The O(N^2 d) kNN and the pair min-sum run
on that device with device-agnostic torch ops; the small set algebra always runs on the host. The
backend that was used is reported (``KNNResult.backend``, ``return_info=True``).
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from .utils import exact_fp32_matmul, progress, resolve_device

__all__ = [
    "KNNResult",
    "knn",
    "faiss_available",
    "faiss_gpu_available",
    "jaccard_distance",
    "re_ranking",
]

log = logging.getLogger(__name__)

ArrayLike = Any  # numpy array or torch tensor


# =============================================================================================
# kNN
# =============================================================================================
@dataclass
class KNNResult:
    """Result of :func:`knn`.

    Attributes
    ----------
    indices : (n, k) int64 array, neighbours sorted by increasing distance. For a self-search the
        point itself is always in column 0.
    sq_dists : (n, k) float32 array, the matching squared Euclidean distances (the self column of a
        self-search is exactly 0).
    backend : which implementation ran, e.g. ``"torch-cpu"``, ``"torch-cuda"``, ``"faiss-cpu"``,
        ``"faiss-gpu"``.
    precision : the screening matmul of the torch search, ``"fp32"`` or ``"bf16"`` (the answer is
        the same; faiss results report ``"fp32"``).

    The object unpacks like a tuple: ``idx, d2, backend = knn(x, 30)``.
    """

    indices: np.ndarray
    sq_dists: np.ndarray
    backend: str
    precision: str = "fp32"

    def __iter__(self) -> Iterator[Any]:
        return iter((self.indices, self.sq_dists, self.backend))


def _faiss():
    try:
        import faiss  # noqa: F401

        return faiss
    except Exception:  # ImportError, or a broken binary wheel
        return None


def faiss_available() -> bool:
    """True when ``import faiss`` works (faiss-cpu or faiss-gpu)."""
    return _faiss() is not None


def faiss_gpu_available() -> bool:
    """True when faiss was built with GPU support and sees at least one GPU."""
    faiss = _faiss()
    if faiss is None or not hasattr(faiss, "StandardGpuResources"):
        return False
    try:
        return faiss.get_num_gpus() > 0
    except Exception:
        return False


def _to_float_tensor(x: ArrayLike, device: torch.device) -> torch.Tensor:
    """A contiguous float32 tensor on ``device`` (no copy when ``x`` already is one)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.detach().to(device=device, dtype=torch.float32).contiguous()


def _to_float_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def _merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, d: torch.Tensor, i: torch.Tensor,
                k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a new candidate list (d, i) into the running k best of the same rows."""
    if best is None:
        return d, i
    d = torch.cat([best[0], d], dim=1)
    i = torch.cat([best[1], i], dim=1)
    kk = min(k, d.shape[1])
    d, pos = torch.topk(d, kk, dim=1, largest=False, sorted=True)
    return d, torch.gather(i, 1, pos)


@contextmanager
def _full_fp32_matmul():
    """Exact float32 products inside the block (no TF32 / bf16 shortcuts a caller may have enabled).

    A kNN is a ranking: with TF32 (10-bit mantissa) the order of close neighbours would change.
    """
    with exact_fp32_matmul():  # legacy or per-backend precision API, whichever the caller used
        yield


def _default_block(device: torch.device, n: int, precision: str = "fp32") -> int:
    """Tile size of the torch search: big tiles on a GPU; on a CPU, 1024 for small sets (more tiles
    means more of the symmetric saving) and 2048 for large ones (better BLAS efficiency); bf16 tiles
    of 4096 on a CPU (oneDNN's bf16 kernels need large tiles to reach their rate)."""
    if device.type == "cuda":
        return 8192
    if precision == "bf16":
        return 4096
    return 1024 if n <= 8192 else 2048


# =============================================================================================
# Exact scores: correctly rounded float32 dot products, and the screening bound
# =============================================================================================
#: unit roundoffs (round to nearest): bfloat16 (8-bit significand), float32, float64
U_BF16, U_F32, U_F64 = 2.0**-8, 2.0**-24, 2.0**-53
#: absolute slack for flushed denormals (AMX and some GPU kernels flush them), per term of a sum
_TINY = 2.0**-120
PRECISIONS = ("auto", "fp32", "bf16")
#: the kNN's choices: the direct fp32 search, or canonical distances screened in fp32 or bf16
KNN_PRECISIONS = ("fp32", "exact", "bf16")


def _gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: bounds the rounding error of an n-term dot product."""
    if n * u >= 0.5:
        raise ValueError(f"dimension {n} too large for the error bound")
    return n * u / (1.0 - n * u)


def score_bound(dim: int, precision: str) -> float:
    """``beta`` with ``|screen(a, b) - RN32(a.b)| <= beta ||a|| ||b|| + dim * 2^-120``.

    ``screen`` is the score a fast matmul gives, ``RN32(a.b)`` the exact dot product rounded once
    to float32 (the *canonical* score every decision is made on). Proof, ``u = 2^-8`` (bf16),
    ``v = 2^-24`` (fp32), ``g = gamma_dim(v)``:

    * fp32 matmul, any summation order, with or without FMA: ``|fl(a.b) - a.b| <= g sum|a_i b_i|
      <= g ||a|| ||b||`` (Cauchy-Schwarz), so ``beta = g + v`` (``v``: the rounding of ``RN32``).
    * bf16: the inputs are rounded, ``a~_i = a_i (1 + d_i)``, ``|d_i| <= u``, so
      ``|a~.b~ - a.b| <= (2u + u^2) sum|a_i b_i|``. The products of bf16 numbers are exact in
      fp32 and accumulated in fp32: error ``<= g (1 + u)^2 sum|a_i b_i|``. The result is rounded
      to bf16 (CPU matmuls return bf16): ``u`` times the accumulated value, itself at most
      ``(1 + 2u + u^2 + g (1 + u)^2) ||a|| ||b||``. Plus ``v`` for ``RN32``. Flushed denormals
      (DAZ/FTZ) change each term by less than ``2^-126``: the absolute ``dim * 2^-120``. For bf16
      ``g`` is taken with ``2v`` (GPU tensor-core adders may truncate instead of rounding), and
      :func:`screen_matmul` turns off cuBLAS's reduced-precision (bf16) reductions.

    The bound is multiplied by ``1 + 2^-20`` to absorb the rounding of its own evaluation.
    """
    g = _gamma(max(int(dim), 1), U_F32)
    if precision == "fp32":
        beta = g + U_F32
    elif precision == "bf16":
        u = U_BF16
        g = _gamma(max(int(dim), 1), 2 * U_F32)  # tensor-core adders may truncate: 2v per addition
        acc = (2 * u + u * u) + g * (1 + u) ** 2
        beta = acc + u * (1 + acc) + U_F32
    else:
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return beta * (1 + 2.0**-20)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where ``device`` computes bf16 natively (AMX / AVX512-BF16 CPU,
    CUDA compute capability >= 8), else ``"fp32"``; an explicit choice is returned as is."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    from .utils import bf16_native

    return "bf16" if bf16_native(device) else "fp32"


def screen_matmul(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """Float32 ``a @ b.T`` for screening: exact fp32 products, or bf16 inputs (``a``/``b`` already
    bf16 is fine) with the result converted back to float32."""
    if precision == "bf16":
        flags = torch.backends.cuda.matmul
        saved = flags.allow_bf16_reduced_precision_reduction
        flags.allow_bf16_reduced_precision_reduction = False  # fp32 accumulation (the bound's)
        try:
            return torch.mm(a.to(torch.bfloat16), b.to(torch.bfloat16).T).float()
        finally:
            flags.allow_bf16_reduced_precision_reduction = saved
    with exact_fp32_matmul():
        return a @ b.T


def _round_to_f32(num: int, exp: int) -> np.float32:
    """``num * 2**exp`` (an exact rational, Python ints) rounded to nearest-even float32."""
    if num == 0:
        return np.float32(0.0)
    neg, num = num < 0, abs(num)
    lead = num.bit_length() - 1 + exp  # exponent of the leading bit
    ulp = max(lead - 23, -149)  # float32 spacing at that magnitude (subnormals: 2^-149)
    if ulp > exp:
        sh = ulp - exp
        q, r = num >> sh, num & ((1 << sh) - 1)
        half = 1 << (sh - 1)
        if r > half or (r == half and q & 1):
            q += 1
        num, exp = q, ulp
    val = np.float32(np.ldexp(float(num), exp)) if lead < 128 else np.float32(np.inf)
    return -val if neg else val


def _exact_dot_f32(a: np.ndarray, b: np.ndarray) -> np.float32:
    """``RN32(a.b)`` of two float32 vectors with integer arithmetic (exact, slow: the fallback)."""
    ma, ea = np.frexp(a.astype(np.float64))
    mb, eb = np.frexp(b.astype(np.float64))
    p = (ma * 2.0**24).astype(np.int64) * (mb * 2.0**24).astype(np.int64)  # exact: < 2^48
    e = ea.astype(np.int64) + eb.astype(np.int64) - 48
    nz = p != 0
    if not nz.any():
        return np.float32(0.0)
    p, e = p[nz], e[nz]
    order = np.argsort(e, kind="stable")
    p, e = p[order], e[order]
    starts = np.flatnonzero(np.r_[True, e[1:] != e[:-1]])
    sums = np.add.reduceat(p, starts)  # per exponent: < 2048 * 2^48 < 2^63, exact
    emin = int(e[0])
    total = sum(int(s) << int(x - emin) for s, x in zip(sums, e[starts]))
    return _round_to_f32(total, emin)


def _verified_round(r64: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float64 approximations ``r64`` (``|r64 - exact| <= err``) to float32 and flag where
    that is provably ``RN32(exact)``: the whole interval ``r64 +- err`` lies strictly inside the
    rounding interval of ``fl32(r64)`` (between the midpoints to its float32 neighbours, which are
    exact in float64)."""
    with np.errstate(over="ignore", invalid="ignore"):
        r32 = r64.astype(np.float32)
        lo = np.nextafter(r32, np.float32(-np.inf)).astype(np.float64)
        hi = np.nextafter(r32, np.float32(np.inf)).astype(np.float64)
        mid_lo = (r32.astype(np.float64) + lo) / 2
        mid_hi = (r32.astype(np.float64) + hi) / 2
        e = err * (1 + 2.0**-30) + np.abs(r64) * 2.0**-51 + 2.0**-1070
        ok = (r64 - e > mid_lo) & (r64 + e < mid_hi) & np.isfinite(r64)
    return r32, ok


def _f64_pair_dots(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                   absolute: bool = False, x64: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``x[rows[t]] . y[cols[t]]`` in float64 (products exact, any summation order) and the float64
    product of the two vectors' norms. Large CPU batches are split over torch's threads (the
    sampled product below runs on one)."""
    threads = torch.get_num_threads() if x.device.type == "cpu" else 1
    if threads < 2 or len(rows) < 50_000:
        return _f64_pair_dots_one(x, y, rows, cols, absolute, x64)
    from concurrent.futures import ThreadPoolExecutor

    order = np.argsort(rows, kind="stable")
    parts = np.array_split(order, threads)
    with ThreadPoolExecutor(threads) as pool:
        res = list(pool.map(lambda p: _f64_pair_dots_one(x, y, rows[p], cols[p], absolute, x64), parts))
    dots = np.empty(len(rows), np.float64)
    norms = np.empty(len(rows), np.float64)
    for p, (dp, npp) in zip(parts, res):
        dots[p], norms[p] = dp, npp
    return dots, norms


def _f64_pair_dots_one(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                       absolute: bool = False, x64: torch.Tensor | None = None,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_f64_pair_dots` on one thread: a sampled dense-dense product over the pairs' pattern
    (no gathered copy per pair)."""
    if len(rows) == 0:
        return np.zeros(0, np.float64), np.zeros(0, np.float64)
    ur, rinv = np.unique(rows, return_inverse=True)
    uc, cinv = np.unique(cols, return_inverse=True)
    dev = x.device
    a = (x if x64 is None else x64).index_select(0, torch.from_numpy(ur).to(dev)).double()
    b = y.index_select(0, torch.from_numpy(uc).to(dev)).double()
    if absolute:
        a, b = a.abs_(), b.abs_()
    key = rinv.astype(np.int64) * len(uc) + cinv
    ukey, kinv = np.unique(key, return_inverse=True)  # sorted by (row, col), no duplicates
    pr, pc = ukey // len(uc), ukey % len(uc)
    crow = np.concatenate([[0], np.cumsum(np.bincount(pr, minlength=len(ur)))])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        pattern = torch.sparse_csr_tensor(torch.from_numpy(crow).to(dev), torch.from_numpy(pc).to(dev),
                                          torch.zeros(len(ukey), dtype=torch.float64, device=dev),
                                          size=(len(ur), len(uc)), check_invariants=False)
        out = torch.sparse.sampled_addmm(pattern, a, b.T, beta=0.0).values().cpu().numpy()[kinv]
    na = torch.linalg.vector_norm(a, dim=1).cpu().numpy()
    nb = na if (y is x and np.array_equal(ur, uc)) else torch.linalg.vector_norm(b, dim=1).cpu().numpy()
    return out, na[rinv] * nb[cinv]


def exact_pair_dots(x: torch.Tensor, y: torch.Tensor, rows: np.ndarray, cols: np.ndarray,
                    x64: torch.Tensor | None = None) -> np.ndarray:
    """``RN32(x[rows[t]] . y[cols[t]])``: the exact dot products rounded once to float32.

    A deterministic function of the two vectors alone (not of the kernel, the batch or the
    device), which is what lets a bf16 search and an fp32 search make identical decisions.
    Three stages: a float64 sum (error ``<= gamma_d(2^-53) ||a|| ||b||``) whose rounding is
    verified (:func:`_verified_round`); where that is too coarse (near-zero scores), the same
    with the tighter ``gamma_d sum|a_i b_i|``; the rest exactly with integers. ``x64``: ``x`` in
    float64 when the caller keeps it (saves converting the rows at every call).
    """
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    d = int(x.shape[1])
    g = _gamma(d + 2, U_F64)
    r64, norms = _f64_pair_dots(x, y, rows, cols, x64=x64)
    out, ok = _verified_round(r64, g * norms * (1 + 2 * g))
    bad = np.flatnonzero(~ok)
    if len(bad):
        absd, _ = _f64_pair_dots(x, y, rows[bad], cols[bad], absolute=True, x64=x64)
        out2, ok2 = _verified_round(r64[bad], g * absd * (1 + 4 * g))
        out[bad[ok2]] = out2[ok2]
        bad = bad[~ok2]
    if len(bad):
        xa, ya = x.cpu().numpy(), y.cpu().numpy()
        for t in bad:
            out[t] = _exact_dot_f32(xa[rows[t]], ya[cols[t]])
    return out


def exact_sqnorms(x: torch.Tensor) -> np.ndarray:
    """``RN32(||x_i||^2)`` for every row (see :func:`exact_pair_dots`)."""
    n, d = int(x.shape[0]), int(x.shape[1])
    out = np.empty(n, np.float32)
    g = _gamma(d + 2, U_F64)
    step = max(1, (1 << 22) // max(d, 1))
    for s in range(0, n, step):
        r64 = x[s:s + step].double().pow(2).sum(1).cpu().numpy()  # all terms >= 0: error g * r64
        r32, ok = _verified_round(r64, g * r64 * (1 + 2 * g))
        for t in np.flatnonzero(~ok):
            row = x[s + t].cpu().numpy()
            r32[t] = _exact_dot_f32(row, row)
        out[s:s + step] = r32
    return out


def _screen_tile(xa: torch.Tensor, xb: torch.Tensor, sqa: torch.Tensor, sqb: torch.Tensor,
                 out: torch.Tensor, precision: str) -> torch.Tensor:
    """Screening squared distances ``|a|^2 + |b|^2 - 2 a.b`` of a tile, written into ``out``
    (float32); the products in exact fp32 (``addmm``) or in bf16 (``xa``/``xb`` already bf16)."""
    if precision == "bf16":
        out.copy_(screen_matmul(xa, xb, "bf16")).mul_(-2.0).add_(sqb[None, :])
    else:
        torch.addmm(sqb[None, :], xa, xb.T, beta=1.0, alpha=-2.0, out=out)
    return out.add_(sqa[:, None])


def _torch_knn_self(x: torch.Tensor, k: int, block: int, precision: str = "fp32",
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Screening self-kNN that uses the symmetry of the distance matrix.

    The matrix ``D = |x|^2 + |y|^2 - 2 X X^T`` is cut into ``block x block`` tiles and only the tiles
    on or above the diagonal are computed: tile (a, b) gives candidates to the rows of block ``a``
    (top-k along its rows) *and* to the rows of block ``b`` (top-k along its columns). Each row keeps
    a running top-k that is merged with every new candidate list. That halves the matrix-product
    work compared with the plain row-chunked search (:func:`_torch_knn_rows`).
    """
    n = x.shape[0]
    sq = (x * x).sum(1)
    xs = x.to(torch.bfloat16) if precision == "bf16" else x
    starts = list(range(0, n, block))
    best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(starts)
    pairs = [(a, b) for a in range(len(starts)) for b in range(a, len(starts))]
    # two reusable tile buffers (no per-tile allocations: keeps the allocator and the RSS quiet)
    size = min(block, n)
    buf = torch.empty(size * size, dtype=torch.float32, device=x.device)
    buf_t = torch.empty(size * size, dtype=torch.float32, device=x.device)
    for a, b in progress(pairs, desc="knn tiles"):
        a0, a1 = starts[a], min(starts[a] + block, n)
        b0, b1 = starts[b], min(starts[b] + block, n)
        tile = buf[: (a1 - a0) * (b1 - b0)].view(a1 - a0, b1 - b0)
        _screen_tile(xs[a0:a1], xs[b0:b1], sq[a0:a1], sq[b0:b1], tile, precision)
        d, i = torch.topk(tile, min(k, b1 - b0), dim=1, largest=False, sorted=True)
        best[a] = _merge_topk(best[a], d, i + b0, k)
        if b != a:
            tile_t = buf_t[: (a1 - a0) * (b1 - b0)].view(b1 - b0, a1 - a0)
            tile_t.copy_(tile.T)
            d, i = torch.topk(tile_t, min(k, a1 - a0), dim=1, largest=False, sorted=True)
            best[b] = _merge_topk(best[b], d, i + a0, k)
    del buf, buf_t
    d = torch.cat([bd[0] for bd in best])  # type: ignore[index]
    i = torch.cat([bd[1] for bd in best])  # type: ignore[index]
    return i, d


def _torch_knn_rows(x: torch.Tensor, q: torch.Tensor, k: int, block: int, precision: str = "fp32",
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain screening kNN: for each chunk of query rows, all distances to ``x`` then ``topk``."""
    n = x.shape[0]
    xsq = (x * x).sum(1)
    qsq = (q * q).sum(1)
    xs, qs = (x.to(torch.bfloat16), q.to(torch.bfloat16)) if precision == "bf16" else (x, q)
    # keep one chunk of the distance matrix at ~block^2 floats
    rows = min(q.shape[0], max(1, (block * block) // max(n, 1)))
    buf = torch.empty(rows * n, dtype=torch.float32, device=x.device)
    out_i, out_d = [], []
    for s in progress(range(0, q.shape[0], rows), desc="knn rows"):
        e = min(s + rows, q.shape[0])
        dist = buf[: (e - s) * n].view(e - s, n)
        _screen_tile(qs[s:e], xs, qsq[s:e], xsq, dist, precision)
        d, i = torch.topk(dist, k, dim=1, largest=False, sorted=True)
        out_i.append(i)
        out_d.append(d)
    del buf
    return torch.cat(out_i), torch.cat(out_d)


def distance_bound(dim: int, precision: str) -> float:
    """``beta_D`` with ``|e_ij - D_ij| <= beta_D (|q_i|^2 + |x_j|^2) + 4 dim 2^-120`` where ``e`` is
    the screening squared distance (:func:`_screen_tile`) and ``D_ij = fl32(fl32(n_i + n_j) -
    2 c_ij)`` the canonical one, ``n = RN32(|.|^2)``, ``c = RN32(q_i.x_j)``.

    Proof, ``W = |q|^2 + |x|^2``, ``v = 2^-24``: both approximate ``X = |q|^2 + |x|^2 - 2 q.x``.
    The screening norms (float32 sums) are off by ``gamma_d |.|^2`` each (``gamma_d W``), the
    screening product by ``beta |q||x| <= beta W / 2`` (:func:`score_bound`), so ``2 q.x`` by
    ``beta W``; two float32 additions round values of magnitude ``<= (|q| + |x|)^2 <= 2W``:
    ``4 v W``. For ``D``: the two rounded norms ``v W``, their rounded sum ``v W``, ``2c``
    ``v W``, the final subtraction ``2 v W``: ``5 v W``. Total ``(beta + gamma_d + 9v) W``; the
    ``10v`` and the ``1 + 2^-10`` factor cover the second-order terms.
    """
    return (score_bound(dim, precision) + _gamma(max(int(dim), 1), U_F32) + 10 * U_F32) * (1 + 2.0**-10)


def _canonical_sqdist(x: torch.Tensor, q: torch.Tensor, nx: np.ndarray, nq: np.ndarray,
                      rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``D = fl32(fl32(nq_i + nx_j) - 2 RN32(q_i . x_j))`` for the pairs: a function of the two
    vectors alone, the value every decision and every returned distance is made of."""
    c = exact_pair_dots(q, x, rows, cols)
    return (nq[rows] + nx[cols]) - np.float32(2.0) * c


def _screen_candidates(x: torch.Tensor, q: torch.Tensor | None, k: int, block: int, precision: str,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j) with screening distance ``e_ij <= T_i + 2 B_i``: ``T_i`` the k-th smallest
    ``e`` of row i, ``B_i`` the bound of :func:`distance_bound`. Starts from a screening top-
    ``(k + margin)`` (symmetric tiles for a self-search) and widens the rows whose list is full
    below the limit (the limit could hide more candidates) with a row search of twice the width.

    Every j with ``D_ij <= D_(k)`` (the k-th smallest canonical distance) is a candidate: the k
    items with ``e <= T`` have ``D <= T + B``, so ``D_(k) <= T + B``, and ``D_ij <= D_(k)`` gives
    ``e_ij <= D_ij + B <= T + 2B``.
    """
    n, d = x.shape
    qq = x if q is None else q
    m = qq.shape[0]
    up = (1 + (d + 2) * U_F32) ** 2  # float32 norms, raised by their worst rounding error

    def sqnorm_up(t: torch.Tensor) -> np.ndarray:
        return t.norm(dim=1).double().cpu().numpy() ** 2 * up

    xn2 = sqnorm_up(x)
    qn2 = xn2 if q is None else sqnorm_up(q)
    lim_b = 2 * (distance_bound(d, precision) * (qn2 + xn2.max()) + 4 * d * _TINY)
    width = min(n, k + max(8, k // 2))
    if q is None:
        i_t, d_t = _torch_knn_self(x, width, block, precision)
    else:
        i_t, d_t = _torch_knn_rows(x, q, width, block, precision)
    rows_all = np.arange(m)
    out_r, out_c = [], []
    while True:
        idx = i_t.cpu().numpy().astype(np.int64)
        e = d_t.cpu().numpy().astype(np.float64)
        lim = e[:, k - 1] + lim_b[rows_all]
        full = (e[:, -1] <= lim) & (width < n)
        sel = (e <= lim[:, None]) & ~full[:, None]
        r, c = np.nonzero(sel)
        out_r.append(rows_all[r])
        out_c.append(idx[r, c])
        if not full.any():
            break
        rows_all = rows_all[full]
        width = min(n, 2 * width)
        i_t, d_t = _torch_knn_rows(x, qq[torch.from_numpy(rows_all).to(x.device)], width, block, precision)
    return np.concatenate(out_r), np.concatenate(out_c)


def _exact_knn(x: torch.Tensor, q: torch.Tensor | None, k: int, block: int, precision: str,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by canonical distance: the first k of each row's candidates (screening, see
    :func:`_screen_candidates`) sorted by ``(D_ij, j)``. The candidates hold every j that can
    be among them, and ``D`` does not depend on how it is computed, so the fp32 and the bf16
    screening give identical lists and distances (ties: the lower index first)."""
    rows, cols = _screen_candidates(x, q, k, block, precision)
    nx = exact_sqnorms(x)
    nq = nx if q is None else exact_sqnorms(q)
    dist = _canonical_sqdist(x, x if q is None else q, nx, nq, rows, cols)
    order = np.lexsort((cols, dist, rows))
    rows, cols, dist = rows[order], cols[order], dist[order]
    m = x.shape[0] if q is None else q.shape[0]
    first = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=m))[:-1]])
    take = (first[:, None] + np.arange(k)[None, :]).ravel()
    return cols[take].reshape(m, k), dist[take].reshape(m, k).astype(np.float32)


#: faiss-gpu's largest k of a flat-index search (k-selection in registers); above it, torch is used
FAISS_GPU_MAX_K = 2048

_GPU_RESOURCES: dict[int, Any] = {}  # one StandardGpuResources (its ~1.5 GiB scratch) per device
_FALLBACK_WARNED: set[str] = set()


def _gpu_resources(faiss, device_index: int):
    """The cached ``StandardGpuResources`` of a device: created once per process, not per call."""
    res = _GPU_RESOURCES.get(device_index)
    if res is None:
        res = _GPU_RESOURCES[device_index] = faiss.StandardGpuResources()
    return res


def _warn_fallback_once(reason: str) -> None:
    if reason not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(reason)
        log.warning("kNN: %s; using the torch search instead", reason)


def _faiss_knn(x: np.ndarray, q: np.ndarray, k: int, device: torch.device) -> tuple[np.ndarray, np.ndarray, str]:
    """Exact L2 kNN with faiss: a GPU flat index when possible, ``IndexFlatL2`` on the CPU otherwise."""
    faiss = _faiss()
    assert faiss is not None
    d = x.shape[1]
    if device.type == "cuda" and faiss_gpu_available():
        dev_index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.empty_cache()  # hand PyTorch's cached blocks back before faiss allocates
        res = _gpu_resources(faiss, dev_index)
        cfg = faiss.GpuIndexFlatConfig()
        cfg.device = dev_index
        index = faiss.GpuIndexFlatL2(res, d, cfg)
        name = "faiss-gpu"
    else:
        index = faiss.IndexFlatL2(d)
        name = "faiss-cpu"
    index.add(x)
    dist, idx = index.search(q, k)
    del index
    return idx.astype(np.int64, copy=False), dist.astype(np.float32, copy=False), name


def _put_self_first(idx: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make column 0 of a self-search the point itself, with distance exactly 0.

    With duplicates or near-duplicates another point can be at distance ~0 and float rounding may
    rank it before (or even push out) the point itself. The reference code assumes self is first, so
    we move it there: rows whose list lacks self drop their last entry to make room; the relative
    order of the other neighbours is kept.
    """
    n, k = idx.shape
    me = np.arange(n, dtype=np.int64)
    is_self = idx == me[:, None]
    if bool(is_self[:, 0].all()):
        dist[:, 0] = 0.0
        return idx, dist
    missing = ~is_self.any(1)
    idx = idx.copy()
    dist = dist.copy()
    idx[missing, -1] = me[missing]
    is_self = idx == me[:, None]
    key = np.where(is_self, -1, np.arange(k)[None, :])
    order = np.argsort(key, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, 1)
    dist = np.take_along_axis(dist, order, 1)
    dist[:, 0] = 0.0
    return idx, dist


def knn(
    features: ArrayLike,
    k: int,
    queries: ArrayLike | None = None,
    backend: str = "auto",
    device: str | torch.device | None = "auto",
    block: int | None = None,
    precision: str = "auto",
) -> KNNResult:
    """Exact k nearest neighbours under squared Euclidean distance.

    Parameters
    ----------
    features : (n, d) database vectors (numpy or torch).
    k : number of neighbours per query.
    queries : (m, d) query vectors. ``None`` means a **self-search** of ``features``: each point's
        own index is put in column 0 (distance 0), as the k-reciprocal code expects, so the list
        holds the point plus its ``k - 1`` nearest other points.
    backend : ``"torch"``, ``"faiss"`` or ``"auto"``. Auto picks faiss-gpu on a CUDA device when
        faiss was built with GPU support, torch on any other CUDA device, the symmetric torch search
        for a CPU self-search (it does half the arithmetic of a flat index), and faiss-cpu (when
        installed) for CPU query searches. faiss-gpu keeps one ``StandardGpuResources`` per device;
        for ``k`` above its limit (:data:`FAISS_GPU_MAX_K`) or on any faiss error (out of GPU memory)
        the exact torch search runs instead (warned once; ``backend`` of the result says which ran).
    device : ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    block : tile size of the torch search (default: 1024 or 2048 on CPU, 8192 on CUDA).
    precision : ``"auto"`` = ``"fp32"``: the direct fp32 search (the symmetric half product, its
        own float32 distances; near-tied neighbours may come in either order). ``"exact"`` and
        ``"bf16"``: neighbours ordered by the canonical distance
        ``D_ij = fl32(RN32|q_i|^2 + RN32|x_j|^2) - 2 RN32(q_i.x_j)`` (exact dot products rounded
        once to float32, so independent of the matmul kernel, its blocking and the device), ties
        by the lower index, found by an fp32 or a bf16 screen and an exact re-scoring of every
        candidate within the screen's error bound (:func:`_exact_knn`); the two give identical
        answers. ``sq_dists`` are these ``D``. Measured on this kit's AMX CPU at N = 12,936 (``make
        bench``, two threads): the direct search 2.7 s, ``exact`` 4.0 s, ``bf16`` 6.0 s (the bf16
        band's float64 re-scoring costs more than the bf16 screen saves), so ``auto`` keeps the
        direct fp32 search.

    Returns
    -------
    :class:`KNNResult` ``(indices int64 (m, k), sq_dists float32 (m, k), backend)``.

    faiss computes the same neighbours up to its own float32 rounding: it can differ from the
    torch search in the order of (numerically) tied neighbours, and in which of several tied
    points fills the last slot.
    """
    dev = resolve_device(device)
    n = int(features.shape[0])
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, n={n}]")
    self_search = queries is None
    if precision != "auto" and precision not in KNN_PRECISIONS:
        raise ValueError(f"precision must be one of {('auto',) + KNN_PRECISIONS}, got {precision!r}")
    if backend == "auto":
        if dev.type == "cuda":
            backend = "faiss" if faiss_gpu_available() else "torch"
        else:
            backend = "torch" if (self_search or not faiss_available()) else "faiss"
    if backend == "faiss":
        if not faiss_available():
            raise ImportError("backend='faiss' needs faiss-cpu or faiss-gpu")
        name = None
        if dev.type == "cuda" and k > FAISS_GPU_MAX_K:
            _warn_fallback_once(f"k={k} is above faiss-gpu's limit of {FAISS_GPU_MAX_K}")
            backend = "torch"
        else:
            x = _to_float_numpy(features)
            q = x if self_search else _to_float_numpy(queries)
            try:
                idx, dist, name = _faiss_knn(x, q, k, dev)
            except Exception as exc:  # out of GPU memory, a broken wheel...: the exact torch search
                _warn_fallback_once(f"faiss failed ({type(exc).__name__}: {exc})")
                backend = "torch"
    prec = "fp32"
    if backend == "torch":
        x = _to_float_tensor(features, dev)
        prec = "fp32" if precision == "auto" else precision
        screen = "bf16" if prec == "bf16" else "fp32"  # the matmul that finds the candidates
        bs = block or _default_block(dev, n, screen)
        q = None if self_search else _to_float_tensor(queries, dev)
        with torch.no_grad(), _full_fp32_matmul():
            if prec == "fp32":  # the direct search: the fp32 screen's own distances
                i_t, d_t = _torch_knn_self(x, k, bs) if self_search else _torch_knn_rows(x, q, k, bs)
                idx, dist = i_t.cpu().numpy(), d_t.cpu().numpy()
            else:  # canonical distances, screened in fp32 ("exact") or bf16: identical answers
                idx, dist = _exact_knn(x, q, k, bs, screen)
        name = f"torch-{dev.type}"
    elif backend != "faiss":
        raise ValueError(f"unknown backend {backend!r} (use 'auto', 'torch' or 'faiss')")
    np.maximum(dist, 0.0, out=dist)  # rounding can give tiny negatives
    if self_search:
        idx, dist = _put_self_first(idx, dist)
    return KNNResult(np.ascontiguousarray(idx), np.ascontiguousarray(dist), name, prec)


# =============================================================================================
# Shared k-reciprocal machinery
# =============================================================================================
def _pattern(rows: np.ndarray, cols: np.ndarray, n: int, data: np.ndarray | None = None,
             dtype=np.int32) -> sp.csr_matrix:
    """Canonical CSR matrix with entries at (rows, cols) (``data`` defaults to 1)."""
    if data is None:
        data = np.ones(len(rows), dtype=dtype)
    m = sp.csr_matrix((data, (rows, cols)), shape=(n, n))
    m.sum_duplicates()
    return m


def _reciprocal(rank: np.ndarray, width: int) -> sp.csr_matrix:
    """R(i) = { j in rank[i, :width] : i in rank[j, :width] } as a 0/1 CSR pattern.

    ``F`` has a 1 at (i, j) when j is among the first ``width`` entries of i's list; reciprocity is
    the element-wise product ``F * F^T``.
    """
    n = rank.shape[0]
    f = _pattern(np.repeat(np.arange(n), width), rank[:, :width].ravel(), n)
    f.data[:] = 1  # duplicate columns in a list (never from knn()) would otherwise count twice
    r = f.multiply(f.T.tocsr()).tocsr()
    r.sort_indices()
    return r


def _segment_reduce(ufunc, values: np.ndarray, indptr: np.ndarray, empty_value: float) -> np.ndarray:
    """Per-row reduction of CSR ``values`` (``ufunc.reduceat`` that tolerates empty rows)."""
    n = len(indptr) - 1
    out = np.full(n, empty_value, dtype=np.float64)
    nonempty = indptr[1:] > indptr[:-1]
    if values.size:
        out[nonempty] = ufunc.reduceat(values.astype(np.float64), indptr[:-1][nonempty])
    return out


def _kreciprocal_encoding(
    rank: np.ndarray,
    n_full: int,
    n_half: int,
    n_qe: int,
    pair_dist: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> sp.csr_matrix:
    """Steps 2-5 of the k-reciprocal algorithm, shared by Jaccard and re-ranking.

    Parameters
    ----------
    rank : (N, W) neighbour table, nearest first (self in column 0).
    n_full, n_half : how many columns of ``rank`` form the forward neighbourhood for the full
        reciprocal set ``R(i, k1)`` and for the half set ``R(j, round(k1/2))`` used in the expansion.
        (CC's Jaccard: ``k1`` and ``round(k1/2) + 1`` capped at ``k1``; torchreid: ``k1 + 1`` and
        ``round(k1/2) + 1``.)
    n_qe : number of nearest rows averaged by query expansion (1 = none).
    pair_dist : ``pair_dist(rows, cols)`` -> distances of the given pairs, the quantity that goes
        into the Gaussian kernel (``2 - 2 x_i.x_j`` for Jaccard, the normalised ``O[i, j]`` for
        re-ranking).

    Returns
    -------
    ``V`` as a canonical float32 CSR matrix (rows sum to 1).

    How each step is vectorised:

    * reciprocity: ``R = F * F^T`` on 0/1 patterns;
    * expansion: ``|R(c, h) & R(i, k1)|`` for every candidate ``c in R(i, k1)`` is entry (i, c) of
      the sparse product ``R1 @ R2^T``, sampled on the pattern of ``R1``. The candidate is accepted
      when that count is ``> 2/3 |R(c, h)|``, tested as ``3 * count > 2 * size`` in integers (it
      agrees with the reference's float test for every size below 100,000). The expanded set is
      the pattern of ``R1 + Acc @ R2`` (the sparse product also removes duplicates);
    * Gaussian encoding: a per-row softmax of ``-pair_dist`` over the pattern;
    * query expansion: ``V_qe = Q @ V / n_qe`` with ``Q`` the 0/1 pattern of the first ``n_qe``
      neighbours.
    """
    n = rank.shape[0]
    r1 = _reciprocal(rank, n_full)
    r2 = _reciprocal(rank, n_half)
    size2 = np.diff(r2.indptr).astype(np.int64)
    # counts[i, c] = |R2(c) & R1(i)| for (i, c) in R1
    counts = r1.multiply((r1 @ r2.T).tocsr()).tocoo()
    accept = 3 * counts.data.astype(np.int64) > 2 * size2[counts.col]
    acc = _pattern(counts.row[accept], counts.col[accept], n)
    expanded = (r1 + acc @ r2).tocsr()
    expanded.sum_duplicates()
    expanded.sort_indices()
    indptr = expanded.indptr.astype(np.int64)
    cols = expanded.indices.astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))

    # Gaussian kernel, normalised per row (a softmax of -d over the expanded set)
    d = np.asarray(pair_dist(rows, cols), dtype=np.float64)
    dmin = _segment_reduce(np.minimum, d, indptr, 0.0)
    w = np.exp(-(d - dmin[rows]))
    wsum = _segment_reduce(np.add, w, indptr, 1.0)
    v = sp.csr_matrix(((w / wsum[rows]).astype(np.float32), cols, indptr), shape=(n, n))

    if n_qe > 1:
        q = _pattern(np.repeat(np.arange(n), n_qe), rank[:, :n_qe].ravel(), n, dtype=np.float32)
        v = (q @ v).tocsr()
        v.data /= np.float32(n_qe)
        v.sort_indices()
    v.eliminate_zeros()  # (nothing to drop in exact arithmetic; keeps the support honest)
    return v


@dataclass
class _InvertedIndex:
    """CSR and CSC views of ``V`` as torch tensors on the compute device."""

    n: int
    crow: torch.Tensor  # (N+1,) CSR row pointer
    ccol: torch.Tensor  # (nnz,) CSR column of each entry
    cval: torch.Tensor  # (nnz,) CSR value of each entry
    pos: torch.Tensor  # (nnz,) position of each CSR entry in the CSC arrays
    kptr: torch.Tensor  # (N+1,) CSC column pointer
    krow: torch.Tensor  # (nnz,) CSC row of each entry (ascending inside a column)
    kval: torch.Tensor  # (nnz,) CSC value of each entry


def _inverted_index(v: sp.csr_matrix, device: torch.device) -> _InvertedIndex:
    n = v.shape[0]
    # the CSC transpose of an index array tells where every CSR entry lands in column order
    tag = sp.csr_matrix((np.arange(v.nnz, dtype=np.int64) + 1, v.indices, v.indptr), shape=v.shape).tocsc()
    tag.sort_indices()
    csr_of_csc = tag.data - 1  # CSC position -> CSR entry
    pos = np.empty(v.nnz, dtype=np.int64)
    pos[csr_of_csc] = np.arange(v.nnz, dtype=np.int64)

    def t(a, dtype=torch.int64):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return _InvertedIndex(
        n=n,
        crow=t(v.indptr),
        ccol=t(v.indices),
        cval=t(v.data, torch.float32),
        pos=t(pos),
        kptr=t(tag.indptr),
        krow=t(tag.indices),
        kval=t(v.data[csr_of_csc], torch.float32),
    )


def _row_blocks(work: np.ndarray, max_work: int, max_rows: int) -> list[tuple[int, int]]:
    """Cut rows [0, len(work)) into consecutive blocks of bounded total ``work`` and row count."""
    blocks = []
    cum = np.concatenate([[0], np.cumsum(work, dtype=np.int64)])
    s = 0
    n = len(work)
    while s < n:
        e = int(np.searchsorted(cum, cum[s] + max_work, side="right")) - 1
        e = max(s + 1, min(e, s + max_rows, n))
        blocks.append((s, e))
        s = e
    return blocks


def _expand_counts(counts: torch.Tensor, total: int) -> torch.Tensor:
    """``repeat_interleave(arange(len(counts)), counts)`` via a cumulative sum (faster on CPU).

    A 1 is added at the first output slot of every source; the running sum then tells which
    source each slot belongs to. Sources with a zero count simply share a start position.
    """
    start = torch.cumsum(counts, 0) - counts
    marks = torch.zeros(total + 1, dtype=torch.int64, device=counts.device)
    marks.index_add_(0, start, torch.ones_like(start))
    return torch.cumsum(marks[:total], 0) - 1


def _minsum_triples(
    inv: _InvertedIndex,
    left: tuple[int, int],
    mode: str,
    partner_rows: tuple[int, int] | None = None,
    max_triples: int = 4_000_000,
    max_block_rows: int = 1 << 30,
    desc: str = "min-sum",
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Enumerate the contributions ``min(V_ik, V_jk)`` of the min-sum ``m_ij = sum_k min(V_ik, V_jk)``.

    For every non-zero ``(i, k)`` of the rows in ``left = (r0, r1)``, the inverted index (column
    ``k`` of the CSC form) lists every row ``j`` that also has ``k`` in its support; each such pair
    contributes ``min(V_ik, V_jk)`` to ``m_ij``. Pairs of rows that share no column never appear,
    which is what makes the computation sparse.

    ``mode="upper"`` only pairs ``i`` with ``j > i`` (inside a CSC column rows are sorted, so these
    are the entries after ``i``'s own); ``mode="range"`` pairs ``i`` with the rows ``j`` in
    ``partner_rows = (p0, p1)``. Either way each left entry's partners are one contiguous slice
    ``[lo, hi)`` of the CSC arrays, so the triples are generated with a cumulative-sum expansion and
    gathers only (no Python loop over rows, no sort).

    Yields ``(b0, b1, i, j, val)`` per block of left rows ``[b0, b1)``: flat triples (row, partner,
    contribution) whose number is bounded by ``max_triples`` (unless one row alone exceeds it).
    The caller sums them by pair.
    """
    r0, r1 = left
    crow = inv.crow
    dev = crow.device
    e0, e1 = int(crow[r0]), int(crow[r1])
    if e1 <= e0:
        return
    col = inv.ccol[e0:e1]
    if mode == "upper":
        lo = inv.pos[e0:e1] + 1
        hi = inv.kptr[1:].index_select(0, col)
    elif mode == "range":
        assert partner_rows is not None
        p0, p1 = partner_rows
        # rows are sorted inside a CSC column: count, per column, the rows below p0 and below p1
        kcol = _expand_counts(inv.kptr.diff(), int(inv.kptr[-1]))
        below0 = torch.zeros(inv.n, dtype=torch.int64, device=dev)
        below1 = torch.zeros(inv.n, dtype=torch.int64, device=dev)
        below0.index_add_(0, kcol, (inv.krow < p0).to(torch.int64))
        below1.index_add_(0, kcol, (inv.krow < p1).to(torch.int64))
        colstart = inv.kptr[:-1].index_select(0, col)
        lo = colstart + below0.index_select(0, col)
        hi = colstart + below1.index_select(0, col)
    else:
        raise ValueError(mode)
    cnt = (hi - lo).clamp_min(0)
    row_of_ent = _expand_counts(crow[r0 + 1:r1 + 1] - crow[r0:r1], e1 - e0) + r0
    work = torch.zeros(r1 - r0, dtype=torch.int64, device=dev)
    work.index_add_(0, row_of_ent - r0, cnt)
    blocks = _row_blocks(work.cpu().numpy(), max_triples, max_block_rows)
    bounds = crow.cpu().numpy()
    for b0, b1 in progress(blocks, desc=desc):
        s, e = int(bounds[b0]) - e0, int(bounds[b1]) - e0
        c = cnt[s:e]
        total = int(c.sum())
        if total == 0:
            continue
        # triple t belongs to left entry src[t]; its partner is CSC slot lo[src] + (t - first[src])
        src = _expand_counts(c, total)
        first = torch.cumsum(c, 0) - c
        slot = (lo[s:e] - first).index_select(0, src)
        slot += torch.arange(total, device=dev)
        j = inv.krow.index_select(0, slot)
        val = torch.minimum(inv.cval[e0 + s:e0 + e].index_select(0, src), inv.kval.index_select(0, slot))
        i = row_of_ent[s:e].index_select(0, src)
        del src, slot
        yield b0, b1, i, j, val


def _dense_accumulator_rows(n_cols: int, budget_floats: int) -> int:
    return max(1, budget_floats // max(n_cols, 1))


# =============================================================================================
# Jaccard distance (CC / HHCL clustering)
# =============================================================================================
def _knn_pair_dist(x: torch.Tensor, sqnorm: np.ndarray, rank: np.ndarray, sq: np.ndarray,
                   ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``pair_dist`` for Jaccard: ``d_ij = 2 - 2 x_i . x_j``.

    Most pairs of an expanded set are in the kNN table, whose squared distances give
    ``2 - 2 x_i.x_j = |x_i - x_j|^2 + 2 - |x_i|^2 - |x_j|^2`` for free. The few pairs that are only
    2-hop neighbours are computed with explicit dot products.
    """
    n, w = rank.shape

    def pair_dist(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        # locate (row, col) in the kNN table: union of the two patterns, E entries tagged odd
        e01 = sp.csr_matrix((np.ones(len(rows), np.int64), cols, np.concatenate(
            [[0], np.cumsum(np.bincount(rows, minlength=n))])), shape=(n, n))
        kenc = _pattern(np.repeat(np.arange(n), w), rank.ravel(), n,
                        data=2 + 4 * np.tile(np.arange(w, dtype=np.int64), n))
        both = (e01 + kenc).tocsr()
        both.sort_indices()
        tag = both.data[both.data % 2 == 1]  # one per (row, col), in (row, col) order
        hit = tag >= 3
        out = np.empty(len(rows), dtype=np.float64)
        t = (tag[hit] - 3) // 4
        r = rows[hit]
        out[hit] = sq[r, t].astype(np.float64) + 2.0 - sqnorm[r] - sqnorm[cols[hit]]
        miss = np.flatnonzero(~hit)
        for s in range(0, len(miss), 8192):
            m = miss[s:s + 8192]
            ri = torch.from_numpy(rows[m]).to(x.device)
            ci = torch.from_numpy(cols[m]).to(x.device)
            dots = (x[ri] * x[ci]).sum(1)
            out[m] = (2.0 - 2.0 * dots).double().cpu().numpy()
        return out

    return pair_dist


def _jaccard_minsum(v: sp.csr_matrix, n: int, dev: torch.device, max_triples: int | None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 6a: ``m_ij`` for every pair ``i < j`` with overlapping support (upper triangle), summed
    in blocks of rows with a dense accumulator on ``dev``; returns (rows, cols, m) as float64 m."""
    inv = _inverted_index(v, dev)
    if max_triples is None:
        max_triples = 32_000_000 if dev.type == "cuda" else 2_000_000
    budget = 64_000_000 if dev.type == "cuda" else 4_000_000  # floats in the dense accumulator
    up_r, up_c, up_m = [], [], []
    block_rows = _dense_accumulator_rows(n, budget)
    acc = torch.zeros(min(n, block_rows) * n, dtype=torch.float32, device=dev)
    owner = torch.full((acc.numel(),), -1, dtype=torch.int32, device=dev)
    for b0, b1, i, j, val in _minsum_triples(inv, (0, n), "upper", max_triples=max_triples,
                                             max_block_rows=block_rows, desc="jaccard min-sum"):
        width_b = n - b0  # partners j > i >= b0
        flat = (i - b0) * width_b + (j - b0)
        del i, j
        acc.index_add_(0, flat, val)
        # one representative triple per distinct pair (the last one), found with a scatter-max:
        # no sort, and deterministic on every device
        t = torch.arange(flat.numel(), dtype=torch.int32, device=dev)
        owner.scatter_reduce_(0, flat, t, reduce="amax")
        uniq = flat[owner.index_select(0, flat) == t]
        up_m.append(acc.index_select(0, uniq).cpu().numpy())
        acc.index_fill_(0, uniq, 0.0)  # reset the touched cells for the next block
        owner.index_fill_(0, uniq, -1)
        uniq = uniq.cpu().numpy()
        up_r.append(uniq // width_b + b0)
        up_c.append(uniq % width_b + b0)
        del flat, val, t, uniq
    del acc, owner
    ur = np.concatenate(up_r) if up_r else np.zeros(0, np.int64)
    uc = np.concatenate(up_c) if up_c else np.zeros(0, np.int64)
    um = np.concatenate(up_m).astype(np.float64) if up_m else np.zeros(0, np.float64)
    return ur, uc, um


def _jaccard_assemble(ur: np.ndarray, uc: np.ndarray, um: np.ndarray, diag_m: np.ndarray, n: int,
                      dense: bool) -> tuple[Any, int]:
    """Step 6b: ``d = max(0, 1 - m/(2 - m))``, mirrored, as a canonical CSR matrix holding every pair
    below 1 and the whole diagonal (or a dense array); also returns the number of stored pairs."""
    def to_dist(m: np.ndarray) -> np.ndarray:
        d = 1.0 - m / (2.0 - m)
        return np.maximum(d, 0.0).astype(np.float32)

    ud, dd = to_dist(um), to_dist(diag_m)
    keep = ud < 1.0  # (always true unless m underflows)
    ur, uc, ud = ur[keep], uc[keep], ud[keep]
    diag = np.arange(n, dtype=np.int64)
    if dense:
        out = np.ones((n, n), dtype=np.float32)
        out[ur, uc] = ud
        out[uc, ur] = ud
        out[diag, diag] = dd
        return out, int(2 * len(ud) + n)
    rows = np.concatenate([ur, uc, diag])
    cols = np.concatenate([uc, ur, diag])
    data = np.concatenate([ud, ud, dd])
    # coo -> csr keeps explicit zeros (unlike sparse arithmetic), then sort the columns
    result = sp.coo_matrix((data, (rows, cols)), shape=(n, n)).tocsr()
    result.sort_indices()
    return result, int(2 * len(ud) + n)


def jaccard_distance(
    features: ArrayLike,
    k1: int = 30,
    k2: int = 6,
    device: str | torch.device | None = "auto",
    dense: bool = False,
    backend: str = "auto",
    return_info: bool = False,
    max_triples: int | None = None,
    precision: str = "auto",
):
    """k-reciprocal Jaccard distance of a feature set, as cluster-contrast / HHCL compute it.

    Semantics (identical to ``compute_jaccard_distance`` of the CC code, see the golden README §1):

    1. ``I`` = the ``k1`` nearest neighbours of every point **including itself** (``k1`` columns:
       the reference asks its kNN for ``k1`` columns and then slices ``[:k1+1]``).
    2. ``R(i)`` = reciprocal neighbours within those ``k1`` columns; the half set uses
       ``h = int(np.around(k1/2))`` and ``h + 1`` columns (capped at ``k1``).
    3. Expansion with the 2/3 rule; 4. ``V[i, E] = softmax(-(2 - 2 x_i.x_j))``;
    5. query expansion over the first ``k2`` kNN rows (capped at ``k1``);
    6. ``d = 1 - m/(2 - m)`` with ``m_ij = sum_k min(V_ik, V_jk)``, negatives clipped to 0.

    Parameters
    ----------
    features : (N, d) L2-normalised features (numpy or torch).
    k1, k2 : neighbourhood sizes (HHCL/CC defaults 30 and 6).
    device : where the kNN and the min-sum run (``"auto"`` = CUDA when available).
    dense : return the full (N, N) float32 array instead of the sparse matrix (O(N^2) memory).
    backend : kNN backend, see :func:`knn`.
    return_info : also return a dict with the kNN backend and precision, device, timings and sizes.
    max_triples : chunk size of the min-sum (pairs generated at once); default 2M on CPU, 32M on CUDA.
    precision : screening matmul of the kNN (``"auto"``, ``"fp32"``, ``"bf16"``, see :func:`knn`);
        the neighbour lists and distances, hence the result, are identical either way.

    Returns
    -------
    ``scipy.sparse.csr_matrix`` (float32, canonical) holding every pair with distance < 1,
    symmetric, with the diagonal always stored (also where it is exactly 0). An absent entry means
    distance 1. Beware that some scipy operations (arithmetic, ``eliminate_zeros``) drop stored
    zeros; :func:`reidkit.clustering.dbscan_labels` consumes the matrix as is. With ``dense=True``
    a float32 ``numpy`` array. With ``return_info=True`` a ``(result, info)`` tuple.
    """
    t_start = time.perf_counter()
    dev = resolve_device(device)
    x = _to_float_tensor(features, dev)
    n = x.shape[0]
    if n < 2:
        raise ValueError("need at least two points")
    width = min(k1, n)
    n_full, n_half, n_qe = width, min(int(np.around(k1 / 2)) + 1, width), min(k2, width)
    res = knn(x, width, backend=backend, device=dev, precision=precision)  # step 1
    t_knn = time.perf_counter()
    sqnorm = (x * x).sum(1).double().cpu().numpy()
    v = _kreciprocal_encoding(res.indices, n_full, n_half, n_qe,  # steps 2-5
                              _knn_pair_dist(x, sqnorm, res.indices, res.sq_dists))
    t_enc = time.perf_counter()
    ur, uc, um = _jaccard_minsum(v, n, dev, max_triples)
    diag_m = _segment_reduce(np.add, v.data, v.indptr, 0.0)  # m_ii = sum_k V_ik (~1)
    t_min = time.perf_counter()
    result, stored = _jaccard_assemble(ur, uc, um, diag_m, n, dense)
    t_end = time.perf_counter()
    if not return_info:
        return result
    info = {
        "knn_backend": res.backend,
        "knn_precision": res.precision,
        "device": str(dev),
        "n": n,
        "k1": k1,
        "k2": k2,
        "v_nnz": int(v.nnz),
        "pairs_below_1": stored,
        "time_knn_s": t_knn - t_start,
        "time_encoding_s": t_enc - t_knn,
        "time_minsum_s": t_min - t_enc,
        "time_assemble_s": t_end - t_min,
        "time_total_s": t_end - t_start,
    }
    return result, info


# =============================================================================================
# Re-ranking (torchreid semantics)
# =============================================================================================
def _absmax_rows(t: torch.Tensor, dim: int, chunk: int = 1024) -> torch.Tensor:
    """``t.abs().amax(dim)`` in row chunks (no full-size temporary)."""
    if dim == 1:
        return torch.cat([t[s:s + chunk].abs().amax(1) for s in range(0, t.shape[0], chunk)])
    out = None
    for s in range(0, t.shape[0], chunk):
        m = t[s:s + chunk].abs().amax(0)
        out = m if out is None else torch.maximum(out, m)
    return out


def _rerank_bytes(nq: int, ng: int) -> int:
    """Device bytes re-ranking holds: the three input blocks (the gallery x gallery block dominates:
    27 GB for MSMT17's 82,161 images), the (q, g) output and the working set of the row chunks."""
    return 4 * (nq * nq + 2 * nq * ng + ng * ng) + 3 * 4 * 16_000_000


def _rerank_device(device, nq: int, ng: int, headroom: float = 1.25) -> torch.device:
    """``device="auto"``: CUDA only when its free memory (``torch.cuda.mem_get_info``, after
    returning PyTorch's cached blocks) holds what re-ranking needs with some headroom, else the CPU.
    An explicit device is used as given."""
    if device is not None and str(device) != "auto":
        return resolve_device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    need = _rerank_bytes(nq, ng)
    try:
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info()
    except Exception:
        return torch.device("cpu")
    if free >= headroom * need:
        return torch.device("cuda", torch.cuda.current_device())
    log.info("re-ranking on the CPU: it needs %.1f GB, the GPU has %.1f GB free", need / 1e9, free / 1e9)
    return torch.device("cpu")


def _rerank_colmax(qq: torch.Tensor, qg: torch.Tensor, gg: torch.Tensor) -> torch.Tensor:
    """Step 1: column maxima of ``B^2`` (max of squares = square of the max |value|)."""
    colmax_q = torch.maximum(_absmax_rows(qq, 0), _absmax_rows(qg, 1)) ** 2  # columns 0..q-1
    colmax_g = torch.maximum(_absmax_rows(qg, 0), _absmax_rows(gg, 0)) ** 2  # columns q..
    return torch.cat([colmax_q, colmax_g])


def _rerank_rank_table(qq: torch.Tensor, qg: torch.Tensor, gg: torch.Tensor, colmax: torch.Tensor,
                       width: int, chunk: int) -> np.ndarray:
    """Step 2: the ``width`` smallest entries of each row of ``O``, built in row chunks."""
    nq = qq.shape[0]
    n = nq + gg.shape[0]
    ranks = []
    for s in progress(range(0, n, chunk), desc="re-ranking rows"):
        e = min(s + chunk, n)
        parts = []
        if s < nq:  # query rows i: column i of B = [qq[:, i]; qg[i, :]]
            qe = min(e, nq)
            parts.append(torch.cat([qq[:, s:qe].T, qg[s:qe]], dim=1))
        if e > nq:  # gallery rows q+g': column of B = [qg[:, g']; gg[:, g']]
            gs, ge = max(s, nq) - nq, e - nq
            parts.append(torch.cat([qg[:, gs:ge].T, gg[:, gs:ge].T], dim=1))
        o = torch.cat(parts) if len(parts) > 1 else parts[0]  # always a fresh tensor
        del parts
        o.mul_(o).div_(colmax[s:e, None])  # O rows = column of B^2 / its max (in place)
        ranks.append(torch.topk(o, width, dim=1, largest=False, sorted=True).indices)
        del o
    return torch.cat(ranks).cpu().numpy().astype(np.int64)


def _rerank_pair_dist(qq: torch.Tensor, qg: torch.Tensor, gg: torch.Tensor, colmax: torch.Tensor,
                      ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Step 3: ``pair_dist`` of re-ranking, ``O[i, j] = B[j, i]^2 / colmax[i]`` read from the input
    block that holds ``B[j, i]``."""
    nq, dev = qq.shape[0], qq.device

    def pair_dist(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = torch.empty(len(rows), dtype=torch.float32)
        r = torch.from_numpy(rows)
        c = torch.from_numpy(cols)
        for sel_r, sel_c, block, ro, co in (
            (r < nq, c < nq, qq, 0, 0),  # B[j, i] = qq[j, i]
            (r >= nq, c < nq, qg, 0, nq),  # B[j, i] = qg[j, i - q]
            (r < nq, c >= nq, qg.T, nq, 0),  # B[j, i] = qg[i, j - q]
            (r >= nq, c >= nq, gg, nq, nq),  # B[j, i] = gg[j - q, i - q]
        ):
            m = sel_r & sel_c
            if not bool(m.any()):
                continue
            jj = (c[m] - ro).to(dev)
            ii = (r[m] - co).to(dev)
            val = block[jj, ii]
            out[m] = (val * val / colmax[r[m].to(dev)]).cpu()
        return out.numpy()

    return pair_dist


def _rerank_final(v: sp.csr_matrix, qg: torch.Tensor, colmax: torch.Tensor, lam: float) -> np.ndarray:
    """Steps 5-6: ``m`` for query rows x gallery columns accumulated straight into the output, then
    ``(1 - lambda) (1 - m/(2 - m)) + lambda O[:q, q:]`` in place, in row chunks."""
    nq, ng = qg.shape
    dev = qg.device
    inv = _inverted_index(v, dev)
    final = torch.zeros(nq * ng, dtype=torch.float32, device=dev)
    max_triples = 32_000_000 if dev.type == "cuda" else 2_000_000
    for _b0, _b1, i, j, val in _minsum_triples(inv, (0, nq), "range", partner_rows=(nq, nq + ng),
                                               max_triples=max_triples, desc="re-ranking min-sum"):
        final.index_add_(0, i * ng + (j - nq), val)
    final = final.view(nq, ng)
    with torch.no_grad():
        step = max(1, 16_000_000 // max(ng, 1))
        for s in range(0, nq, step):
            e = min(s + step, nq)
            m = final[s:e]  # view: everything below is in place
            den = 2.0 - m
            m.div_(den).neg_().add_(1.0)  # jaccard = 1 - m/(2-m); m = 0 (no shared support) gives 1
            del den
            o = qg[s:e] * qg[s:e]
            o.div_(colmax[s:e, None]).mul_(lam)  # lambda * O[i, q+g']
            m.mul_(1.0 - lam).add_(o)
            del o
    return final.cpu().numpy()


def re_ranking(
    q_g_dist: ArrayLike,
    q_q_dist: ArrayLike,
    g_g_dist: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    device: str | torch.device | None = "auto",
    return_info: bool = False,
    chunk: int | None = None,
):
    """k-reciprocal re-ranking (Zhong et al., CVPR'17) with the semantics of torchreid's ``re_ranking``.

    Conventions of the reference (golden README §3) that this reproduces:

    * the block matrix ``B = [[qq, qg], [qg^T, gg]]`` is squared element-wise (the inputs are
      already squared distances, so this is the 4th power of the Euclidean distance);
    * ``O = (B^2 / colmax(B^2))^T``: row ``i`` of ``O`` is column ``i`` of ``B^2`` divided by its max;
    * forward neighbourhoods have ``k + 1`` entries (``k1 + 1`` and ``h + 1``, ``h = round(k1/2)``);
      the 2/3 expansion rule, ``V = softmax(-O)`` over the expanded set and query expansion over
      the first ``k2`` entries of the ranking are the shared machinery of :func:`jaccard_distance`;
    * the Jaccard distance is computed for the query rows only and is **not** clipped;
    * ``final = (1 - lambda) * jaccard + lambda * O[:q]``, returned as the query x gallery block.

    Memory: the (q+g)^2 matrix is never formed. ``O`` is produced in row chunks from the three input
    blocks, keeping only each row's ``max(k1 + 1, k2)`` smallest entries; the values needed later
    (``O[i, j]`` of expanded sets and the query x gallery block) are read back from the inputs.
    The output is the only (q, g) array allocated.

    Parameters
    ----------
    q_g_dist, q_q_dist, g_g_dist : squared Euclidean distances (numpy or torch), shapes (q, g),
        (q, q), (g, g).
    k1, k2, lambda_value : re-ranking parameters (torchreid defaults 20, 6, 0.3).
    device : ``"auto"``, ``"cpu"``, ``"cuda"``... Auto takes CUDA only when its free memory holds
        the blocks (:func:`_rerank_device`), else the CPU.
    return_info : also return a dict with device and timings.
    chunk : rows of ``O`` materialised at once (default: about 16M floats).

    Returns
    -------
    (q, g) float32 numpy array (and the info dict when ``return_info``).
    """
    t_start = time.perf_counter()
    dev = _rerank_device(device, int(q_g_dist.shape[0]), int(q_g_dist.shape[1]))
    qg = _to_float_tensor(q_g_dist, dev)
    qq = _to_float_tensor(q_q_dist, dev)
    gg = _to_float_tensor(g_g_dist, dev)
    nq, ng = qg.shape
    if qq.shape != (nq, nq) or gg.shape != (ng, ng):
        raise ValueError(f"inconsistent shapes {tuple(qg.shape)}, {tuple(qq.shape)}, {tuple(gg.shape)}")
    n = nq + ng
    h = int(np.around(k1 / 2.0))
    n_full, n_half, n_qe = min(k1 + 1, n), min(h + 1, n), min(k2, n)
    if chunk is None:
        chunk = max(1, 16_000_000 // n)
    with torch.no_grad():
        colmax = _rerank_colmax(qq, qg, gg)
        rank = _rerank_rank_table(qq, qg, gg, colmax, max(n_full, n_half, n_qe), chunk)
    t_rank = time.perf_counter()
    v = _kreciprocal_encoding(rank, n_full, n_half, n_qe, _rerank_pair_dist(qq, qg, gg, colmax))
    del rank
    t_enc = time.perf_counter()
    out = _rerank_final(v, qg, colmax, float(lambda_value))
    t_end = time.perf_counter()
    if not return_info:
        return out
    info = {
        "device": str(dev),
        "n_query": nq,
        "n_gallery": ng,
        "v_nnz": int(v.nnz),
        "time_rank_s": t_rank - t_start,
        "time_encoding_s": t_enc - t_rank,
        "time_minsum_s": t_end - t_enc,
        "time_total_s": t_end - t_start,
    }
    return out, info
