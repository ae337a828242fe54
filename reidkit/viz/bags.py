"""Figures for weak supervision (notebook 05): DGL's graph of one bag, the appearance kernel and
its sigma widget, pseudo-labels on a bag, the weak triplet, training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from matplotlib.patches import FancyBboxPatch, Rectangle

from reidkit.dgl.graphical import appearance_kernel
from reidkit.viz.base import GREEN, GREY, RED, _thumb, image_grid

PALETTE = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02"]


def _circle(n: int, radius: float = 1.0, start: float = np.pi / 2) -> np.ndarray:
    angle = start - np.linspace(0, 2 * np.pi, n, endpoint=False)
    return radius * np.c_[np.cos(angle), np.sin(angle)]


def dgl_graph_diagram(n_images: int = 6, bag_labels: Sequence[str] = ("a", "b"),
                      outside: Sequence[str] = ("c", "d"), seed: int = 0):
    """The static diagram of DGL's model for one bag.

    Image nodes ``y_1..y_n`` (hidden identities) on the left, joined by pairwise (Potts) edges whose
    width stands for ``k_ij``; the bag's label set ``L_b`` on the right, with a unary edge from
    every image to every label in ``L_b`` (cost ``-log p(c|x_i)``); labels outside ``L_b`` are
    struck out (the bag constraint, cost ``+inf``). Returns the figure."""

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(9, 5.2))
    pos = _circle(n_images, 1.15) + np.array([-1.6, 0.0])
    # pairwise edges: strong inside a person's images, weak across (illustrative weights)
    person = np.arange(n_images) % len(bag_labels)
    for i in range(n_images):
        for j in range(i + 1, n_images):
            w = 0.75 + 0.2 * rng.random() if person[i] == person[j] else 0.1 + 0.2 * rng.random()
            ax.plot(*zip(pos[i], pos[j]), color="#4d4d4d", lw=0.5 + 4 * w, alpha=0.25 + 0.6 * w, zorder=1)
    lab_y = np.linspace(0.9, -0.9, len(bag_labels)) if len(bag_labels) > 1 else np.zeros(1)
    lab_pos = np.c_[np.full(len(bag_labels), 1.9), lab_y]
    for i in range(n_images):
        for c, lp in enumerate(lab_pos):
            ax.plot(*zip(pos[i], lp), color=PALETTE[c % len(PALETTE)], lw=0.9, ls="--", alpha=0.4, zorder=0)
    for i, p in enumerate(pos):
        ax.add_patch(plt.Circle(p, 0.26, fc="white", ec=PALETTE[person[i] % len(PALETTE)], lw=2.5, zorder=3))
        ax.text(*p, f"$y_{i + 1}$", ha="center", va="center", fontsize=13, zorder=4)
    for c, (lab, lp) in enumerate(zip(bag_labels, lab_pos)):
        ax.add_patch(FancyBboxPatch(lp - 0.22, 0.44, 0.44, boxstyle="round,pad=0.02", fc=PALETTE[c % len(PALETTE)],
                                    ec="k", lw=1, alpha=0.9, zorder=3))
        ax.text(*lp, lab, ha="center", va="center", fontsize=14, color="white", weight="bold", zorder=4)
    ax.add_patch(FancyBboxPatch((1.55, -1.35), 0.7, 2.7, boxstyle="round,pad=0.05", fc="none", ec="k", lw=1.5,
                                ls="-", zorder=2))
    ax.text(1.9, 1.55, "bag label set $L_b$", ha="center", fontsize=11)
    ax.add_patch(FancyBboxPatch((-3.0, -1.5), 2.8, 3.0, boxstyle="round,pad=0.05", fc="#f7f7f7", ec=GREY, lw=1,
                                zorder=-1))
    ax.text(-1.6, 1.6, "bag $b$: images, identities hidden", ha="center", fontsize=10, color="#555555")
    for t, lab in enumerate(outside):
        xy = np.array([3.1, 0.6 - 1.2 * t])
        ax.add_patch(FancyBboxPatch(xy - 0.2, 0.4, 0.4, boxstyle="round,pad=0.02", fc="#eeeeee", ec=GREY, zorder=3))
        ax.text(*xy, lab, ha="center", va="center", fontsize=13, color=GREY, zorder=4)
        ax.plot([xy[0] - 0.3, xy[0] + 0.3], [xy[1] - 0.3, xy[1] + 0.3], color=RED, lw=2.5, zorder=5)
    ax.text(3.1, -1.75, "labels outside $L_b$:\n$B(y_i; L_b) = +\\infty$", ha="center", fontsize=10, color=RED)
    ax.text(-1.6, -1.95, "pairwise: $\\lambda\\, k_{ij}\\,[y_i \\neq y_j]$\n(edge width = $k_{ij}$)",
            ha="center", fontsize=10)
    ax.text(0.65, 1.25, "unary edges:\n$U(c) = -\\log p(c \\mid x_i)$", ha="center", fontsize=10, color="#555555")
    energy = "$E(Y) = \\sum_i U(y_i) + \\lambda \\sum_{i \\neq j} k_{ij}[y_i \\neq y_j] + \\sum_i B(y_i; L_b)$"
    ax.text(0.3, -2.45, energy, ha="center", fontsize=12)
    ax.set_xlim(-3.1, 3.7)
    ax.set_ylim(-2.75, 1.95)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("DGL: the graphical model of one bag (image nodes, unary edges to $L_b$, pairwise edges)")
    fig.tight_layout()
    return fig


def save_dgl_graph_diagram(path: str | Path) -> Path:
    """Draw :func:`dgl_graph_diagram` and save it as a PNG (the notebook's committed figure)."""

    fig = dgl_graph_diagram()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def bag_graph(paths: Sequence[str], kernel, true_cls: Sequence[int], bag_classes: Sequence[int],
              title: str | None = None, ax=None, thumb=(64, 32)):
    """One real bag drawn as DGL's graph: image thumbnails on a circle (frame colour = the true
    identity, which the model never sees), edges whose width and darkness are ``kernel[i, j]``, the
    bag constraint in the middle. Returns the figure."""

    kernel = np.asarray(kernel, dtype=float)
    n = len(paths)
    if kernel.shape != (n, n):
        raise ValueError(f"kernel is {kernel.shape}, expected ({n}, {n})")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 6))
    else:
        fig = ax.figure
    pos = _circle(n)
    colour = {c: PALETTE[k % len(PALETTE)] for k, c in enumerate(bag_classes)}
    for i in range(n):
        for j in range(i + 1, n):
            w = float(np.clip(kernel[i, j], 0, 1))
            ax.plot(*zip(pos[i], pos[j]), color="k", alpha=0.05 + 0.85 * w, lw=0.3 + 5 * w, zorder=1)
    for i, p in enumerate(paths):
        ax.add_artist(AnnotationBbox(OffsetImage(_thumb(p, thumb), zoom=1.0), pos[i], frameon=True, zorder=2,
                                     bboxprops=dict(edgecolor=colour[int(true_cls[i])], lw=3)))
        ax.text(*(1.45 * pos[i]), f"$y_{{{i}}}$", ha="center", va="center", fontsize=9, zorder=5,
                bbox=dict(boxstyle="round,pad=0.15", fc="w", ec="none", alpha=0.9))
    ax.text(0, 0, "$y_i \\in L_b = \\{" + ", ".join(map(str, bag_classes)) + "\\}$", ha="center", va="center",
            fontsize=10, bbox=dict(boxstyle="round", fc="w", ec="grey"))
    ax.set_xlim(-1.65, 1.65)
    ax.set_ylim(-1.65, 1.65)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title or "one bag: edges = appearance kernel $k_{ij}$", fontsize=10)
    return fig


def kernel_matrix(kernel, true_cls: Sequence[int], title: str | None = None, ax=None):
    """The kernel as a heat map, images ordered as given, with the true-identity blocks outlined
    (the diagonal blocks are same-person pairs). Returns the figure."""

    kernel = np.asarray(kernel, dtype=float)
    if ax is None:
        fig, ax = plt.subplots(figsize=(4, 3.6))
    else:
        fig = ax.figure
    im = ax.imshow(kernel, vmin=0, vmax=1, cmap="viridis")
    true_cls = np.asarray(true_cls)
    start = 0
    for k in range(1, len(true_cls) + 1):
        if k == len(true_cls) or true_cls[k] != true_cls[start]:
            ax.add_patch(Rectangle((start - 0.5, start - 0.5), k - start, k - start, fill=False, ec="w", lw=2))
            start = k
    n = len(kernel)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{kernel[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="k" if kernel[i, j] > 0.6 else "w")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.tick_params(labelsize=7)
    ax.set_title(title or "$k_{ij}$", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def kernel_contrast(kernel, true_cls: Sequence[int]) -> dict:
    """Mean off-diagonal ``k_ij`` over same-identity pairs and over different-identity pairs, their
    difference ``gap`` (how much the kernel tells the two apart: 0 when every edge is cut or every
    pair is joined) and their ratio."""
    kernel = np.asarray(kernel, dtype=float)
    y = np.asarray(true_cls)
    same = (y[:, None] == y[None, :]) & ~np.eye(len(y), dtype=bool)
    diff = y[:, None] != y[None, :]
    s = float(kernel[same].mean()) if same.any() else float("nan")
    d = float(kernel[diff].mean()) if diff.any() else float("nan")
    return {"same": s, "different": d, "gap": s - d, "ratio": s / d if d > 0 else float("inf")}


def kernel_sigma_figure(g, true_cls: Sequence[int], sigmas: Sequence[float]):
    """The kernel of one bag for several sigmas side by side (the widget's static version)."""

    fig, axes = plt.subplots(1, len(sigmas), figsize=(3.6 * len(sigmas), 3.4), squeeze=False)
    for ax, s in zip(axes[0], sigmas):
        K = appearance_kernel(np.asarray(g), s)
        c = kernel_contrast(K, true_cls)
        kernel_matrix(K, true_cls, f"$\\sigma$ = {s:.3g}: same {c['same']:.2f}, diff {c['different']:.2f}", ax=ax)
    fig.tight_layout()
    return fig


def _sigma_view(g, paths, true_cls, bag_classes, sigma):

    K = appearance_kernel(np.asarray(g), sigma)
    c = kernel_contrast(K, true_cls)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), gridspec_kw={"width_ratios": [1.1, 1]})
    bag_graph(paths, K, true_cls, bag_classes, ax=axes[0], title=f"$\\sigma$ = {sigma:.3g}")
    kernel_matrix(K, true_cls, ax=axes[1], title=f"$k_{{ij}}$: same person {c['same']:.2f}, "
                  f"different {c['different']:.2f} (gap {c['gap']:.2f})")
    fig.tight_layout()
    return fig


def kernel_widget(g, paths: Sequence[str], true_cls: Sequence[int], bag_classes: Sequence[int],
                  sigma: float = 1.0, sigma_min: float = 0.01, sigma_max: float = 100.0):
    """A sigma slider (log scale) over one bag: the graph and the kernel matrix redrawn for
    ``k_ij = exp(-||g_i - g_j||^2 / sigma)``. Small sigma cuts every edge, large sigma joins all."""
    import ipywidgets as widgets  # optional: needs a notebook front end (the GPU machine has none)
    from IPython.display import display

    lo, hi = np.log10(sigma_min), np.log10(sigma_max)
    slider = widgets.FloatLogSlider(value=float(np.clip(sigma, sigma_min, sigma_max)), base=10, min=lo, max=hi,
                                    step=(hi - lo) / 40, description="sigma", continuous_update=False,
                                    readout_format=".3g", layout=widgets.Layout(width="420px"))
    out = widgets.Output()

    def render(*_):
        with out:
            out.clear_output(wait=True)
            fig = _sigma_view(g, paths, true_cls, bag_classes, slider.value)
            display(fig)
            plt.close(fig)

    slider.observe(render, names="value")
    render()
    return widgets.VBox([slider, out])


def bag_inference_figure(paths: Sequence[str], true_cls: Sequence[int], pseudo: Sequence[int], probs=None,
                         title: str = "pseudo-labels"):
    """A bag with each image's true class, pseudo-label and (if given) its largest in-bag
    probability; green frame = pseudo-label right, red = wrong. Returns the figure."""
    true_cls, pseudo = np.asarray(true_cls), np.asarray(pseudo)
    right = pseudo == true_cls
    titles = [f"true {t}\npseudo {p}" + (f"\np={np.max(pr):.2f}" if probs is not None else "")
              for t, p, pr in zip(true_cls, pseudo, probs if probs is not None else [None] * len(pseudo))]
    return image_grid(list(paths), titles, ncols=min(8, len(paths)),
                      border_colors=[GREEN if ok else RED for ok in right],
                      suptitle=f"{title}: {int(right.sum())}/{len(right)} pseudo-labels right")


def weak_triplet_figure(emb, bag_of: Sequence[int], title: str = "weak triplet: median in-bag vs nearest out-of-bag"):
    """2-D embeddings coloured by bag, each point numbered. Returns the figure."""

    emb = np.asarray(emb, dtype=float)
    bag_of = np.asarray(bag_of)
    fig, ax = plt.subplots(figsize=(4, 3.5))
    for k, b in enumerate(np.unique(bag_of)):
        ax.scatter(*emb[bag_of == b].T, c=PALETTE[k % len(PALETTE)], label=f"bag {b}")
    for i, (a, b) in enumerate(emb.tolist()):
        ax.annotate(str(i), (a, b), textcoords="offset points", xytext=(4, 4))
    ax.legend()
    ax.set_title(title, fontsize=10)
    return fig


def weak_training_curves(histories: dict):
    """Loss and pseudo-label accuracy per epoch for every variant (``{variant: history}``)."""

    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for variant, hist in histories.items():
        ep = [h["epoch"] for h in hist]
        axes[0].plot(ep, [h["loss"] for h in hist], marker="o", label=variant)
        acc = [h.get("pseudo_acc") for h in hist]
        if any(a is not None for a in acc):
            axes[1].plot(ep, [np.nan if a is None else 100 * a for a in acc], marker="o", label=variant)
    axes[0].set_title("training loss")
    axes[1].set_title("pseudo-label = true id (%)")
    for ax in axes:
        ax.set_xlabel("epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def assignment_survey_figure(survey: dict, title: str = "greedy vs exact balanced assignment"):
    """Per bag: greedy cost minus exact cost (never below 0) and the pseudo-label accuracy of MAP,
    greedy and exact (from ``reidkit.dgl.graphical.compare_assignments``). Returns the figure."""

    gap = survey["greedy_cost"] - survey["exact_cost"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    axes[0].bar(np.arange(len(gap)), gap, color=[RED if d else GREY for d in survey["disagree"]])
    axes[0].set_xlabel("bag")
    axes[0].set_ylabel("greedy cost - exact cost")
    axes[0].set_title(f"{int(survey['disagree'].sum())}/{len(gap)} bags: greedy != exact (red)", fontsize=10)
    names = ["map_acc", "greedy_acc", "exact_acc"]
    axes[1].bar(["MAP (no balance)", "greedy", "exact"], [100 * survey[k].mean() for k in names],
                color=[GREY, "#d95f02", "#1b9e77"])
    axes[1].set_ylabel("pseudo-labels right (%)")
    axes[1].set_ylim(0, 100)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def relaxed_potts_figure(sigma: float = 1.0, max_sq_dist: float | None = None):
    """A toy picture of the relaxed Potts term between two images ``i`` and ``j``.

    The pairwise energy is ``k_ij * (1 - p_i . p_j)`` with ``k_ij = exp(-d / sigma)`` and ``d`` the
    squared distance of their low-level descriptors; ``1 - p_i . p_j`` is the chance that labels
    drawn from the two soft label vectors differ. Left: the energy against ``d`` for three pairs of
    two-class label vectors (same confident label, one unsure, confident and different). Right: the
    energy over ``d`` and ``q``, where ``p_i = (1, 0)`` and ``p_j = (q, 1 - q)``. Look-alike images
    (small ``d``) pay for disagreeing; images far apart pay nothing whatever their labels.
    Returns the figure."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    top = float(max_sq_dist) if max_sq_dist else 4.0 * sigma
    d = np.linspace(0.0, top, 200)
    k = np.exp(-d / sigma)
    pairs = [((1.0, 0.0), (1.0, 0.0), "same label, both sure", GREEN),
             ((1.0, 0.0), (0.5, 0.5), "one image unsure", "#d95f02"),
             ((1.0, 0.0), (0.0, 1.0), "different labels, both sure", RED)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for p_i, p_j, name, colour in pairs:
        disagree = 1.0 - float(np.dot(p_i, p_j))
        axes[0].plot(d, k * disagree, color=colour, lw=2, label=f"{name}: $1 - p_i^\\top p_j$ = {disagree:g}")
    axes[0].axvline(sigma * np.log(2), color=GREY, ls=":", lw=1)
    axes[0].text(sigma * np.log(2), 1.02, " $k_{ij} = 1/2$", color="#555555", fontsize=9, va="bottom")
    axes[0].set_xlabel("$\\|g_i - g_j\\|^2$ (squared distance of the descriptors)")
    axes[0].set_ylabel("$k_{ij}\\,(1 - p_i^\\top p_j)$")
    axes[0].set_ylim(-0.03, 1.12)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[0].set_title("pairwise energy of one pair", fontsize=10)
    q = np.linspace(0.0, 1.0, 101)
    energy = np.exp(-d[None, :] / sigma) * (1.0 - q[:, None])
    im = axes[1].imshow(energy, origin="lower", aspect="auto", extent=(0, top, 0, 1), cmap="magma", vmin=0, vmax=1)
    axes[1].set_xlabel("$\\|g_i - g_j\\|^2$")
    axes[1].set_ylabel("$q$ in $p_j = (q, 1-q)$, with $p_i = (1, 0)$")
    axes[1].set_title("bright = costly: look-alikes that disagree", fontsize=10)
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(f"the relaxed Potts term, $k_{{ij}} = \\exp(-\\|g_i - g_j\\|^2 / \\sigma)$, $\\sigma$ = {sigma:g}",
                 fontsize=11)
    fig.tight_layout()
    return fig
