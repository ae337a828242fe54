"""Figures of camera bias: the distances of same/different people within and across cameras, and a
2-D embedding coloured by identity and by camera (from :mod:`reidkit.retrieval.camera_bias`)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from reidkit.viz.base import GREEN, GREY, RED

_CAMERA_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
_GROUP_STYLE = {  # name: (colour, line style, legend)
    "same_id_same_cam": (GREEN, "-", "same person, same camera"),
    "same_id_cross_cam": (RED, "-", "same person, other camera"),
    "diff_id_same_cam": ("#555555", "--", "different people, same camera"),
    "diff_id_cross_cam": (GREY, ":", "different people, other camera"),
}


def camera_bias_figure(groups: dict, coords: np.ndarray, pids: Sequence[int], cams: Sequence[int],
                       title: str | None = None, max_ids: int = 40):
    """Three panels: the four pair-distance distributions of
    :func:`reidkit.retrieval.camera_bias.camera_distance_groups` (``groups``), then the 2-D embedding
    ``coords`` (rows matching ``pids`` and ``cams``, e.g. ``pids[index]`` for the ``index`` of
    :func:`~reidkit.retrieval.camera_bias.embedding_2d`) coloured by identity and by camera.

    In the identity panel the marker is the camera; the ``max_ids`` identities with the most
    cameras (then images) are coloured, the others drawn small and grey, so a person split by
    camera shows as one colour in two places."""

    pid = np.asarray(pids).astype(np.int64).ravel()
    cam = np.asarray(cams).astype(np.int64).ravel()
    xy = np.asarray(coords, dtype=float)
    if not len(xy) == pid.size == cam.size:
        raise ValueError(f"sizes differ: coords {len(xy)}, pids {pid.size}, cams {cam.size}")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))

    ax = axes[0]
    dist = groups["distances"]
    filled = [d for d in dist.values() if len(d)]
    lo = min(float(d.min()) for d in filled) if filled else 0.0
    hi = max(float(d.max()) for d in filled) if filled else 1.0
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 51)
    for name, (colour, ls, label) in _GROUP_STYLE.items():
        d = dist[name]
        if len(d) == 0:
            continue
        tag = f"{label} ({groups['counts'][name]:,}" + (", sampled)" if groups["sampled"][name] else ")")
        ax.hist(d, bins=bins, density=True, histtype="step", lw=1.8, color=colour, ls=ls, label=tag)
        ax.axvline(float(np.median(d)), color=colour, ls=ls, lw=0.8)
    share = groups["summary"].get("cross_cam_pos_beyond_same_cam_neg_median")
    names = {"sqeuclidean": r"squared Euclidean $|x_i - x_j|^2$", "cosine": "cosine distance"}
    metric = names[groups["metric"]]
    ax.set_xlabel(metric + " (vertical lines: medians)")
    ax.set_ylabel("density")
    ax.set_title("pair distances" + ("" if share is None else
                 f": {100 * share:.0f}% of cross-camera same-person pairs\nare farther than the median "
                 "same-camera stranger"), fontsize=9)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.9)

    ids, n_cams, n_imgs = [], [], []
    for p in np.unique(pid):
        ids.append(p)
        n_cams.append(np.unique(cam[pid == p]).size)
        n_imgs.append(int((pid == p).sum()))
    order = np.lexsort((np.array(ids), -np.array(n_imgs), -np.array(n_cams)))
    shown = [ids[k] for k in order[:max_ids]]
    cmap = plt.get_cmap("tab20")
    cam_values = np.unique(cam)
    marker_of = {c: _MARKERS[k % len(_MARKERS)] for k, c in enumerate(cam_values)}
    ax = axes[1]
    rest = ~np.isin(pid, shown)
    ax.scatter(xy[rest, 0], xy[rest, 1], s=4, color="#dddddd", lw=0)
    for k, p in enumerate(shown):
        for c in cam_values:
            m = (pid == p) & (cam == c)
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=18, color=cmap(k % 20), marker=marker_of[c], lw=0.3,
                           edgecolor="black")
    for c in cam_values:
        ax.scatter([], [], marker=marker_of[c], color="white", edgecolor="black", label=f"C{c + 1}")
    ax.legend(fontsize=7, title="marker = camera", title_fontsize=7, loc="best")
    ax.set_title(f"coloured by identity ({len(shown)} of {len(ids)} people in colour)", fontsize=9)

    ax = axes[2]
    for k, c in enumerate(cam_values):
        m = cam == c
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=_CAMERA_COLOURS[k % len(_CAMERA_COLOURS)], lw=0,
                   label=f"C{c + 1} ({int(m.sum())})")
    ax.legend(fontsize=7, markerscale=2, loc="best")
    ax.set_title("coloured by camera", fontsize=9)
    for ax in axes[1:]:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
