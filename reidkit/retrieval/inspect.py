"""One query looked at closely (notebook 06): its ranked gallery, precision-recall, which queries fail,
and how two rankings differ."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def ranked_gallery(dist_row, q_pid: int, q_cam: int, g_pids, g_cams, topk: int | None = None) -> np.ndarray:
    """Gallery indices of one query's ranked list under the Market protocol.

    Gallery images of the query's identity taken by the query's camera are removed (junk), the
    rest is sorted by ascending distance with ties kept in gallery order (a stable sort), and the
    first ``topk`` indices are returned (all of them when ``topk`` is None)."""
    dist_row = np.asarray(dist_row)
    g_pids, g_cams = np.asarray(g_pids), np.asarray(g_cams)
    valid = np.flatnonzero(~((g_pids == q_pid) & (g_cams == q_cam)))
    order = valid[np.argsort(dist_row[valid], kind="stable")]
    return order if topk is None else order[:topk]


def precision_recall(dist_row, q_pid: int, q_cam: int, g_pids, g_cams) -> dict[str, Any]:
    """One query's ranked list read as a precision-recall curve (Market protocol).

    The list is :func:`ranked_gallery` (same-identity same-camera junk removed, stable sort).
    Returns ``order`` (gallery indices, ranked), ``hits`` (bool per position), ``precision`` and
    ``recall`` after each position, ``match_ranks`` (1-based positions of the true matches),
    ``AP`` (the mean of the precision at each hit: the area under the step curve, the value
    :func:`evaluate_rank` reports) and ``INP`` (matches / position of the last one); both NaN
    when no true match is left."""
    order = ranked_gallery(dist_row, q_pid, q_cam, g_pids, g_cams)
    hits = np.asarray(g_pids)[order] == q_pid
    n = int(hits.sum())
    cum = np.cumsum(hits)
    precision = cum / np.arange(1, len(hits) + 1)
    recall = cum / max(n, 1)
    ranks = np.flatnonzero(hits) + 1
    return {
        "order": order,
        "hits": hits,
        "precision": precision,
        "recall": recall,
        "match_ranks": ranks,
        "AP": float(precision[hits].mean()) if n else math.nan,
        "INP": float(n / ranks[-1]) if n else math.nan,
    }


def queries_by_outcome(result: dict) -> dict[str, np.ndarray]:
    """Query indices grouped by what an :func:`evaluate_rank` result says about them:
    ``"all"``, ``"rank-1 hit"`` (the closest kept gallery image is the same person),
    ``"rank-1 miss"`` (a true match exists but is not first) and ``"no match"`` (only same-camera
    images of the person are in the gallery: skipped by the Market protocol)."""
    first = np.asarray(result["first_match_rank"])
    return {
        "all": np.arange(len(first)),
        "rank-1 hit": np.flatnonzero(first == 0),
        "rank-1 miss": np.flatnonzero(first > 0),
        "no match": np.flatnonzero(first < 0),
    }


def compare_rankings(before: dict, after: dict) -> dict[str, Any]:
    """What changed, query by query, between two :func:`evaluate_rank` results of the same
    queries (e.g. plain distances ``before`` and re-ranked ones ``after``).

    Returns counts over the valid queries: ``first_better`` / ``first_worse`` / ``first_same``
    (the first true match moved up / down / stayed), ``ap_up`` / ``ap_down``, ``rank1_fixed``
    (miss -> hit) / ``rank1_broken`` (hit -> miss), ``worse_first_but_ap_up`` (the first match
    moved down while the AP still rose); the per-query arrays ``first_before``,
    ``first_after`` (0-based), ``ap_before``, ``ap_after`` and ``ap_change`` (NaN for skipped
    queries); and two example queries: ``fixed``, the
    rank-1 miss turned hit with the largest AP gain (else the largest AP gain), and ``broken``,
    the rank-1 hit turned miss with the largest AP loss (else the largest loss). Ties go to the
    lower query index."""
    fb = np.asarray(before["first_match_rank"])
    fa = np.asarray(after["first_match_rank"])
    if fb.shape != fa.shape or not np.array_equal(fb < 0, fa < 0):
        raise ValueError("compare_rankings needs two evaluations of the same queries and gallery")
    valid = np.flatnonzero(fb >= 0)
    if len(valid) == 0:
        raise ValueError("no valid query (no query has a true match)")
    d_ap = np.asarray(after["AP"], dtype=np.float64) - np.asarray(before["AP"], dtype=np.float64)
    b, a, d = fb[valid], fa[valid], d_ap[valid]
    eps = 1e-12

    def pick(mask: np.ndarray, sign: int) -> int:
        pool = valid[mask] if mask.any() else valid
        vals = sign * d_ap[pool]
        return int(pool[np.argmax(vals)])  # argmax: first (lowest index) of the ties

    return {
        "num_valid_q": int(len(valid)),
        "first_better": int((a < b).sum()),
        "first_worse": int((a > b).sum()),
        "first_same": int((a == b).sum()),
        "ap_up": int((d > eps).sum()),
        "ap_down": int((d < -eps).sum()),
        "rank1_fixed": int(((b > 0) & (a == 0)).sum()),
        "rank1_broken": int(((b == 0) & (a > 0)).sum()),
        "worse_first_but_ap_up": int(((a > b) & (d > eps)).sum()),
        "first_before": fb,
        "first_after": fa,
        "ap_before": np.asarray(before["AP"], dtype=np.float64),
        "ap_after": np.asarray(after["AP"], dtype=np.float64),
        "ap_change": d_ap,
        "fixed": pick((b > 0) & (a == 0), +1),
        "broken": pick((b == 0) & (a > 0), -1),
    }


def camera_share_by_rank(dist, q_pids, g_pids, q_cams, g_cams, max_k: int = 50):
    """How often the nearest *other-person* gallery images come from the query's own camera.

    For every query, the gallery images of other identities are sorted by distance (stable);
    ``share[k-1]`` is the fraction, over queries, of the first k of them taken by the query's
    camera, and ``chance`` the same fraction over all of them (what a camera-blind feature gives at
    every k). Returns ``(share, chance)``; ``share`` has ``min(max_k, smallest count)`` entries."""
    d = np.asarray(dist)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    k = max_k
    rows, chance = [], []
    for i in range(d.shape[0]):
        other = np.flatnonzero(g_pids != q_pids[i])
        same = g_cams[other] == q_cams[i]
        order = np.argsort(d[i, other], kind="stable")
        k = min(k, len(other))
        rows.append(same[order[:max_k]])
        chance.append(same.mean())
    if not rows or k == 0:
        raise ValueError("no query has gallery images of other identities")
    hits = np.stack([r[:k] for r in rows]).astype(np.float64)
    share = (np.cumsum(hits, axis=1) / np.arange(1, k + 1)).mean(axis=0)
    return share, float(np.mean(chance))
