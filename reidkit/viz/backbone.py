"""Figures and the GeM widget of notebook 02 (the backbone): the network as a diagram, the final
feature map at last stride 1 and 2, where generalized-mean pooling takes its value from, the
pair distances of ImageNet features (no re-ID training), and the baselines a re-ID model must beat.

Small helpers feed them: :func:`gem_share` and :func:`gem_values` (which cells of the map a GeM
pool draws on, and what it gives per channel). The computations behind the figures live where they
belong: :func:`reidkit.retrieval.inspect.camera_share_by_rank` and :func:`reidkit.nets.features.pixel_features`."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import FancyBboxPatch

from reidkit.retrieval.inspect import camera_share_by_rank
from reidkit.viz.base import GREEN, GREY, RED, _thumb


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def gem_share(fmap, p: float, eps: float = 1e-6) -> np.ndarray:
    """How much each cell of a (C, h, w) map contributes to its GeM pool at power ``p``.

    For channel c the GeM value is ``(mean_x x_c^p)^(1/p)``; cell x contributes the fraction
    ``x_c^p / sum_x' x_c'^p`` of the mean. The result is that fraction averaged over the channels
    (channels that are zero everywhere are left out): an (h, w) array that sums to 1. At p = 1
    the cells share in proportion to their activation, and as p grows the share concentrates on
    each channel's strongest cell (max pooling)."""

    x = torch.as_tensor(fmap).float()
    if x.ndim != 3:
        raise ValueError(f"expected a (C, h, w) feature map, got shape {tuple(x.shape)}")
    alive = x.flatten(1).amax(dim=1) > eps
    if not bool(alive.any()):
        raise ValueError("every channel of the feature map is zero")
    x = x[alive].clamp(min=eps).double()
    # x^p / sum x^p, computed as a softmax of p * log x (no overflow at large p)
    share = torch.softmax(float(p) * x.flatten(1).log(), dim=1).mean(dim=0)
    return share.view(x.shape[1], x.shape[2]).numpy()


def gem_values(fmap, ps: Sequence[float], eps: float = 1e-6) -> np.ndarray:
    """GeM of every channel of a (C, h, w) map for each power in ``ps``: a (len(ps), C) array
    (p = inf gives max pooling)."""

    x = torch.as_tensor(fmap).double().clamp(min=eps).flatten(1)
    rows = [x.amax(dim=1) if np.isinf(p) else x.pow(p).mean(dim=1).pow(1.0 / p) for p in ps]
    return torch.stack(rows).numpy()


def _overlay(ax, image_path: str, heat: np.ndarray, size, title: str, grid: bool = True, cmap="magma"):
    """An image with a (h, w) heat map stretched over it, and the map's cell grid drawn."""
    img = _thumb(image_path, size)
    ax.imshow(img)
    H, W = img.shape[:2]
    h, w = heat.shape
    ax.imshow(heat, cmap=cmap, alpha=0.55, extent=(0, W, H, 0), interpolation="nearest")
    if grid:
        for i in range(1, h):
            ax.axhline(i * H / h, color="white", lw=0.4, alpha=0.6)
        for j in range(1, w):
            ax.axvline(j * W / w, color="white", lw=0.4, alpha=0.6)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------
def pipeline_diagram(arch: str, image_hw: tuple[int, int], map_shape: Sequence[int], pooling: str = "avg"):
    """The re-ID network as boxes: image -> backbone (last stride 1) -> C x h x w map -> pooling ->
    BN neck -> L2 normalisation -> a point on the unit sphere."""

    c, h, w = (int(v) for v in map_shape)
    H, W = image_hw
    boxes = [
        ("image", f"3 x {H} x {W}", "#f0f0f0"),
        (f"{arch}\nImageNet weights", "last stride 1\n(1/16 of the input)", "#dbe9f6"),
        ("feature map", f"{c} x {h} x {w}", "#dbe9f6"),
        ("GeM pooling", r"$(\frac{1}{|X|}\sum_x x^p)^{1/p}$", "#fde0c5") if pooling == "gem" else
        ("average pooling", r"$\frac{1}{|X|}\sum_x x$  (GeM, p = 1)", "#fde0c5"),
        ("BN neck", "BatchNorm1d,\nbias frozen at 0", "#fde0c5"),
        ("L2 normalise", r"$f = \hat{x} / \|\hat{x}\|_2$", "#d9f0d3"),
        ("feature f", f"{c}-d, $\\|f\\|_2 = 1$", "#d9f0d3"),
    ]
    fig, ax = plt.subplots(figsize=(13, 2.2))
    ax.set_xlim(0, len(boxes))
    ax.set_ylim(0, 1)
    ax.axis("off")
    for i, (name, sub, colour) in enumerate(boxes):
        ax.add_patch(FancyBboxPatch((i + 0.08, 0.18), 0.78, 0.64, boxstyle="round,pad=0.02",
                                    facecolor=colour, edgecolor="#555555"))
        ax.text(i + 0.47, 0.62, name, ha="center", va="center", fontsize=9, weight="bold")
        ax.text(i + 0.47, 0.36, sub, ha="center", va="center", fontsize=8)
        if i:
            ax.annotate("", xy=(i + 0.08, 0.5), xytext=(i - 0.12, 0.5),
                        arrowprops=dict(arrowstyle="->", color="#333333"))
    ax.text(3.0, 0.04, "trained for re-ID in notebooks 04 and 05; here: ImageNet weights, untouched",
            ha="center", fontsize=8, style="italic", color="#555555")
    fig.tight_layout()
    return fig


def stride_maps_figure(image_path: str, maps: Mapping[str, object], size=(256, 128)):
    """One image and, for each named (C, h, w) final map, the channel-mean activation stretched
    over the image with the map's cell grid: the same weights at last stride 2 and 1."""

    fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.0 * (1 + len(maps)), 3.6))
    axes[0].imshow(_thumb(image_path, size))
    axes[0].set_title("input", fontsize=8)
    axes[0].axis("off")
    for ax, (name, fmap) in zip(axes[1:], maps.items()):
        m = np.asarray(fmap, dtype=np.float32)
        _overlay(ax, image_path, m.mean(axis=0), size,
                 f"{name}\n{m.shape[0]} x {m.shape[1]} x {m.shape[2]}\n({m.shape[1] * m.shape[2]} cells)")
    fig.tight_layout()
    return fig


def gem_figure(image_path: str, fmap, p: float = 3.0, size=(256, 128), top: int = 5):
    """Where a GeM pool at power ``p`` takes its value from, on one image's (C, h, w) map.

    Left: the image. Middle: :func:`gem_share` over the image, with the effective number of cells
    it draws on (1 / sum share^2). Right: GeM of the ``top`` strongest channels as p goes from 1
    (average) towards max pooling (dashed lines), with the chosen p marked."""

    fmap = np.asarray(fmap, dtype=np.float32)
    share = gem_share(fmap, p)
    n_cells = share.size
    effective = 1.0 / float(np.sum(share ** 2))
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1, 3]})
    axes[0].imshow(_thumb(image_path, size))
    axes[0].set_title("input", fontsize=8)
    axes[0].axis("off")
    _overlay(axes[1], image_path, share, size,
             f"share of each cell, p = {p:g}\n~{effective:.0f} of {n_cells} cells count")
    strongest = np.argsort(-fmap.reshape(fmap.shape[0], -1).max(axis=1), kind="stable")[:top]
    ps = np.geomspace(1.0, 64.0, 60)
    curves = gem_values(fmap[strongest], ps)
    at_p = gem_values(fmap[strongest], [p])[0]
    ax = axes[2]
    for k, c in enumerate(strongest):
        line, = ax.plot(ps, curves[:, k], lw=1.5, label=f"channel {c}")
        ax.axhline(fmap[c].max(), color=line.get_color(), ls="--", lw=0.8)
        ax.plot([p], [at_p[k]], "o", color=line.get_color())
    ax.axvline(p, color=GREY, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("p (log scale): 1 = average pooling, dashed = max pooling")
    ax.set_ylabel("pooled value")
    ax.set_title(f"GeM of the {top} strongest channels", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def gem_widget(image_path: str, fmap, p: float = 3.0, size=(256, 128), p_max: float = 20.0):
    """A slider over GeM's power p (1 = average pooling) that redraws :func:`gem_figure`:
    watch the share of the cells move from the whole person onto a few peaks."""
    import ipywidgets as widgets  # optional: needs a notebook front end (the GPU machine has none)
    from IPython.display import display

    fmap = np.asarray(fmap, dtype=np.float32)
    slider = widgets.FloatSlider(value=float(p), min=1.0, max=float(p_max), step=0.5, description="GeM p",
                                 continuous_update=False, readout_format=".1f")
    out = widgets.Output()

    def render(*_):
        with out:
            out.clear_output(wait=True)
            fig = gem_figure(image_path, fmap, slider.value, size=size)
            display(fig)
            plt.close(fig)

    slider.observe(render, names="value")
    render()
    return widgets.VBox([slider, out])


def pair_distance_figure(dist, q_pids, g_pids, q_cams, g_cams, title: str = "", max_k: int = 50):
    """Left: histograms of query-gallery squared distances (features on the unit sphere) in three
    groups: same person from another camera (the matches that count), other person from the
    query's camera, other person from another camera; the top axis reads them as cosine similarity,
    ``cos = 1 - d / 2``, and the medians are marked. Right: :func:`camera_share_by_rank`, the share
    of the query's camera among its k nearest other-person images, against chance."""

    d = np.asarray(dist, dtype=np.float64)
    same_id = np.asarray(q_pids)[:, None] == np.asarray(g_pids)[None, :]
    same_cam = np.asarray(q_cams)[:, None] == np.asarray(g_cams)[None, :]
    groups = [(same_id & ~same_cam, GREEN, "same person, other camera"),
              (~same_id & same_cam, RED, "other person, same camera"),
              (~same_id & ~same_cam, GREY, "other person, other camera")]
    bins = np.linspace(max(0.0, d.min()), d.max(), 50)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    for mask, colour, label in groups:
        if mask.any():
            vals = d[mask]
            ax.hist(vals, bins=bins, density=True, alpha=0.45, color=colour,
                    label=f"{label} ({mask.sum()} pairs)")
            ax.axvline(np.median(vals), color=colour, lw=2)
    ax.set_xlabel(r"squared distance $\|a-b\|^2 = 2 - 2a^\top b$ (vertical lines: medians)")
    ax.set_ylabel("density")
    top = ax.secondary_xaxis("top", functions=(lambda x: 1 - x / 2, lambda c: 2 - 2 * c))
    top.set_xlabel(r"cosine similarity $a^\top b$", fontsize=8)
    ax.legend(fontsize=7)
    share, chance = camera_share_by_rank(d, q_pids, g_pids, q_cams, g_cams, max_k)
    ks = np.arange(1, len(share) + 1)
    ax2.plot(ks, 100 * share, color=RED, lw=2, label="nearest other-person images")
    ax2.axhline(100 * chance, color=GREY, ls="--", label="chance (a camera-blind feature)")
    ax2.set_xscale("log")
    ax2.set_xlabel("k nearest images of other people (log scale)")
    ax2.set_ylabel("% from the query's camera")
    ax2.set_ylim(0, max(100 * share.max(), 100 * chance) * 1.15)
    ax2.legend(fontsize=7)
    ax2.set_title("where the camera bias lives: at the top of the list", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def baseline_figure(scores: Mapping[str, Mapping[str, float]], params: Mapping[str, int | None] | None = None,
                    title: str = ""):
    """Horizontal bars of mAP and rank-1 (in %) per feature, labelled with the network's number of
    parameters: what a network gives without re-ID training."""

    names = list(scores)
    params = params or {}
    labels = [n + (f"\n{params[n] / 1e6:.1f} M parameters" if params.get(n) else "\nno parameters")
              for n in names]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 0.75 * len(names) + 1.2))
    for off, key, colour, label in ((-0.18, "mAP", "#4575b4", "mAP"), (0.18, "rank1", "#fdae61", "rank-1")):
        vals = [100 * scores[n][key] for n in names]
        ax.barh(y + off, vals, height=0.34, color=colour, label=label)
        for yi, v in zip(y + off, vals):
            ax.text(v + 0.5, yi, f"{v:.1f}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("% (no re-ID training for any row)")
    ax.set_xlim(0, max(100 * max(s["rank1"], s["mAP"]) for s in scores.values()) * 1.2 + 1)
    ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig

