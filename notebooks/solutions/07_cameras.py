"""Worked solutions to the exercises of notebook 07 (cameras: camera bias, centring, CA-Jaccard, CAP).

Each ``exercise_K(ctx)`` takes a :class:`reidkit.course.runctx.RunContext` (any HHCL profile; the tests
use the smoke profile on the embedded sample) and returns a dict with the measured numbers and a
``"conclusion"`` written from those numbers, never a fixed text. Nothing here is library code: it is
what a student could have written in the notebook, calling reidkit.
"""

from __future__ import annotations

import numpy as np

from reidkit.config import apply_overrides
from reidkit.hhcl.cap import proxy_index
from reidkit.hhcl.clustering import dbscan_labels
from reidkit.hhcl.label_quality import pseudo_label_quality
from reidkit.hhcl.method import cluster
from reidkit.retrieval.ca_jaccard import ca_jaccard_distance
from reidkit.retrieval.camera_bias import camera_centred, camera_distance_groups, per_camera_means

#: the profile's clustering with every camera-aware part off (HHCL as released)
PLAIN = {"camera.centre": False, "camera.jaccard": "plain"}
#: the clustering of the camera-aware recipe (``--camera-aware``): centring and CA-Jaccard
RECIPE = {"camera.centre": True, "camera.jaccard": "ca"}


def _truth(ctx):
    """Training features, true identities and cameras of the run (the truth only scores)."""
    ds = ctx.dataset()
    feats = ctx.features("train")
    pids = np.array([r.pid for r in ds.train])
    cams = np.array([r.camid for r in ds.train])
    return feats, pids, cams


def _row(labels, pids, cams, **extra):
    """One table row: the counts and scores of a clustering."""
    q = pseudo_label_quality(labels, pids, cams)
    return {**extra, "clusters": q["num_clusters"], "outliers": q["num_outliers"], "ari": q["ari"],
            "purity": q["purity"] or 0.0, "join_rate": q["cross_camera_join_rate"] or 0.0,
            "ids_joined": round((q["ids_joined_across_share"] or 0.0) * q["ids_multi_camera"]),
            "ids_multi_camera": q["ids_multi_camera"]}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0%}"


def _moved(a: float, b: float) -> str:
    return "rose" if b > a else "fell" if b < a else "stayed"


def exercise_1(ctx):
    """Predict, then measure: how much of a feature is the camera?

    Question: what share of the feature variance do the camera means explain (rho) for the raw
    features, the camera-centred ones and the raw ones with shuffled camera labels? Does centring
    bring one person's cross-camera pairs closer relative to same-camera strangers (the ratio of the
    two medians)? How many people does each camera see, and what does that do to its mean?
    """
    feats, pids, cams = _truth(ctx)
    rng = np.random.default_rng(ctx.seed)
    centred = camera_centred(feats, cams)
    rho = {"raw": per_camera_means(feats, cams)["camera_variance_share"],
           "centred": per_camera_means(centred, cams)["camera_variance_share"],
           "shuffled": per_camera_means(feats, rng.permutation(cams))["camera_variance_share"]}
    ratio = {}
    for name, x in (("raw", feats), ("centred", centred)):
        s = camera_distance_groups(x, pids, cams, seed=ctx.seed)["summary"]
        ratio[name] = s["median_same_id_cross_cam"] / s["median_diff_id_same_cam"]
    ids_per_camera = {int(c): len(set(pids[cams == c])) for c in np.unique(cams)}
    few = sorted(c for c, n in ids_per_camera.items() if n <= 3)
    closer = ratio["centred"] < ratio["raw"]
    conclusion = (
        f"The camera means explain {rho['raw']:.1%} of the feature variance, against {rho['shuffled']:.1%} "
        f"for shuffled camera labels; after centring {rho['centred']:.2%}. Relative to same-camera strangers, "
        f"one person's cross-camera pairs moved {'closer' if closer else 'farther'} (ratio of medians "
        f"{ratio['raw']:.3f} -> {ratio['centred']:.3f}). {len(few)} of {len(ids_per_camera)} cameras see at "
        f"most 3 people, so their mean is largely those people's mean: "
        + ("rho counts identity as well as camera, and centring removed part of the identity with it."
           if not closer else
           "even so, subtracting the camera means helped the cross-camera pairs here."))
    return {"rho": rho, "median_ratio": ratio, "ids_per_camera": ids_per_camera,
            "cameras_with_few_people": few, "centring_brought_closer": closer, "conclusion": conclusion}


def exercise_2(ctx, k1_inter_values=(0, 2, 5, 10, 20)):
    """Predict, then measure: how many inter-camera neighbours?

    Question: with CA-Jaccard (``camera.jaccard="ca"``, no centring) at the profile's eps, how do the
    cross-camera join rate and the purity move as ``camera.k1_inter`` grows? Which value has the best
    ARI, and does it beat the plain clustering?
    """
    feats, pids, cams = _truth(ctx)
    plain_labels, _ = cluster(feats, apply_overrides(ctx.profile, PLAIN), ctx.device, cams)
    plain = _row(plain_labels, pids, cams, k1_inter=None)
    rows = []
    for k in k1_inter_values:
        prof = apply_overrides(ctx.profile, {"camera.centre": False, "camera.jaccard": "ca", "camera.k1_inter": k})
        labels, _ = cluster(feats, prof, ctx.device, cams)
        rows.append(_row(labels, pids, cams, k1_inter=k))
    first, last = rows[0], rows[-1]
    best = max(rows, key=lambda r: r["ari"])
    conclusion = (
        f"From k1_inter={first['k1_inter']} to {last['k1_inter']} the cross-camera join rate "
        f"{_moved(first['join_rate'], last['join_rate'])} from {first['join_rate']:.3f} to {last['join_rate']:.3f} "
        f"and the purity {_moved(first['purity'], last['purity'])} from {first['purity']:.3f} to "
        f"{last['purity']:.3f}. The best ARI, {best['ari']:.3f} at k1_inter={best['k1_inter']}, is "
        f"{'above' if best['ari'] > plain['ari'] else 'below'} the plain clustering's {plain['ari']:.3f} "
        f"(plain join rate {plain['join_rate']:.3f}, purity {plain['purity']:.3f}): "
        + ("on this data more inter-camera neighbours join people more than they join cameras."
           if best["ari"] <= plain["ari"] else "on this data the inter-camera neighbours pay off."))
    return {"plain": plain, "rows": rows, "best": best, "conclusion": conclusion}


def exercise_3(ctx):
    """Turn off CLQE.

    Question: cluster (DBSCAN at the profile's eps) with the CA-Jaccard distance with both parts on,
    with CKRNNs and plain query expansion (``clqe=False``), and with neither. Which part costs the
    purity? What share of CLQE's inter-camera rows show a stranger, for people seen by one camera
    and by two?
    """
    feats, pids, cams = _truth(ctx)
    c, cam = ctx.profile.cluster, ctx.profile.camera
    kw = {"k1": c.k1, "k2": c.k2, "k1_intra": cam.k1_intra, "k1_inter": cam.k1_inter,
          "k2_intra": cam.k2_intra, "k2_inter": cam.k2_inter, "device": ctx.device}
    rows, info = [], None
    for name, ckrnns, clqe in (("CKRNNs + CLQE", True, True), ("CKRNNs + LQE", True, False),
                               ("KRNNs + LQE", False, False)):
        dist, i = ca_jaccard_distance(feats, cams, ckrnns=ckrnns, clqe=clqe, return_info=True, **kw)
        info = i if info is None else info
        labels = dbscan_labels(dist, eps=c.eps, min_samples=c.min_samples)
        rows.append(_row(labels, pids, cams, distance=name))
    stranger = pids[info["rank_inter"][:, :cam.k2_inter]] != pids[:, None]
    multi = np.array([len(set(cams[pids == p])) > 1 for p in pids])
    share = {"one_camera": float(stranger[~multi].mean()) if (~multi).any() else None,
             "several_cameras": float(stranger[multi].mean()) if multi.any() else None}
    both, no_clqe, neither = rows
    cost_clqe = no_clqe["purity"] - both["purity"]
    cost_ckrnns = neither["purity"] - no_clqe["purity"]
    culprit = "CLQE" if cost_clqe >= cost_ckrnns else "CKRNNs"
    conclusion = (
        f"Purity is {both['purity']:.3f} with both parts, {no_clqe['purity']:.3f} without CLQE and "
        f"{neither['purity']:.3f} with neither (join rate {both['join_rate']:.3f}, {no_clqe['join_rate']:.3f}, "
        f"{neither['join_rate']:.3f}): {culprit} costs the most purity ({max(cost_clqe, cost_ckrnns):+.3f}). "
        f"Of the {cam.k2_inter} inter-camera rows CLQE averages into each vector, {_pct(share['one_camera'])} show "
        f"a stranger for people seen by one camera and {_pct(share['several_cameras'])} for people seen by "
        f"several, so CLQE mixes strangers into the vectors of everyone whom no second camera saw.")
    return {"rows": rows, "stranger_share": share, "purity_cost": {"CLQE": cost_clqe, "CKRNNs": cost_ckrnns},
            "culprit": culprit, "conclusion": conclusion}


def _proxy_counts(labels, cams) -> dict:
    labels = np.asarray(labels)
    clustered = labels >= 0
    if not clustered.any():
        return {"clusters": 0, "proxies": 0, "multi_camera_clusters": 0, "pullable_share": 0.0}
    plab, _, _ = proxy_index(labels, cams)
    per_cluster = np.bincount(plab, minlength=int(labels.max()) + 1)     # proxies (= cameras) per cluster
    pullable = per_cluster[labels[clustered]] > 1
    return {"clusters": int(labels.max()) + 1, "proxies": int(plab.size),
            "multi_camera_clusters": int((per_cluster > 1).sum()), "pullable_share": float(pullable.mean()),
            "cameras_per_cluster": per_cluster.tolist()}


def exercise_4(ctx):
    """Proxies against clusters.

    Question: how many CAP proxies are there per cluster for the plain clustering and for the
    recipe's (centred + CA-Jaccard)? How many clusters hold several cameras, and what share of the
    clustered images can the association loss pull across cameras?
    """
    feats, pids, cams = _truth(ctx)
    out = {}
    for name, ov in (("plain", PLAIN), ("recipe", RECIPE)):
        labels, _ = cluster(feats, apply_overrides(ctx.profile, ov), ctx.device, cams)
        out[name] = {**_proxy_counts(labels, cams), **_row(labels, pids, cams)}
    p, r = out["plain"], out["recipe"]
    parts = []
    for name, d in (("plain", p), ("recipe", r)):
        ratio = d["proxies"] / d["clusters"] if d["clusters"] else float("nan")
        parts.append(f"{name}: {d['proxies']} proxies for {d['clusters']} clusters (ratio {ratio:.2f}), "
                     f"{d['multi_camera_clusters']} clusters hold several cameras, {d['pullable_share']:.0%} of "
                     f"the clustered images can be pulled across cameras, purity {d['purity']:.3f}")
    conclusion = (
        "; ".join(parts) + ". The extra proxies, proxies minus clusters, count exactly the camera joins the "
        "clustering made: CAP pulls across cameras only where the clusters already did, so "
        + ("the recipe gives the association loss more to work on, at the purity shown."
           if r["pullable_share"] > p["pullable_share"] else
           "here the recipe gives the association loss no more to work on than the plain clustering."))
    return {**out, "conclusion": conclusion}
