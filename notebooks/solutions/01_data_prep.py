"""Worked solutions to the exercises of notebook 01 (Data: what re-ID asks).

Load them in a new notebook cell with ``%run solutions/01_data_prep.py`` (nothing runs on loading),
then call ``exercise_K(ctx)``. Each one measures its answer on the run's dataset (a
:class:`reidkit.course.runctx.RunContext`), prints a conclusion drawn from the numbers it measured
and returns those numbers, with the printed text under ``explanation``.
``tests/notebooks/test_solutions_01.py`` runs them all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reidkit.data import stats
from reidkit.data.datasets import parse_mars_name
from reidkit.data.records import relabel
from reidkit.data.samplers import CameraAwarePKSampler
from reidkit.retrieval.market import evaluate_rank


def _say(out: dict) -> dict:
    print(out["explanation"])
    return out


def exercise_1(ctx, file_name: str = "0004C2T0004F008.jpg") -> dict:
    """Which split is this file in? Read identity, camera, tracklet and frame from the MARS file
    name alone, then find the split(s) of the dataset that hold the file, and say whether a model
    could have trained on this person."""
    pid, camid, tracklet, frame = parse_mars_name(file_name)
    ds = ctx.dataset()
    splits = [name for name, recs in ds.splits().items() if any(Path(r.path).name == file_name for r in recs)]
    in_train = pid in {r.pid for r in ds.train}
    where = ", ".join(splits) if splits else "no split of this dataset"
    if in_train:
        verdict = "its person is in the training split, so a model could have learnt this person"
    else:
        verdict = ("its person is not in the training split, so no model trained here has seen this person: "
                   "the test people are new")
    return _say({
        "pid": pid, "camera": camid + 1, "tracklet_in_name": tracklet, "frame": frame,
        "splits": splits, "identity_in_train": in_train,
        "explanation": f"{file_name}: person {pid}, camera C{camid + 1}, tracklet T{tracklet}, frame {frame}. "
                       f"The file is in {where}; {verdict}.",
    })


def exercise_2(ctx) -> dict:
    """Count the training identities seen by two or more cameras, list them, and explain why this
    number matters for notebook 03's clusters."""
    per_id = stats.cameras_per_identity(ctx.dataset().train)
    multi = [pid for pid, n in per_id.items() if n >= 2]
    share = len(multi) / len(per_id)
    if not multi:
        why = ("No training person changes camera, so no cluster can ever join two cameras: the model gets no "
               "cross-camera positive at all, while the test asks for nothing else.")
    elif share < 0.5:
        why = (f"Clustering joins images that already look alike (frames of one tracklet, tracklets of one camera), "
               f"so notebook 03's clusters will be nearly pure but one-camera; only these {len(multi)} people can "
               f"ever give a cross-camera positive, and the test asks exactly for cross-camera matches.")
    else:
        why = (f"Most people change camera, so notebook 03's clusters can join two cameras for {len(multi)} people; "
               "whether they do is what the clustering must earn, and impure clusters become possible.")
    return _say({
        "multi_camera_ids": len(multi), "ids": multi, "identities": len(per_id),
        "single_camera_ids": len(per_id) - len(multi),
        "explanation": f"{len(multi)} of {len(per_id)} training identities are seen by two or more cameras "
                       f"({multi}). {why}",
    })


def exercise_3(ctx) -> dict:
    """Predict, then measure, the share of PK partners that come from another camera than their
    anchor over one epoch of ``CameraAwarePKSampler``, with ``camera_aware=True`` and ``False``."""
    ds = ctx.dataset()
    labels, _ = relabel(ds.train)
    camids = [r.camid for r in ds.train]
    K = ctx.profile.hhcl.num_instances
    shares = {}
    for aware in (True, False):
        stream = list(CameraAwarePKSampler(labels, camids, num_instances=K, seed=ctx.seed, camera_aware=aware))
        shares[aware] = stats.cross_camera_share(stream, labels, camids, K)
    n_ids = len(set(labels))
    multi = sum(n >= 2 for n in stats.cameras_per_identity(ds.train).values())
    gap = shares[True] - shares[False]
    if multi == 0:
        why = "No identity has a second camera, so neither rule can draw a cross-camera partner."
    elif multi / n_ids < 0.5:
        why = (f"The gap is small because only {multi} of {n_ids} identities have a second camera: the camera-aware "
               "rule changes their partners only, and cannot create cross-camera pairs the data does not hold. "
               "On Market-1501, where every person has two cameras or more, the camera-aware share would be "
               "near 100% and the gap large.")
    else:
        why = (f"{multi} of {n_ids} identities have a second camera, so the camera-aware rule turns most partners "
               "into cross-camera pairs, which the plain rule draws only in proportion to the other cameras' images.")
    return _say({
        "K": K, "multi_camera_ids": multi, "identities": n_ids,
        "cross_camera_aware": shares[True], "cross_camera_plain": shares[False],
        "explanation": f"Partners from another camera over one epoch: {shares[True]:.0%} with camera_aware=True, "
                       f"{shares[False]:.0%} with camera_aware=False (a gap of {100 * gap:.0f} points). {why}",
    })


def exercise_4(ctx) -> dict:
    """Predict, then measure, the rank-1 and mAP of the 16 x 8 pixel feature on the test split,
    with same-camera junk removed (the protocol) and with junk counted as true matches."""
    ds = ctx.dataset()
    qp = stats.pixel_vectors(ds.query, size=(16, 8))
    gp = stats.pixel_vectors(ds.gallery, size=(16, 8))
    dist = (2.0 - 2.0 * qp @ gp.T).astype(np.float32)          # unit vectors: 2 - 2 cos
    q_pids, g_pids = np.array([r.pid for r in ds.query]), np.array([r.pid for r in ds.gallery])
    q_cams, g_cams = np.array([r.camid for r in ds.query]), np.array([r.camid for r in ds.gallery])
    res = {}
    for label, qc in (("junk removed", q_cams), ("junk kept", np.full_like(q_cams, -1))):
        r = evaluate_rank(dist, q_pids, g_pids, qc, g_cams, max_rank=10, device="cpu")
        res[label] = {"rank1": float(r["cmc"][0]), "mAP": float(r["mAP"]), "valid": int(r["num_valid_q"])}
    kept, removed = res["junk kept"], res["junk removed"]
    gap = kept["rank1"] - removed["rank1"]
    if gap > 0.1:
        why = (f"Keeping junk lifts even raw pixels by {100 * gap:.0f} rank-1 points: a same-camera frame of the "
               "person shares the background and the light, so finding it measures tracking. The protocol removes "
               "junk so that only cross-camera matches count.")
    elif gap > 0:
        why = (f"Keeping junk lifts pixels by only {100 * gap:.0f} rank-1 points here: same-camera frames of the "
               "person are not always their nearest images. The protocol still removes them, so that only "
               "cross-camera matches count.")
    else:
        why = ("Keeping junk does not help pixels here: same-camera images of the person are not their nearest "
               "ones. The protocol removes them anyway, so that only cross-camera matches count.")
    return _say({
        "junk_removed": removed, "junk_kept": kept,
        "explanation": f"16x8 pixels, junk removed: rank-1 {removed['rank1']:.0%}, mAP {removed['mAP']:.0%} over "
                       f"{removed['valid']} valid queries; junk kept as matches: rank-1 {kept['rank1']:.0%}, mAP "
                       f"{kept['mAP']:.0%} over {kept['valid']} (the skipped queries come back). {why}",
    })


def exercise_5(ctx) -> dict:
    """How many query images keep no true match once same-camera junk is removed? Which identities
    do they belong to, and why? Confirm the count with ``evaluate_rank``'s ``num_valid_q`` on a
    random distance matrix, and say why it does not depend on the distances."""
    ds = ctx.dataset()
    counts = stats.match_counts(ds.query, ds.gallery)
    lost = np.flatnonzero(counts["matches"] == 0)
    lost_ids = sorted({ds.query[i].pid for i in lost})
    gallery_cams = {pid: sorted({g.camid + 1 for g in ds.gallery if g.pid == pid}) for pid in lost_ids}
    query_cams = {pid: sorted({ds.query[i].camid + 1 for i in lost if ds.query[i].pid == pid}) for pid in lost_ids}
    rng = np.random.default_rng(ctx.seed)
    dist = rng.random((len(ds.query), len(ds.gallery))).astype(np.float32)
    res = evaluate_rank(dist, [r.pid for r in ds.query], [r.pid for r in ds.gallery],
                        [r.camid for r in ds.query], [r.camid for r in ds.gallery], max_rank=10, device="cpu")
    n_valid = int(res["num_valid_q"])
    same = all(query_cams[p] == gallery_cams[p] for p in lost_ids)
    if not lost_ids:
        why = "Every query has a true match in another camera, so no query is skipped."
    elif same:
        why = ("For each of them the skipped query tracklet was filmed by the only camera in which the gallery shows "
               "that person, so all its matches are junk.")
    else:
        why = "Their gallery images all sit in the skipped query's own camera, so every match is junk."
    agree = "agrees" if n_valid == len(ds.query) - len(lost) else "DISAGREES"
    return _say({
        "queries": len(ds.query), "without_match": len(lost), "identities": lost_ids,
        "query_cameras": query_cams, "gallery_cameras": gallery_cams, "num_valid_q": n_valid,
        "explanation": f"{len(lost)} of {len(ds.query)} query images, of {len(lost_ids)} identities {lost_ids}, keep "
                       f"no true match. {why} evaluate_rank on random distances counts {n_valid} valid queries, "
                       f"which {agree} with {len(ds.query)} - {len(lost)}: validity depends only on pids and cameras "
                       "(what is junk, what is a match), never on the order the distances give.",
    })
