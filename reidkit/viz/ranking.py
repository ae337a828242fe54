"""Ranked lists: a query and its closest gallery images, as a figure and as a browser widget."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from reidkit.retrieval.inspect import precision_recall, queries_by_outcome, ranked_gallery
from reidkit.retrieval.market import evaluate_rank
from reidkit.viz.base import GREEN, RED, image_grid


def ranked_list(query_path: str, gallery_paths: Sequence[str], matches: Sequence[bool],
                distances: Sequence[float] | None = None, title: str | None = None):
    """A query and its top-k gallery images, green border = same identity, red = different."""
    paths = [query_path] + list(gallery_paths)
    colors = [None] + [GREEN if m else RED for m in matches]
    titles = ["query"] + [f"{i + 1}" + (f"\n{d:.3f}" if distances is not None else "")
                          for i, d in enumerate(distances if distances is not None else [0] * len(matches))]
    return image_grid(paths, titles, ncols=len(paths), border_colors=colors, suptitle=title)


def _ids(records):
    return np.array([r.pid for r in records]), np.array([r.camid for r in records])


def ranked_query_figure(dist, query, gallery, qi: int, topk: int = 10, title: str = ""):
    """:func:`ranked_list` of query ``qi`` under the Market protocol (junk removed), with the
    query's identity and camera in the title."""
    dist = np.asarray(dist)
    q_pids, q_cams = _ids(query)
    g_pids, g_cams = _ids(gallery)
    order = ranked_gallery(dist[qi], q_pids[qi], q_cams[qi], g_pids, g_cams, topk)
    head = f"{title}: " if title else ""
    return ranked_list(query[qi].path, [gallery[j].path for j in order],
                       [g_pids[j] == q_pids[qi] for j in order], dist[qi, order],
                       title=f"{head}query {qi}, id {q_pids[qi]}, camera C{q_cams[qi] + 1}")


def ranked_comparison(dists: dict, query, gallery, qi: int, topk: int = 10):
    """One query's ranked list under several distances, one row each (e.g. plain and re-ranked):
    the row title gives the distance's name and the 1-based position of the first true match."""
    q_pids, q_cams = _ids(query)
    g_pids, g_cams = _ids(gallery)
    paths, titles, colors = [], [], []
    for name, dist in dists.items():
        row = np.asarray(dist)[qi]
        full = ranked_gallery(row, q_pids[qi], q_cams[qi], g_pids, g_cams)
        hits = g_pids[full] == q_pids[qi]
        first = int(np.argmax(hits)) + 1 if hits.any() else None
        order = full[:topk]
        paths += [query[qi].path] + [gallery[j].path for j in order]
        titles += [f"{name}\nfirst match: {first}"] + [f"{i + 1}: id {g_pids[j]}" for i, j in enumerate(order)]
        colors += [None] + [GREEN if g_pids[j] == q_pids[qi] else RED for j in order]
    return image_grid(paths, titles, ncols=topk + 1, border_colors=colors,
                      suptitle=f"query {qi}, id {q_pids[qi]}, camera C{q_cams[qi] + 1}")


def match_summary(dist_row, q_pid: int, q_cam: int, g_pids, g_cams) -> str:
    """One line for a query: how many true matches are left after junk removal, how many junk
    images were removed, and the 1-based positions of the true matches in the ranked list."""
    g_pids, g_cams = np.asarray(g_pids), np.asarray(g_cams)
    junk = int(((g_pids == q_pid) & (g_cams == q_cam)).sum())
    ranks = precision_recall(dist_row, q_pid, q_cam, g_pids, g_cams)["match_ranks"]
    if len(ranks) == 0:
        return (f"no true match left: all {junk} images of this person in the gallery come from the query's "
                f"camera (junk), so the Market protocol skips this query")
    return (f"{len(ranks)} true matches after removing {junk} same-camera images (junk); "
            f"their positions in the ranked list: {', '.join(str(int(r)) for r in ranks)}")


def ranked_browser(dist, query, gallery, topk: int = 10, title: str = "", reranked=None):
    """An ipywidgets browser of ranked lists (same-identity same-camera images removed).

    Controls: a filter (all queries, rank-1 hits, rank-1 misses, queries with no match left),
    a full-width slider over the queries of that filter, a top-k slider and, when ``reranked``
    (a second (num_query, num_gallery) distance matrix) is given, a plain / re-ranked switch.
    Under the figure, one line lists the positions of every true match of the query (what a
    student needs to compute its AP by hand). Each move re-renders one :func:`ranked_list`."""
    import ipywidgets as widgets  # optional: needs a notebook front end (the GPU machine has none)
    from IPython.display import display

    dists = {"plain": np.asarray(dist)}
    if reranked is not None:
        dists["re-ranked"] = np.asarray(reranked)
    q_pids, q_cams = _ids(query)
    g_pids, g_cams = _ids(gallery)
    groups = {name: queries_by_outcome(evaluate_rank(d, q_pids, g_pids, q_cams, g_cams, max_rank=1))
              for name, d in dists.items()}

    which = widgets.ToggleButtons(options=list(dists), description="distance")
    if len(dists) == 1:
        which.layout.display = "none"
    show = widgets.ToggleButtons(description="show", style={"button_width": "140px"})
    slider = widgets.IntSlider(0, 0, len(query) - 1, description="query", continuous_update=False,
                               layout=widgets.Layout(width="100%"))
    k = widgets.IntSlider(topk, 1, min(20, len(gallery)), description="top-k", continuous_update=False,
                          layout=widgets.Layout(width="50%"))
    info = widgets.HTML()
    out = widgets.Output()
    state = {"busy": False, "qi": 0}

    def members():
        return groups[which.value][show.value]

    def filter_options():
        g = groups[which.value]
        return [(f"{name} ({len(idx)})", name) for name, idx in g.items() if len(idx)]

    def render(*_):
        if state["busy"]:
            return
        idx = members()
        qi = int(idx[min(slider.value, len(idx) - 1)])
        state["qi"] = qi
        d = dists[which.value]
        info.value = (f"<b>query {qi}</b> ({slider.value + 1} of {len(idx)} in '{show.value}'). "
                      + match_summary(d[qi], q_pids[qi], q_cams[qi], g_pids, g_cams))
        with out:
            out.clear_output(wait=True)
            fig = ranked_query_figure(d, query, gallery, qi, k.value, title=f"{title} ({which.value})".strip())
            display(fig)
            plt.close(fig)

    def regroup(keep_query: bool):
        """Refill the filter and the slider's range; stay on the same query when it is still shown."""
        old = state["qi"]
        state["busy"] = True
        current = show.value
        show.options = filter_options()
        show.value = current if current in groups[which.value] and len(groups[which.value][current]) else "all"
        idx = members()
        slider.max = max(len(idx) - 1, 0)
        hit = np.flatnonzero(idx == old)
        slider.value = int(hit[0]) if keep_query and len(hit) else 0
        state["busy"] = False
        render()

    show.options = filter_options()
    show.value = "all"
    slider.max = len(members()) - 1
    which.observe(lambda _: regroup(True), names="value")
    show.observe(lambda _: None if state["busy"] else regroup(False), names="value")
    slider.observe(render, names="value")
    k.observe(render, names="value")
    render()
    return widgets.VBox([which, show, slider, k, info, out])
