"""Basic figures: image grids, dataset statistics, training curves, CMC curves."""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from reidkit.data.transforms import denormalize, load_image

GREEN, RED, GREY = "#1a9850", "#d73027", "#999999"


def _thumb(path: str, size=(128, 64)):

    img = load_image(path).resize((size[1], size[0]))
    return np.asarray(img)


def image_grid(paths: Sequence[str], titles: Sequence[str] | None = None, ncols: int = 8,
               border_colors: Sequence[str | None] | None = None, size=(128, 64), scale: float = 1.0,
               suptitle: str | None = None):
    """A grid of images with optional titles and coloured borders (green/red for right/wrong)."""

    n = len(paths)
    ncols = max(1, min(ncols, n))
    nrows = max(1, int(np.ceil(n / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.15 * ncols * scale, 2.3 * nrows * scale), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, p in enumerate(paths):
        ax = axes.ravel()[i]
        ax.imshow(_thumb(p, size))
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
        color = border_colors[i] if border_colors is not None else None
        if color:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(4)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def tensor_grid(images, titles: Sequence[str] | None = None, ncols: int = 8, suptitle: str | None = None):
    """Like ``image_grid`` for normalised CHW tensors (e.g. augmented training images)."""

    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.15 * ncols, 2.3 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, img in enumerate(images):
        ax = axes.ravel()[i]
        ax.imshow(denormalize(img).permute(1, 2, 0).numpy())
        if titles is not None:
            ax.set_title(titles[i], fontsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.tight_layout()
    return fig


def dataset_stats_figure(dataset):
    """Images per identity (histogram) and images per camera (bars), per split."""

    splits = dataset.splits()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for name, recs in splits.items():
        if not recs:
            continue
        per_id = np.array(list(Counter(r.pid for r in recs).values()))
        axes[0].hist(per_id, bins=min(30, max(5, len(set(per_id.tolist())))), alpha=0.6, label=name)
    axes[0].set_xlabel("images per identity")
    axes[0].set_ylabel("identities")
    axes[0].legend()
    cams = sorted({r.camid for recs in splits.values() for r in recs})
    width = 0.8 / max(1, len(splits))
    for k, (name, recs) in enumerate(splits.items()):
        counts = Counter(r.camid for r in recs)
        axes[1].bar(np.arange(len(cams)) + k * width, [counts.get(c, 0) for c in cams], width, label=name)
    axes[1].set_xticks(np.arange(len(cams)) + width * (len(splits) - 1) / 2)
    axes[1].set_xticklabels([f"C{c + 1}" if c >= 0 else "?" for c in cams])
    axes[1].set_ylabel("images")
    axes[1].set_title("images per camera", fontsize=10)
    axes[1].legend()
    fig.tight_layout()
    return fig


def curves(history: Sequence[dict], keys: Sequence[str], xkey: str = "epoch", title: str | None = None):
    """One small panel per key of a per-epoch history (list of dicts)."""

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    xs = [h.get(xkey) for h in history]
    for ax, key in zip(axes[0], keys):
        pts = [(x, h[key]) for x, h in zip(xs, history) if h.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel(xkey)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def cmc_figure(cmcs: dict, max_rank: int = 20):
    """CMC curves (rank-k accuracy against k) of several models; a model's re-ranked curve
    (named ``<model> + re-rank``) is drawn dashed in the model's colour, the legend beside the plot."""

    fig, ax = plt.subplots(figsize=(7.0, 3.4))
    colours = {}
    for name, cmc in cmcs.items():
        cmc = np.asarray(cmc)[:max_rank]
        base = name[: -len(" + re-rank")] if name.endswith(" + re-rank") else name
        line, = ax.plot(np.arange(1, len(cmc) + 1), 100 * cmc, marker=".", label=name, color=colours.get(base),
                        ls="--" if base != name else "-")
        colours.setdefault(base, line.get_color())
    ax.set_xlabel("rank k")
    ax.set_ylabel("matching rate (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    return fig
