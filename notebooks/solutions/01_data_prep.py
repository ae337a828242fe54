"""Worked solutions to the exercises of notebook 01 (Data: what re-ID asks).

Each ``exercise_K`` answers exercise K of ``notebooks/01_data_prep.ipynb`` on the run's dataset
(a :class:`reidkit.course.runctx.RunContext`) and returns the numbers that answer it, with the written
part of the answer in an ``explanation`` string. ``tests/test_solutions_01.py`` runs them all.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from reidkit.data import stats
from reidkit.data.datasets import parse_mars_name
from reidkit.data.records import relabel
from reidkit.data.samplers import CameraAwarePKSampler, ConsecutiveBagSampler
from reidkit.retrieval.market import evaluate_rank


def exercise_1(ctx, file_name: str = "0004C2T0004F008.jpg") -> dict:
    """Which split is this file in? Read identity, camera, tracklet and frame from the MARS file
    name alone, then find the split(s) of the dataset that hold the file, and say whether a model
    could have trained on this person."""
    pid, camid, tracklet, frame = parse_mars_name(file_name)
    ds = ctx.dataset()
    splits = [name for name, recs in ds.splits().items() if any(Path(r.path).name == file_name for r in recs)]
    in_train = pid in {r.pid for r in ds.train}
    return {
        "pid": pid, "camera": camid + 1, "tracklet_in_name": tracklet, "frame": frame,
        "splits": splits, "identity_in_train": in_train,
        "explanation": (f"{file_name} is person {pid}, camera C{camid + 1}, tracklet T{tracklet}, frame {frame}; "
                        f"the file sits in {', '.join(splits) or 'no split'}. Its identity is "
                        f"{'also' if in_train else 'never'} in the training split, so a model "
                        f"{'could' if in_train else 'could not'} have learnt this person: the test people are new."),
    }


def exercise_2(ctx) -> dict:
    """Count the training identities seen by two or more cameras, list them, and explain why this
    number matters for notebook 03's clusters."""
    per_id = stats.cameras_per_identity(ctx.dataset().train)
    multi = [pid for pid, n in per_id.items() if n >= 2]
    return {
        "multi_camera_ids": len(multi), "ids": multi, "identities": len(per_id),
        "single_camera_ids": len(per_id) - len(multi),
        "explanation": (f"Only {len(multi)} of {len(per_id)} training people were filmed by two or more cameras. "
                        "Clustering groups images that already look alike, i.e. frames of one tracklet and "
                        "tracklets of one camera, so the pseudo-labels of notebook 03 are nearly pure but "
                        "almost never join two cameras: the model trained on them gets cross-camera positives "
                        f"from at most {len(multi)} people, while the test asks exactly for cross-camera matches."),
    }


def pk_batch_by_hand(labels, camids, P: int, K: int, seed: int = 0) -> list[int]:
    """P identities x K images: a random anchor per identity, then K-1 partners from its other
    cameras (its other images when one camera saw it all), without replacement when possible."""
    rng = np.random.default_rng(seed)
    labels, camids = np.asarray(labels), np.asarray(camids)
    batch = []
    for pid in rng.choice(np.unique(labels[labels >= 0]), size=P, replace=False):
        members = np.flatnonzero(labels == pid)
        anchor = int(rng.choice(members))
        pool = members[camids[members] != camids[anchor]]
        if len(pool) == 0:
            pool = members[members != anchor]
        batch.append(anchor)
        if len(pool):
            batch.extend(int(j) for j in rng.choice(pool, size=K - 1, replace=len(pool) < K))
    return batch


def exercise_3(ctx) -> dict:
    """Build a PK batch by hand and check it with ``stats.pk_batch_problems`` (the rules of
    ``CameraAwarePKSampler``); then measure, over one epoch, how many partners come from another
    camera than their anchor with ``camera_aware=True`` and ``False``, and explain the gap."""
    ds = ctx.dataset()
    labels, _ = relabel(ds.train)
    camids = [r.camid for r in ds.train]
    K = ctx.profile.hhcl.num_instances
    P = ctx.profile.hhcl.batch_size // K
    hand = pk_batch_by_hand(labels, camids, P, K, seed=ctx.seed)
    shares = {}
    for aware in (True, False):
        stream = list(CameraAwarePKSampler(labels, camids, num_instances=K, seed=ctx.seed, camera_aware=aware))
        shares[aware] = stats.cross_camera_share(stream, labels, camids, K)
    multi = sum(n >= 2 for n in stats.cameras_per_identity(ds.train).values())
    return {
        "P": P, "K": K, "batch": hand,
        "hand_problems": stats.pk_batch_problems(hand, labels, camids, K),
        "cross_camera_aware": shares[True], "cross_camera_plain": shares[False],
        "explanation": (f"With camera_aware=True every partner of the {multi} multi-camera identities comes from "
                        f"another camera ({shares[True]:.0%} of all partners); the plain rule draws from all other "
                        f"images and gets {shares[False]:.0%}. The gap is small because the other "
                        f"{len(set(labels)) - multi} identities have no second camera at all: the sampler cannot "
                        "create cross-camera pairs the data does not hold."),
    }


def exercise_4(ctx) -> dict:
    """How big is a SYSU-style bag? With the profile's ``uo_batch_size`` and ``uo_bags_per_batch``,
    the images per bag, per class for bags of 1, 3 and 5 classes, and the distinct identities of a
    5-class bag centred on class 0; checked on one batch of ``ConsecutiveBagSampler``."""
    ds = ctx.dataset()
    labels, _ = relabel(ds.train)
    d = ctx.profile.dgl
    sampler = ConsecutiveBagSampler(labels, batch_size=d.uo_batch_size, bags_per_batch=d.uo_bags_per_batch,
                                    seed=ctx.seed)
    bag_size = sampler.bag_size
    per_class = {n: bag_size // n for n in (1, 3, 5)}
    boundary = sampler.bag_classes(0, 2)           # a 5-class bag centred on class 0
    batch = np.asarray(next(iter(sampler)))
    lab = np.asarray(labels)
    measured = []
    for j in range(d.uo_bags_per_batch):
        bag = lab[batch[j * bag_size:(j + 1) * bag_size]]
        measured.append({"mode": j % 3, "images": len(bag), "distinct_ids": len(set(bag.tolist())),
                         "max_images_per_class": max(Counter(bag.tolist()).values())})
    return {
        "bag_size": bag_size, "images_per_class": per_class, "boundary_slots": boundary,
        "boundary_distinct_ids": len(set(boundary)), "measured_bags": measured,
        "explanation": (f"A batch of {d.uo_batch_size} images split into {d.uo_bags_per_batch} bags gives bags of "
                        f"{bag_size} images: {per_class[1]} of one class, {per_class[3]} of each of 3 classes, or "
                        f"{per_class[5]} of each of 5. At the edge the classes are clamped: the 5-class bag around "
                        f"class 0 takes slots {boundary}, so |L_b| = {len(set(boundary))} and class 0 gets "
                        f"{boundary.count(0) * per_class[5]} images."),
    }


def exercise_5(ctx) -> dict:
    """How many query images keep no true match once same-camera junk is removed? Which identities
    do they belong to, and why? Confirm the count with ``evaluate_rank``'s ``num_valid_q`` on any
    distance matrix, and say why it does not depend on the distances."""
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
    return {
        "queries": len(ds.query), "without_match": int(len(lost)), "identities": lost_ids,
        "query_cameras": query_cams, "gallery_cameras": gallery_cams,
        "num_valid_q": int(res["num_valid_q"]),
        "explanation": (f"{len(lost)} of {len(ds.query)} query images have every gallery image of their person in "
                        "their own camera: those query tracklets were filmed by the only camera that also filmed "
                        "the gallery tracklets, so all their matches are junk. evaluate_rank skips them. The "
                        "count depends only on the pids and cameras (which images are removed and which remain "
                        "as matches), never on the order the distances give, so any distance matrix shows it."),
    }
