"""Pseudo-labels by clustering: DBSCAN on the k-reciprocal Jaccard distance, plus diagnostics.

HHCL / cluster-contrast re-cluster the training set every epoch::

    D = jaccard_distance(features, k1=30, k2=6)        # reidkit.retrieval.jaccard
    labels = dbscan_labels(D, eps=0.45, min_samples=4)  # -1 = outlier, not used for training

DBSCAN only ever asks "which points lie within ``eps`` of point i?". With ``eps < 1`` the answer
only involves pairs whose Jaccard distance is below 1, which are exactly the entries stored in the
sparse matrix returned by :func:`reidkit.retrieval.jaccard.jaccard_distance`. So DBSCAN on that sparse
matrix gives the same labels as DBSCAN on the dense N x N matrix, at a fraction of the memory and
time. (scikit-learn reads a sparse precomputed matrix as a radius graph: a **stored** entry is a
candidate neighbour, an absent one is not, and a stored 0 means distance 0 -- so pairs at distance
exactly 0 must stay stored, which this module preserves.)

:func:`cluster_stats` summarises a labelling (counts, outliers, and agreement with ground-truth
identities when known), and :func:`eps_sweep` re-runs DBSCAN for several ``eps`` on one distance
graph, for the notebook's eps slider.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = ['dbscan_labels', 'radius_graph', 'cluster_stats', 'eps_sweep']


def radius_graph(dist: Any, eps: float) -> sp.csr_matrix:
    """The pairs within ``eps`` of a sparse or dense distance matrix, as a DBSCAN-ready CSR graph.

    * Sparse input: absent entries mean "far" (distance 1 for a Jaccard matrix), so ``eps`` must be
      below every absent distance; for Jaccard that is ``eps < 1``.
    * Stored zeros (self pairs, duplicates) are kept; the diagonal is always stored.
    * Each row is sorted by distance, the order scikit-learn wants for precomputed graphs (it would
      otherwise re-sort row by row in Python).

    Dense input is scanned in row chunks, so the dense matrix is never copied.
    """
    eps = float(eps)
    if sp.issparse(dist):
        m = sp.csr_matrix(dist)  # no copy for CSR input; explicit zeros are kept
        n = m.shape[0]
        if m.shape != (n, n):
            raise ValueError(f"distance matrix must be square, got {m.shape}")
        indptr = m.indptr.astype(np.int64)
        rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
        keep = (m.data <= eps) & (m.indices != rows)  # the diagonal is added back below
        r, c, d = rows[keep], m.indices[keep].astype(np.int64), m.data[keep]
    else:
        a = np.asarray(dist)
        n = a.shape[0]
        if a.ndim != 2 or a.shape != (n, n):
            raise ValueError(f"distance matrix must be square, got {a.shape}")
        rs, cs, ds = [], [], []
        step = max(1, 4_000_000 // max(n, 1))
        for s in range(0, n, step):
            blk = a[s:s + step]
            rr, cc = np.nonzero(blk <= eps)
            rr = rr + s
            off = rr != cc
            rs.append(rr[off])
            cs.append(cc[off])
            ds.append(blk[rr[off] - s, cc[off]])
        r = np.concatenate(rs).astype(np.int64) if rs else np.zeros(0, np.int64)
        c = np.concatenate(cs).astype(np.int64) if cs else np.zeros(0, np.int64)
        d = np.concatenate(ds) if ds else np.zeros(0, np.float32)
    # self pairs first (distance 0 as far as DBSCAN is concerned: a point is its own neighbour)
    diag = np.arange(n, dtype=np.int64)
    r = np.concatenate([diag, r])
    c = np.concatenate([diag, c])
    d = np.concatenate([np.zeros(n, dtype=d.dtype if d.size else np.float32), d])
    order = np.lexsort((d, r))  # by row, then by distance
    r, c, d = r[order], c[order], d[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=n))])
    return sp.csr_matrix((d, c, indptr), shape=(n, n))


def _check_eps(dist: Any, eps: float) -> None:
    if sp.issparse(dist) and not eps < 1.0:
        raise ValueError(
            "a sparse Jaccard matrix leaves pairs at distance 1 unstored, so DBSCAN on it is only "
            f"exact for eps < 1 (got eps={eps}); pass the dense matrix for eps >= 1")


def _dbscan_on_graph(graph: sp.csr_matrix, eps: float, min_samples: int, n_jobs: int | None) -> np.ndarray:

    with warnings.catch_warnings():
        # the graph is already sorted by row values; silence sklearn's efficiency notes anyway
        warnings.simplefilter("ignore", category=UserWarning)
        model = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed", n_jobs=n_jobs)
        return model.fit_predict(graph).astype(np.int64)


def dbscan_labels(dist: Any, eps: float, min_samples: int = 4, n_jobs: int | None = None) -> np.ndarray:
    """DBSCAN labels (``-1`` = outlier) from a precomputed distance matrix.

    Parameters
    ----------
    dist : the sparse CSR matrix of :func:`reidkit.retrieval.jaccard.jaccard_distance` (absent = 1), or a
        dense (N, N) array.
    eps : neighbourhood radius (HHCL: 0.45 Market, 0.6 Duke, 0.7 MSMT). Must be < 1 for sparse input.
    min_samples : neighbours (counting the point itself) for a core point; 4 in HHCL/CC.
    n_jobs : passed to scikit-learn (the radius queries on a precomputed graph are cheap anyway).

    Both input forms are turned into the same radius graph (pairs with distance <= eps), so they give
    identical labels, equal to scikit-learn's dense ``DBSCAN(metric="precomputed")``.
    """
    _check_eps(dist, eps)
    return _dbscan_on_graph(radius_graph(dist, eps), eps, min_samples, n_jobs)


def _as_singletons(labels: np.ndarray) -> np.ndarray:
    """Replace every negative label by a fresh singleton id (outliers are clusters of one)."""
    out = labels.astype(np.int64).copy()
    neg = out < 0
    base = out.max() + 1 if (~neg).any() else 0
    out[neg] = base + np.arange(int(neg.sum()))
    return out


def _purity(pred: np.ndarray, gt: np.ndarray) -> float:
    """Fraction of points whose cluster's majority ground-truth label is their own."""
    if pred.size == 0:
        return float("nan")
    _, p = np.unique(pred, return_inverse=True)
    _, g = np.unique(gt, return_inverse=True)
    counts = sp.coo_matrix((np.ones(len(p)), (p, g))).tocsr()
    return float(counts.max(axis=1).toarray().sum() / len(p))


def cluster_stats(labels: Sequence[int] | np.ndarray, gt: Sequence[int] | np.ndarray | None = None) -> dict:
    """Summary of a clustering, optionally scored against ground-truth identities.

    Always returned: ``num_points``, ``num_clusters`` (labels >= 0), ``num_outliers`` (label -1),
    ``outlier_fraction``, ``largest_cluster``, ``mean_cluster_size``.

    With ``gt`` (ground-truth ids; a negative gt label marks a point with no identity and is treated
    as its own singleton identity):

    * ``purity``, ``nmi``, ``ari`` -- over the **clustered points only** (predicted outliers are
      left out, as they are left out of training). This is what tells you how clean the
      pseudo-labels the network trains on are.
    * ``nmi_all``, ``ari_all`` -- over **all points**, every predicted outlier counted as a cluster
      of its own. This also penalises discarding data.
    * ``num_gt_ids`` -- distinct ground-truth identities among all points.

    NMI and ARI are scikit-learn's ``normalized_mutual_info_score`` (arithmetic normalisation) and
    ``adjusted_rand_score``. Scores are ``nan`` when no point is clustered.
    """
    lab = np.asarray(labels).astype(np.int64).ravel()
    n = lab.size
    clustered = lab >= 0
    sizes = np.bincount(lab[clustered]) if clustered.any() else np.zeros(0, np.int64)
    sizes = sizes[sizes > 0]
    out: dict[str, Any] = {
        "num_points": int(n),
        "num_clusters": int(sizes.size),
        "num_outliers": int(n - clustered.sum()),
        "outlier_fraction": float((n - clustered.sum()) / n) if n else float("nan"),
        "largest_cluster": int(sizes.max()) if sizes.size else 0,
        "mean_cluster_size": float(sizes.mean()) if sizes.size else 0.0,
    }
    if gt is None:
        return out

    g = np.asarray(gt).astype(np.int64).ravel()
    if g.size != n:
        raise ValueError(f"gt has {g.size} entries, labels {n}")
    g = _as_singletons(g)
    out["num_gt_ids"] = int(np.unique(g).size)
    if clustered.any():
        out["purity"] = _purity(lab[clustered], g[clustered])
        out["nmi"] = float(normalized_mutual_info_score(g[clustered], lab[clustered]))
        out["ari"] = float(adjusted_rand_score(g[clustered], lab[clustered]))
    else:
        out["purity"] = out["nmi"] = out["ari"] = float("nan")
    all_pred = _as_singletons(lab)
    out["nmi_all"] = float(normalized_mutual_info_score(g, all_pred))
    out["ari_all"] = float(adjusted_rand_score(g, all_pred))
    return out


def eps_sweep(
    dist: Any,
    eps_values: Iterable[float],
    gt: Sequence[int] | np.ndarray | None = None,
    min_samples: int = 4,
    return_labels: bool = False,
) -> list[dict]:
    """DBSCAN for several ``eps`` on one distance matrix, for plots and the notebook's eps slider.

    The radius graph is extracted once at the largest ``eps`` (one pass over a dense matrix, or a
    filter of the sparse one); each smaller ``eps`` only filters that graph, so a sweep costs little
    more than a single DBSCAN. Returns one :func:`cluster_stats` dict per ``eps`` (in the given
    order), with an added ``"eps"`` key and, if ``return_labels``, the ``"labels"`` array.
    """
    eps_list = [float(e) for e in eps_values]
    if not eps_list:
        return []
    top = max(eps_list)
    _check_eps(dist, top)
    graph = radius_graph(dist, top)
    results = []
    for eps in eps_list:
        g = graph if eps == top else radius_graph(graph, eps)
        labels = _dbscan_on_graph(g, eps, min_samples, None)
        stats = {"eps": eps, **cluster_stats(labels, gt)}
        if return_labels:
            stats["labels"] = labels
        results.append(stats)
    return results


# =============================================================================================
# What the clusters join and what they miss, split by camera (notebook 03's honest part)
# =============================================================================================
def _pairs(counts: np.ndarray) -> int:
    """Number of unordered pairs inside groups of the given sizes: sum of n(n-1)/2."""
    c = np.asarray(counts, dtype=np.int64)
    return int((c * (c - 1) // 2).sum())


def _group_sizes(*keys: np.ndarray) -> np.ndarray:
    """Sizes of the groups of points that agree on every key."""
    _, counts = np.unique(np.stack(keys, axis=1), axis=0, return_counts=True)
    return counts


def camera_split_purity(labels: Sequence[int] | np.ndarray, pids: Sequence[int] | np.ndarray,
                        camids: Sequence[int] | np.ndarray) -> dict:
    """How clean and how complete a clustering is, within one camera and across cameras.

    Every unordered pair of images is either *within a camera* (both seen by the same camera) or
    *across cameras*. For each of the two kinds this counts, in pairs:

    * ``same_id_pairs`` -- pairs of the same true identity (what a perfect clustering joins);
    * ``joined_same_id`` -- of those, the pairs that share a cluster (outliers join nothing);
    * ``recall`` -- ``joined_same_id / same_id_pairs`` (``nan`` when there is no such pair);
    * ``clustered_pairs`` -- pairs that share a cluster, of any identity;
    * ``purity`` -- ``joined_same_id / clustered_pairs``: the fraction of the pairs a cluster
      asserts that are true (pair precision; ``nan`` when the clusters join no such pair).

    Also returned: ``clusters`` (labels >= 0), ``single_camera_clusters`` (clusters whose members
    all come from one camera), ``ids_multi_camera`` (true identities seen by two or more cameras)
    and ``ids_joined_across`` (of those, how many have at least one cross-camera pair in a cluster).

    Computed from group counts, never from the N x N pairs, so it is cheap at any N.
    """
    lab = np.asarray(labels, dtype=np.int64).ravel()
    pid = np.asarray(pids, dtype=np.int64).ravel()
    cam = np.asarray(camids, dtype=np.int64).ravel()
    if not lab.size == pid.size == cam.size:
        raise ValueError(f"sizes differ: labels {lab.size}, pids {pid.size}, camids {cam.size}")
    c = lab >= 0
    same_id = {"within": _pairs(_group_sizes(pid, cam)), "all": _pairs(_group_sizes(pid))}
    joined = {"within": _pairs(_group_sizes(lab[c], pid[c], cam[c])) if c.any() else 0,
              "all": _pairs(_group_sizes(lab[c], pid[c])) if c.any() else 0}
    clustered = {"within": _pairs(_group_sizes(lab[c], cam[c])) if c.any() else 0,
                 "all": _pairs(_group_sizes(lab[c])) if c.any() else 0}
    out: dict[str, Any] = {}
    for kind in ("within", "across"):
        def pick(d):
            return d["within"] if kind == "within" else d["all"] - d["within"]
        s, j, k = pick(same_id), pick(joined), pick(clustered)
        out[f"{kind}_camera" if kind == "within" else "across_cameras"] = {
            "same_id_pairs": s, "joined_same_id": j, "clustered_pairs": k,
            "recall": j / s if s else float("nan"), "purity": j / k if k else float("nan")}
    cams_per_cluster = [np.unique(cam[c][lab[c] == k]).size for k in np.unique(lab[c])]
    multi = [p for p in np.unique(pid) if np.unique(cam[pid == p]).size > 1]
    joined_across = 0
    for p in multi:
        sel = c & (pid == p)
        if any(np.unique(cam[sel & (lab == k)]).size > 1 for k in np.unique(lab[sel])):
            joined_across += 1
    out.update({"clusters": len(cams_per_cluster),
                "single_camera_clusters": int(sum(n == 1 for n in cams_per_cluster)),
                "ids_multi_camera": len(multi), "ids_joined_across": joined_across})
    return out


def missed_cross_camera_pairs(labels: Sequence[int] | np.ndarray, pids: Sequence[int] | np.ndarray,
                              camids: Sequence[int] | np.ndarray) -> list[dict]:
    """Which cross-camera pairs of one person the clusters join, and which they miss.

    One row per true identity and pair of cameras that both see it (``cam_a < cam_b``, 0-based):

    * ``pairs`` -- image pairs of this person between the two cameras (``n_a * n_b``);
    * ``joined`` / ``missed`` -- of those, the pairs in one cluster / the others;
    * ``clusters_a`` / ``clusters_b`` -- ``{label: images}`` of the person's images in each camera
      (label -1 = outlier), i.e. where DBSCAN put each side;
    * ``status`` -- ``"joined"`` (every pair shares a cluster), ``"missed"`` (none does) or
      ``"partial"``.

    Rows are sorted with the most missed pairs first, then by identity.
    """
    lab = np.asarray(labels, dtype=np.int64).ravel()
    pid = np.asarray(pids, dtype=np.int64).ravel()
    cam = np.asarray(camids, dtype=np.int64).ravel()
    rows = []
    for p in np.unique(pid):
        cams = np.unique(cam[pid == p])
        for ia, a in enumerate(cams):
            for b in cams[ia + 1:]:
                la, lb = lab[(pid == p) & (cam == a)], lab[(pid == p) & (cam == b)]
                ca = dict(zip(*[x.tolist() for x in np.unique(la, return_counts=True)]))
                cb = dict(zip(*[x.tolist() for x in np.unique(lb, return_counts=True)]))
                joined = sum(n * cb.get(k, 0) for k, n in ca.items() if k >= 0)
                pairs = la.size * lb.size
                rows.append({"pid": int(p), "cam_a": int(a), "cam_b": int(b), "pairs": int(pairs),
                             "joined": int(joined), "missed": int(pairs - joined),
                             "clusters_a": ca, "clusters_b": cb,
                             "status": "joined" if joined == pairs else ("missed" if joined == 0 else "partial")})
    rows.sort(key=lambda r: (-r["missed"], r["pid"], r["cam_a"], r["cam_b"]))
    return rows


__all__ += ["camera_split_purity", "missed_cross_camera_pairs"]
