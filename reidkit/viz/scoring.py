"""Figures of notebook 06: one query's precision-recall curve, and what re-ranking moves."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from reidkit.viz.base import GREEN, GREY, RED


def precision_recall_figure(pr: dict, title: str = "", show: int = 60):
    """Left: the first ``show`` positions of one ranked list (green = true match, red = not) with
    the precision after each position. Right: precision against recall as a step curve; the
    shaded area under it is the AP. ``pr`` is :func:`reidkit.retrieval.inspect.precision_recall`."""

    hits, prec, rec = pr["hits"], pr["precision"], pr["recall"]
    n = min(show, len(hits))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.4), gridspec_kw={"width_ratios": [1.6, 1]})
    pos = np.arange(1, n + 1)
    a.bar(pos, np.ones(n), width=1.0, color=[GREEN if h else RED for h in hits[:n]], alpha=0.25)
    a.plot(pos, prec[:n], color="black", lw=1.2, label="precision after position k")
    a.scatter(pos[hits[:n]], prec[:n][hits[:n]], color=GREEN, zorder=3, s=18, label="precision at a true match")
    a.set(xlabel="position k in the ranked list", ylabel="precision", ylim=(0, 1.05), xlim=(0.5, n + 0.5))
    a.legend(fontsize=8, loc="upper right")
    r_hit = rec[hits]
    p_hit = prec[hits]
    # the AP's step curve: at each hit, recall jumps by 1/|G| at the precision reached there
    xs = np.concatenate([[0.0], np.repeat(r_hit, 2)[:-1]])
    ys = np.repeat(p_hit, 2)
    b.fill_between(xs, ys, step=None, color=GREEN, alpha=0.25, label=f"area = AP = {pr['AP']:.3f}")
    b.plot(xs, ys, color=GREEN, lw=1.5)
    b.plot(rec, prec, color=GREY, lw=0.8, label="precision at every position")
    b.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.05))
    b.legend(fontsize=8, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def rank_shift_figure(cmp: dict, labels=("plain", "re-ranked"), max_rank: int = 20):
    """What re-ranking moves, from :func:`reidkit.retrieval.inspect.compare_rankings`. Left: where the
    first true match lands (1-based position, the last bar gathers everything beyond
    ``max_rank``), before and after. Right: each valid query's AP before against after; points
    above the diagonal gained."""

    fb, fa = cmp["first_before"], cmp["first_after"]
    valid = fb >= 0
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1.6, 1]})
    edges = np.arange(1, max_rank + 3) - 0.5
    for vals, lab, col, off in ((fb[valid], labels[0], GREY, -0.2), (fa[valid], labels[1], RED, 0.2)):
        pos = np.minimum(vals + 1, max_rank + 1)
        counts, _ = np.histogram(pos, bins=edges)
        a.bar(np.arange(1, max_rank + 2) + off, counts, width=0.4, color=col, label=lab)
    a.set_xticks(list(range(1, max_rank + 1, 2)) + [max_rank + 1])
    a.set_xticklabels([str(t) for t in range(1, max_rank + 1, 2)] + [f">{max_rank}"])
    a.set(xlabel="position of the first true match", ylabel="queries")
    a.legend(fontsize=8)
    ap_b, ap_a = np.asarray(cmp["ap_before"])[valid], np.asarray(cmp["ap_after"])[valid]
    up = np.asarray(cmp["ap_change"])[valid] > 1e-12
    b.scatter(ap_b[up], ap_a[up], s=12, color=GREEN, label=f"AP up ({int(up.sum())})")
    b.scatter(ap_b[~up], ap_a[~up], s=12, color=RED, label=f"AP not up ({int((~up).sum())})")
    b.plot([0, 1], [0, 1], color="black", lw=0.8)
    b.set(xlabel=f"AP, {labels[0]}", ylabel=f"AP, {labels[1]}", xlim=(0, 1.02), ylim=(0, 1.02))
    b.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig
