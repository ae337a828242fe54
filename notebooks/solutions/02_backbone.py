"""Worked solutions to the exercises of notebook 02 (The backbone: from pixels to a re-ID feature).

Each ``exercise_K`` answers exercise K of ``notebooks/02_backbone.ipynb`` on the run's dataset
(a :class:`reidkit.course.runctx.RunContext`; the direct-transfer features come from ``ctx.features``)
and returns the numbers that answer it, with the written part of the answer in an
``explanation`` string. ``tests/test_solutions_02.py`` runs them all on the smoke profile.
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
    """mAP and rank-1 of query features against gallery features (Market protocol)."""
    q_pids, q_cams = ids_and_cams(query)
    g_pids, g_cams = ids_and_cams(gallery)
    res = evaluate_rank(pairwise_distance(qf, gf), q_pids, g_pids, q_cams, g_cams, max_rank=10)
    return {"mAP": float(res["mAP"]), "rank1": float(res["cmc"][0]), "num_valid_q": int(res["num_valid_q"])}


def test_images(ctx, records):
    """The test transform of the run's profile over ``records``."""
    return ImageDataset(records, test_transform(ctx.profile.data.height, ctx.profile.data.width))


def gem(fmap, p=3.0, eps=1e-6):
    """GeM over the cells of a (B, C, h, w) tensor: (mean of x^p over the cells)^(1/p), (B, C)."""
    return fmap.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


# -- the exercises --------------------------------------------------------------------------------
def exercise_1(ctx, p: float = 3.0) -> dict:
    """Implement GeM and compare it with average pooling on the sample.

    Write ``gem(fmap, p)``, check it against ``reidkit.nets.backbones.GeneralizedMeanPooling``, then pool the
    final maps of the direct-transfer network with p = 1 (average pooling) and with p = 3, L2-
    normalise (the BN neck is the identity at the ImageNet start) and compare mAP and rank-1. Is the
    difference larger than one query's worth of rank-1?"""
    ds = ctx.dataset()
    model = ctx.direct_transfer_model().eval()
    feats = {}
    kit_diff = 0.0
    for split in ("query", "gallery"):
        pooled = {1.0: [], p: []}
        loader = DataLoader(test_images(ctx, getattr(ds, split)), batch_size=ctx.profile.data.test_batch_size)
        with torch.no_grad():
            for batch in loader:
                fmap = model.forward_maps(batch["img"].to(ctx.device))[1].float().cpu()
                kit = GeneralizedMeanPooling(p=p)(fmap).flatten(1)
                kit_diff = max(kit_diff, float((gem(fmap, p) - kit).abs().max()))
                for power in pooled:
                    pooled[power].append(F.normalize(gem(fmap, power), dim=1))
        feats[split] = {power: torch.cat(v).numpy() for power, v in pooled.items()}
    avg = score(feats["query"][1.0], feats["gallery"][1.0], ds.query, ds.gallery)
    gem_scores = score(feats["query"][p], feats["gallery"][p], ds.query, ds.gallery)
    one_query = 1.0 / avg["num_valid_q"]
    diff = gem_scores["mAP"] - avg["mAP"]
    return {
        "p": p, "average": avg, "gem": gem_scores, "mAP_difference": diff,
        "rank1_difference": gem_scores["rank1"] - avg["rank1"], "one_query_of_rank1": one_query,
        "kit_max_abs_difference": kit_diff,
        "explanation": (
            f"GeM with p = {p:g} gives mAP {100 * gem_scores['mAP']:.1f} against {100 * avg['mAP']:.1f} for average "
            f"pooling ({100 * diff:+.1f} points) and rank-1 {100 * gem_scores['rank1']:.1f} against "
            f"{100 * avg['rank1']:.1f}. One query is worth {100 * one_query:.1f} points of rank-1 here, so the "
            "difference is a few queries at most: within the noise of 16 test identities. Untrained, GeM only "
            "re-weights the ImageNet activations towards their peaks, and those peaks lie on background as "
            "often as on the person; its reported gain (about one mAP point on Market) appears after training, "
            "when the network learns where the peaks should be and p itself is learnt."),
    }


def exercise_2(ctx) -> dict:
    """Find the query that direct transfer fails worst, and say why.

    The query with the lowest AP among those with a match in another camera: where its first true
    match lands, which cameras and people fill its top ten, and what they share with the query.

    What the images show on the sample (smoke profile, MobileNetV2 at 128x64): the worst query is a
    man in a red shirt seen from the side by camera C1; all his true matches come from C2, where he
    is seen from behind with a backpack, pushing a bicycle that fills half of each crop. His top ten
    holds other people seen from the side, walking on the same grey pavement, in the same stride.
    Pose, viewpoint and a large object (the bicycle) decide the ImageNet feature, not the red shirt
    that a person would match on."""
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
    match_cams = sorted({int(c) + 1 for c in g_cams[order[hits]]})
    top_cams = sorted({int(c) + 1 for c in g_cams[wrong10]})
    return {
        "query": worst, "pid": int(q_pids[worst]), "camera": int(q_cams[worst]) + 1,
        "AP": float(res["AP"][worst]), "AP_by_sorting": ap_by_sorting,
        "first_match_rank": int(match_ranks[0]), "num_matches": int(len(match_ranks)),
        "match_cameras": match_cams, "gallery_size_after_junk": int(len(order)),
        "top10_pids": g_pids[top10].tolist(), "top10_cameras": (g_cams[top10] + 1).tolist(),
        "wrong_top10_people": int(len(np.unique(g_pids[wrong10]))),
        "wrong_top10_from_query_camera": same_cam,
        "explanation": (
            f"Query {worst} (person {q_pids[worst]}, camera C{q_cams[worst] + 1}) has AP "
            f"{100 * res['AP'][worst]:.1f} %: its first true match is at position {match_ranks[0]} of "
            f"{len(order)}, and its {len(match_ranks)} matches were all filmed by "
            f"{', '.join('C' + str(c) for c in match_cams)}. Its top ten holds "
            f"{len(np.unique(g_pids[wrong10]))} other people from cameras {', '.join('C' + str(c) for c in top_cams)} "
            f"({100 * same_cam:.0f} % from the query's own camera). Look at the images (viz.ranked_list): the "
            "ImageNet feature describes the whole crop (pose, viewpoint, large objects, floor and light), so "
            "people caught in the same pose on similar ground outrank the same person seen from another side "
            "by another camera. Re-ID training has to teach the network to ignore exactly those cues."),
    }


def exercise_3(ctx) -> dict:
    """Last stride 2 against last stride 1: the final map's shape for one image, and the
    direct-transfer mAP and rank-1 with each (the same ImageNet weights)."""
    ds = ctx.dataset()
    m = ctx.profile.model
    models = {1: ctx.direct_transfer_model().eval(),
              2: build_model(m.arch, m.pooling, m.pretrained, last_stride=2, device=ctx.device).eval()}
    x = test_images(ctx, ds.query[:1])[0]["img"][None].to(ctx.device)
    shapes, scores = {}, {}
    for stride, model in models.items():
        with torch.no_grad():
            shapes[stride] = tuple(model.forward_maps(x)[1].shape[1:])
    scores[1] = score(ctx.features("query"), ctx.features("gallery"), ds.query, ds.gallery)
    scores[2] = score(extract_records(models[2], ds.query, ctx.profile, ctx.device),
                      extract_records(models[2], ds.gallery, ctx.profile, ctx.device), ds.query, ds.gallery)
    cells = {s: shape[1] * shape[2] for s, shape in shapes.items()}
    diff = scores[1]["mAP"] - scores[2]["mAP"]
    return {
        "map_shape": shapes, "cells": cells, "scores": scores, "mAP_gain_of_stride_1": diff,
        "explanation": (
            f"At {ctx.profile.data.height}x{ctx.profile.data.width} the final map is {shapes[2]} at last stride 2 "
            f"and {shapes[1]} at last stride 1: {cells[1] // cells[2]} times as many cells, with the same weights. "
            f"Direct-transfer mAP moves by {100 * diff:+.1f} points (rank-1 {100 * scores[2]['rank1']:.1f} -> "
            f"{100 * scores[1]['rank1']:.1f}): on 16 test identities that is a few queries, within the noise. "
            "The papers' gain comes after training, when the finer cells are learnt to hold small identity "
            "cues; to see it you need a real test set (thousands of queries) and a trained network."),
    }


def exercise_4(ctx) -> dict:
    """Flip-averaged features: direct-transfer mAP with and without them, and the check that the
    flip-averaged feature of a mirrored image equals that of the original."""
    ds = ctx.dataset()
    model = ctx.direct_transfer_model().eval()
    amp = amp_dtype(ctx.profile, ctx.device) or False
    flipped = {s: extract_features(model, test_images(ctx, getattr(ds, s)), device=ctx.device, flip=True, amp=amp,
                                   batch_size=ctx.profile.data.test_batch_size) for s in ("query", "gallery")}
    plain = score(ctx.features("query"), ctx.features("gallery"), ds.query, ds.gallery)
    flip = score(flipped["query"], flipped["gallery"], ds.query, ds.gallery)
    # invariance: the same images, mirrored before the network, give the same flip-averaged feature
    images = torch.stack([test_images(ctx, ds.query[:8])[i]["img"] for i in range(8)])
    f_orig = extract_features(model, images, device=ctx.device, flip=True, amp=False)
    f_mirr = extract_features(model, images.flip(-1), device=ctx.device, flip=True, amp=False)
    invariance_error = float(np.abs(f_orig - f_mirr).max())
    return {
        "plain": plain, "flip": flip, "mAP_difference": flip["mAP"] - plain["mAP"],
        "invariance_error": invariance_error, "norms": np.linalg.norm(flipped["query"], axis=1),
        "explanation": (
            f"Flip averaging gives mAP {100 * flip['mAP']:.1f} against {100 * plain['mAP']:.1f} "
            f"({100 * (flip['mAP'] - plain['mAP']):+.1f} points) and rank-1 {100 * flip['rank1']:.1f} against "
            f"{100 * plain['rank1']:.1f}. The flip-averaged feature is g(x) + g(flip x) normalised, a sum that "
            f"does not change when x is mirrored (largest difference {invariance_error:.1e}): a person walking "
            "left in one camera and right in another gets the same feature for that cue, which is what re-ID "
            "wants. It costs a second forward pass per test image."),
    }


def exercise_5(ctx) -> dict:
    """Fit the BN neck without labels: set its running mean and variance to those of the pooled
    training features, extract the query and gallery features again, and compare mAP and rank-1
    with direct transfer (neck at mu = 0, sigma^2 = 1). Which part does the work: subtracting the
    mean, or dividing by the standard deviation?

    The neck computes ``(f - mu) / sqrt(var + eps)`` per channel (weight 1, bias 0 at the start), so
    the fitted features are computed here from the pooled features directly, and checked against the
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

    scores = {"direct transfer": score(neck(pooled["query"], False, False), neck(pooled["gallery"], False, False),
                                       ds.query, ds.gallery),
              "centred only": score(neck(pooled["query"], True, False), neck(pooled["gallery"], True, False),
                                    ds.query, ds.gallery),
              "fitted neck": score(neck(pooled["query"]), neck(pooled["gallery"]), ds.query, ds.gallery)}
    cos_before = pooled["query"] @ pooled["gallery"].T / np.outer(np.linalg.norm(pooled["query"], axis=1),
                                                                   np.linalg.norm(pooled["gallery"], axis=1))
    diff = scores["fitted neck"]["mAP"] - scores["direct transfer"]["mAP"]
    from_centring = scores["centred only"]["mAP"] - scores["direct transfer"]["mAP"]
    verdict = "helps" if diff > 0.01 else ("hurts" if diff < -0.01 else "changes little")
    return {
        "scores": scores, "mAP_difference": diff, "mAP_from_centring": from_centring,
        "network_difference": network_difference, "mean_cosine_before": float(cos_before.mean()),
        "train_images": len(ds.train), "train_identities": len({r.pid for r in ds.train}),
        "explanation": (
            f"Fitting the neck on the unlabelled training images {verdict}: mAP "
            f"{100 * scores['fitted neck']['mAP']:.1f} against {100 * scores['direct transfer']['mAP']:.1f} "
            f"({100 * diff:+.1f} points); centring alone gives {100 * scores['centred only']['mAP']:.1f} "
            f"({100 * from_centring:+.1f}). The pooled ImageNet activations are all positive, so every feature "
            f"points into the same corner of the space: the average cosine between a query and a gallery image "
            f"is {cos_before.mean():.2f} before the neck. Subtracting the training mean removes that shared "
            "direction, and what remains is what differs between images; dividing by the standard deviation "
            "then gives every channel the same weight, which helps when the large channels were the shared, "
            "uninformative ones and hurts when it inflates channels that carry only noise. No label was used: "
            "the statistics come from the target cameras' images alone, a small free adaptation. It moves "
            "mAP by points, not by the tens that re-ID training brings."),
    }
