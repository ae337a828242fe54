"""Notebook 01's figures: identities across cameras, the identity x camera map, a query with its
junk and its true matches, a PK batch, a weak bag, and the identity browser widget."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np

from reidkit.data.stats import identity_camera_counts
from reidkit.viz.base import GREEN, GREY, image_grid

BLUE = "#4575b4"


def _title_room(fig):
    """Lower the top of the axes so the suptitle gets a strip of its own (about 0.4 inch);
    cheaper than a second tight_layout on a large grid."""
    top = min(fig.subplotpars.top, 1 - 0.4 / fig.get_figheight())
    fig.subplots_adjust(top=top)
    return fig


def _spread_over_tracklets(recs: Sequence, max_images: int) -> list:
    """Up to ``max_images`` records, taking turns over the (camera, tracklet) groups."""
    groups: dict = {}
    for r in recs:
        groups.setdefault((r.camid, r.tracklet), []).append(r)
    keys = sorted(groups)
    picks, depth = [], 0
    while len(picks) < max_images and any(depth < len(groups[k]) for k in keys):
        picks += [groups[k][depth] for k in keys if depth < len(groups[k])]
        depth += 1
    # keep each group's frames side by side
    picks = picks[:max_images]
    return sorted(picks, key=lambda r: (r.camid, r.tracklet, r.path))


def identity_grid(records: Sequence, pid: int, max_images: int = 8):
    """Images of one identity, spread over its cameras and tracklets, titled camera / tracklet."""
    recs = [r for r in records if r.pid == pid]
    if not recs:
        raise ValueError(f"identity {pid} has no image in these records")
    picks = _spread_over_tracklets(recs, max_images)
    cams = sorted({r.camid + 1 for r in recs})
    n_trk = len({r.tracklet for r in recs})
    return _title_room(image_grid([r.path for r in picks], [f"C{r.camid + 1} T{r.tracklet}" for r in picks],
                                  ncols=max_images,
                                  suptitle=f"identity {pid}: {len(recs)} images, {n_trk} tracklets, cameras {cams}"))


def camera_grid(records: Sequence, camid: int, max_images: int = 8):
    """One image of each of the first ``max_images`` identities seen by camera ``camid``."""
    seen, picks = set(), []
    for r in records:
        if r.camid == camid and r.pid not in seen:
            seen.add(r.pid)
            picks.append(r)
    n = sum(1 for r in records if r.camid == camid)
    return _title_room(image_grid([r.path for r in picks[:max_images]], [f"id {r.pid}" for r in picks[:max_images]],
                                  ncols=max_images,
                                  suptitle=f"camera C{camid + 1}: {n} images of {len(seen)} identities"))


def camera_map_figure(dataset):
    """Per split, an identity x camera map of image counts: a row with one lit cell is a person
    that only one camera saw. In the query panel a red cell is a query (person, camera) whose
    person the gallery shows in no other camera: those queries have no true match and are skipped."""

    splits = {k: v for k, v in dataset.splits().items() if v}
    all_cams = sorted({r.camid for recs in splits.values() for r in recs})
    gallery_cams: dict = {}
    for r in splits.get("gallery", []):
        gallery_cams.setdefault(r.pid, set()).add(r.camid)
    fig, axes = plt.subplots(1, len(splits), figsize=(3.4 * len(splits), 4.2), squeeze=False)
    for ax, (name, recs) in zip(axes[0], splits.items()):
        counts, pids, cams = identity_camera_counts(recs)
        full = np.zeros((len(pids), len(all_cams)), dtype=np.int64)
        for j, c in enumerate(cams):
            full[:, all_cams.index(c)] = counts[:, j]
        ax.imshow(full > 0, cmap="Blues", vmin=0, vmax=1.4, aspect="auto")
        lost = 0
        for i in range(full.shape[0]):
            for j in range(full.shape[1]):
                if full[i, j]:
                    skipped = (name == "query" and "gallery" in splits
                               and not gallery_cams.get(pids[i], set()) - {all_cams[j]})
                    lost += skipped
                    ax.text(j, i, str(full[i, j]), ha="center", va="center", fontsize=6, zorder=3)
                    if skipped:
                        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fc="#f4a582", ec="#d73027", lw=1.2,
                                                   zorder=2))
        single = int(((full > 0).sum(1) == 1).sum())
        title = f"{name}: {single} of {len(pids)} ids in one camera"
        if name == "query" and "gallery" in splits:
            title += f"\n{lost} cells with no match elsewhere (red)"
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(all_cams)))
        ax.set_xticklabels([f"C{c + 1}" for c in all_cams], fontsize=7)
        ax.set_yticks(range(len(pids)))
        ax.set_yticklabels([str(p) for p in pids], fontsize=6)
        ax.set_xlabel("camera")
    axes[0][0].set_ylabel("identity (images per camera)")
    fig.tight_layout()
    return fig


def junk_figure(query_record, gallery: Sequence, max_images: int = 12):
    """A query (blue) beside the gallery images of its identity: grey border = junk (same
    camera, removed before ranking), green border = a true match (another camera)."""
    same = [g for g in gallery if g.pid == query_record.pid]
    same = sorted(same, key=lambda g: (g.camid != query_record.camid, g.camid, g.tracklet, g.path))
    shown = _spread_over_tracklets(same, max_images - 1)
    shown = sorted(shown, key=lambda g: (g.camid != query_record.camid, g.camid, g.tracklet, g.path))
    paths = [query_record.path] + [g.path for g in shown]
    titles = [f"query C{query_record.camid + 1}"] + [
        f"{'junk' if g.camid == query_record.camid else 'match'} C{g.camid + 1}" for g in shown]
    colors = [BLUE] + [GREY if g.camid == query_record.camid else GREEN for g in shown]
    n_junk = sum(g.camid == query_record.camid for g in same)
    return _title_room(image_grid(paths, titles, ncols=len(paths), border_colors=colors,
                                  suptitle=f"identity {query_record.pid}: {n_junk} junk, {len(same) - n_junk} "
                                           f"true matches in the gallery"))


def pk_batch_figure(records: Sequence, indices: Sequence[int], num_instances: int, title: str = ""):
    """A PK batch laid out K images per identity (two identities per row when K <= 4), the
    anchor of each identity framed in blue."""
    idx = list(indices)
    colors = [BLUE if k % num_instances == 0 else None for k in range(len(idx))]
    ncols = num_instances * max(1, 8 // num_instances)
    title = title or f"P={len(idx) // num_instances} identities x K={num_instances} images (anchor framed)"
    return _title_room(image_grid([records[i].path for i in idx],
                                  [f"id {records[i].pid} C{records[i].camid + 1}" for i in idx], ncols=ncols,
                                  border_colors=colors, suptitle=title))


def bag_figure(records: Sequence, indices: Sequence[int], bag_ids: Sequence[int], reveal: bool = False):
    """One weak bag: its images, labelled only with the set of identities (``reveal`` shows
    the hidden per-image identity)."""
    idx = list(indices)
    titles = [f"id {records[i].pid}" if reveal else "?" for i in idx]
    return _title_room(image_grid([records[i].path for i in idx], titles, ncols=len(idx),
                                  suptitle=f"one bag, labelled only with the set {sorted(bag_ids)}"))


def identity_browser(records: Sequence, max_images: int = 8):
    """An ipywidgets browser over the identities of ``records``: a slider picks one, the figure
    shows its images spread over cameras and tracklets (one update re-draws one small grid)."""
    import ipywidgets as widgets  # optional: needs a notebook front end (the GPU machine has none)
    from IPython.display import display

    pids = sorted({r.pid for r in records})
    slider = widgets.IntSlider(0, 0, len(pids) - 1, description="identity #", continuous_update=False)
    out = widgets.Output()

    def render(*_):
        with out:
            out.clear_output(wait=True)
            fig = identity_grid(records, pids[slider.value], max_images)
            display(fig)
            plt.close(fig)

    slider.observe(render, names="value")
    render()
    return widgets.VBox([slider, out])
