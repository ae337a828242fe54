"""Ranked lists: a query and its closest gallery images, as a figure and as a browser widget."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from reidkit.evaluation import ranked_gallery
from reidkit.viz.base import GREEN, RED, image_grid


def ranked_list(query_path: str, gallery_paths: Sequence[str], matches: Sequence[bool],
                distances: Sequence[float] | None = None, title: str | None = None):
    """A query and its top-k gallery images, green border = same identity, red = different."""
    paths = [query_path] + list(gallery_paths)
    colors = [None] + [GREEN if m else RED for m in matches]
    titles = ["query"] + [f"{i + 1}" + (f"\n{d:.3f}" if distances is not None else "")
                          for i, d in enumerate(distances if distances is not None else [0] * len(matches))]
    return image_grid(paths, titles, ncols=len(paths), border_colors=colors, suptitle=title)


def ranked_browser(dist, query, gallery, topk: int = 10, title: str = ""):
    """An ipywidgets browser: a query slider and its ranked gallery (same-pid same-camera removed).

    ``dist`` is (num_query, num_gallery); ``query`` / ``gallery`` are record lists. The widget only
    re-renders :func:`ranked_list`; nothing is computed on interaction but the sort of one row."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    dist = np.asarray(dist)
    q_pids = np.array([r.pid for r in query]); g_pids = np.array([r.pid for r in gallery])
    q_cams = np.array([r.camid for r in query]); g_cams = np.array([r.camid for r in gallery])
    slider = widgets.IntSlider(0, 0, len(query) - 1, description="query", continuous_update=False)
    k = widgets.IntSlider(topk, 1, min(20, len(gallery)), description="top-k", continuous_update=False)
    out = widgets.Output()

    def render(*_):
        qi = slider.value
        order = ranked_gallery(dist[qi], q_pids[qi], q_cams[qi], g_pids, g_cams, k.value)
        with out:
            out.clear_output(wait=True)
            fig = ranked_list(query[qi].path, [gallery[j].path for j in order],
                              [g_pids[j] == q_pids[qi] for j in order], dist[qi, order],
                              title=f"{title} query {qi}: id {q_pids[qi]}, C{q_cams[qi] + 1}")
            display(fig)
            plt.close(fig)

    slider.observe(render, names="value")
    k.observe(render, names="value")
    render()
    return widgets.VBox([widgets.HBox([slider, k]), out])
