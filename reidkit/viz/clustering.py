"""Figures and the eps widget of notebook 03 (clustering): neighbour lists, distance histograms,
the eps sweep, the tracklet x cluster table, one person's cameras, an eps slider, and a
toy picture of the k-reciprocal expansion R*."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np

from reidkit.hhcl.clustering import camera_split_purity, cluster_stats, dbscan_labels
from reidkit.retrieval.jaccard import _kreciprocal_encoding
from reidkit.viz.base import GREEN, GREY, RED, image_grid

_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")


def neighbours_figure(records: Sequence, rank: np.ndarray, i: int, k: int = 8):
    """Image ``i`` and its ``k`` nearest neighbours (``rank``: a self-first kNN table with at least
    ``k + 1`` columns). Green border = k-reciprocal (``i`` is also in the neighbour's first
    ``k + 1`` entries), grey = one-way. Titles give the true identity and camera, which the method
    never sees."""
    neigh = [int(j) for j in rank[i, 1:k + 1]]
    recip = [i in rank[j, :k + 1] for j in neigh]
    paths = [records[i].path] + [records[j].path for j in neigh]
    titles = [f"image {i}\nid {records[i].pid} C{records[i].camid + 1}"]
    titles += [f"id {records[j].pid} C{records[j].camid + 1}" + ("\nreciprocal" if r else "")
               for j, r in zip(neigh, recip)]
    colors = [None] + [GREEN if r else GREY for r in recip]
    return image_grid(paths, titles, ncols=k + 1, border_colors=colors,
                      suptitle=f"image {i}: its {k} nearest neighbours (green = {k}-reciprocal)")


def distance_histograms(euclidean: np.ndarray, jaccard: np.ndarray, same_id: np.ndarray,
                        same_cam: np.ndarray | None = None):
    """Histograms of pair distances, same identity against different identity, for the squared
    Euclidean and the Jaccard distance (1-D arrays over the same pairs). With ``same_cam``, the
    same-identity pairs are split into within-camera and across-camera pairs."""

    same_id = np.asarray(same_id, bool)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
    for ax, d, name in ((axes[0], euclidean, r"squared Euclidean $2 - 2\,x_i^\top x_j$"),
                        (axes[1], jaccard, r"Jaccard $d_J$")):
        d = np.asarray(d)
        bins = np.linspace(min(0.0, d.min()), max(1.0, d.max()), 41)
        if same_cam is None:
            groups = [(~same_id, GREY, 0.5, "different identity"), (same_id, GREEN, 0.6, "same identity")]
        else:
            sc = np.asarray(same_cam, bool)
            groups = [(~same_id, GREY, 0.5, "different identity"),
                      (same_id & sc, GREEN, 0.6, "same identity, same camera"),
                      (same_id & ~sc, RED, 0.6, "same identity, other camera")]
        for mask, colour, alpha, label in groups:
            if mask.any():  # an empty group has no density
                ax.hist(d[mask], bins=bins, alpha=alpha, density=True, color=colour, label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("distance")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("density")
    fig.tight_layout()
    return fig


def eps_sweep_figure(sweep: Sequence[dict], splits: Sequence[dict] | None = None,
                     eps: float | None = None, num_ids: int | None = None):
    """The eps sweep: clusters, outliers, NMI / ARI and, with ``splits`` (one
    :func:`reidkit.hhcl.clustering.camera_split_purity` per eps), the pair recall within a camera and
    across cameras. ``eps`` draws the profile's value, ``num_ids`` the true number of identities."""

    e = [s["eps"] for s in sweep]
    n = 4 if splits is not None else 3
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.0))
    axes[0].plot(e, [s["num_clusters"] for s in sweep], marker="o")
    axes[0].set_title("clusters", fontsize=10)
    if num_ids is not None:
        axes[0].axhline(num_ids, color=GREY, ls="--", lw=1, label="true identities")
        axes[0].legend(fontsize=7)
    axes[1].plot(e, [s["num_outliers"] for s in sweep], marker="o", color="#8c564b")
    axes[1].set_title("outliers (dropped)", fontsize=10)
    axes[2].plot(e, [s["nmi"] for s in sweep], marker="o", label="NMI")
    axes[2].plot(e, [s["ari"] for s in sweep], marker="o", label="ARI")
    axes[2].plot(e, [s["purity"] for s in sweep], marker=".", ls=":", label="purity")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title("agreement with the hidden identities", fontsize=10)
    axes[2].legend(fontsize=7)
    if splits is not None:
        axes[3].plot(e, [s["within_camera"]["recall"] for s in splits], marker="o", color=GREEN,
                     label="within a camera")
        axes[3].plot(e, [s["across_cameras"]["recall"] for s in splits], marker="o", color=RED,
                     label="across cameras")
        axes[3].set_ylim(0, 1.02)
        axes[3].set_title("same-person pairs joined", fontsize=10)
        axes[3].legend(fontsize=7)
    for ax in axes:
        if eps is not None:
            ax.axvline(eps, color="black", lw=0.8, ls=":")
        ax.set_xlabel("eps")
    fig.tight_layout()
    return fig


def contingency_figure(labels: np.ndarray, pids: np.ndarray, camids: np.ndarray,
                       tracklets: np.ndarray | None = None, title: str | None = None, ax=None):
    """Tracklets (rows: identity, camera, tracklet) against clusters (columns, outliers last):
    each cell counts the images of that tracklet in that cluster. Rows of one identity share a
    colour on the left; a person seen by two cameras has its rows marked in red."""

    lab = np.asarray(labels).astype(np.int64)
    pid = np.asarray(pids).astype(np.int64)
    cam = np.asarray(camids).astype(np.int64)
    trk = np.asarray(tracklets).astype(np.int64) if tracklets is not None else cam
    keys = sorted(set(zip(pid.tolist(), cam.tolist(), trk.tolist())))
    row_of = {k: r for r, k in enumerate(keys)}
    # columns: clusters ordered by their first row, so the table reads as a staircase
    rows = np.array([row_of[k] for k in zip(pid.tolist(), cam.tolist(), trk.tolist())])
    clusters = sorted({int(c) for c in lab if c >= 0}, key=lambda c: (rows[lab == c].min(), c))
    cols = clusters + ([-1] if (lab < 0).any() else [])
    col_of = {c: j for j, c in enumerate(cols)}
    table = np.zeros((len(keys), max(1, len(cols))), dtype=np.int64)
    np.add.at(table, (rows, [col_of[int(c)] for c in lab]), 1)
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(cols) + 2.5), max(3.0, 0.2 * len(keys) + 1.2)))
    else:
        fig = ax.figure
    ax.imshow(np.where(table > 0, table, np.nan), cmap="viridis", aspect="auto", interpolation="nearest",
              vmin=0, vmax=max(1, int(table.max())))
    for (r, j) in zip(*np.nonzero(table)):
        ax.text(j, r, str(table[r, j]), ha="center", va="center", fontsize=6,
                color="black" if table[r, j] > table.max() / 2 else "white")
    multi = {p for p in set(pid.tolist()) if np.unique(cam[pid == p]).size > 1}
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels([f"id {p} C{c + 1}" + (f" t{t}" if tracklets is not None else "") for p, c, t in keys],
                       fontsize=6)
    for tick, (p, _, _) in zip(ax.get_yticklabels(), keys):
        tick.set_color(RED if p in multi else "black")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([str(c) if c >= 0 else "out" for c in cols], fontsize=6, rotation=90)
    ax.set_xlabel("cluster (out = outliers)")
    ax.set_title(title or "tracklets (rows) against clusters (columns); red = person seen by 2 cameras",
                 fontsize=9)
    if own:
        fig.tight_layout()
    return fig


def cross_camera_figure(records: Sequence, labels: np.ndarray, pid: int, per_camera: int = 4):
    """One person's images in every camera that sees them (``per_camera`` each), titled with the
    DBSCAN cluster each image landed in; the border colour is the cluster (grey = outlier)."""
    lab = np.asarray(labels).astype(np.int64)
    idx = [i for i, r in enumerate(records) if r.pid == pid]
    cams = sorted({records[i].camid for i in idx})
    chosen = []
    for c in cams:
        mine = [i for i in idx if records[i].camid == c]
        pick = np.linspace(0, len(mine) - 1, min(per_camera, len(mine))).round().astype(int)
        chosen += [mine[p] for p in pick]
    seen = sorted({int(lab[i]) for i in chosen if lab[i] >= 0})
    colour = {c: _PALETTE[k % len(_PALETTE)] for k, c in enumerate(seen)}
    titles = [f"C{records[i].camid + 1} " + (f"cluster {lab[i]}" if lab[i] >= 0 else "outlier") for i in chosen]
    borders = [colour.get(int(lab[i]), GREY) for i in chosen]
    return image_grid([records[i].path for i in chosen], titles, ncols=len(chosen), border_colors=borders,
                      suptitle=f"identity {pid} in cameras {', '.join('C%d' % (c + 1) for c in cams)}: "
                               "where DBSCAN put each image (same colour = same cluster)")


def eps_widget(dist: Any, eps_grid: Sequence[float], pids: np.ndarray, camids: np.ndarray,
               tracklets: np.ndarray | None = None, min_samples: int = 4, value: float | None = None):
    """An eps slider over ``eps_grid`` (the profile's ``cluster.eps_grid``) that reruns DBSCAN on
    the precomputed Jaccard matrix ``dist`` and shows the counts, NMI / ARI, the within- and
    across-camera pair recall and the tracklet x cluster table. Each eps is clustered once and
    cached; the Jaccard matrix is never recomputed."""
    import ipywidgets as widgets  # optional: needs a notebook front end (the GPU machine has none)
    from IPython.display import display

    grid = [round(float(e), 4) for e in eps_grid]
    start = min(grid, key=lambda e: abs(e - (value if value is not None else grid[len(grid) // 2])))
    cache: dict[float, tuple] = {}

    def at(eps: float):
        if eps not in cache:
            lab = dbscan_labels(dist, eps=eps, min_samples=min_samples)
            cache[eps] = (lab, cluster_stats(lab, pids), camera_split_purity(lab, pids, camids))
        return cache[eps]

    slider = widgets.SelectionSlider(options=grid, value=start, description="eps", continuous_update=False)
    out = widgets.Output()

    def render(*_):
        eps = slider.value
        lab, st, sp_ = at(eps)
        w, a = sp_["within_camera"], sp_["across_cameras"]
        with out:
            out.clear_output(wait=True)
            print(f"eps {eps:.2f}: {st['num_clusters']} clusters for {st['num_gt_ids']} people, "
                  f"{st['num_outliers']} outliers dropped | NMI {st['nmi']:.3f}  ARI {st['ari']:.3f}  "
                  f"purity {st['purity']:.3f}\nsame-person pairs joined: within a camera "
                  f"{w['joined_same_id']}/{w['same_id_pairs']}, across cameras "
                  f"{a['joined_same_id']}/{a['same_id_pairs']}")
            fig = contingency_figure(lab, pids, camids, tracklets, title=f"eps = {eps:.2f}")
            display(fig)
            plt.close(fig)

    slider.observe(render, names="value")
    render()
    return widgets.VBox([slider, out])


# --------------------------------------------------------------------------------------------
# the expansion R*(p, k) on a toy 2-D point set
# --------------------------------------------------------------------------------------------
def _toy_points(seed: int = 5) -> np.ndarray:
    """Four loose groups of 2-D points (a stand-in for four people's images)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [1.6, 0.3], [0.7, 1.5], [-1.2, 1.2]])
    return np.concatenate([c + 0.45 * rng.standard_normal((6, 2)) for c in centres])


def kreciprocal_toy(points: np.ndarray | None = None, p: int = 0, k: int = 8, seed: int = 5) -> dict:
    """N(p,k), R(p,k) and the expansion R*(p,k) of one point ``p`` of a small 2-D set, computed with
    plain Python sets and checked against the kit's own kernel (the support of the k-reciprocal
    encoding of :mod:`reidkit.retrieval.jaccard` before query expansion is exactly R*).

    The conventions are those of ``jaccard_distance``: a neighbour list counts the point itself
    (N(p,k) holds p and its k-1 nearest others, ties by the lower index); the half sets use
    ``round(k/2) + 1`` list entries, capped at k; a candidate g of R(p,k) is accepted when
    ``|R(p,k) & R(g,k/2)| > 2/3 |R(g,k/2)|``. Returns the points, the sets and, per candidate, its
    half set, overlap and verdict."""
    x = _toy_points(seed) if points is None else np.asarray(points, dtype=np.float64)
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    order = d.copy()
    np.fill_diagonal(order, -1.0)                          # every point first in its own list
    rank = np.argsort(order, axis=1, kind="stable")
    n_half = min(int(np.around(k / 2)) + 1, k)

    def recip(i: int, width: int) -> set:
        return {int(g) for g in rank[i, :width] if i in rank[g, :width]}

    R = recip(p, k)
    candidates = []
    star = set(R)
    for g in sorted(R):
        half = recip(g, n_half)
        inside = len(half & R)
        ok = 3 * inside > 2 * len(half)
        candidates.append({"g": g, "half": half, "inside": inside, "accepted": ok, "adds": half - R if ok else set()})
        if ok:
            star |= half
    v = _kreciprocal_encoding(rank, k, n_half, 1, lambda r, c: d[r, c])
    kit = set(v.indices[v.indptr[p]:v.indptr[p + 1]].tolist())
    if kit != star:
        raise AssertionError(f"R* by hand {sorted(star)} differs from the kit's {sorted(kit)}")
    return {"points": x, "p": p, "k": k, "n_half": n_half, "N": {int(g) for g in rank[p, :k]},
            "R": R, "R_star": star, "kit_R_star": kit, "candidates": candidates}


def kreciprocal_toy_figure(toy: dict):
    """Two panels for :func:`kreciprocal_toy`. Left: N(p,k), with the reciprocal members R(p,k)
    filled. Right: the expansion; every candidate g of R(p,k) is labelled with how many members of
    its half set R(g,k/2) lie inside R(p,k), green when more than 2/3 (accepted), red otherwise, and
    a line joins g to each member of its half set that lies outside R(p,k): the points an accepted
    set adds to R* (orange diamonds), or the ones that got a set rejected."""
    x, p, k = toy["points"], toy["p"], toy["k"]
    near = sorted(toy["N"] | toy["R_star"] | set().union(*(c["half"] for c in toy["candidates"])))
    lo, hi = x[near].min(0), x[near].max(0)
    pad = 0.25 * (hi - lo).max()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax in axes:
        ax.scatter(x[:, 0], x[:, 1], s=30, color="#cccccc", zorder=1)
        ax.scatter(*x[p], marker="*", s=260, color="black", zorder=5)
        ax.annotate("p", x[p], xytext=(7, 5), textcoords="offset points", fontsize=11)
        ax.set_xlim(lo[0] - pad, hi[0] + pad)
        ax.set_ylim(lo[1] - pad, hi[1] + pad)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[0]
    for g in sorted(toy["N"] - {p}):
        recip = g in toy["R"]
        ax.plot(*zip(x[p], x[g]), color="#1f77b4" if recip else GREY, ls="-" if recip else "--", lw=1.2, zorder=2)
        ax.scatter(*x[g], s=70, zorder=3, color="#1f77b4" if recip else "white", edgecolors="#1f77b4")
    ax.set_title(f"N(p,{k}): {len(toy['N'])} points, p included\nfilled: R(p,{k}), {len(toy['R'])} points "
                 "(hollow: p lists them, they do not list p)", fontsize=9)
    ax = axes[1]
    rx = x[sorted(toy["R"])]
    ax.scatter(rx[:, 0], rx[:, 1], s=70, color="#1f77b4", zorder=3, label=f"R(p,{k})")
    for c in toy["candidates"]:
        if c["g"] == p:
            continue
        colour = GREEN if c["accepted"] else RED
        for h in sorted(c["half"] - toy["R"]):
            ax.plot(*zip(x[c["g"]], x[h]), color=colour, lw=1.3, ls="-" if c["accepted"] else ":", zorder=2)
        ax.annotate(f"{c['inside']} of {len(c['half'])}", x[c["g"]], xytext=(6, -12), textcoords="offset points",
                    fontsize=8, color=colour, fontweight="bold")
    added = sorted(toy["R_star"] - toy["R"])
    if added:
        ax.scatter(x[added, 0], x[added, 1], s=110, marker="D", color="#ff7f0e", zorder=4, label="added to R*")
    ax.plot([], [], color=GREEN, label="accepted: more than 2/3 inside")
    ax.plot([], [], color=RED, ls=":", label="rejected")
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"R*(p,{k}): R(p,{k}) plus the accepted R(g,{k}/2), {len(toy['R_star'])} points\n"
                 f"label at g: members of R(g,{k}/2) inside R(p,{k}), of all", fontsize=9)
    fig.tight_layout()
    return fig
