"""What a re-ID dataset holds, counted: cameras and tracklets per identity, the query/gallery
matches left after same-camera junk is removed, the rules a PK batch keeps, and which images
are each other's nearest neighbour.

These are the counts notebook 01 teaches from; they work on any parsed dataset (plain
:class:`reidkit.data.records.Record` lists), the embedded sample or a real one.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
from PIL import Image

from reidkit.data.records import Record
from reidkit.data.transforms import load_image


def cameras_per_identity(records: Sequence[Record]) -> dict[int, int]:
    """Number of distinct cameras that saw each identity, ``{pid: count}`` in pid order."""
    cams = defaultdict(set)
    for r in records:
        cams[r.pid].add(r.camid)
    return {pid: len(cams[pid]) for pid in sorted(cams)}


def tracklets_per_identity(records: Sequence[Record]) -> dict[int, int]:
    """Number of distinct tracklets of each identity (``Record.tracklet``; -1 when the dataset
    has none, which counts as one), ``{pid: count}`` in pid order."""
    trk = defaultdict(set)
    for r in records:
        trk[r.pid].add(r.tracklet)
    return {pid: len(trk[pid]) for pid in sorted(trk)}


def identity_camera_counts(records: Sequence[Record]) -> tuple[np.ndarray, list[int], list[int]]:
    """Images of each identity per camera: ``(counts, pids, cams)`` with ``counts[i, j]`` the
    number of images of ``pids[i]`` taken by camera ``cams[j]``."""
    pids = sorted({r.pid for r in records})
    cams = sorted({r.camid for r in records})
    row = {p: i for i, p in enumerate(pids)}
    col = {c: j for j, c in enumerate(cams)}
    counts = np.zeros((len(pids), len(cams)), dtype=np.int64)
    for r in records:
        counts[row[r.pid], col[r.camid]] += 1
    return counts, pids, cams


def split_summary(records: Sequence[Record]) -> dict:
    """Images, identities, tracklets (0 for a dataset without them) and cameras of one split, the
    images per identity, and how many identities one camera only saw (``single_camera_ids``) or
    two or more did (``multi_camera_ids``)."""
    per_cam = cameras_per_identity(records)
    n_ids = len(per_cam)
    return {
        "images": len(records),
        "identities": n_ids,
        "tracklets": len({(r.pid, r.tracklet) for r in records if r.tracklet >= 0}),
        "cameras": len({r.camid for r in records}),
        "images_per_identity": round(len(records) / max(1, n_ids), 2),
        "single_camera_ids": sum(1 for n in per_cam.values() if n == 1),
        "multi_camera_ids": sum(1 for n in per_cam.values() if n >= 2),
    }


def match_counts(query: Sequence[Record], gallery: Sequence[Record]) -> dict[str, np.ndarray]:
    """For every query image, how many gallery images are true matches under the Market protocol
    (same identity, *another* camera) and how many are junk (same identity, same camera: removed
    before ranking). A query with no match left is skipped by ``evaluate_rank``."""
    q_pid = np.array([r.pid for r in query]); q_cam = np.array([r.camid for r in query])
    g_pid = np.array([r.pid for r in gallery]); g_cam = np.array([r.camid for r in gallery])
    matches = np.zeros(len(query), dtype=np.int64)
    junk = np.zeros(len(query), dtype=np.int64)
    for pid in np.unique(q_pid):  # by identity: memory stays O(images), not O(query x gallery)
        qi = np.flatnonzero(q_pid == pid)
        g_same = g_cam[g_pid == pid]
        same_cam = (q_cam[qi, None] == g_same[None, :]).sum(1)
        junk[qi] = same_cam
        matches[qi] = len(g_same) - same_cam
    return {"matches": matches, "junk": junk}


def pk_batch_problems(indices: Sequence[int], labels: Sequence[int], camids: Sequence[int],
                      num_instances: int, camera_aware: bool = True) -> list[str]:
    """Every way ``indices`` breaks the rules of :class:`~reidkit.data.samplers.CameraAwarePKSampler`
    (an empty list when it keeps them all). The rules, per identity run:

    1. the stream is a sequence of runs, one per identity: ``num_instances`` (K) indices, or
       the anchor alone for an identity with a single image;
    2. no identity gives two runs, and no run holds an image labelled -1 (an outlier);
    3. the K-1 partners after the anchor share its label and come from the *other cameras'*
       images of that identity when it has any (``camera_aware``), else from its other images;
    4. partners repeat only when that pool has fewer than K images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    camids = np.asarray(camids, dtype=np.int64)
    idx = [int(i) for i in indices]
    problems, seen, pos = [], set(), 0
    while pos < len(idx):
        anchor = idx[pos]
        lab = int(labels[anchor])
        if lab < 0:
            problems.append(f"position {pos}: image {anchor} is an outlier (label -1)")
            pos += 1
            continue
        members = np.flatnonzero(labels == lab)
        size = 1 if len(members) == 1 else num_instances
        run = idx[pos:pos + size]
        if len(run) < size:
            problems.append(f"identity {lab}: run of {len(run)} images at position {pos}, expected {size}")
        if lab in seen:
            problems.append(f"identity {lab}: a second run at position {pos}")
        seen.add(lab)
        partners = run[1:]
        wrong = [j for j in partners if labels[j] != lab]
        if wrong:
            problems.append(f"identity {lab}: partners {wrong} carry another label")
        else:
            others = members[camids[members] != camids[anchor]] if camera_aware else members[:0]
            pool = others if len(others) else members[members != anchor]
            outside = sorted(set(partners) - set(pool.tolist()))
            if outside:
                where = "other cameras" if len(others) else "other images"
                problems.append(f"identity {lab}: partners {outside} are not from the {where} of anchor {anchor}")
            if len(pool) >= num_instances and len(set(partners)) < len(partners):
                problems.append(f"identity {lab}: partners repeat although {len(pool)} >= K images are available")
        pos += size
    return problems


def pk_runs(stream: Sequence[int], labels: Sequence[int], num_instances: int) -> list[list[int]]:
    """Split a :class:`~reidkit.data.samplers.CameraAwarePKSampler` stream into its per-identity
    runs: ``num_instances`` indices, or the anchor alone for a one-image identity."""
    labels = np.asarray(labels, dtype=np.int64)
    sizes = {int(lab): n for lab, n in zip(*np.unique(labels, return_counts=True))}
    out, pos, idx = [], 0, [int(i) for i in stream]
    while pos < len(idx):
        size = 1 if sizes[int(labels[idx[pos]])] == 1 else num_instances
        out.append(idx[pos:pos + size])
        pos += size
    return out


def cross_camera_share(stream: Sequence[int], labels: Sequence[int], camids: Sequence[int],
                       num_instances: int) -> float:
    """Fraction of the partners in a PK stream whose camera differs from their anchor's."""
    camids = np.asarray(camids)
    flags = [camids[j] != camids[run[0]] for run in pk_runs(stream, labels, num_instances) for j in run[1:]]
    return float(np.mean(flags)) if flags else 0.0


def pixel_vectors(records: Sequence[Record], size: tuple[int, int] = (16, 8)) -> np.ndarray:
    """Each image shrunk to ``size`` (height, width) RGB pixels, flattened, centred and
    L2-normalised: the crudest possible "feature", float32 ``(n, 3*h*w)``."""

    h, w = size
    out = np.empty((len(records), 3 * h * w), dtype=np.float32)
    for i, r in enumerate(records):
        img = load_image(r.path).resize((w, h), Image.BILINEAR)
        v = np.asarray(img, dtype=np.float32).ravel() / 255.0
        v -= v.mean()
        out[i] = v / max(float(np.linalg.norm(v)), 1e-12)
    return out


def nearest_neighbours(feats: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """Index of each row's nearest other row by cosine similarity (rows L2-normalised), computed
    in blocks of ``chunk`` rows so that memory stays O(chunk x n)."""
    feats = np.asarray(feats, dtype=np.float32)
    n = len(feats)
    if n < 2:
        raise ValueError(f"need at least 2 features to find neighbours, got {n}")
    nn = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):
        sim = feats[s:s + chunk] @ feats.T
        sim[np.arange(sim.shape[0]), np.arange(s, s + sim.shape[0])] = -np.inf
        nn[s:s + chunk] = sim.argmax(1)
    return nn


def neighbour_agreement(feats: np.ndarray, records: Sequence[Record]) -> dict[str, float]:
    """What each image's nearest other image shares with it, as fractions of the images:
    ``same_tracklet``, ``same_identity``, ``same_camera``, and ``same_identity_other_camera``
    (the pairs re-ID is about). ``same_tracklet`` is NaN for a dataset without tracklets
    (``Record.tracklet == -1``, e.g. Market-1501)."""
    if len(feats) != len(records):
        raise ValueError(f"{len(feats)} features for {len(records)} records")
    nn = nearest_neighbours(feats)
    pid = np.array([r.pid for r in records]); cam = np.array([r.camid for r in records])
    trk = np.array([r.tracklet for r in records])
    same_id, same_cam = pid == pid[nn], cam == cam[nn]
    same_trk = same_id & (trk == trk[nn]) & (trk >= 0)
    return {
        "same_tracklet": float(np.mean(same_trk)) if (trk >= 0).any() else float("nan"),
        "same_identity": float(np.mean(same_id)),
        "same_camera": float(np.mean(same_cam)),
        "same_identity_other_camera": float(np.mean(same_id & ~same_cam)),
    }
