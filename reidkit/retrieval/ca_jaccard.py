"""CA-Jaccard: the camera-aware k-reciprocal Jaccard distance (Chen et al., CVPR 2024).

Camera bias makes an image's nearest neighbours mostly images of the same camera, so the plain
k-reciprocal sets (:func:`reidkit.retrieval.jaccard.jaccard_distance`) rarely link the cameras.
CA-Jaccard changes two steps of the algorithm:

* **CKRNNs** (camera-aware k-reciprocal nearest neighbours): the reciprocal sets are found
  separately on the *intra-camera* ranking list (same-camera images, self first, ``k1_intra + 1``
  forward entries) and on the *inter-camera* list (other cameras only, ``k1_inter + 1`` entries),
  and united. There is no 2/3 expansion in this mode.
* **CLQE** (camera-aware local query expansion): ``V[i]`` is averaged over the first ``k2_intra``
  rows of the intra list and the first ``k2_inter`` rows of the inter list instead of the first
  ``k2`` of the global list. At ``epoch == 0`` (warm-up) both are 3.

Semantics are those of ``compute_jaccard_distance`` in ``caj/utils/caj_rerank.py`` (golden README
section 8): global ranking on ``2 - 2 x.y``, ``k + 1`` forward entries, ``V = softmax(-d)`` over the
neighbour set, no query expansion at all when ``k2 == 1``, ``d = max(0, 1 - m/(2 - m))``. With both
flags off the result is the plain k-reciprocal Jaccard with ``k1 + 1`` forward entries, which is
**not** cluster-contrast's ``jaccard_distance`` (``k1`` entries).

Cost. The ranking lists come from one blocked pass over the camera-sorted features: an exact kNN
per camera for the intra lists (:func:`reidkit.retrieval.knn.knn`, self-search) and, for every pair
of cameras ``a < b``, tiles of ``x_a x_b^T`` whose rows feed the inter lists of ``a`` and whose
columns feed those of ``b``. That is half of the N x N products, like the global self-search of the
plain kernel; no N x N matrix is ever held. In CKRNN mode the global list that LQE needs is the
merge of the two lists, so no global search runs. Encoding and min-sum are the plain kernel's sparse
machinery.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from reidkit.core.device import resolve_device
from reidkit.retrieval.exact import _default_block, _full_fp32_matmul, _to_float_tensor
from reidkit.retrieval.jaccard import (
    _knn_pair_dist,
    _kreciprocal_encoding,
    _pattern,
    _reciprocal,
    _segment_reduce,
    jaccard_from_encoding,
)
from reidkit.retrieval.knn import knn, symmetric_tile_knn

__all__ = ["ca_jaccard_distance", "camera_knn"]

#: the CA-Jaccard code forces k2_intra = k2_inter = 3 at epoch 0
WARMUP_K2 = 3


# =============================================================================================
# Intra- and inter-camera ranking lists
# =============================================================================================
def _knn_backend(precision: str) -> str:
    """The canonical precisions exist only in the torch search (faiss would ignore them)."""
    return "auto" if precision in ("auto", "fp32") else "torch"


def _inter_tiles(xs: torch.Tensor, bounds: list[tuple[int, int]], k: int, block: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Direct fp32 inter-camera kNN of camera-sorted ``xs`` (camera ``c`` = rows ``bounds[c]``).

    Each tile between row blocks of two different cameras is computed once: its rows give
    candidates to the first block, its columns to the second. Returns ``(indices, sq_dists)``
    of shape (N, k), sorted by distance, indices into ``xs``.
    """
    blocks = [(c, s, min(s + block, e)) for c, (b0, e) in enumerate(bounds) for s in range(b0, e, block)]
    pairs = [(a, b) for a in range(len(blocks)) for b in range(a + 1, len(blocks))
             if blocks[a][0] != blocks[b][0]]
    return symmetric_tile_knn(xs, (xs * xs).sum(1), [(s, e) for _, s, e in blocks], pairs, k,
                              desc="inter-camera knn tiles")


def camera_knn(features: Any, cams: Any, k_intra: int, k_inter: int, device: Any = "auto",
               precision: str = "auto") -> dict:
    """Exact intra-camera and inter-camera nearest neighbours (squared Euclidean distance).

    Parameters
    ----------
    features : (N, d) features (numpy or torch). cams : (N,) camera labels (any integers).
    k_intra : columns of the intra list: same-camera images, **self first**.
    k_inter : columns of the inter list: images of the other cameras (self excluded).
    device : where the products run (``"auto"`` = CUDA when available).
    precision : ``"auto"``/``"fp32"``: the direct fp32 search (intra via :func:`knn`, inter via
        one symmetric pass over camera-pair tiles); ``"exact"``/``"bf16"``: :func:`knn`'s canonical
        distances with its tie rule (lower index first), per camera against itself and the rest
        (torch backend: faiss has no canonical mode).

    Raises ``ValueError`` when ``cams`` has the wrong length, a camera has fewer than ``k_intra``
    images or fewer than ``k_inter`` lie outside it.

    Returns
    -------
    dict with ``intra``/``inter`` (N, k) int64 indices into ``features`` and ``intra_sq``/
    ``inter_sq`` (N, k) float32 squared distances, rows in input order.
    """
    dev = resolve_device(device)
    x = _to_float_tensor(features, dev)
    cams = np.asarray(cams).reshape(-1)
    n = x.shape[0]
    if len(cams) != n:
        raise ValueError(f"cams has {len(cams)} entries for {n} features")
    perm = np.argsort(cams, kind="stable")  # camera-sorted order, ascending index inside a camera
    labels, counts = np.unique(cams, return_counts=True)
    for c, m in zip(labels, counts):
        if m < k_intra:
            raise ValueError(f"camera {c} has {m} images; the intra-camera list needs {k_intra} per camera "
                             "(k1_intra + 1, or the query expansion's width)")
        if n - m < k_inter:
            raise ValueError(f"only {n - m} images outside camera {c}; the inter-camera list needs {k_inter}")
    ends = np.cumsum(counts)
    bounds = [(int(e - m), int(e)) for e, m in zip(ends, counts)]
    xs = x.index_select(0, torch.from_numpy(perm).to(dev)) if not np.array_equal(perm, np.arange(n)) else x
    intra = np.empty((n, k_intra), np.int64)
    intra_sq = np.empty((n, k_intra), np.float32)
    inter = np.empty((n, k_inter), np.int64)
    inter_sq = np.empty((n, k_inter), np.float32)
    backend = _knn_backend(precision)
    for s, e in bounds:  # intra lists: the kit's exact kNN, self-search per camera
        res = knn(xs[s:e], k_intra, device=dev, precision=precision, backend=backend)
        intra[s:e], intra_sq[s:e] = res.indices + s, res.sq_dists
    if precision in ("auto", "fp32"):
        with torch.no_grad(), _full_fp32_matmul():
            i_t, d_t = _inter_tiles(xs, bounds, k_inter, _default_block(dev, n))
        inter[:], inter_sq[:] = i_t.cpu().numpy(), d_t.cpu().numpy()
        np.maximum(inter_sq, 0.0, out=inter_sq)
    else:
        for s, e in bounds:
            rest = np.r_[0:s, e:n]
            rest = rest[np.argsort(perm[rest], kind="stable")]  # input order: ties by lower input index
            res = knn(xs[torch.from_numpy(rest).to(dev)], k_inter, queries=xs[s:e], device=dev,
                      precision=precision, backend=backend)
            inter[s:e], inter_sq[s:e] = rest[res.indices], res.sq_dists
    out = {}
    for name, idx, d2 in (("intra", intra, intra_sq), ("inter", inter, inter_sq)):
        r = np.empty_like(idx)
        r[perm] = perm[idx]  # back to input indices and input row order
        d = np.empty_like(d2)
        d[perm] = d2
        out[name], out[name + "_sq"] = r, d
    return out


def _merge_global(intra: np.ndarray, intra_sq: np.ndarray, inter: np.ndarray, inter_sq: np.ndarray,
                  width: int) -> np.ndarray:
    """The first ``width`` columns of the global list from the two camera lists: self first, then
    the rest by (distance, index). Exact when both lists have at least ``width`` columns."""
    idx = np.concatenate([intra[:, 1:], inter], axis=1)
    d = np.concatenate([intra_sq[:, 1:], inter_sq], axis=1).astype(np.float64)
    order = np.lexsort((idx, d), axis=1)[:, : width - 1]
    return np.concatenate([intra[:, :1], np.take_along_axis(idx, order, 1)], axis=1)


# =============================================================================================
# Encoding
# =============================================================================================
def _softmax_encode(pattern: sp.csr_matrix, pair_dist) -> sp.csr_matrix:
    """``V[i, E_i] = softmax(-d_i)`` over the support of each row of ``pattern``."""
    pattern = pattern.tocsr()
    pattern.sum_duplicates()
    pattern.sort_indices()
    n = pattern.shape[0]
    indptr = pattern.indptr.astype(np.int64)
    cols = pattern.indices.astype(np.int64)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    d = np.asarray(pair_dist(rows, cols), dtype=np.float64)
    w = np.exp(-(d - _segment_reduce(np.minimum, d, indptr, 0.0)[rows]))
    w /= _segment_reduce(np.add, w, indptr, 1.0)[rows]
    return sp.csr_matrix((w.astype(np.float32), cols, indptr), shape=(n, n))


def _query_expand(v: sp.csr_matrix, rows_table: np.ndarray) -> sp.csr_matrix:
    """``V[i] = mean(V[rows_table[i]])`` (a repeated row counts twice)."""
    n, w = rows_table.shape
    q = _pattern(np.repeat(np.arange(n), w), rows_table.ravel(), n, dtype=np.float32)
    out = (q @ v).tocsr()
    out.data /= np.float32(w)
    out.sort_indices()
    out.eliminate_zeros()
    return out


# =============================================================================================
# CA-Jaccard
# =============================================================================================
def _checked_inputs(features: Any, cams: Any, dev: torch.device, ks: tuple) -> tuple[torch.Tensor, np.ndarray]:
    """The features as a float32 tensor on ``dev`` and the cameras as a flat array, checked."""
    x = _to_float_tensor(features, dev)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {tuple(x.shape)}")
    n = x.shape[0]
    cams = np.asarray(cams.cpu() if isinstance(cams, torch.Tensor) else cams).reshape(-1)
    if len(cams) != n:
        raise ValueError(f"cams has {len(cams)} entries for {n} features")
    if n < 2:
        raise ValueError("need at least two points")
    k1, k2, k1_intra, k1_inter, k2_intra, k2_inter = ks
    if min(k1, k2, k1_intra + 1, k1_inter + 1, k2_intra + 1, k2_inter + 1) < 1:
        raise ValueError("k1, k2 must be >= 1 and k1_intra, k1_inter, k2_intra, k2_inter >= 0")
    return x, cams


def ca_jaccard_distance(
    features: Any,
    cams: Any,
    k1: int = 30,
    k2: int = 6,
    k1_intra: int = 5,
    k1_inter: int = 20,
    k2_intra: int = 2,
    k2_inter: int = 4,
    ckrnns: bool = True,
    clqe: bool = True,
    epoch: int | None = None,
    device: Any = "auto",
    dense: bool = False,
    return_info: bool = False,
    precision: str = "auto",
    max_triples: int | None = None,
):
    """CA-Jaccard distance of a feature set (CKRNNs and CLQE; see the module docstring).

    Parameters
    ----------
    features : (N, d) L2-normalised features (numpy or torch). cams : (N,) camera labels.
    k1, k2 : global neighbourhood (KRNNs, ``k1 + 1`` forward entries) and LQE size.
    k1_intra, k1_inter : CKRNN sizes (``k + 1`` forward entries in each list).
    k2_intra, k2_inter : CLQE rows from the intra / inter list (the released training uses 2, 4).
    ckrnns, clqe : the two camera-aware parts; both off gives the plain k-reciprocal Jaccard.
    epoch : ``0`` is the warm-up (CLQE with 3 + 3 rows); ``None`` or any other value: no warm-up.
    device : where the kNN and the min-sum run (``"auto"`` = CUDA when available).
    dense : return the (N, N) float32 array instead of the sparse matrix.
    return_info : also return a dict with the ranking lists used (``rank_global``/``rank_intra``/
        ``rank_inter``, ``None`` when not computed), sizes and timings.
    precision : kNN precision, see :func:`camera_knn` and :func:`reidkit.retrieval.knn.knn`.
    max_triples : chunk size of the min-sum (see ``jaccard_distance``).

    Returns
    -------
    ``scipy.sparse.csr_matrix`` float32 in the convention of ``jaccard_distance``: symmetric, every
    pair below 1 stored, the diagonal always stored, an absent entry means 1 (ready for
    ``dbscan_labels``). With ``dense=True`` a numpy array; with ``return_info`` a ``(result, info)``.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    x, cams = _checked_inputs(features, cams, dev, (k1, k2, k1_intra, k1_inter, k2_intra, k2_inter))
    n = x.shape[0]
    if epoch == 0:
        k2_intra = k2_inter = WARMUP_K2
    qe = k2 != 1  # the reference skips query expansion altogether when k2 == 1, CLQE included
    if clqe and qe and k2_intra + k2_inter < 1:
        raise ValueError("CLQE needs k2_intra + k2_inter >= 1")

    rank_global = rank_intra = rank_inter = None
    w_intra, w_inter = k1_intra + 1, k1_inter + 1
    if clqe and qe:
        w_intra, w_inter = max(w_intra, k2_intra), max(w_inter, k2_inter)
    if ckrnns and not clqe and qe:  # the global top-k2 is the merge of the two lists
        w_intra, w_inter = max(w_intra, k2), max(w_inter, k2)
    sqnorm = (x * x).sum(1).double().cpu().numpy()
    if ckrnns or clqe:
        lists = camera_knn(x, cams, w_intra, w_inter, device=dev, precision=precision)
        rank_intra, rank_inter = lists["intra"], lists["inter"]
    if not ckrnns:
        w_global = max(k1 + 1, k2 if qe else 1)
        if w_global > n:
            raise ValueError(f"k1 + 1 = {k1 + 1} and k2 = {k2} need at most N = {n} points")
        res = knn(x, w_global, device=dev, precision=precision, backend=_knn_backend(precision))
        rank_global, global_sq = res.indices, res.sq_dists
    elif qe and not clqe:
        rank_global = _merge_global(lists["intra"], lists["intra_sq"], lists["inter"], lists["inter_sq"], k2)
    t_knn = time.perf_counter()

    if ckrnns:  # E = R_intra(i, k1_intra) | R_inter(i, k1_inter), no expansion
        pattern = _reciprocal(rank_intra, k1_intra + 1) + _reciprocal(rank_inter, k1_inter + 1)
        table = np.concatenate([rank_intra, rank_inter], axis=1)  # disjoint per row
        table_sq = np.concatenate([lists["intra_sq"], lists["inter_sq"]], axis=1)
        v = _softmax_encode(pattern, _knn_pair_dist(x, sqnorm, table, table_sq))
    else:  # KRNNs with the 2/3 expansion: the plain kernel's encoding, QE below
        h = int(np.around(k1 / 2))
        v = _kreciprocal_encoding(rank_global, k1 + 1, min(h + 1, rank_global.shape[1]), 1,
                                  _knn_pair_dist(x, sqnorm, rank_global, global_sq))
    if qe:
        if clqe:
            rows_table = np.concatenate([rank_intra[:, :k2_intra], rank_inter[:, :k2_inter]], axis=1)
        else:
            rows_table = rank_global[:, :k2]
        v = _query_expand(v, rows_table)
    t_enc = time.perf_counter()

    result, stored, t_min, t_end = jaccard_from_encoding(v, n, dev, max_triples, dense)
    if not return_info:
        return result
    info = {
        "mode": ("CKRNNs" if ckrnns else "KRNNs") + " + " + ("CLQE" if clqe else "LQE"),
        "device": str(dev),
        "n": n,
        "n_cameras": int(len(np.unique(cams))),
        "k2_intra": k2_intra,
        "k2_inter": k2_inter,
        "query_expansion": qe,
        "rank_global": rank_global,
        "rank_intra": rank_intra,
        "rank_inter": rank_inter,
        "v_nnz": int(v.nnz),
        "pairs_below_1": stored,
        "time_knn_s": t_knn - t0,
        "time_encoding_s": t_enc - t_knn,
        "time_minsum_s": t_min - t_enc,
        "time_assemble_s": t_end - t_min,
        "time_total_s": t_end - t0,
    }
    return result, info
