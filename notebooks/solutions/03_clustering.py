"""Worked solutions to the exercises of notebook 03 (clustering: k-reciprocal Jaccard and DBSCAN).

Load them in a new notebook cell with ``%run solutions/03_clustering.py``, then call
``exercise_K(ctx)``. Each ``exercise_K(ctx)`` takes a :class:`reidkit.course.runctx.RunContext` (any
profile; the tests use the smoke profile on the embedded sample), prints a conclusion that follows
from the numbers it measured, and returns those numbers with the conclusion under
``explanation``. Nothing runs when the file is loaded. Nothing here is library code: it is what a
student could have written in the notebook, calling reidkit.
"""

from __future__ import annotations

import numpy as np

from reidkit.hhcl.clustering import (
    camera_split_purity,
    cluster_stats,
    dbscan_labels,
    eps_sweep,
    missed_cross_camera_pairs,
)
from reidkit.retrieval.jaccard import jaccard_distance


def _truth(ctx):
    """Training features, true identities and cameras of the run (the truth only scores)."""
    ds = ctx.dataset()
    feats = ctx.features("train")
    pids = np.array([r.pid for r in ds.train])
    cams = np.array([r.camid for r in ds.train])
    return ds, feats, pids, cams


def _jaccard_sweep(ctx, feats, pids, cams):
    """DBSCAN on the profile's Jaccard distance at every eps of ``prof.cluster.eps_grid``: one row
    per eps with the cluster counts, purity, ARI and the within- and across-camera pair recall."""
    c = ctx.profile.cluster
    jac = jaccard_distance(feats, k1=c.k1, k2=c.k2, device=ctx.device)
    rows = []
    for s in eps_sweep(jac, c.eps_grid, gt=pids, min_samples=c.min_samples, return_labels=True):
        split = camera_split_purity(s["labels"], pids, cams)
        rows.append({"eps": s["eps"], "clusters": s["num_clusters"], "outliers": s["num_outliers"],
                     "purity": s["purity"], "ari": s["ari"], "ari_all": s["ari_all"],
                     "within_camera_recall": split["within_camera"]["recall"],
                     "across_cameras_recall": split["across_cameras"]["recall"]})
    return rows


def _notebook_prediction():
    """The ``prediction`` dict of the notebook's exercise cell, when run inside IPython."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell.user_ns.get("prediction") if shell is not None else None
    except ImportError:
        return None


def _report(explanation: str) -> str:
    print(explanation)
    return explanation


def exercise_1(ctx, prediction=None):
    """Predict, then measure: what eps does to the clusters.

    At the smallest and the largest eps of ``prof.cluster.eps_grid``: the clusters and outliers,
    the purity and the fraction of cross-camera pairs of one person that share a cluster; and the
    first eps at which purity falls below 0.9. ``prediction`` (by default the notebook's
    ``prediction`` cell) is ``{"smallest": {...}, "largest": {...}}`` with the same keys; each value
    given is printed next to the measured one.

    Returns ``rows`` (one dict per eps of the grid), ``smallest`` and ``largest`` (the two end rows)
    and ``first_eps_purity_below_0.9`` (``None`` if it never does), with the explanation.
    """
    prediction = prediction if prediction is not None else (_notebook_prediction() or {})
    _, feats, pids, cams = _truth(ctx)
    rows = _jaccard_sweep(ctx, feats, pids, cams)
    below = [r["eps"] for r in rows if r["purity"] < 0.9]
    lo, hi = rows[0], rows[-1]
    keys = ("clusters", "outliers", "purity", "across_cameras_recall")
    lines = [f"{'':22s} {'eps ' + format(lo['eps'], 'g'):>16s} {'eps ' + format(hi['eps'], 'g'):>16s}"]
    for k in keys:
        cells = []
        for end, row in (("smallest", lo), ("largest", hi)):
            said = (prediction.get(end) or {}).get(k)
            got = f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k])
            cells.append(got + ("" if said is None else f" (you: {said})"))
        lines.append(f"{k:22s} {cells[0]:>16s} {cells[1]:>16s}")
    gain = hi["across_cameras_recall"] - lo["across_cameras_recall"]
    loss = lo["purity"] - hi["purity"]
    lines.append(
        f"From eps {lo['eps']:g} to {hi['eps']:g} the outliers go from {lo['outliers']} to {hi['outliers']} and the "
        f"clusters from {lo['clusters']} to {hi['clusters']}; purity "
        + (f"falls by {loss:.2f}" if loss > 0.01 else "barely moves")
        + f" while the across-camera recall gains {gain:+.2f}. "
        + (f"Purity first falls below 0.9 at eps {below[0]:g}. " if below else "Purity never falls below 0.9 on the grid. ")
        + ("A larger eps buys far more merged strangers than joined cameras: the two cameras of one person "
           "share few neighbours to begin with." if loss > gain else
           "Here the larger eps joins cross-camera pairs at least as fast as it merges strangers: look at "
           "which clusters merged before you trust it."))
    return {"rows": rows, "smallest": lo, "largest": hi,
            "first_eps_purity_below_0.9": below[0] if below else None,
            "explanation": _report("\n".join(lines))}


def exercise_2(ctx, k1_values=(5, 10, 20, 30)):
    """Predict, then measure: what k1 does to the clusters (eps, k2 and min_samples fixed).

    One row per k1 with the stored pairs, clusters, outliers, ARI and the within- and
    across-camera recall, and an explanation built from them.
    """
    c = ctx.profile.cluster
    ds, feats, pids, cams = _truth(ctx)
    images_per_id = int(np.median(np.unique(pids, return_counts=True)[1]))
    rows = []
    for k1 in k1_values:
        jac = jaccard_distance(feats, k1=k1, k2=min(c.k2, k1), device=ctx.device)
        labels = dbscan_labels(jac, eps=c.eps, min_samples=c.min_samples)
        st, split = cluster_stats(labels, pids), camera_split_purity(labels, pids, cams)
        rows.append({"k1": k1, "stored_pairs": int(jac.nnz), "clusters": st["num_clusters"],
                     "outliers": st["num_outliers"], "ari": st["ari"],
                     "within_camera_recall": split["within_camera"]["recall"],
                     "across_cameras_recall": split["across_cameras"]["recall"]})
    lines = ["  k1  stored pairs  clusters  outliers    ARI  within-camera  across-cameras"]
    lines += [f"{r['k1']:4d} {r['stored_pairs']:13d} {r['clusters']:9d} {r['outliers']:9d} {r['ari']:6.3f} "
              f"{r['within_camera_recall']:14.3f} {r['across_cameras_recall']:15.3f}" for r in rows]
    best = max(rows, key=lambda r: r["ari"])
    first, last = rows[0], rows[-1]
    more_pairs = all(a["stored_pairs"] <= b["stored_pairs"] for a, b in zip(rows, rows[1:]))
    lines.append(
        ("Stored pairs grow with k1 at every step" if more_pairs else "Stored pairs do not grow at every step")
        + f" ({first['stored_pairs']} -> {last['stored_pairs']}): larger reciprocal sets share more neighbours. "
        f"Clusters go from {first['clusters']} to {last['clusters']} and the across-camera recall from "
        f"{first['across_cameras_recall']:.2f} to {last['across_cameras_recall']:.2f}. ARI peaks at k1 = {best['k1']} "
        f"({best['ari']:.3f}). "
        + (f"Past one person's {images_per_id} images, R(p, k1) must hold other people, whose neighbourhoods then "
           f"overlap with ours: at k1 = {last['k1']} ARI is {last['ari']:.3f}, below the peak."
           if last["k1"] > images_per_id and last["ari"] < best["ari"] - 0.005 else
           f"On this run a k1 above one person's {images_per_id} images has not yet cost ARI; with more look-alike "
           "people it would, as R(p, k1) fills with other identities."))
    return {"rows": rows, "images_per_identity": images_per_id, "best_k1": best["k1"],
            "explanation": _report("\n".join(lines))}


def exercise_3(ctx, pid=None):
    """One person, two cameras: the first training identity seen by two cameras that the clusters
    do not join (unless ``pid`` is given; if every such person is joined, the first one). Where
    DBSCAN put each camera's images at the profile's eps, the smallest and median Jaccard distance
    between the two sides, and the smallest eps of the grid at which they share a cluster, with the
    clustering's purity there."""
    c = ctx.profile.cluster
    _, feats, pids, cams = _truth(ctx)
    jac = jaccard_distance(feats, k1=c.k1, k2=c.k2, device=ctx.device, dense=True)
    labels = dbscan_labels(jac, eps=c.eps, min_samples=c.min_samples)
    rows = missed_cross_camera_pairs(labels, pids, cams)
    if not rows:
        return {"pid": None, "explanation": _report("No training identity is seen by two cameras.")}
    if pid is not None:
        row = next(r for r in rows if r["pid"] == pid)
    else:
        row = next((r for r in rows if r["status"] != "joined"), rows[0])
    a = np.flatnonzero((pids == row["pid"]) & (cams == row["cam_a"]))
    b = np.flatnonzero((pids == row["pid"]) & (cams == row["cam_b"]))
    between = jac[np.ix_(a, b)]
    joined_at, purity_there = None, None
    for s in eps_sweep(jac, c.eps_grid, gt=pids, min_samples=c.min_samples, return_labels=True):
        lab = s["labels"]
        if np.intersect1d(lab[a][lab[a] >= 0], lab[b][lab[b] >= 0]).size:
            joined_at, purity_there = s["eps"], s["purity"]
            break
    where = lambda d: ", ".join(f"{n} in {'noise' if k < 0 else 'cluster ' + str(k)}" for k, n in sorted(d.items()))
    text = (f"Person {row['pid']}: camera C{row['cam_a'] + 1} -> {where(row['clusters_a'])}; camera "
            f"C{row['cam_b'] + 1} -> {where(row['clusters_b'])} ({row['joined']} of {row['pairs']} cross-camera pairs "
            f"joined at eps {c.eps:g}). Between the two cameras the Jaccard distance is at least "
            f"{between.min():.3f} (median {np.median(between):.3f}). ")
    if joined_at is None:
        text += ("No eps of the grid puts the two sides in one cluster: their images share almost no reciprocal "
                 "neighbours, so no eps can join them without joining everything.")
    elif joined_at <= c.eps:
        text += (f"They already share a cluster at eps {joined_at:g} (purity {purity_there:.3f}): for this person "
                 "the ImageNet features are enough.")
    else:
        text += (f"They first share a cluster at eps {joined_at:g}, where purity is {purity_there:.3f}: "
                 + ("other people merge too, so raising eps is not the fix." if purity_there < 0.9 else
                    "the clustering is still fairly pure there, so this person sits close to the profile's eps."))
    return {"pid": row["pid"], "cameras": (row["cam_a"], row["cam_b"]),
            "clusters_a": row["clusters_a"], "clusters_b": row["clusters_b"], "status": row["status"],
            "min_distance": float(between.min()), "median_distance": float(np.median(between)),
            "joined_at_eps": joined_at, "purity_at_that_eps": purity_there, "explanation": _report(text)}


def exercise_4(ctx, min_samples_values=(4, 8, 9, 12)):
    """min_samples against tracklets of eight frames: the clusters, outliers and purity at the
    profile's eps for each min_samples, and the size of the sample's tracklets."""
    c = ctx.profile.cluster
    ds, feats, pids, cams = _truth(ctx)
    tracklet_size = int(np.median(np.unique([r.tracklet for r in ds.train], return_counts=True)[1]))
    jac = jaccard_distance(feats, k1=c.k1, k2=c.k2, device=ctx.device)
    rows = []
    for ms in min_samples_values:
        labels = dbscan_labels(jac, eps=c.eps, min_samples=ms)
        st = cluster_stats(labels, pids)
        rows.append({"min_samples": ms, "clusters": st["num_clusters"], "outliers": st["num_outliers"],
                     "purity": st["purity"]})
    lines = ["min_samples  clusters  outliers  purity"]
    lines += [f"{r['min_samples']:11d} {r['clusters']:9d} {r['outliers']:9d} {r['purity']:7.3f}" for r in rows]
    steps = [(a, b, b["outliers"] - a["outliers"]) for a, b in zip(rows, rows[1:])]
    a, b, jump = max(steps, key=lambda t: t[2])
    crosses = a["min_samples"] <= tracklet_size < b["min_samples"]
    lines.append(
        f"The biggest jump in outliers, {jump:+d}, comes from min_samples {a['min_samples']} to {b['min_samples']}"
        + (f", across the tracklet length of {tracklet_size} frames. A core point needs min_samples images within "
           f"eps, itself included; one tracklet supplies at most {tracklet_size}, so past that a frame is core only "
           "if another tracklet is close too, and the tracklets whose person has no second close tracklet turn to "
           "noise together. Keep min_samples well below the tracklet length on video data."
           if crosses else
           f". The tracklets have {tracklet_size} frames, so the jump is not at the tracklet length here: at the "
           "profile's eps many frames of one tracklet are not within eps of each other, and core points thin out "
           "earlier."))
    return {"rows": rows, "tracklet_size": tracklet_size, "largest_jump": (a["min_samples"], b["min_samples"], jump),
            "explanation": _report("\n".join(lines))}


def exercise_5(ctx, quantiles=(0.005, 0.01, 0.02, 0.03, 0.05, 0.1)):
    """Why not DBSCAN on the Euclidean distance? DBSCAN on the dense squared Euclidean distance
    2 - 2 x_p.x_q with eps at the given quantiles of the pair distances, against the Jaccard distance
    over the profile's eps grid; both scored with every image counted (outliers as singletons)."""
    c = ctx.profile.cluster
    _, feats, pids, cams = _truth(ctx)
    x = feats.astype(np.float64)
    eucl = np.maximum(2 - 2 * x @ x.T, 0)
    pair_d = eucl[np.triu_indices(len(x), 1)]
    euclid_rows = []
    for q in quantiles:
        eps = float(np.quantile(pair_d, q))
        labels = dbscan_labels(eucl, eps=eps, min_samples=c.min_samples)
        st, split = cluster_stats(labels, pids), camera_split_purity(labels, pids, cams)
        euclid_rows.append({"quantile": q, "eps": eps, "clusters": st["num_clusters"],
                            "outliers": st["num_outliers"], "ari": st["ari"], "ari_all": st["ari_all"],
                            "across_cameras_recall": split["across_cameras"]["recall"]})
    jaccard_rows = _jaccard_sweep(ctx, feats, pids, cams)
    best_e = max(euclid_rows, key=lambda r: r["ari_all"])
    best_j = max(jaccard_rows, key=lambda r: r["ari_all"])
    good_j = [r["eps"] for r in jaccard_rows if r["ari_all"] > 0.8 * best_j["ari_all"]]
    good_e = [r["quantile"] for r in euclid_rows if r["ari_all"] > 0.8 * best_e["ari_all"]]
    after = euclid_rows[euclid_rows.index(best_e) + 1] if best_e is not euclid_rows[-1] else None
    lines = ["quantile      eps  clusters  outliers  ARI (all images)  across-camera recall"]
    lines += [f"{r['quantile']:8.3f} {r['eps']:8.4f} {r['clusters']:9d} {r['outliers']:9d} {r['ari_all']:17.3f} "
              f"{r['across_cameras_recall']:21.3f}" for r in euclid_rows]
    text = (f"Best Euclidean ARI {best_e['ari_all']:.3f} (quantile {best_e['quantile']:g}) against best Jaccard ARI "
            f"{best_j['ari_all']:.3f} (eps {best_j['eps']:g}); "
            + ("the Jaccard distance wins. " if best_j["ari_all"] > best_e["ari_all"] else
               "the Euclidean distance does as well here. ")
            + f"Within 80 % of its best, Jaccard keeps {len(good_j)} of {len(jaccard_rows)} eps values and Euclidean "
            f"{len(good_e)} of {len(euclid_rows)} quantiles. ")
    if after is not None:
        text += (f"Just above the best Euclidean eps (quantile {after['quantile']:g}) there are {after['clusters']} "
                 f"clusters and ARI {after['ari_all']:.3f}: "
                 + ("DBSCAN chains through look-alikes and a few bridging pairs merge the clusters into a handful."
                    if after["clusters"] < best_e["clusters"] / 2 else
                    "the clusters survive this step; the chaining comes at a slightly larger eps."))
    text += (f" Across-camera recall: {best_e['across_cameras_recall']:.2f} (Euclidean) and "
             f"{best_j['across_cameras_recall']:.2f} (Jaccard): both start from the same features.")
    lines.append(text)
    return {"euclidean": euclid_rows, "jaccard": jaccard_rows, "best_euclidean": best_e, "best_jaccard": best_j,
            "explanation": _report("\n".join(lines))}
