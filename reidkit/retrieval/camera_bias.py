"""Camera bias, measured on features: how much of what a feature says is the camera, not the person.

On L2-normalised features ``(N, d)`` with true identities ``pids`` and cameras ``cams``:

* :func:`camera_distance_groups` -- the distances of four kinds of pairs: same person in the same
  camera, same person across cameras, different people in the same camera, different people across
  cameras, and summary numbers. Exact while a kind has at most ``max_pairs`` pairs, a seeded uniform
  sample of ``max_pairs`` of them otherwise; never a dense N x N matrix.
* :func:`per_camera_means` -- each camera's mean feature, the distances between those means and
  the share of the feature variance that the camera explains.
* :func:`camera_centred` -- the cheap remedy: subtract each camera's mean, renormalise.
* :func:`embedding_2d` -- a seeded t-SNE (or PCA) picture of the features.

The figure is :func:`reidkit.viz.cameras.camera_bias_figure`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

__all__ = ["GROUPS", "camera_centred", "camera_distance_groups", "embedding_2d", "per_camera_means"]

#: The four kinds of pairs, as (name, same person?, same camera?).
GROUPS = (("same_id_same_cam", True, True), ("same_id_cross_cam", True, False),
          ("diff_id_same_cam", False, True), ("diff_id_cross_cam", False, False))

_BLOCK = 1 << 22  # elements per temporary block (booleans of a row scan, floats of a distance chunk)


def _inputs(features: Any, *named: tuple[str, Any]) -> tuple[np.ndarray, ...]:
    """``features`` as a 2-D float array and each named label array as 1-D int64, same length."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, d), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    out = [x]
    for name, a in named:
        a = np.asarray(a).astype(np.int64).ravel()
        if a.size != x.shape[0]:
            raise ValueError(f"{name} has {a.size} entries, features {x.shape[0]} rows")
        out.append(a)
    return tuple(out)


def _n_pairs(counts: np.ndarray) -> int:
    c = np.asarray(counts, dtype=np.int64)
    return int((c * (c - 1) // 2).sum())


def _group_counts(pids: np.ndarray, cams: np.ndarray) -> dict[str, int]:
    """Exact number of unordered pairs of each kind, from group sizes (no pair is formed)."""
    n = pids.size
    both = _n_pairs(np.unique(np.stack([pids, cams], 1), axis=0, return_counts=True)[1]) if n else 0
    same_id = _n_pairs(np.unique(pids, return_counts=True)[1])
    same_cam = _n_pairs(np.unique(cams, return_counts=True)[1])
    total = n * (n - 1) // 2
    return {"same_id_same_cam": both, "same_id_cross_cam": same_id - both,
            "diff_id_same_cam": same_cam - both, "diff_id_cross_cam": total - same_id - same_cam + both}


def _exact_pairs(pids: np.ndarray, cams: np.ndarray, same_id: bool, same_cam: bool) -> np.ndarray:
    """Every unordered pair ``(i, j)``, ``i < j``, of one kind, as an (M, 2) array sorted by (i, j).

    Same-person pairs are enumerated identity by identity; different-person pairs by a scan over
    blocks of rows, so the temporary memory stays at ``_BLOCK`` booleans."""
    n = pids.size
    found = []
    if same_id:
        order = np.argsort(pids, kind="stable")
        bounds = np.flatnonzero(np.diff(pids[order])) + 1
        for members in np.split(order, bounds):
            if members.size < 2:
                continue
            members = np.sort(members)
            a, b = np.triu_indices(members.size, 1)
            i, j = members[a], members[b]
            keep = (cams[i] == cams[j]) == same_cam
            found.append(np.stack([i[keep], j[keep]], 1))
    else:
        step = max(1, _BLOCK // max(n, 1))
        cols = np.arange(n)
        for s in range(0, n, step):
            rows = np.arange(s, min(n, s + step))
            mask = (cols[None, :] > rows[:, None]) & (pids[rows, None] != pids[None, :])
            mask &= (cams[rows, None] == cams[None, :]) == same_cam
            r, c = np.nonzero(mask)
            found.append(np.stack([rows[r], c], 1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].astype(np.int64)


def _sample_pairs(pids: np.ndarray, cams: np.ndarray, same_id: bool, same_cam: bool, k: int,
                  available: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` pairs drawn uniformly, with replacement, among the ``available`` pairs of one kind.

    A candidate pair is drawn uniformly among the pairs that share the identity (same-person
    kinds), share the camera (different people, same camera) or differ in camera (different
    people, across cameras), then kept if it is of the kind: uniform over the kind."""
    n = pids.size
    key = pids if same_id else cams
    if same_id or same_cam:  # a key value with probability proportional to its pairs, then two members
        order = np.argsort(key, kind="stable")
        _, start, size = np.unique(key[order], return_index=True, return_counts=True)
        weight = size * (size - 1) / 2.0
        candidates = weight.sum()
    else:  # i with probability proportional to its cross-camera partners, then j among them
        cam_order = np.argsort(cams, kind="stable")
        cam_vals, cam_start, cam_size = np.unique(cams[cam_order], return_index=True, return_counts=True)
        cam_of = np.searchsorted(cam_vals, cams)
        weight = (n - cam_size[cam_of]).astype(np.float64)
        candidates = weight.sum() / 2.0
    p = weight / weight.sum()
    accept = available / candidates
    got, have = [], 0
    while have < k:
        m = int(np.ceil((k - have) / accept * 1.1)) + 16
        if same_id or same_cam:
            g = rng.choice(size.size, size=m, p=p)
            a = rng.integers(0, size[g])
            b = rng.integers(0, size[g] - 1)
            b = b + (b >= a)  # a second, distinct member
            i, j = order[start[g] + a], order[start[g] + b]
        else:
            i = rng.choice(n, size=m, p=p)
            ci = cam_of[i]
            r = rng.integers(0, n - cam_size[ci])  # r-th image outside camera ci, in camera order
            r = r + cam_size[ci] * (r >= cam_start[ci])
            j = cam_order[r]
        keep = ((pids[i] == pids[j]) == same_id) & ((cams[i] == cams[j]) == same_cam)
        pair = np.sort(np.stack([i[keep], j[keep]], 1), axis=1)
        got.append(pair)
        have += len(pair)
    return np.concatenate(got)[:k].astype(np.int64)


def _pair_distances(x: np.ndarray, pairs: np.ndarray, metric: str) -> np.ndarray:
    """Distances of the rows of ``pairs``, in chunks of ``_BLOCK`` floats."""
    out = np.empty(len(pairs), dtype=np.float64)
    step = max(1, _BLOCK // max(x.shape[1], 1))
    sq = np.einsum("nd,nd->n", x, x, dtype=np.float64)
    for s in range(0, len(pairs), step):
        i, j = pairs[s:s + step, 0], pairs[s:s + step, 1]
        dot = np.einsum("nd,nd->n", x[i], x[j], dtype=np.float64)
        if metric == "sqeuclidean":
            out[s:s + step] = np.maximum(sq[i] + sq[j] - 2.0 * dot, 0.0)
        else:
            out[s:s + step] = 1.0 - dot / np.maximum(np.sqrt(sq[i] * sq[j]), 1e-12)
    return out


def camera_distance_groups(features: Any, pids: Any, cams: Any, max_pairs: int = 200_000,
                           metric: str = "sqeuclidean", seed: int = 0) -> dict:
    """Distances of same/different-person pairs within one camera and across cameras.

    Parameters
    ----------
    features : (N, d) features, L2-normalised as everywhere in the kit.
    pids, cams : (N,) true identities and cameras (only used to sort pairs into the four kinds).
    max_pairs : the most pairs kept per kind. A kind with at most ``max_pairs`` pairs is
        enumerated exactly; a larger one is a uniform sample (with replacement) of ``max_pairs``
        pairs drawn with ``seed``. Memory stays O(N + max_pairs) at any N.
    metric : ``"sqeuclidean"`` -- ``|x_i - x_j|^2``, i.e. ``2 - 2 x_i.x_j`` on unit vectors, the
        distance the kit's k-reciprocal Jaccard starts from -- or ``"cosine"``, ``1 - cos``.
    seed : the seed of the sample.

    Returns a dict, each per-kind entry keyed by the names of :data:`GROUPS`:

    * ``distances`` -- 1-D float64 arrays of pair distances; ``pairs`` -- the (M, 2) int64 pairs
      ``i < j`` they belong to (sorted when exact);
    * ``counts`` -- the exact number of pairs of each kind in the data; ``sampled`` -- whether the
      kind was sampled;
    * ``summary`` -- plain floats: ``mean_<kind>``, ``median_<kind>`` (``None`` for an empty
      kind), ``camera_gap_same_id`` (mean same-person distance across cameras minus within one),
      ``camera_gap_diff_id`` (the same for different people), and
      ``cross_cam_pos_beyond_same_cam_neg_median``: the share of same-person cross-camera pairs
      farther apart than the median different-person same-camera pair -- pairs that a threshold
      keeping half of the same-camera strangers apart would never join;
    * ``metric``.
    """
    x, pid, cam = _inputs(features, ("pids", pids), ("cams", cams))
    if metric not in ("sqeuclidean", "cosine"):
        raise ValueError(f"metric must be 'sqeuclidean' or 'cosine', got {metric!r}")
    if int(max_pairs) < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    rng = np.random.default_rng(seed)
    counts = _group_counts(pid, cam)
    pairs, sampled, dist = {}, {}, {}
    for name, same_id, same_cam in GROUPS:
        sampled[name] = counts[name] > max_pairs
        if sampled[name]:
            pairs[name] = _sample_pairs(pid, cam, same_id, same_cam, int(max_pairs), counts[name], rng)
        else:
            pairs[name] = _exact_pairs(pid, cam, same_id, same_cam)
        dist[name] = _pair_distances(x, pairs[name], metric)
    summary: dict[str, float | None] = {}
    for name, _, _ in GROUPS:
        d = dist[name]
        summary[f"mean_{name}"] = float(d.mean()) if d.size else None
        summary[f"median_{name}"] = float(np.median(d)) if d.size else None

    def gap(a, b):
        return None if summary[a] is None or summary[b] is None else summary[a] - summary[b]

    summary["camera_gap_same_id"] = gap("mean_same_id_cross_cam", "mean_same_id_same_cam")
    summary["camera_gap_diff_id"] = gap("mean_diff_id_cross_cam", "mean_diff_id_same_cam")
    pos, neg = dist["same_id_cross_cam"], dist["diff_id_same_cam"]
    summary["cross_cam_pos_beyond_same_cam_neg_median"] = (
        float((pos > np.median(neg)).mean()) if pos.size and neg.size else None)
    return {"distances": dist, "pairs": pairs, "counts": counts, "sampled": sampled,
            "summary": summary, "metric": metric}


def per_camera_means(features: Any, cams: Any) -> dict:
    """Each camera's mean feature and how far apart those means are: the size of the bias.

    Returns a dict:

    * ``cameras`` -- the camera ids, sorted; ``counts`` -- images per camera;
    * ``means`` -- (C, d) float64 per-camera mean vectors; ``mean_norms`` -- their lengths (a
      unit-vector mean has length 1 when all the camera's features agree, 0 when they cancel);
    * ``mean_distances`` -- (C, C) Euclidean distances between the camera means;
      ``max_mean_distance`` -- the largest;
    * ``camera_variance_share`` -- between-camera variance over total variance,
      ``sum_c n_c |mu_c - mu|^2 / sum_i |x_i - mu|^2`` (summed over every dimension): the share
      of the feature spread that the camera alone explains, 0 when every camera has the same mean.
    """
    x, cam = _inputs(features, ("cams", cams))
    if x.shape[0] == 0:
        raise ValueError("no features")
    x = x.astype(np.float64)
    cameras, inv, counts = np.unique(cam, return_inverse=True, return_counts=True)
    sums = np.zeros((cameras.size, x.shape[1]))
    np.add.at(sums, inv, x)
    means = sums / counts[:, None]
    mu = x.mean(axis=0)
    total = float(((x - mu) ** 2).sum())
    between = float((counts * ((means - mu) ** 2).sum(axis=1)).sum())
    dists = cdist(means, means)
    return {"cameras": cameras.tolist(), "counts": counts.tolist(), "means": means,
            "mean_norms": np.linalg.norm(means, axis=1), "mean_distances": dists,
            "max_mean_distance": float(dists.max()),
            "camera_variance_share": between / total if total > 0 else 0.0}


def camera_centred(features: Any, cams: Any, normalise: bool = True) -> np.ndarray:
    """Features with each camera's mean subtracted, then (``normalise``) L2-renormalised.

    Returns a new array of the input's float dtype. A row equal to its camera's mean (e.g. the
    only image of a camera) becomes the zero vector and stays zero after renormalisation."""
    x, cam = _inputs(features, ("cams", cams))
    _, inv, counts = np.unique(cam, return_inverse=True, return_counts=True)
    sums = np.zeros((counts.size, x.shape[1]))
    np.add.at(sums, inv, x.astype(np.float64))
    out = x.astype(np.float64) - (sums / counts[:, None])[inv]
    if normalise:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = np.divide(out, norms, out=np.zeros_like(out), where=norms > 1e-12)
    return out.astype(x.dtype)


def embedding_2d(features: Any, method: str = "tsne", seed: int = 0, max_points: int = 3000,
                 perplexity: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D picture of the features: ``(coords, index)``, ``coords[k]`` being row ``index[k]``.

    At most ``max_points`` rows are embedded (a seeded sample, kept in row order, when N is
    larger). ``method="tsne"``: scikit-learn's t-SNE (PCA initialisation, ``perplexity`` capped
    below a third of the points), after a PCA to 50 dimensions when d > 50; ``method="pca"``:
    the first two principal components. ``seed`` picks the sample and is t-SNE's random state;
    with the PCA initialisation the same inputs and seed give the same picture.
    """
    x, = _inputs(features)
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"need at least 3 points to embed, got {n}")
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(n, size=max_points, replace=False)) if n > max_points else np.arange(n)
    x = x[index].astype(np.float64)
    if method == "pca":
        return PCA(n_components=2, svd_solver="full").fit_transform(x), index
    if x.shape[1] > 50:
        x = PCA(n_components=min(50, x.shape[0]), svd_solver="full").fit_transform(x)
    tsne = TSNE(n_components=2, perplexity=min(float(perplexity), (x.shape[0] - 1) / 3.0),
                init="pca", random_state=seed)
    return tsne.fit_transform(x), index
