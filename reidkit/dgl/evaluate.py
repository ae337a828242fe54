"""Features and evaluation of weakly supervised models: the Market protocol at the variant's input
size, the SYSU-30k protocol with the gallery streamed, and graphical inference on one bag."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from reidkit.config import Profile, get_profile
from reidkit.core.device import bf16_native, resolve_device
from reidkit.data.records import Record, ReIDDataset
from reidkit.data.sysu30k import SYSU_DISTRACTOR_LABEL
from reidkit.data.transforms import ImageDataset, test_transform
from reidkit.dgl.graphical import pseudo_labels_from_bags
from reidkit.dgl.objectives import balanced_targets
from reidkit.nets.features import extract_features
from reidkit.nets.weak import forward_heads, network_of, weak_input_size
from reidkit.retrieval.protocol import rank_metrics, sysu30k_protocol
from reidkit.retrieval.sysu import sysu30k_evaluate


def dgl_amp_dtype(profile: str | Profile, device: Any) -> torch.dtype | None:
    """Autocast dtype of DGL training and evaluation: None (fp32, as the DGL reference and the
    SYSU-30k protocol) unless the profile asks for it (``dgl.amp``); then bf16 only where the
    device computes it natively (:func:`reidkit.core.device.bf16_native`), else fp32."""
    prof = get_profile(profile)
    if not prof.dgl.amp:
        return None
    return torch.bfloat16 if bf16_native(device) else None


def extract_weak_features(model: nn.Module, records: Sequence[Record], profile: str | Profile,
                          device: Any = "auto", flip: bool | None = None, variant: str = "full",
                          desc: str = "features", amp: Any = None) -> np.ndarray:
    """L2-normalised test features at the variant's input size. ``flip=None``: flip-summed for MGN
    (the DGL reference test feature), plain ``model(x)`` otherwise (the kit's common protocol, as
    ``reidkit.retrieval.protocol.evaluate_model``)."""

    prof = get_profile(profile)
    if flip is None:
        flip = network_of(model) == "mgn"
    h, w = weak_input_size(prof, variant)
    ds = ImageDataset(records, test_transform(h, w))
    return extract_features(model, ds, device=device, flip=bool(flip), batch_size=prof.data.test_batch_size,
                            num_workers=prof.data.workers,
                            amp=(dgl_amp_dtype(prof, device) if amp is None else amp) or False, desc=desc)


def evaluate_weak(model: nn.Module, query: Sequence[Record], gallery: Sequence[Record], profile: str | Profile,
                  device: Any = "auto", variant: str = "full", flip: bool | None = None,
                  return_features: bool = False, amp: Any = None):
    """Market-protocol mAP / CMC (``reidkit.retrieval.market.evaluate_rank``, like
    ``reidkit.retrieval.protocol.evaluate_model``) with the features of :func:`extract_weak_features`."""

    qf = extract_weak_features(model, query, profile, device, flip, variant, "query features", amp)
    gf = extract_weak_features(model, gallery, profile, device, flip, variant, "gallery features", amp)
    res = rank_metrics(qf, gf, query, gallery, device)
    return (res, qf, gf) if return_features else res


def sample_sysu_protocol(qf, q_pids, q_cams, gf, g_pids, g_cams, distractors, chunk: int = 64,
                         device: Any = "cpu") -> dict:
    """The SYSU-30k protocol on a small dataset: every query against the gallery plus the
    ``distractors`` features (e.g. the training images) labelled -1000, streamed in chunks of
    ``chunk`` through ``sysu30k_evaluate``. Returns rank1/5/10, mAP (trapezoid), mAP_standard."""

    feats = [np.asarray(gf), np.asarray(distractors)]
    labels = [np.asarray(g_pids), np.full(len(distractors), SYSU_DISTRACTOR_LABEL)]
    cams = [np.asarray(g_cams), np.zeros(len(distractors), dtype=np.int64)]

    def chunks():
        for f, l, c in zip(feats, labels, cams):
            for s in range(0, len(f), chunk):
                yield f[s:s + chunk], l[s:s + chunk], c[s:s + chunk]

    res = sysu30k_evaluate(np.asarray(qf), np.asarray(q_pids), np.asarray(q_cams), chunks, device=device)
    return {k: float(res[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mAP_standard")}


def _logits_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x, return_all=True)
    logits = out.logits
    if isinstance(logits, (tuple, list)):
        return torch.cat(list(logits), dim=1)
    if logits is None:
        raise ValueError("feature='logits' needs a model with a classifier")
    return logits


def evaluate_sysu30k(model: nn.Module, dataset: ReIDDataset, profile: str | Profile = "sysu30k",
                     device: Any = "auto", chunk: int = 8192, feature: str = "embedding", flip: bool = True,
                     size: tuple[int, int] | None = None, batch_size: int | None = None,
                     num_workers: int | None = None, amp: Any = False, buffer_size: int = 1024,
                     log: Callable[[str], None] | None = None) -> dict:
    """The SYSU-30k protocol (spec §4.2) with the gallery features never held in memory.

    Query features are extracted first (1,000 images). Gallery features then flow from
    ``reidkit.nets.features.iter_features`` (chunks of ``chunk`` rows) straight into
    ``reidkit.retrieval.sysu.sysu30k_evaluate``, which keeps per query only the counts it needs: memory
    is O(queries x chunk), whatever the gallery size. The gallery is passed as a callable, so in
    the rare case where a true match streams past late (not in the official folder order, where the
    1,000 true matches come before ``0000others``) the second pass re-extracts instead of failing.

    ``feature``: ``"embedding"`` (``model(x)``, the kit's test feature) or ``"logits"`` (the
    official script's feature for ``ft_net``: the classifier output). ``flip``: sum the features of
    the image and its horizontal flip before L2 normalisation (the official script does).
    ``size``: input (height, width); default the profile's data size (the official script resizes
    to 256x128 for ``ft_net``). ``amp``: autocast of the extraction, fp32 by default as the
    official protocol (see ``reidkit.nets.features.resolve_amp``; training passes
    :func:`dgl_amp_dtype`). Returns the dict of ``sysu30k_evaluate`` plus ``seconds``."""

    prof = get_profile(profile)
    dev = resolve_device(device)
    if feature not in ("embedding", "logits"):
        raise ValueError(f"feature must be 'embedding' or 'logits', got {feature!r}")
    forward_fn = _logits_forward if feature == "logits" else None
    h, w = size or (prof.data.height, prof.data.width)
    t0 = time.time()
    res = sysu30k_protocol(model, dataset.query, dataset.gallery, test_transform(h, w), dev, flip=flip,
                           batch_size=batch_size or prof.data.test_batch_size,
                           num_workers=prof.data.workers if num_workers is None else num_workers, chunk=chunk,
                           forward_fn=forward_fn, amp=amp, buffer_size=buffer_size)
    res["seconds"] = time.time() - t0
    if log:
        log(f"sysu30k: rank-1 {100 * res['rank1']:.2f} rank-10 {100 * res['rank10']:.2f} "
            f"mAP {100 * res['mAP']:.2f} over {res['num_gallery']:,} gallery images in {res['seconds']:.0f} s")
    return res


@torch.no_grad()
def bag_inference(model: nn.Module, records: Sequence[Record], bag_classes: Sequence[int], profile: str | Profile,
                  device: Any = "auto", variant: str = "full", method: str = "map") -> dict:
    """Graphical inference on one bag, image by image (eval mode, test transform).

    ``bag_classes``: the bag label (class indices). ``method``: ``map`` (the full model's exact MAP
    of unary + bag constraint, per head 0), ``greedy`` / ``exact`` (the unary-only balanced
    assignments). Returns ``pseudo`` (class per image) and ``probs`` (softmax of head 0 restricted to
    the bag's classes, renormalised; (n, |L_b|))."""

    prof = get_profile(profile)
    dev = resolve_device(device)
    h, w = weak_input_size(prof, variant)
    ds = ImageDataset(records, test_transform(h, w))
    x = torch.stack([ds[i]["img"] for i in range(len(ds))]).to(dev)
    was = model.training
    model.eval()
    try:
        logits = forward_heads(model, x)[0][0].float()
    finally:
        model.train(was)
    classes = torch.as_tensor(list(bag_classes), device=dev)
    if method == "map":
        mask = torch.zeros_like(logits)
        mask[:, classes] = 1.0
        pseudo = pseudo_labels_from_bags(logits, mask)
    else:
        pseudo = balanced_targets(logits, [(0, len(records), list(bag_classes))], method)
    probs = torch.softmax(logits[:, classes], dim=1)
    return {"pseudo": pseudo.cpu().numpy(), "probs": probs.cpu().numpy(), "classes": list(bag_classes)}
