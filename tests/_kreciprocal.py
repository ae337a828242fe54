"""The naive k-reciprocal encoding that the Jaccard and re-ranking tests compare the kernels with:
dense, float64, row by row, written from the documented semantics (small inputs only)."""

from __future__ import annotations

import numpy as np


def kreciprocal_encoding(rank: np.ndarray, dist: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """``V`` (n, n) of the k-reciprocal encoding.

    ``rank[i]`` is row i's ranking list (self first; it may be cut to its first columns) and
    ``dist[i, j]`` the distance whose ``exp(-d)`` weights the neighbours. Row i's reciprocal set is
    the j among its first ``k1 + 1`` entries that have i among theirs; each member c adds its own
    reciprocal set at ``round(k1 / 2)`` when more than 2/3 of it lies in i's; the weights are a
    softmax of ``-dist`` over the set; then, unless ``k2 == 1``, each row is the mean of the rows
    of its first ``k2`` neighbours (local query expansion)."""
    n = rank.shape[0]

    def recip(i, k):
        fwd = rank[i, : k + 1]
        return np.array([j for j in fwd if i in rank[j, : k + 1]], dtype=np.int64)

    h = int(np.around(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):
        r = recip(i, k1)
        e = r
        for c in r:
            rc = recip(c, h)
            if len(np.intersect1d(rc, r)) > 2 / 3 * len(rc):
                e = np.append(e, rc)
        e = np.unique(e)
        w = np.exp(-dist[i, e])
        v[i, e] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    return v


def jaccard_of(v_rows: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``1 - m / (2 - m)`` with ``m = sum_k min(V[a, k], V[b, k])`` for every row a of ``v_rows``."""
    m = np.minimum(v_rows[:, None, :], v[None, :, :]).sum(-1)
    return 1 - m / (2 - m)
