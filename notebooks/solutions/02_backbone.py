"""Worked solutions to the exercises of notebook 02 (The backbone: from pixels to a re-ID feature).

Load them in a new notebook cell with ``%run solutions/02_backbone.py``, then call
``exercise_K(ctx)``. Each ``exercise_K`` measures on the run's dataset (a
:class:`reidkit.course.runctx.RunContext`; the ImageNet features come from ``ctx.features``),
prints a conclusion that follows from the numbers it measured, and returns those numbers with the
conclusion under ``explanation``. Nothing runs when the file is loaded.
``tests/notebooks/test_solutions_02.py`` runs them all on the smoke profile.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from reidkit.core.device import amp_dtype
from reidkit.data.transforms import ImageDataset, test_transform
from reidkit.nets.backbones import GeneralizedMeanPooling, build_model
from reidkit.nets.features import extract_features
from reidkit.retrieval.distances import pairwise_distance
from reidkit.retrieval.inspect import ranked_gallery
from reidkit.retrieval.market import evaluate_rank
from reidkit.retrieval.protocol import extract_records


# -- small helpers shared by the solutions -------------------------------------------------------
def ids_and_cams(records):
    return np.array([r.pid for r in records]), np.array([r.camid for r in records])


def score(qf, gf, query, gallery) -> dict:
    """mAP, rank-1 and every query's AP (NaN for a query with no match in another camera)."""
    q_pids, q_cams = ids_and_cams(query)
    g_pids, g_cams = ids_and_cams(gallery)
    res = evaluate_rank(pairwise_distance(qf, gf), q_pids, g_pids, q_cams, g_cams, max_rank=10)
    return {"mAP": float(res["mAP"]), "rank1": float(res["cmc"][0]), "num_valid_q": int(res["num_valid_q"]),
            "AP": np.asarray(res["AP"], dtype=np.float64)}


def tracklet_interval(ap_a, ap_b, query, seed: int = 1, n: int = 1000) -> tuple[float, float]:
    """The central 95 % of the mean AP difference ``b - a`` when whole query tracklets are resampled
    (a paired bootstrap: the frames of one tracklet succeed or fail together)."""
    ok = ~np.isnan(ap_a) & ~np.isnan(ap_b)
    key = np.array([f"{r.pid}/{r.camid}/{r.tracklet}" for r in query])[ok]
    _, group = np.unique(key, return_inverse=True)
    per_tracklet = np.bincount(group, weights=(ap_b - ap_a)[ok]) / np.bincount(group)
    pick = np.random.default_rng(seed).integers(0, len(per_tracklet), size=(n, len(per_tracklet)))
    lo, hi = np.percentile(per_tracklet[pick].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def verdict(interval) -> str:
    lo, hi = interval
    return "a real gain" if lo > 0 else ("a real loss" if hi < 0 else "within the noise")


def test_images(ctx, records):
    """The test transform of the run's profile over ``records``."""
    return ImageDataset(records, test_transform(ctx.profile.data.height, ctx.profile.data.width))


def gem(fmap, p=3.0, eps=1e-6):
    """GeM over the cells of a (B, C, h, w) tensor: (mean of x^p over the cells)^(1/p), (B, C)."""
    return fmap.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def _notebook_prediction():
    """The ``prediction`` dict of the notebook's exercise cell, when run inside IPython."""
    try:
        from IPython import get_ipython

        shell = get_ipython()
        return shell.user_ns.get("prediction") if shell is not None else None
    except ImportError:
        return None


# -- the exercises --------------------------------------------------------------------------------
def exercise_1(ctx, ps=(3.0, 8.0), prediction=None) -> dict:
    """Predict, then measure: GeM's p on the ImageNet features, before any training.

    Pools the final maps of the untrained network with p = 1 (average pooling) and with every p of
    ``ps``, L2-normalises (the neck is the identity at the start), scores each, and compares every
    difference with the tracklet bootstrap. ``prediction`` maps p to "up", "down" or "no change"
    (by default the notebook's ``prediction`` cell); each is marked right or wrong."""
    prediction = prediction if prediction is not None else (_notebook_prediction() or {})
    ds = ctx.dataset()
    model = ctx.direct_transfer_model().eval()
    powers = (1.0,) + tuple(float(p) for p in ps)
    feats, kit_diff = {}, 0.0
    for split in ("query", "gallery"):
        pooled = {p: [] for p in powers}
        loader = DataLoader(test_images(ctx, getattr(ds, split)), batch_size=ctx.profile.data.test_batch_size)
        with torch.no_grad():
            for batch in loader:
                fmap = model.forward_maps(batch["img"].to(ctx.device))[1].float().cpu()
                kit = GeneralizedMeanPooling(p=powers[1])(fmap).flatten(1)
                kit_diff = max(kit_diff, float((gem(fmap, powers[1]) - kit).abs().max()))
                for p in powers:
                    pooled[p].append(F.normalize(gem(fmap, p), dim=1))
        feats[split] = {p: torch.cat(v).numpy() for p, v in pooled.items()}
    scores = {p: score(feats["query"][p], feats["gallery"][p], ds.query, ds.gallery) for p in powers}
    avg = scores[1.0]
    lines, diff, interval, verdicts, right = [], {}, {}, {}, {}
    for p in powers[1:]:
        diff[p] = scores[p]["mAP"] - avg["mAP"]
        interval[p] = tracklet_interval(avg["AP"], scores[p]["AP"], ds.query, seed=ctx.seed)
        verdicts[p] = verdict(interval[p])
        measured = {"a real gain": "up", "a real loss": "down"}.get(verdicts[p], "no change")
        said = str(prediction.get(p, prediction.get(int(p), "?"))).strip().lower()
        right[p] = None if said not in ("up", "down", "no change") else said == measured
        lines.append(f"p = {p:g}: mAP {100 * scores[p]['mAP']:.1f} against {100 * avg['mAP']:.1f} for average "
                     f"pooling, {100 * diff[p]:+.1f} points (tracklet bootstrap {100 * interval[p][0]:+.1f} to "
                     f"{100 * interval[p][1]:+.1f}): {verdicts[p]}, so '{measured}'"
                     + ("" if right[p] is None else f"; your prediction '{said}' was {'right' if right[p] else 'wrong'}")
                     + ".")
    real = [p for p in powers[1:] if verdicts[p] != "within the noise"]
    if not real:
        why = ("No p moves mAP beyond the noise of the sample's query tracklets: untrained, GeM only re-weights "
               "the ImageNet activations towards their peaks, and those peaks are not chosen for identity.")
    else:
        why = (f"At p = {', '.join(f'{p:g}' for p in real)} the change is larger than the noise: the cells where the "
               "ImageNet channels peak are " + ("more" if diff[real[0]] > 0 else "less") + " often on the person "
               "than the average cell. Training (and a learnt p) can change that either way.")
    explanation = "\n".join(lines + [why])
    print(explanation)
    return {"p_values": list(powers[1:]), "average": avg, "gem": {p: scores[p] for p in powers[1:]},
            "mAP_difference": diff, "interval": interval, "verdict": verdicts, "prediction_right": right,
            "kit_max_abs_difference": kit_diff, "explanation": explanation}


def exercise_2(ctx) -> dict:
    """The query the ImageNet features fail worst: the valid query with the lowest AP, where its
    first true match lands, which cameras and people fill its top ten, and its ranked list drawn
    with ``viz.ranked_list`` (returned under ``figure``)."""
    from reidkit import viz

    ds = ctx.dataset()
    q_pids, q_cams = ids_and_cams(ds.query)
    g_pids, g_cams = ids_and_cams(ds.gallery)
    dist = pairwise_distance(ctx.features("query"), ctx.features("gallery"))
    res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=10)
    valid = np.flatnonzero(res["num_matches"] > 0)
    worst = int(valid[np.argmin(res["AP"][valid])])
    order = ranked_gallery(dist[worst], q_pids[worst], q_cams[worst], g_pids, g_cams)
    hits = g_pids[order] == q_pids[worst]
    match_ranks = np.flatnonzero(hits) + 1                       # 1-based positions of the true matches
    ap_by_sorting = float(np.mean(np.arange(1, len(match_ranks) + 1) / match_ranks))
    top10 = order[:10]
    wrong10 = top10[g_pids[top10] != q_pids[worst]]
    same_cam = float(np.mean(g_cams[wrong10] == q_cams[worst])) if len(wrong10) else 0.0
    chance = float(np.mean(g_cams[order[~hits]] == q_cams[worst]))   # among all other people's images
    match_cams = sorted({int(c) + 1 for c in g_cams[order[hits]]})
    fig = viz.ranked_list(ds.query[worst].path, [ds.gallery[j].path for j in top10],
                          [bool(h) for h in hits[:10]], dist[worst, top10],
                          title=f"worst query {worst} (id {q_pids[worst]}, C{q_cams[worst] + 1}); cameras: "
                                + " ".join(f"C{c + 1}" for c in g_cams[top10]))
    if same_cam > max(1.5 * chance, chance + 0.15):
        cue = ("the wrong images come from the query's own camera far more often than chance: the feature "
               "matches the camera's floor, walls and light, not the person")
    elif len(wrong10) and same_cam < chance / 1.5:
        cue = ("the wrong images mostly come from other cameras than chance would give: they are look-alikes "
               "(clothing colour, pose, a large carried object) that the ImageNet feature weighs above the "
               "person's own details")
    else:
        cue = ("the wrong images come from the query's camera about as often as chance: here it is not the "
               "camera but people who look alike in colour and pose that outrank the true match")
    explanation = (f"Query {worst} (person {q_pids[worst]}, camera C{q_cams[worst] + 1}) has AP "
                   f"{100 * res['AP'][worst]:.1f} %: its first true match is at position {match_ranks[0]} of "
                   f"{len(order)}, and its {len(match_ranks)} matches were filmed by "
                   f"{', '.join('C' + str(c) for c in match_cams)}. Its top ten holds {len(wrong10)} wrong images of "
                   f"{len(np.unique(g_pids[wrong10]))} people, {100 * same_cam:.0f} % of them from the query's camera "
                   f"(chance: {100 * chance:.0f} %). So {cue}.")
    print(explanation)
    return {"query": worst, "pid": int(q_pids[worst]), "camera": int(q_cams[worst]) + 1,
            "AP": float(res["AP"][worst]), "AP_by_sorting": ap_by_sorting,
            "first_match_rank": int(match_ranks[0]), "num_matches": int(len(match_ranks)),
            "match_cameras": match_cams, "gallery_size_after_junk": int(len(order)),
            "top10_pids": g_pids[top10].tolist(), "top10_cameras": (g_cams[top10] + 1).tolist(),
            "wrong_top10_people": int(len(np.unique(g_pids[wrong10]))),
            "wrong_top10_from_query_camera": same_cam, "chance_query_camera": chance,
            "figure": fig, "explanation": explanation}


def exercise_3(ctx) -> dict:
    """Last stride 2 against last stride 1: the final map's shape for one image, and mAP and
    rank-1 with each (the same ImageNet weights), with the tracklet bootstrap of the difference."""
    ds = ctx.dataset()
    m = ctx.profile.model
    models = {1: ctx.direct_transfer_model().eval(),
              2: build_model(m.arch, m.pooling, m.pretrained, last_stride=2, device=ctx.device).eval()}
    x = test_images(ctx, ds.query[:1])[0]["img"][None].to(ctx.device)
    shapes = {}
    for stride, model in models.items():
        with torch.no_grad():
            shapes[stride] = tuple(model.forward_maps(x)[1].shape[1:])
    scores = {1: score(ctx.features("query"), ctx.features("gallery"), ds.query, ds.gallery),
              2: score(extract_records(models[2], ds.query, ctx.profile, ctx.device),
                       extract_records(models[2], ds.gallery, ctx.profile, ctx.device), ds.query, ds.gallery)}
    cells = {s: shape[1] * shape[2] for s, shape in shapes.items()}
    diff = scores[1]["mAP"] - scores[2]["mAP"]
    interval = tracklet_interval(scores[2]["AP"], scores[1]["AP"], ds.query, seed=ctx.seed)
    v = verdict(interval)
    if v == "within the noise":
        tail = ("The finer map changes little before training: its extra cells only split what the ImageNet "
                "channels already see. The papers' gain appears after training, on thousands of queries.")
    else:
        tail = (f"The finer map {'helps' if diff > 0 else 'hurts'} even before training, beyond the tracklet "
                "noise; check it on a real test set before you trust the size of the effect.")
    explanation = (f"At {ctx.profile.data.height}x{ctx.profile.data.width} the final map is {shapes[2]} at last "
                   f"stride 2 and {shapes[1]} at last stride 1: {cells[1] // cells[2]} times as many cells, with "
                   f"the same weights. mAP moves by {100 * diff:+.1f} points with last stride 1 (tracklet bootstrap "
                   f"{100 * interval[0]:+.1f} to {100 * interval[1]:+.1f}: {v}); rank-1 "
                   f"{100 * scores[2]['rank1']:.1f} -> {100 * scores[1]['rank1']:.1f}. {tail}")
    print(explanation)
    return {"map_shape": shapes, "cells": cells, "scores": scores, "mAP_gain_of_stride_1": diff,
            "interval": interval, "verdict": v, "explanation": explanation}


def exercise_4(ctx) -> dict:
    """Flip-averaged features: mAP with and without them, and the check that the flip-averaged
    feature of a mirrored image equals that of the original."""
    ds = ctx.dataset()
    model = ctx.direct_transfer_model().eval()
    amp = amp_dtype(ctx.profile, ctx.device) or False
    flipped = {s: extract_features(model, test_images(ctx, getattr(ds, s)), device=ctx.device, flip=True, amp=amp,
                                   batch_size=ctx.profile.data.test_batch_size) for s in ("query", "gallery")}
    plain = score(ctx.features("query"), ctx.features("gallery"), ds.query, ds.gallery)
    flip = score(flipped["query"], flipped["gallery"], ds.query, ds.gallery)
    images = torch.stack([test_images(ctx, ds.query[:8])[i]["img"] for i in range(8)])
    f_orig = extract_features(model, images, device=ctx.device, flip=True, amp=False)
    f_mirr = extract_features(model, images.flip(-1), device=ctx.device, flip=True, amp=False)
    invariance_error = float(np.abs(f_orig - f_mirr).max())
    diff = flip["mAP"] - plain["mAP"]
    interval = tracklet_interval(plain["AP"], flip["AP"], ds.query, seed=ctx.seed)
    v = verdict(interval)
    cost = ("worth its second forward pass" if v == "a real gain" else
            "not worth its second forward pass here" if v == "a real loss" else
            "a second forward pass for a change within the noise here")
    explanation = (f"Flip averaging gives mAP {100 * flip['mAP']:.1f} against {100 * plain['mAP']:.1f} "
                   f"({100 * diff:+.1f} points, tracklet bootstrap {100 * interval[0]:+.1f} to "
                   f"{100 * interval[1]:+.1f}: {v}); rank-1 {100 * flip['rank1']:.1f} against "
                   f"{100 * plain['rank1']:.1f}. So it is {cost}. The feature g(x) + g(flip x), normalised, does not "
                   f"change when x is mirrored (largest difference {invariance_error:.1e}): a person walking left in "
                   "one camera and right in another gets the same feature for that cue.")
    print(explanation)
    return {"plain": plain, "flip": flip, "mAP_difference": diff, "interval": interval, "verdict": v,
            "invariance_error": invariance_error, "norms": np.linalg.norm(flipped["query"], axis=1),
            "explanation": explanation}


def exercise_5(ctx) -> dict:
    """Fit the BN neck without labels: its running mean and variance set to those of the pooled
    training features; mAP and rank-1 against the untouched neck, and which part does the work
    (subtracting the mean, or dividing by the standard deviation too).

    The neck computes ``(f - mu) / sqrt(var + eps)`` per channel (weight 1, bias 0 at the start), so
    the fitted features are computed from the pooled features directly, and checked against the
    network with its neck set, on a few query images."""
    ds = ctx.dataset()
    model = ctx.direct_transfer_model().eval()
    pooled = {s: extract_features(model, test_images(ctx, getattr(ds, s)), device=ctx.device, amp=False,
                                  normalize=False, forward_fn=lambda m, x: m(x, return_all=True).pooled,
                                  batch_size=ctx.profile.data.test_batch_size)
              for s in ("train", "query", "gallery")}
    mean, var = pooled["train"].mean(axis=0), pooled["train"].var(axis=0, ddof=1)
    eps = model.neck.eps

    def neck(f, centre=True, scale=True):
        f = (f - mean) if centre else f
        f = f / np.sqrt(var + eps) if scale else f
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    with torch.no_grad():                                         # the same thing done by the network
        model.neck.running_mean.copy_(torch.as_tensor(mean))
        model.neck.running_var.copy_(torch.as_tensor(var))
        x = torch.stack([test_images(ctx, ds.query[:4])[i]["img"] for i in range(4)]).to(ctx.device)
        by_network = model(x).cpu().numpy()
    network_difference = float(np.abs(by_network - neck(pooled["query"][:4])).max())

    variants = {"untouched neck": (False, False), "centred only": (True, False), "fitted neck": (True, True)}
    scores = {name: score(neck(pooled["query"], *cs), neck(pooled["gallery"], *cs), ds.query, ds.gallery)
              for name, cs in variants.items()}
    cos_before = pooled["query"] @ pooled["gallery"].T / np.outer(np.linalg.norm(pooled["query"], axis=1),
                                                                   np.linalg.norm(pooled["gallery"], axis=1))
    base = scores["untouched neck"]
    diff = scores["fitted neck"]["mAP"] - base["mAP"]
    from_centring = scores["centred only"]["mAP"] - base["mAP"]
    interval = tracklet_interval(base["AP"], scores["fitted neck"]["AP"], ds.query, seed=ctx.seed)
    v = verdict(interval)
    label = {"a real gain": "helps", "a real loss": "hurts"}.get(v, "changes little")
    if abs(from_centring) >= abs(diff - from_centring):
        part = ("Most of the change comes from subtracting the mean: it removes the direction that all the "
                "all-positive features share, so what remains is what differs between images")
    else:
        part = ("Most of the change comes from dividing by the standard deviation: every channel gets the same "
                "weight, which " + ("helps when the large channels were the shared, uninformative ones"
                                    if diff - from_centring > 0 else "hurts when it inflates channels that carry noise"))
    explanation = (f"Fitting the neck on the unlabelled training images {label}: mAP "
                   f"{100 * scores['fitted neck']['mAP']:.1f} against {100 * base['mAP']:.1f} ({100 * diff:+.1f} "
                   f"points, tracklet bootstrap {100 * interval[0]:+.1f} to {100 * interval[1]:+.1f}: {v}); centring alone "
                   f"gives {100 * scores['centred only']['mAP']:.1f} ({100 * from_centring:+.1f}). {part}. Before the "
                   f"neck the average cosine between a query and a gallery image is {cos_before.mean():.2f}: the "
                   "positive activations point every feature into the same corner. No label was used.")
    print(explanation)
    return {"scores": scores, "mAP_difference": diff, "mAP_from_centring": from_centring,
            "interval": interval, "verdict": v, "network_difference": network_difference,
            "mean_cosine_before": float(cos_before.mean()),
            "train_images": len(ds.train), "train_identities": len({r.pid for r in ds.train}),
            "explanation": explanation}
