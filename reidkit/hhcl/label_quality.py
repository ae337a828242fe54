"""How good a set of pseudo-labels is, scored against the true identities (diagnostic only).

:func:`pseudo_label_quality` turns one epoch's DBSCAN labels into a flat dict of plain ints and
floats, ready for ``history.json``: counts, ARI / NMI, purity, and how well the clusters join one
person's images across cameras. Everything is counted from group sizes and contingency tables, so
memory is O(N); no N x N pair matrix is ever formed. It never feeds training or model selection.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from reidkit.hhcl.clustering import _as_singletons, camera_split_purity, cluster_stats

__all__ = ["pseudo_label_quality", "persistent_errors"]


def _none_if_nan(v: float) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def _pid_cluster_table(lab: np.ndarray, pid: np.ndarray, cam: np.ndarray):
    """Over the clustered points (outliers join nothing): the distinct (pid, cluster) rows, sorted,
    with how many images and how many cameras each holds."""
    c = lab >= 0
    rows, inv, images = np.unique(np.stack([pid[c], lab[c]], 1), axis=0, return_inverse=True,
                                  return_counts=True)
    seen = np.unique(np.stack([inv.ravel(), cam[c]], 1), axis=0)  # (row, camera) seen
    return rows, images, np.bincount(seen[:, 0], minlength=len(rows))


def _ids_all_cameras_joined(pid: np.ndarray, cam: np.ndarray, table) -> int:
    """Identities seen by 2+ cameras that have images from every one of those cameras in one
    cluster."""
    ids, cams_of_id = np.unique(np.unique(np.stack([pid, cam], 1), axis=0)[:, 0], return_counts=True)
    rows, _, cameras = table
    best = np.zeros(ids.size, dtype=np.int64)
    np.maximum.at(best, np.searchsorted(ids, rows[:, 0]), cameras)  # most cameras one cluster holds
    return int(((cams_of_id > 1) & (best == cams_of_id)).sum())


def _ids_joined_across_leading(table) -> int:
    """Identities that have images from 2+ cameras in one cluster **and** are that cluster's largest
    identity (ties included): a join that a cluster of many people cannot fake."""
    rows, images, cameras = table
    if not len(rows):
        return 0
    top = np.zeros(int(rows[:, 1].max()) + 1, dtype=np.int64)
    np.maximum.at(top, rows[:, 1], images)                        # largest identity's size per cluster
    leads_across = (images == top[rows[:, 1]]) & (cameras > 1)
    return int(np.unique(rows[leads_across, 0]).size)


def pseudo_label_quality(labels: Any, pids: Any, cams: Any) -> dict:
    """Quality of pseudo-labels ``labels`` (``-1`` = DBSCAN outlier) against true ``pids``.

    A negative true identity is a person of its own. Returned keys (ints, floats, or ``None``
    where a score is undefined, e.g. no cross-camera pair exists; the dict is strict JSON):

    * ``num_points``, ``num_ids`` (true identities), ``num_clusters``, ``num_outliers``,
      ``outlier_share``, ``largest_cluster``;
    * ``ari``, ``nmi`` -- scikit-learn's adjusted Rand index and NMI over **all** points, each
      outlier counted as a cluster of its own (a singleton);
    * ``ari_clustered``, ``nmi_clustered``, ``purity`` -- over the clustered points only, the
      ones training uses; purity is the share of them whose cluster's majority identity is theirs;
    * ``cross_camera_pairs`` -- pairs of one person's images from two different cameras;
      ``cross_camera_joined`` -- those that share a cluster; ``cross_camera_join_rate`` -- their
      ratio; ``within_camera_join_rate`` -- the same for same-camera pairs; ``pair_precision`` --
      the share of the pairs the clusters join that are one person;
    * ``ids_multi_camera`` -- identities seen by 2+ cameras; ``ids_joined_across_share`` -- the
      share of those with images from 2+ cameras in one cluster; ``ids_all_cameras_joined_share``
      -- with images from every camera that sees them in one cluster (equal for two cameras);
      ``ids_joined_across_leading_share`` -- with images from 2+ cameras in one cluster of which
      they are the largest identity: a few clusters of many people join most people's cameras
      in the first two shares, not in this one.
    """
    lab = np.asarray(labels).astype(np.int64).ravel()
    pid = np.asarray(pids).astype(np.int64).ravel()
    cam = np.asarray(cams).astype(np.int64).ravel()
    if not lab.size == pid.size == cam.size:
        raise ValueError(f"sizes differ: labels {lab.size}, pids {pid.size}, cams {cam.size}")
    if lab.size == 0:
        raise ValueError("no labels")
    pid = _as_singletons(pid)
    st = cluster_stats(lab, pid)
    split = camera_split_purity(lab, pid, cam)
    table = _pid_cluster_table(lab, pid, cam)
    across, within = split["across_cameras"], split["within_camera"]
    multi = int(split["ids_multi_camera"])
    pairs_joined = across["joined_same_id"] + within["joined_same_id"]
    pairs_clustered = across["clustered_pairs"] + within["clustered_pairs"]
    return {
        "num_points": int(st["num_points"]), "num_ids": int(st["num_gt_ids"]),
        "num_clusters": int(st["num_clusters"]), "num_outliers": int(st["num_outliers"]),
        "outlier_share": float(st["outlier_fraction"]), "largest_cluster": int(st["largest_cluster"]),
        "ari": float(st["ari_all"]), "nmi": float(st["nmi_all"]),
        "ari_clustered": _none_if_nan(st["ari"]), "nmi_clustered": _none_if_nan(st["nmi"]),
        "purity": _none_if_nan(st["purity"]),
        "cross_camera_pairs": int(across["same_id_pairs"]),
        "cross_camera_joined": int(across["joined_same_id"]),
        "cross_camera_join_rate": _none_if_nan(across["recall"]),
        "within_camera_join_rate": _none_if_nan(within["recall"]),
        "pair_precision": float(pairs_joined / pairs_clustered) if pairs_clustered else None,
        "ids_multi_camera": multi,
        "ids_joined_across_share": split["ids_joined_across"] / multi if multi else None,
        "ids_all_cameras_joined_share": _ids_all_cameras_joined(pid, cam, table) / multi if multi else None,
        "ids_joined_across_leading_share": _ids_joined_across_leading(table) / multi if multi else None,
    }


def _clusters_of(lab: np.ndarray, pid: np.ndarray) -> dict[int, set[int]]:
    """The clusters (outliers left out) that hold images of each identity."""
    out: dict[int, set[int]] = {int(p): set() for p in np.unique(pid)}
    for p, c in zip(pid.tolist(), lab.tolist()):
        if c >= 0:
            out[int(p)].add(int(c))
    return out


def _merged_pairs(lab: np.ndarray, pid: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of identities (a < b) that share at least one cluster."""
    pairs: set[tuple[int, int]] = set()
    for c in np.unique(lab[lab >= 0]):
        ids = sorted({int(p) for p in pid[lab == c]})
        pairs.update((a, b) for i, a in enumerate(ids) for b in ids[i + 1:])
    return pairs


def persistent_errors(labels_before: Any, labels_after: Any, pids: Any, cams: Any) -> dict:
    """Which clustering errors of ``labels_before`` (say, epoch 0) are still there in ``labels_after``
    (the last epoch), scored against the true identities (diagnostic only).

    * an identity is **split** when its clustered images fall in two or more clusters;
    * two identities are **merged** when one cluster holds images of both.

    Returns ``split_before`` / ``split_after`` / ``still_split`` (sorted identity lists),
    ``merged_before`` / ``merged_after`` / ``still_merged`` (sorted ``(a, b)`` pairs), and
    ``detail``: for every identity, its cameras per cluster before and after,
    ``{pid: {"before": {cluster: [cams]}, "after": {cluster: [cams]}}}`` (cameras 0-based).
    """
    before = np.asarray(labels_before).astype(np.int64).ravel()
    after = np.asarray(labels_after).astype(np.int64).ravel()
    pid = np.asarray(pids).astype(np.int64).ravel()
    cam = np.asarray(cams).astype(np.int64).ravel()
    if not before.size == after.size == pid.size == cam.size:
        raise ValueError(f"sizes differ: {before.size}, {after.size}, {pid.size}, {cam.size}")
    cb, ca = _clusters_of(before, pid), _clusters_of(after, pid)
    split_b = sorted(p for p, cs in cb.items() if len(cs) > 1)
    split_a = sorted(p for p, cs in ca.items() if len(cs) > 1)
    merged_b, merged_a = _merged_pairs(before, pid), _merged_pairs(after, pid)

    def cams_per_cluster(lab, p):
        sel = (pid == p) & (lab >= 0)
        return {int(c): sorted({int(x) for x in cam[sel & (lab == c)]}) for c in np.unique(lab[sel])}

    return {"split_before": split_b, "split_after": split_a,
            "still_split": sorted(set(split_b) & set(split_a)),
            "merged_before": sorted(merged_b), "merged_after": sorted(merged_a),
            "still_merged": sorted(merged_b & merged_a),
            "detail": {int(p): {"before": cams_per_cluster(before, p), "after": cams_per_cluster(after, p)}
                       for p in np.unique(pid)}}
