"""Figures and the widget of notebook 04 (cluster memories and the HHCL loop).

- :func:`hhcl_loop_figure`: the static diagram of one HHCL epoch and its inner training loop;
- :func:`memory_2d_figure` / :func:`memory_widget`: three clusters on the unit circle, the softmax
  of one feature over the proxies at temperature ``temp``, its gradient, and where one backward
  moves the hard and the mean proxy for momentum ``momentum`` (sliders for both);
- :func:`hybrid_v2_step` / :func:`hybrid_v2_figure`: the same circle with a ``CMhybrid_v2`` memory
  (a centroid and ``P`` instance slots per cluster): which slots the loss of one feature uses (its
  hardest positive and the hardest negative of every other cluster), and what one backward does
  (the centroid follows the batch mean with momentum, the slots are overwritten by the batch);
- :func:`memories_figure`, :func:`temperature_figure`, :func:`probe_figure`,
  :func:`hardest_members_figure`: the notebook's measurements drawn.

Every loss and every memory update drawn here is computed by :mod:`reidkit.hhcl.memory`; the
figures only add the cosines that say which proxy or slot a rule picks.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from reidkit.hhcl.memory import ClusterMemory
from reidkit.hhcl.memory_probe import infonce_gradient, typical_and_hardest
from reidkit.viz.base import GREEN, GREY, RED, image_grid

BLUE, ORANGE = "#4575b4", "#f46d43"


# --------------------------------------------------------------------------------------------
# the HHCL loop, as a diagram

def hhcl_loop_figure():
    """One HHCL epoch as a cycle of boxes, with the inner loop of training iterations."""

    fig, ax = plt.subplots(figsize=(11, 6.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(-0.9, 5.4)
    ax.axis("off")
    w, h = 2.7, 1.35
    boxes = {  # x, y, width, text, colour
        "extract": (0.2, 3.6, w, "1. extract features\nof every training image\n(eval mode, L2-normalised)", "#deebf7"),
        "jaccard": (4.1, 3.6, w, "2. k-reciprocal\nJaccard distance\n(k1, k2)", "#deebf7"),
        "dbscan": (8.0, 3.6, w, "3. DBSCAN\n(eps, min_samples):\npseudo-labels,\noutliers dropped", "#deebf7"),
        "memory": (8.0, 0.5, w, "4. a new memory from\nthe cluster centroids\n(a hard and a mean\nproxy per cluster)",
                   "#fee8c8"),
        "train": (3.3, 0.5, 3.6, "5. train `iters` iterations:\nPK batch -> features -> loss\n"
                                 "0.5 CE_hard + 0.25 CE_mean\n(InfoNCE at temperature 0.05)", "#e5f5e0"),
    }
    for x, y, ww, text, color in boxes.values():
        ax.add_patch(FancyBboxPatch((x, y), ww, h, boxstyle="round,pad=0.08", fc=color, ec="#333333", lw=1.2))
        ax.text(x + ww / 2, y + h / 2, text, ha="center", va="center", fontsize=9)

    def arrow(p, q, text=None, rad=0.0, color="#333333", at=None, size=16):
        ax.add_patch(FancyArrowPatch(p, q, arrowstyle="-|>", mutation_scale=size, lw=1.6, color=color,
                                     connectionstyle=f"arc3,rad={rad}"))
        if text:
            x, y = at if at is not None else ((p[0] + q[0]) / 2, (p[1] + q[1]) / 2 + 0.12)
            ax.text(x, y, text, ha="center", va="bottom", fontsize=8, color=color)

    arrow((3.0, 4.28), (4.0, 4.28), "N x D")
    arrow((6.9, 4.28), (7.9, 4.28), "N x N\n(sparse)")
    arrow((9.35, 3.5), (9.35, 1.95), "K clusters", at=(10.2, 2.6))
    arrow((7.9, 1.18), (7.0, 1.18), "2K proxies", at=(7.45, 1.3))
    arrow((3.25, 1.5), (1.55, 3.5), "next epoch:\nre-cluster with\nthe trained network", rad=-0.25,
          color=RED, at=(1.2, 1.6))
    # the inner loop: every iteration updates the memory inside backward
    arrow((4.3, 0.4), (5.9, 0.4), None, rad=0.9, color=BLUE, size=12)
    ax.text(5.1, -0.75, "every iteration: loss.backward() computes dL/df, then moves the proxies\n"
            "hard: p <- normalize(0.1 p + 0.9 f_hardest)     mean: p <- normalize(0.1 p + 0.9 batch mean)",
            ha="center", va="bottom", fontsize=8, color=BLUE)
    ax.set_title("One HHCL epoch, repeated every epoch: the memory is rebuilt from the new centroids", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
# the 2-D example and its widget

_OWN_ANGLES = (0.0, 0.25, 0.5, 1.1)     # four members of cluster 0 (radians)
_PROXY_ANGLES = (0.1, 2.0, -2.2)        # the proxies of clusters 0, 1, 2 (hard and mean start equal)


def _unit(angles) -> np.ndarray:
    a = np.asarray(angles, dtype=np.float64)
    return np.stack([np.cos(a), np.sin(a)], axis=-1)


def memory_2d_step(temp: float = 0.05, momentum: float = 0.1) -> dict:
    """The 2-D example as numbers: a ``CMhybrid`` memory of three clusters, one batch of the four
    members of cluster 0, one backward. Returns the proxies before and after, the members, the
    loss, and the softmax and gradient of the member at 1.1 rad (the hardest) over the hard proxies."""

    members = _unit(_OWN_ANGLES)
    proxies = _unit(_PROXY_ANGLES)
    mem = ClusterMemory(2, 3, temp=temp, momentum=momentum, mode="CMhybrid")
    mem.features = torch.from_numpy(np.concatenate([proxies, proxies])).float()
    x = torch.from_numpy(members).float().requires_grad_(True)
    loss = mem(x, torch.zeros(len(members), dtype=torch.long))
    loss.backward()
    after = mem.features.double().numpy()
    one = infonce_gradient(members[-1], proxies, 0, temp)
    return {"members": members, "proxies": proxies, "hard_after": after[0], "mean_after": after[3],
            "loss": float(loss.detach()), "probs": one["probs"], "grad": one["grad"], "feature": members[-1],
            "temp": float(temp), "momentum": float(momentum)}


def memory_2d_figure(temp: float = 0.05, momentum: float = 0.1):
    """Left: the unit circle with three clusters' proxies (stars), cluster 0's members (dots), the
    descent direction of the hardest member's loss (arrow, longer for a larger gradient), and the
    hard and mean proxy of cluster 0 after one backward (hollow markers). Right: that member's
    softmax over the three proxies."""

    s = memory_2d_step(temp, momentum)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.5, 4.2), gridspec_kw={"width_ratios": [1.25, 1]})
    t = np.linspace(0, 2 * np.pi, 200)
    ax.plot(np.cos(t), np.sin(t), color=GREY, lw=0.8)
    colors = [GREEN, ORANGE, BLUE]
    for k, (p, c) in enumerate(zip(s["proxies"], colors)):
        ax.scatter(*p, marker="*", s=260, color=c, zorder=3, label=f"proxy of cluster {k}")
    ax.scatter(*s["members"].T, s=45, color=GREEN, edgecolor="k", zorder=4, label="members of cluster 0")
    for key, marker, lab in (("hard_after", "s", "hard proxy after"), ("mean_after", "D", "mean proxy after")):
        ax.scatter(*s[key], marker=marker, s=110, facecolor="none", edgecolor=RED if key == "hard_after" else "k",
                   lw=2, zorder=5, label=lab)
        ax.annotate("", xy=s[key] * 0.97, xytext=s["proxies"][0] * 0.97,
                    arrowprops=dict(arrowstyle="->", color=RED if key == "hard_after" else "k", lw=1))
    f, g = s["feature"], -s["grad"]
    norm = np.linalg.norm(g)
    scale = 0.6 / (norm + 5.0)  # arrow length 0.6 |g| / (|g| + 5): grows with |g|, never leaves the plot
    ax.annotate("", xy=f + g * scale, xytext=f, arrowprops=dict(arrowstyle="-|>", color="purple", lw=2))
    ax.text(*(f + g * scale + np.array([0.02, 0.05])), "-dL/df", color="purple", fontsize=8)
    ax.set_aspect("equal")
    ax.set_xlim(-1.35, 1.45)
    ax.set_ylim(-1.35, 1.45)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"momentum m = {momentum:.2f}: the hard proxy keeps {momentum:.0%} of its old value", fontsize=9)
    bx.bar(range(3), s["probs"], color=colors)
    bx.set_xticks(range(3))
    bx.set_xticklabels(["own (0)", "cluster 1", "cluster 2"])
    bx.set_ylim(0, 1.12)
    bx.set_ylabel("softmax weight of the member at 1.1 rad")
    bx.set_title(f"temperature = {temp:.3g}: loss of this member {-np.log(s['probs'][0]):.2f}, "
                 f"|dL/df| = {np.linalg.norm(s['grad']):.1f}", fontsize=9)
    for k, p in enumerate(s["probs"]):
        bx.text(k, p + 0.02, f"{p:.2f}", ha="center", fontsize=9)
    fig.tight_layout()
    return fig


def memory_widget(temp: float = 0.05, momentum: float = 0.1):
    """Sliders for the temperature (log scale, 0.01-1) and the momentum (0-0.99) that redraw
    :func:`memory_2d_figure`. Both visibly change the figure: the temperature the softmax bars,
    the gradient arrow and the title; the momentum where the two proxies land."""
    import ipywidgets as widgets  # optional: needs a notebook front end (the GPU machine has none)
    from IPython.display import display

    t_slider = widgets.FloatLogSlider(value=temp, base=10, min=-2, max=0, step=0.05, description="temperature τ",
                                      continuous_update=False, readout_format=".3f",
                                      style={"description_width": "initial"})
    m_slider = widgets.FloatSlider(value=momentum, min=0.0, max=0.99, step=0.01, description="momentum m",
                                   continuous_update=False, style={"description_width": "initial"})
    out = widgets.Output()

    def render(*_):
        with out:
            out.clear_output(wait=True)
            fig = memory_2d_figure(t_slider.value, m_slider.value)
            display(fig)
            plt.close(fig)

    t_slider.observe(render, names="value")
    m_slider.observe(render, names="value")
    render()
    return widgets.VBox([widgets.HBox([t_slider, m_slider]), out])


# --------------------------------------------------------------------------------------------
# CMhybrid_v2 (the paper's hard-instance memory) in two dimensions

_V2_SLOTS = ((-0.2, 0.15, 0.55), (1.25, 1.9, 2.3), (-1.9, -2.4, -2.8))  # P = 3 slots per cluster (radians)
_V2_BATCH = (0.7, 0.4, -0.4)  # one batch of cluster 0; its first member is the feature f of the left panel


def hybrid_v2_step(temp: float = 0.05, momentum: float = 0.1, hard_weight: float = 0.5) -> dict:
    """A ``CMhybrid_v2`` memory of three clusters with three instance slots each, on the unit circle.

    The memory starts as the library builds it at an epoch start: the centroids of the slots'
    features, then the slots. ``f`` (the first batch member, label 0) is scored by the library's
    loss without a backward; then one batch of three members of cluster 0 goes through forward and
    backward on a second copy, which updates the memory. Returns the rows before and after, the
    cosines of ``f`` to the centroids and to every slot, the slot the hard logit of each cluster
    uses (``hard_slot[k]``: the least similar own slot for k = 0, the most similar slot otherwise),
    and the library's loss of ``f``."""

    slots = np.stack([_unit(a) for a in _V2_SLOTS])            # (K, P, 2)
    k, p = slots.shape[:2]
    centroids = slots.mean(1)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    rows = np.concatenate([centroids, slots.transpose(1, 0, 2).reshape(p * k, 2)])  # slot p of k: row k + p*K
    batch = _unit(_V2_BATCH)
    f = batch[0]

    def memory():
        mem = ClusterMemory(2, k, temp=temp, momentum=momentum, mode="CMhybrid_v2", hard_weight=hard_weight,
                            num_instances=p)
        mem.features = torch.from_numpy(rows.copy())
        return mem

    with torch.no_grad():  # the loss of f alone, the memory untouched
        loss_f = float(memory()(torch.from_numpy(f[None]), torch.zeros(1, dtype=torch.long)))
    mem = memory()
    x = torch.from_numpy(batch).requires_grad_(True)
    mem(x, torch.zeros(len(batch), dtype=torch.long)).backward()
    after = mem.features.numpy()
    slot_cos = slots @ f                                       # (K, P)
    hard_slot = [int(np.argmin(slot_cos[0]))] + [int(np.argmax(slot_cos[j])) for j in range(1, k)]
    return {"centroids": centroids, "slots": slots, "feature": f, "batch": batch, "loss": loss_f,
            "centroid_cos": centroids @ f, "slot_cos": slot_cos, "hard_slot": hard_slot,
            "hard_cos": np.array([slot_cos[j, hard_slot[j]] for j in range(k)]),
            "centroids_after": after[:k], "slots_after": after[k:].reshape(p, k, 2).transpose(1, 0, 2),
            "temp": float(temp), "momentum": float(momentum), "hard_weight": float(hard_weight)}


def hybrid_v2_figure(temp: float = 0.05, momentum: float = 0.1, hard_weight: float = 0.5):
    """Left: the centroids (stars) and instance slots (dots) of three clusters; for the feature
    ``f`` (black), dashed lines to the centroids (the centroid softmax) and solid lines to its
    hardest positive slot (green) and to the hardest negative slot of each other cluster (red), the
    slots its hard-instance softmax compares. Right, zoomed on cluster 0: one backward with a batch
    of three of its members: the centroid moves towards the batch mean with momentum, the three
    slots are replaced by the batch members (slot p, numbered, takes the p-th member)."""

    s = hybrid_v2_step(temp, momentum, hard_weight)
    colors = [GREEN, ORANGE, BLUE]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 5), gridspec_kw={"width_ratios": [1.15, 1]})
    t = np.linspace(0, 2 * np.pi, 400)
    for a in (ax, bx):
        a.plot(np.cos(t), np.sin(t), color=GREY, lw=0.8)
        a.set_aspect("equal")
        a.set_xticks([])
        a.set_yticks([])
    ax.set_xlim(-1.35, 1.35)
    ax.set_ylim(-1.35, 1.35)
    bx.set_xlim(0.3, 1.3)
    bx.set_ylim(-0.45, 0.95)
    f = s["feature"]
    for j, c in enumerate(colors):
        ax.plot(*np.stack([f, s["centroids"][j]]).T, color=GREY, ls="--", lw=1, zorder=2,
                label="f to the centroids" if j == 0 else None)
        ax.scatter(*s["centroids"][j], marker="*", s=260, color=c, edgecolor="k", zorder=3,
                   label=f"centroid of cluster {j}")
        ax.scatter(*s["slots"][j].T, s=45, color=c, edgecolor="k", zorder=3)
    ax.scatter(*f, s=80, color="k", zorder=5, label="feature f (cluster 0)")
    ax.text(*(f * 1.13), "f", fontsize=11)
    for j in range(len(colors)):
        end = s["slots"][j][s["hard_slot"][j]]
        own = j == 0
        ax.plot(*np.stack([f, end]).T, color=GREEN if own else RED, lw=2, zorder=4,
                label="hardest positive slot" if own else ("hardest negative slot" if j == 1 else None))
        ax.text(*(end * 1.18), f"{s['hard_cos'][j]:.2f}", fontsize=8, ha="center", va="center",
                color=GREEN if own else RED)
    ax.legend(fontsize=7, loc="lower right")
    w = s["hard_weight"]
    ax.set_title(f"the loss of f: {w:g} CE(centroids) + {1 - w:g} CE(hard slots) = {s['loss']:.2f}\n"
                 f"(numbers: cosine of f to each slot it uses; temperature {s['temp']:g})", fontsize=9)
    bx.scatter(*s["slots"][0].T, s=60, facecolor="none", edgecolor=GREEN, lw=1.5, zorder=3,
               label="slots before")
    bx.scatter(*s["centroids"][0], marker="*", s=300, facecolor="none", edgecolor=GREEN, lw=1.5, zorder=3,
               label="centroid before")
    bx.scatter(*s["slots_after"][0].T, s=60, color=GREEN, edgecolor="k", zorder=4,
               label="slots after = the batch members")
    bx.scatter(*s["centroids_after"][0], marker="*", s=300, color=GREEN, edgecolor="k", zorder=5,
               label="centroid after")
    for p, (a, b) in enumerate(zip(s["slots"][0], s["slots_after"][0]), 1):  # slot p: before, after
        bx.text(*(a * 1.07), f"{p}", fontsize=8, ha="center", va="center", color=GREEN)
        bx.text(*(b * 0.92), f"{p}", fontsize=8, ha="center", va="center", fontweight="bold")
    bx.annotate("", xy=s["centroids_after"][0], xytext=s["centroids"][0],
                arrowprops=dict(arrowstyle="-|>", color="k", lw=1.3))
    bx.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.01), ncol=2)
    bx.set_title(f"one backward, cluster 0: the centroid keeps {s['momentum']:.0%} of its old value\n"
                 "and moves to the batch mean; the slots are overwritten, no momentum", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# measurements drawn

def memories_figure(rows: Sequence[dict]):
    """The three memories on one batch (rows of :func:`reidkit.hhcl.memory_probe.compare_memories`)."""

    keys = [("loss", "loss"), ("rows_updated", "rows updated by one backward"),
            ("largest_move", "largest move of a row"), ("grad_norm", "gradient norm |dL/dx|")]
    fig, axes = plt.subplots(1, len(keys), figsize=(12, 2.8))
    names = [r["mode"] for r in rows]
    for ax, (key, title) in zip(axes, keys):
        ax.bar(names, [r[key] for r in rows], color=[GREY, RED, BLUE][:len(rows)])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def temperature_figure(rows: Sequence[dict]):
    """Loss, gradient norm and effective number of negatives against the temperature
    (rows of :func:`reidkit.hhcl.memory_probe.temperature_table`)."""

    t = [r["temp"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.9))
    axes[0].plot(t, [r["loss"] for r in rows], marker="o", label="mean loss")
    axes[0].axhline(rows[0]["log_K"], color=GREY, ls="--", label="log K (a uniform guess)")
    axes[0].legend(fontsize=8)
    axes[1].plot(t, [r["grad_norm"] for r in rows], marker="o", color=RED)
    axes[1].set_title("mean |dL/df|", fontsize=9)
    axes[2].plot(t, [r["effective_negatives"] for r in rows], marker="o", color=BLUE, label="effective negatives")
    axes[2].axhline(np.exp(rows[0]["log_K"]) - 1, color=GREY, ls="--", label="all K-1 negatives")
    axes[2].legend(fontsize=8)
    axes[0].set_title("loss against the centroids", fontsize=9)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("temperature")
    fig.tight_layout()
    return fig


def probe_figure(histories: dict):
    """Loss and proxy lag per iteration of one or more :func:`reidkit.hhcl.memory_probe.train_probe` runs
    (``{label: history}``); dotted lines mark where the memory is rebuilt from centroids."""

    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for label, h in histories.items():
        axes[0].plot(h["loss"], label=label)
        axes[1].plot(h["lag"], label=label)
    first = next(iter(histories.values()))
    per_epoch = first.get("iters")
    if per_epoch:
        for ax in axes:
            for x in range(per_epoch, len(first["loss"]), per_epoch):
                ax.axvline(x - 0.5, color=GREY, ls=":", lw=1)
    axes[0].set_title("loss per iteration", fontsize=9)
    axes[1].set_title("proxy lag: cos(proxy, current centroid)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def hardest_members_figure(records, features, labels, n: int = 4):
    """For the first ``n`` clusters: the most typical member (green) and the hardest one (red,
    least similar to the cluster mean), with the true identity and camera under each image."""

    paths, titles, colors = [], [], []
    for row in typical_and_hardest(features, labels, n=n):
        for tag, color in (("typical", GREEN), ("hardest", RED)):
            r = records[row[tag]]
            paths.append(r.path)
            titles.append(f"cluster {row['cluster']} {tag}\nid {r.pid} C{r.camid + 1}\ncos {row[tag + '_sim']:.2f}")
            colors.append(color)
    return image_grid(paths, titles, ncols=2 * n, border_colors=colors,
                      suptitle="typical (green) and hardest (red) member of each cluster")
