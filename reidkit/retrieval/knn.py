"""Exact k-nearest neighbours with faiss (GPU or CPU) or torch, one API and one tie rule."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from reidkit.core.device import resolve_device
from reidkit.core.progress import progress
from reidkit.retrieval.exact import (
    KNN_PRECISIONS,
    U_F32,
    ArrayLike,
    _canonical_sqdist,
    _default_block,
    _full_fp32_matmul,
    _screen_tile,
    _to_float_numpy,
    _to_float_tensor,
    distance_error_bound,
    exact_sqnorms,
    fp32_pair_dots,
)

__all__ = ['KNNResult', 'knn', 'faiss_available', 'faiss_gpu_available']


log = logging.getLogger(__name__)


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
        import faiss  # noqa: F401  (optional dependency: faiss-cpu or faiss-gpu)

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


def _entries_below(tile: torch.Tensor, thr: torch.Tensor, by_column: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(r, c)`` of the tile's entries below ``thr`` (a column ``(rows, 1)`` or a row ``(1, cols)``),
    ordered by ``r`` then ``c``, or by ``c`` then ``r`` when ``by_column``. On a CPU numpy's
    ``flatnonzero`` finds them (0.5 ms for a 2048 x 2048 tile against 2.2 ms for ``torch.nonzero``)."""
    mask = tile < thr
    if mask.device.type == "cpu":
        flat = torch.from_numpy(np.flatnonzero(mask.numpy()))
        r, c = flat // tile.shape[1], flat % tile.shape[1]
    else:
        r, c = torch.nonzero(mask, as_tuple=True)
    if by_column:
        order = torch.sort(c, stable=True).indices
        r, c = r[order], c[order]
    return r, c


def _merge_candidates(best: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor, d: torch.Tensor,
                      i: torch.Tensor) -> None:
    """Merge candidates into the running k best of their rows, in place. ``rows`` ascending (the
    row-major order of ``nonzero``), ``d`` and ``i`` their distances and column indices; only the
    rows that received a candidate are touched, each padded to the longest such list."""
    bd, bi = best
    if rows.numel() == 0:
        return
    touched, counts = torch.unique_consecutive(rows, return_counts=True)
    slot = torch.repeat_interleave(torch.arange(touched.numel(), device=rows.device), counts)
    pos = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[slot]
    width = int(counts.max())
    pad_d = torch.full((touched.numel(), width), float("inf"), dtype=bd.dtype, device=bd.device)
    pad_i = torch.zeros((touched.numel(), width), dtype=bi.dtype, device=bi.device)
    pad_d[slot, pos] = d
    pad_i[slot, pos] = i
    cand_d = torch.cat([bd[touched], pad_d], dim=1)
    cand_i = torch.cat([bi[touched], pad_i], dim=1)
    nd, p = torch.topk(cand_d, bd.shape[1], dim=1, largest=False, sorted=True)
    bd[touched] = nd
    bi[touched] = torch.gather(cand_i, 1, p)


def symmetric_tile_knn(xs: torch.Tensor, sq: torch.Tensor, blocks: list[tuple[int, int]],
                       pairs: list[tuple[int, int]], k: int, precision: str = "fp32", desc: str = "knn tiles",
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest screening distances of every row of ``xs`` over the tiles ``pairs`` (block
    ``a`` against block ``b``, ``a <= b``; ``blocks[a] = (start, end)`` rows), each tile computed
    once: its rows give candidates to block ``a``, its columns to block ``b`` (a diagonal tile only
    to its rows). Returns ``(indices, sq_dists)``, (rows of the blocks in order, k), sorted by
    distance; ``sq`` are the rows' squared norms.

    Each row keeps a running k best. A row's first tile fills its list with ``topk``; after that
    only the entries below the row's current k-th best distance can enter it, so one comparison pass
    per tile side finds them (a handful per row: no ``topk`` over the tile and no transposed copy
    of it) and they are merged into the touched rows alone. The lists hold the k smallest of each
    row's tile values, as a ``topk`` over the whole row would (tied values may take the last slots
    in another order). At N = 12,936 (2048-d, two cores) the selection takes 0.3 s against 0.8 s
    for a ``topk`` of every tile side; the products are 2.1 s.
    """
    best: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(blocks)
    # reusable tile buffers (no per-tile allocations: keeps the allocator and the RSS quiet); the
    # transposed one only when a column side must fill a list (never in the diagonal-first self search)
    size = max(e - s for s, e in blocks)
    buf = torch.empty(size * size, dtype=torch.float32, device=xs.device)
    buf_t = None

    def full(lists) -> bool:  # a running list of k entries: its k-th best is a threshold
        return lists is not None and lists[0].shape[1] == k

    for a, b in progress(pairs, desc=desc):
        (a0, a1), (b0, b1) = blocks[a], blocks[b]
        tile = buf[: (a1 - a0) * (b1 - b0)].view(a1 - a0, b1 - b0)
        _screen_tile(xs[a0:a1], xs[b0:b1], sq[a0:a1], sq[b0:b1], tile, precision)
        if full(best[a]):
            r, c = _entries_below(tile, best[a][0][:, -1:])
            _merge_candidates(best[a], r, tile[r, c], c + b0)
        else:
            d, i = torch.topk(tile, min(k, b1 - b0), dim=1, largest=False, sorted=True)
            best[a] = _merge_topk(best[a], d, i + b0, k)
        if b == a:
            continue
        if full(best[b]):
            r, c = _entries_below(tile, best[b][0][:, -1][None, :], by_column=True)
            _merge_candidates(best[b], c, tile[r, c], r + a0)
        else:
            if buf_t is None:
                buf_t = torch.empty(size * size, dtype=torch.float32, device=xs.device)
            tile_t = buf_t[: (a1 - a0) * (b1 - b0)].view(b1 - b0, a1 - a0)
            tile_t.copy_(tile.T)
            d, i = torch.topk(tile_t, min(k, a1 - a0), dim=1, largest=False, sorted=True)
            best[b] = _merge_topk(best[b], d, i + a0, k)
    del buf, buf_t
    return torch.cat([bd[1] for bd in best]), torch.cat([bd[0] for bd in best])  # type: ignore[index]


def _torch_knn_self(x: torch.Tensor, k: int, block: int, precision: str = "fp32",
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Screening self-kNN that uses the symmetry of the distance matrix.

    The matrix ``D = |x|^2 + |y|^2 - 2 X X^T`` is cut into ``block x block`` tiles and only the tiles
    on or above the diagonal are computed (:func:`symmetric_tile_knn`), which halves the
    matrix-product work compared with the plain row-chunked search (:func:`_torch_knn_rows`). The
    diagonal tiles come first, so every row's list is full before the tiles off the diagonal come.
    """
    n = x.shape[0]
    blocks = [(s, min(s + block, n)) for s in range(0, n, block)]
    pairs = [(a, a) for a in range(len(blocks))] + [(a, b) for a in range(len(blocks))
                                                    for b in range(a + 1, len(blocks))]
    xs = x.to(torch.bfloat16) if precision == "bf16" else x
    return symmetric_tile_knn(xs, (x * x).sum(1), blocks, pairs, k, precision)


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


def _screen_candidates(x: torch.Tensor, q: torch.Tensor | None, k: int, block: int, precision: str,
                       middle: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j) with screening distance ``e_ij <= T_i + 2 B_i``: ``T_i`` the k-th smallest
    ``e`` of row i, ``B_i`` the bound of :func:`distance_bound`. Starts from a screening top-
    ``(k + margin)`` (symmetric tiles for a self-search) and widens the rows whose list is full
    below the limit (the limit could hide more candidates) with a row search of twice the width.

    Every j with ``D_ij <= D_(k)`` (the k-th smallest canonical distance) is a candidate: the k
    items with ``e <= T`` have ``D <= T + B``, so ``D_(k) <= T + B``, and ``D_ij <= D_(k)`` gives
    ``e_ij <= D_ij + B <= T + 2B``.

    ``middle = (nq, nx)`` (the canonical squared norms, :func:`exact_sqnorms`) adds the fp32 level
    of a two-level screen: each round's candidates are scored again in fp32 and narrowed to the
    fp32 band (:func:`_fp32_band`), which still holds every j with ``D_ij <= D_(k)``.
    """
    n, d = x.shape
    qq = x if q is None else q
    m = qq.shape[0]
    up = (1 + (d + 2) * U_F32) ** 2  # float32 norms, raised by their worst rounding error

    def sqnorm_up(t: torch.Tensor) -> np.ndarray:
        return t.norm(dim=1).double().cpu().numpy() ** 2 * up

    xn2 = sqnorm_up(x)
    qn2 = xn2 if q is None else sqnorm_up(q)
    lim_b = 2 * distance_error_bound(d, precision, qn2 + xn2.max())
    # the bf16 band (~50x the fp32 one) holds ~75 per row on the benchmark's clustered features (k = 31):
    # a first width of k + k/2 left 96 % of the rows to a second, non-symmetric search (N = 12,936:
    # 6.5-6.8 s, now 3.9-4.1 s)
    width = min(n, 4 * k if precision == "bf16" else k + max(8, k // 2))
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
        if middle is not None and len(r):
            keep = _fp32_band(x, qq, rows_all, idx, sel.shape, r, c, k, middle)
            r, c = r[keep], c[keep]
        out_r.append(rows_all[r])
        out_c.append(idx[r, c])
        if not full.any():
            break
        rows_all = rows_all[full]
        width = min(n, 2 * width)
        i_t, d_t = _torch_knn_rows(x, qq[torch.from_numpy(rows_all).to(x.device)], width, block, precision)
    return np.concatenate(out_r), np.concatenate(out_c)


def _fp32_band(x: torch.Tensor, qq: torch.Tensor, rows_all: np.ndarray, idx: np.ndarray,
               shape: tuple[int, int], r: np.ndarray, c: np.ndarray, k: int,
               norms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Which of one round's screening candidates (query ``rows_all[r]``, point ``idx[r, c]``; every
    round row holds at least k) are kept by the fp32 level: the pair's fp32 dot product
    (:func:`fp32_pair_dots`) gives ``E_ij = nq_i + nx_j - 2 f_ij`` with ``|E_ij - D_ij| <= B_ij =
    distance_bound(d, "fp32") (nq_i + nx_j)`` (the fp32 score is within ``score_bound(d, "fp32")
    |q||x|`` of the canonical one, and ``D``'s own three float32 roundings are inside the bound's
    ``gamma_d + 10v``). ``U_i``, the k-th smallest ``E_ij + B_ij`` of the row, is at least ``D_(k)``
    (k of its candidates have ``D`` below it), so every j with ``D_ij <= D_(k)`` has ``E_ij - B_ij
    <= U_i`` and is kept. On the benchmark's features at N = 12,936 (k = 31) this narrows the bf16
    band from 1.0 M pairs to 0.41 M, so that the float64 scoring and the sort see 0.41 M."""
    nq, nx = norms
    gr, gc = rows_all[r], idx[r, c]
    f = fp32_pair_dots(qq, x, gr, gc).astype(np.float64)
    w = nq[gr].astype(np.float64) + nx[gc]
    est = w - 2.0 * f
    bnd = distance_error_bound(int(x.shape[1]), "fp32", w) * (1 + 2.0**-30)
    ub = np.full(shape, np.inf)
    ub[r, c] = est + bnd
    kth = np.partition(ub, k - 1, axis=1)[:, k - 1]
    return est - bnd <= kth[r]


def _exact_knn(x: torch.Tensor, q: torch.Tensor | None, k: int, block: int, precision: str,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by canonical distance: the first k of each row's candidates (screening, see
    :func:`_screen_candidates`) sorted by ``(D_ij, j)``. The candidates hold every j that can
    be among them, and ``D`` does not depend on how it is computed, so the fp32 and the bf16
    screening give identical lists and distances (ties: the lower index first)."""
    nx = exact_sqnorms(x)
    nq = nx if q is None else exact_sqnorms(q)
    # the bf16 band (~2.5x the candidates of the fp32 screen's) is narrowed by an fp32 level first
    rows, cols = _screen_candidates(x, q, k, block, precision, (nq, nx) if precision == "bf16" else None)
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
        answers. ``sq_dists`` are these ``D``. The bf16 band (~78 candidates per row against ~32 for
        the fp32 screen) is narrowed by an fp32 level (:func:`_fp32_band`) before the float64
        scoring. Measured at N = 12,936 (``make bench``, best of 3, two threads of an AMD EPYC with
        AVX512-BF16, 2026-12-07 19:00): the direct search 2.5 s, ``exact`` 3.5 s, ``bf16`` 3.5 s;
        at N = 32,621 13.4, 16.5 and 13.6 s; so ``auto`` keeps the direct fp32 search.

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
