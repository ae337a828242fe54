"""Weakly supervised training: DGL (differentiable graphical learning over bags), its unary-only
variant, and the fully supervised baseline on the same network (spec dgl-sysu30k §2, §3).

Variants (``train_dgl(..., variant=...)``)
------------------------------------------
``"full"``        The full model: per classifier head ``h``, pseudo-labels ``y_h`` = the most
                  probable id *among the bag's ids* (exact MAP of unary + bag constraint), the CE
                  against them and the relaxed Potts pairwise energy on the low-level kernel
                  (``reidkit.weak.graph_loss``); plus the weakly supervised triplet (median in-bag
                  vs hardest out-of-bag distance, ``reidkit.weak.weak_triplet_loss``) on the global
                  embeddings (spec §2.4)::

                      L = ce_weight * mean_h [CE(z_h, y_h) + pairwise_weight * L_pair(p_h, g)]
                          + triplet_weight * mean_k L_wtri(f_k, l)

                  Bags are simulated as the reference does (spec §1.2): PK batches of
                  ``ids_per_batch`` ids x ``images_per_id`` images, consecutive groups of
                  ``ids_per_bag`` ids form a bag, re-drawn every epoch; only the bag vector
                  (``reidkit.weak.bag_label_vectors``) reaches the loss.
``"unary_only"``  The classifier network of ``UO/train_weak.py`` (spec §3.3): bags of 1, 3 or 5
                  adjacent classes (``ConsecutiveBagSampler``), per bag the greedy balanced
                  assignment of the reference (``assignment="greedy"``; ``"exact"`` solves the same
                  cardinality-constrained problem optimally), CE against those labels. SGD
                  (Nesterov 0.9), backbone lr ``uo_lr_backbone``, head lr ``uo_lr_head``, StepLR.
``"supervised"``  The same network as ``"full"`` and the same PK batches, trained with the *true*
                  ids: ``ce_weight * mean_h CE(z_h, y) + triplet_weight * mean_k`` ordinary
                  batch-hard triplet (margin ``dgl.margin``), i.e. MGN's own supervised recipe.
                  The upper bound a weakly supervised method is compared with.

Networks
--------
* ``"mgn"`` (``reidkit.mgn``), the paper's full model, used when the profile's arch is ResNet-50
  (the ``sysu30k`` profile): 8 heads, 3 global 256-d embeddings for the triplet, ``g`` = 256-d
  layer-1 average, 2048-d test feature, flip-summed at test time as the reference does.
* ``"reidnet"``: **the CPU variant** of the full model (smoke / workshop profiles, MobileNetV2 on
  the embedded sample): the kit's ``ReIDNet`` with one classifier on the BN-neck output
  (``build_model(num_classes=C)``), ``g`` = its ``low`` descriptor (MobileNetV2 ``features[:4]``
  average, 24-d, the same 1/4 resolution as ResNet layer1), the weak triplet on the pooled feature
  before the BN neck (where BoT-style networks put the triplet). Same loss terms, one head.
* ``"ft_net"`` (unary-only, input 192x96 as the reference, or the profile's DGL size if smaller):
  the reference ``ft_net`` exactly: backbone with last stride 2, global
  average pool, **one** ``Linear(feat_dim, C)`` (init N(0, 0.001), bias 0) on the *pooled* feature,
  no BN neck in the path (the kit's ``ReIDNet`` puts its classifier after a BN neck; :class:`FtNet`
  adds its own head on ``out.pooled`` to match the reference). Test feature: the L2-normalised
  pooled feature (the released model's "2048 AsFeature").

Training machinery (shared by all variants): a checkpoint ``out_dir/checkpoint.pt`` every epoch
(atomic write; model, optimiser, scheduler, history), resume from it, autocast bf16 and
channels_last on CUDA only, progress bars through ``reidkit.utils.progress``, and per-epoch
re-seeding of python / numpy / torch, the sampler and the loader from ``(seed, epoch)``, so a run
resumed from the checkpoint of epoch e is bit-identical on CPU to the uninterrupted run.

Schedules step at the *end* of each epoch (PyTorch >= 1.1 order). The reference called
``scheduler.step()`` at the start of the epoch under the old semantics, which moves every decay one
epoch earlier (e.g. the decay at 250 starts with the 250th epoch instead of the 251st).

SYSU-30k: ``train_dgl`` on the ``sysu30k`` dataset streams the training folders
(:class:`SYSUBagStream`, bags by the consecutive-folder rule, sharded over DDP ranks and loader
workers); :func:`evaluate_sysu30k` scores the official test split with the gallery features
streamed from extraction straight into ``reidkit.evaluation.sysu30k_evaluate``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from reidkit.config import DGL_ERASING_FILL, Profile, dgl_input_size, get_profile
from reidkit.data.datasets import Record, ReIDDataset
from reidkit.utils import (activate_device, atomic_torch_save, atomic_write_json, bf16_native,
                           optimizer_steps_to_cpu, progress, resolve_device, seed_everything)

__all__ = [
    "VARIANTS", "FtNet", "WeakTrainResult", "SYSUBagStream", "build_weak_model", "network_for",
    "forward_heads", "full_dgl_loss", "supervised_loss", "batch_hard_triplet_loss", "balanced_targets",
    "bag_matrix", "train_dgl", "extract_weak_features", "evaluate_weak", "evaluate_sysu30k",
    "sample_sysu_protocol", "bag_inference", "load_weak_model",
]

VARIANTS = ("full", "unary_only", "supervised")
NETWORKS = ("mgn", "reidnet", "ft_net")
#: ft_net's training crop is taken from an image resized by 224/192 (Resize(224,112) -> crop 192x96)
_UO_RESIZE = 224 / 192
#: ft_net's input (training crop and validation resize) in the reference unary-only script (spec §3.3).
#: Used, capped by the profile's DGL size, until the profile carries ``dgl.uo_height`` / ``dgl.uo_width``.
FT_NET_INPUT = (192, 96)


# --------------------------------------------------------------------------------------------
# networks

class FtNet(nn.Module):
    """The unary-only variant's ``ft_net``: backbone + average pool + one ``Linear(D, C)`` on the
    pooled feature (no BN neck in the classifier path).

    Wraps a ``ReIDNet`` built without a classifier (its BN neck is still there and keeps running
    statistics, but nothing trains it). ``model(x)`` returns the L2-normalised pooled feature;
    ``model(x, return_all=True)`` the ``ReIDOutput`` with ``logits`` from the pooled feature."""

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.arch = f"ft_net:{net.arch}"
        self.num_classes = int(num_classes)
        self.feat_dim, self.low_dim = net.feat_dim, net.low_dim
        self.init_source = net.init_source
        self.classifier = nn.Linear(net.feat_dim, self.num_classes)
        nn.init.normal_(self.classifier.weight, std=0.001)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor, return_all: bool = False):
        out = self.net(x, return_all=True)
        if not return_all:
            return F.normalize(out.pooled, dim=1)
        out.logits = self.classifier(out.pooled).float()
        return out

    def describe(self) -> dict:
        return {**self.net.describe(), "arch": self.arch, "num_classes": self.num_classes,
                "head": "Linear on the pooled feature (ft_net)"}


def network_for(profile: str | Profile, variant: str) -> str:
    """Which network a variant trains under a profile: ``ft_net`` for the unary-only variant,
    MGN for full / supervised on a plain ResNet-50 (the paper), the one-head ``reidnet`` otherwise
    (the CPU variant)."""
    from reidkit.models import canonical_arch

    prof = get_profile(profile)
    _check_variant(variant)
    if variant == "unary_only":
        return "ft_net"
    return "mgn" if canonical_arch(prof.model.arch) == "resnet50" else "reidnet"


def build_weak_model(profile: str | Profile, variant: str, num_classes: int, device: Any = "auto",
                     network: str = "auto", pretrained: Any = None) -> nn.Module:
    """The network of ``variant`` with a ``num_classes``-way head (ImageNet-initialised backbone;
    ``pretrained`` overrides the profile's weight choice)."""
    from reidkit.mgn import build_mgn
    from reidkit.models import build_model

    prof = get_profile(profile)
    net = network_for(prof, variant) if network == "auto" else network
    if net not in NETWORKS:
        raise ValueError(f"network must be one of {NETWORKS} or 'auto', got {network!r}")
    weights = prof.model.pretrained if pretrained is None else pretrained
    dev = resolve_device(device)
    if net == "mgn":
        if prof.dgl.num_heads != 8:
            raise ValueError(f"MGN has 8 heads; the profile asks for num_heads={prof.dgl.num_heads}")
        pool = prof.model.pooling if prof.model.pooling in ("avg", "max") else "avg"
        model = build_mgn(num_classes, pretrained=weights, pool=pool, device=dev)
    elif net == "reidnet":
        model = build_model(prof.model.arch, prof.model.pooling, weights, num_classes=num_classes,
                            last_stride=prof.model.last_stride, device=dev)
    else:
        base = build_model(prof.model.arch, "avg", weights, num_classes=0, last_stride=2, device=dev)
        model = FtNet(base, num_classes).to(dev)
    model.network = net
    return model


def forward_heads(model: nn.Module, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(logits of every head, embeddings for the triplet, low-level descriptor g), float32.

    MGN: 8 heads, its 3 global 256-d vectors, layer-1 average. ReIDNet / FtNet: one head, the
    pooled feature (before the BN neck), the first-stage average."""
    out = model(x, return_all=True)
    if hasattr(out, "embeddings"):  # MGNOutput
        return list(out.logits), list(out.embeddings), out.low
    if out.logits is None:
        raise ValueError("the model has no classifier (build it with num_classes > 0)")
    return [out.logits], [out.pooled], out.low


# --------------------------------------------------------------------------------------------
# losses

def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def bag_matrix(bag_sets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Soft bag vectors from padded label sets: row i of ``bag_sets`` (B, m) holds the class
    indices of image i's bag, padded with -1; ``l[i, c] = 1/|L_b|`` for every ``c`` in the set."""
    bag_sets = torch.as_tensor(bag_sets).long()
    valid = bag_sets >= 0
    counts = valid.sum(1, keepdim=True).clamp(min=1).float()
    out = torch.zeros(bag_sets.shape[0], num_classes, device=bag_sets.device)
    out.scatter_add_(1, bag_sets.clamp(min=0), valid.float() / counts)
    return out


def full_dgl_loss(logits: Sequence[torch.Tensor], embeddings: Sequence[torch.Tensor], low: torch.Tensor,
                  bag_vectors: torch.Tensor, cfg) -> dict:
    """Total loss of the full model (spec §2.4) and its parts. ``cfg`` is a ``DGLConfig``.

    Returns ``loss`` (differentiable) and the floats ``ce``, ``pairwise`` (before the weight),
    ``triplet`` and the pseudo-labels of every head (``pseudo``: list of int64 tensors)."""
    from reidkit.weak import graph_loss, weak_triplet_loss

    heads, ces, pairs, pseudo = [], [], [], []
    for z in logits:
        total, unary, pair, y = graph_loss(z, bag_vectors, low, sigma=cfg.sigma, pairwise_weight=cfg.pairwise_weight)
        heads.append(total)
        ces.append(unary.detach())
        pairs.append(pair.detach())
        pseudo.append(y)
    tri = [weak_triplet_loss(f, bag_vectors, margin=cfg.margin)[0] for f in embeddings]
    head_term = torch.stack(heads).mean()
    tri_term = torch.stack(tri).mean()
    loss = cfg.ce_weight * head_term + cfg.triplet_weight * tri_term
    return {"loss": loss, "ce": float(torch.stack(ces).mean()), "pairwise": float(torch.stack(pairs).mean()),
            "triplet": float(tri_term.detach()), "pseudo": pseudo}


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Ordinary batch-hard triplet: hardest positive vs hardest negative per anchor (Euclidean)."""
    sq = (embeddings * embeddings).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * embeddings @ embeddings.t()).clamp(min=1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    ap = torch.where(same, dist, torch.full_like(dist, -math.inf)).max(1).values
    an = torch.where(same, torch.full_like(dist, math.inf), dist).min(1).values
    if bool(torch.isinf(an).any()):
        raise ValueError("batch-hard triplet: an anchor has no negative (one identity in the batch)")
    return F.relu(ap - an + margin).mean()


def supervised_loss(logits: Sequence[torch.Tensor], embeddings: Sequence[torch.Tensor], labels: torch.Tensor,
                    cfg) -> dict:
    """The baseline with true labels: ``ce_weight * mean_h CE + triplet_weight * mean_k batch-hard``."""
    ce = torch.stack([F.cross_entropy(z, labels) for z in logits]).mean()
    tri = torch.stack([batch_hard_triplet_loss(f, labels, cfg.margin) for f in embeddings]).mean()
    loss = cfg.ce_weight * ce + cfg.triplet_weight * tri
    return {"loss": loss, "ce": float(ce.detach()), "pairwise": None, "triplet": float(tri.detach())}


def balanced_targets(logits: torch.Tensor, bags: Sequence[tuple[int, int, Sequence[int]]],
                     method: str = "greedy") -> torch.Tensor:
    """Unary-only pseudo-labels: per bag ``(start, end, class ids)``, the balanced assignment of
    the rows ``start:end`` of the (detached) logits. ``method``: ``greedy`` (the reference
    ``mySelect``) or ``exact`` (min-cost assignment). Returns int64 targets on the logits' device."""
    from reidkit.weak import exact_balanced_assignment, greedy_balanced_assignment

    solve = {"greedy": greedy_balanced_assignment, "exact": exact_balanced_assignment}.get(method)
    if solve is None:
        raise ValueError(f"assignment must be 'greedy' or 'exact', got {method!r}")
    scores = logits.detach().float().cpu().numpy()
    out = np.empty(scores.shape[0], dtype=np.int64)
    for start, end, ids in bags:
        out[start:end] = solve(scores[start:end], list(ids))
    return torch.from_numpy(out).to(logits.device)


def _bags_of_batch(bag_index: torch.Tensor, bag_sets: torch.Tensor) -> list[tuple[int, int, list[int]]]:
    """Contiguous runs of equal ``bag_index`` -> (start, end, the bag's class ids)."""
    idx = bag_index.tolist()
    out, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[start]:
            ids = sorted({int(c) for c in bag_sets[start].tolist() if c >= 0})
            out.append((start, i, ids))
            start = i
    return out


# --------------------------------------------------------------------------------------------
# SYSU-30k streaming training data

class SYSUBagStream(IterableDataset):
    """SYSU-30k training images as a stream of whole bags (``reidkit.data.datasets.iter_sysu_bags``).

    Items: ``{"img", "label" (class = folder number - 1), "pid" (folder), "camid" (-1), "bag"
    (stream index of the bag), "bag_labels" (the bag's classes, padded with -1 to 5), "path"}``;
    the ``bag_size`` images of a bag are consecutive. With a DataLoader ``batch_size`` that is a
    multiple of ``bag_size`` every batch holds whole bags (each worker yields its own bags).

    Sharding: the shard of this process is ``rank * num_workers + worker_id`` out of
    ``world_size * num_workers`` (``torch.distributed`` when initialised); bag ``k`` goes to shard
    ``k % num_shards``. ``set_epoch(e)`` re-seeds image draws and the shuffle buffer.

    One pass of the stream (one training "epoch" on SYSU-30k) is one pass over the *bag list*: three
    bags per folder (1, 3, 5 folders) of ``bag_size`` images each, i.e. 84,930 bags and about 1.27M
    images at bag size 15, not all 29.6M images; bags re-draw their images every epoch."""

    def __init__(self, train_dir: str | Path, train_list: str | Path | None = None, transform=None,
                 bag_size: int = 15, seed: int = 0, shuffle_buffer: int = 256, max_bags: int | None = None,
                 num_classes: int | None = None):
        from reidkit.data.datasets import sysu_num_classes

        super().__init__()
        self.train_dir = Path(train_dir)
        self.train_list = Path(train_list) if train_list else None
        self.transform = transform
        self.bag_size, self.seed, self.shuffle_buffer, self.max_bags = int(bag_size), int(seed), shuffle_buffer, max_bags
        self.num_classes = int(num_classes) if num_classes else sysu_num_classes(self.train_dir)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @staticmethod
    def shard_info() -> tuple[int, int]:
        from torch.utils.data import get_worker_info

        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * nw + wid, world * nw

    def bags(self, shard: int | None = None, num_shards: int | None = None):
        from reidkit.data.datasets import iter_sysu_bags

        if shard is None:
            shard, num_shards = self.shard_info()
        return iter_sysu_bags(self.train_dir, self.train_list, bag_size=self.bag_size,
                              seed=self.seed * 100_003 + self.epoch, shard=shard, num_shards=num_shards,
                              shuffle_buffer=self.shuffle_buffer, max_bags=self.max_bags)

    def __iter__(self) -> Iterator[dict]:
        from reidkit.data.transforms import load_image

        for bag in self.bags():
            classes = [c - 1 for c in bag.labels]
            if any(not 0 <= c < self.num_classes for c in classes):
                raise ValueError(f"bag {bag.bag_id}: folder outside 1..{self.num_classes}")
            padded = torch.full((5,), -1, dtype=torch.long)
            padded[:len(classes)] = torch.tensor(classes[:5])
            for rec in bag.records:
                img = load_image(rec.path)
                if self.transform is not None:
                    img = self.transform(img)
                yield {"img": img, "label": rec.pid - 1, "pid": rec.pid, "camid": -1, "bag": bag.index,
                       "bag_labels": padded, "path": rec.path}


# --------------------------------------------------------------------------------------------
# transforms, features, evaluation

def _input_size(prof: Profile, variant: str) -> tuple[int, int]:
    cfg = prof.dgl
    if variant == "unary_only":
        full_h, full_w = dgl_input_size(prof)
        h = getattr(cfg, "uo_height", None) or min(full_h, FT_NET_INPUT[0])
        w = getattr(cfg, "uo_width", None) or min(full_w, FT_NET_INPUT[1])
        return int(h), int(w)
    return dgl_input_size(prof)


def _train_transform(prof: Profile, variant: str):
    """full / supervised: resize, flip, random erasing filled with 0 (``DGL_ERASING_FILL``; no crop,
    spec §3.2). unary-only (ft_net): resize by 224/192, random crop, flip, erasing (spec §3.3)."""
    import torchvision.transforms as T

    from reidkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomErasing, train_transform

    h, w = _input_size(prof, variant)
    if variant != "unary_only":
        return train_transform(h, w, flip=prof.data.flip, pad=0, erasing_p=prof.data.erasing_p,
                               erasing_fill=DGL_ERASING_FILL)
    steps = []
    jitter = float(getattr(prof.dgl, "uo_color_jitter", 0.0) or 0.0)
    if jitter:
        steps.append(T.ColorJitter(jitter, jitter, jitter, 0))
    steps += [T.Resize((round(h * _UO_RESIZE), round(w * _UO_RESIZE)), interpolation=T.InterpolationMode.BICUBIC),
              T.RandomCrop((h, w))]
    if prof.data.flip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if prof.data.erasing_p > 0:
        steps.append(RandomErasing(p=prof.data.erasing_p, fill=DGL_ERASING_FILL))
    return T.Compose(steps)


def _network_of(model: nn.Module) -> str:
    return getattr(model, "network", "mgn" if getattr(model, "arch", "") == "mgn" else "reidnet")


def dgl_amp_dtype(profile: str | Profile, device: Any) -> torch.dtype | None:
    """Autocast dtype of DGL training and evaluation: None (fp32, as the DGL reference and the
    SYSU-30k protocol) unless the profile asks for it (``dgl.amp``); then bf16 only where the
    device computes it natively (:func:`reidkit.utils.bf16_native`), else fp32."""
    prof = get_profile(profile)
    if not prof.dgl.amp:
        return None
    return torch.bfloat16 if bf16_native(device) else None


def extract_weak_features(model: nn.Module, records: Sequence[Record], profile: str | Profile,
                          device: Any = "auto", flip: bool | None = None, variant: str = "full",
                          desc: str = "features") -> np.ndarray:
    """L2-normalised test features at the variant's input size. ``flip=None``: flip-summed for MGN
    (the DGL reference test feature), plain ``model(x)`` otherwise (the kit's common protocol, as
    ``reidkit.train.evaluate_model``)."""
    from reidkit.data.transforms import ImageDataset, test_transform
    from reidkit.features import extract_features

    prof = get_profile(profile)
    if flip is None:
        flip = _network_of(model) == "mgn"
    h, w = _input_size(prof, variant)
    ds = ImageDataset(records, test_transform(h, w))
    return extract_features(model, ds, device=device, flip=bool(flip), batch_size=prof.data.test_batch_size,
                            num_workers=prof.data.workers, amp=dgl_amp_dtype(prof, device) or False, desc=desc)


def _rank_metrics(qf, gf, query, gallery, device, max_rank: int = 20) -> dict:
    from reidkit.evaluation import evaluate_rank, pairwise_distance

    dist = pairwise_distance(qf, gf, device=device)
    res = evaluate_rank(np.asarray(dist), np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
                        np.array([r.camid for r in query]), np.array([r.camid for r in gallery]),
                        max_rank=min(max_rank, len(gallery)), device=device)
    cmc = np.asarray(res["cmc"], dtype=float)
    return {"mAP": float(res["mAP"]), "mINP": float(res["mINP"]), "rank1": float(cmc[0]),
            "rank5": float(cmc[min(4, len(cmc) - 1)]), "rank10": float(cmc[min(9, len(cmc) - 1)]),
            "cmc": cmc.tolist()}


def evaluate_weak(model: nn.Module, query: Sequence[Record], gallery: Sequence[Record], profile: str | Profile,
                  device: Any = "auto", variant: str = "full", flip: bool | None = None,
                  return_features: bool = False):
    """Market-protocol mAP / CMC (``reidkit.evaluation.evaluate_rank``, like
    ``reidkit.train.evaluate_model``) with the features of :func:`extract_weak_features`."""
    qf = extract_weak_features(model, query, profile, device, flip, variant, "query features")
    gf = extract_weak_features(model, gallery, profile, device, flip, variant, "gallery features")
    res = _rank_metrics(qf, gf, query, gallery, device)
    return (res, qf, gf) if return_features else res


def sample_sysu_protocol(qf, q_pids, q_cams, gf, g_pids, g_cams, distractors, chunk: int = 64,
                         device: Any = "cpu") -> dict:
    """The SYSU-30k protocol on a small dataset: every query against the gallery plus the
    ``distractors`` features (e.g. the training images) labelled -1000, streamed in chunks of
    ``chunk`` through ``sysu30k_evaluate``. Returns rank1/5/10, mAP (trapezoid), mAP_standard."""
    from reidkit.data.datasets import SYSU_DISTRACTOR_LABEL
    from reidkit.evaluation import sysu30k_evaluate

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
    ``reidkit.features.iter_features`` (chunks of ``chunk`` rows) straight into
    ``reidkit.evaluation.sysu30k_evaluate``, which keeps per query only the counts it needs: memory
    is O(queries x chunk), whatever the gallery size. The gallery is passed as a callable, so in
    the rare case where a true match streams past late (not in the official folder order, where the
    1,000 true matches come before ``0000others``) the second pass re-extracts instead of failing.

    ``feature``: ``"embedding"`` (``model(x)``, the kit's test feature) or ``"logits"`` (the
    official script's feature for ``ft_net``: the classifier output). ``flip``: sum the features of
    the image and its horizontal flip before L2 normalisation (the official script does).
    ``size``: input (height, width); default the profile's data size (the official script resizes
    to 256x128 for ``ft_net``). ``amp``: autocast of the extraction, fp32 by default as the
    official protocol (see ``reidkit.features.resolve_amp``; training passes
    :func:`dgl_amp_dtype`). Returns the dict of ``sysu30k_evaluate`` plus ``seconds``."""
    from reidkit.data.transforms import ImageDataset, test_transform
    from reidkit.evaluation import sysu30k_evaluate
    from reidkit.features import extract_features, iter_features

    prof = get_profile(profile)
    dev = resolve_device(device)
    if feature not in ("embedding", "logits"):
        raise ValueError(f"feature must be 'embedding' or 'logits', got {feature!r}")
    forward_fn = _logits_forward if feature == "logits" else None
    h, w = size or (prof.data.height, prof.data.width)
    tf = test_transform(h, w)
    bs = batch_size or prof.data.test_batch_size
    nw = prof.data.workers if num_workers is None else num_workers
    t0 = time.time()
    query, gallery = list(dataset.query), dataset.gallery
    qf = extract_features(model, ImageDataset(query, tf), device=dev, flip=flip, amp=amp, batch_size=bs,
                          num_workers=nw, forward_fn=forward_fn, desc="sysu30k query")
    g_labels = np.fromiter((r.pid for r in gallery), dtype=np.int64, count=len(gallery))
    g_cams = np.fromiter((r.camid for r in gallery), dtype=np.int64, count=len(gallery))

    def gallery_chunks():
        for feats, start in iter_features(model, ImageDataset(gallery, tf), device=dev, flip=flip, amp=amp,
                                          batch_size=bs, num_workers=nw, chunk_rows=chunk, forward_fn=forward_fn,
                                          desc="sysu30k gallery"):
            end = start + feats.shape[0]
            yield feats, g_labels[start:end], g_cams[start:end]

    res = sysu30k_evaluate(qf, np.array([r.pid for r in query]), np.array([r.camid for r in query]),
                           gallery_chunks, chunk_size=chunk, buffer_size=buffer_size, device=dev)
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
    from reidkit.data.transforms import ImageDataset, test_transform
    from reidkit.weak import pseudo_labels_from_bags

    prof = get_profile(profile)
    dev = resolve_device(device)
    h, w = _input_size(prof, variant)
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


# --------------------------------------------------------------------------------------------
# training

@dataclass
class WeakTrainResult:
    out_dir: Path
    variant: str
    network: str
    history: list[dict]
    test: dict | None            # Market protocol (records datasets) or SYSU-30k protocol (sysu30k)
    num_classes: int
    finished: bool
    class_of_pid: dict = field(default_factory=dict)
    model: nn.Module = field(repr=False, default=None)


def _optimizer(model: nn.Module, prof: Profile, variant: str):
    cfg = prof.dgl
    if variant == "unary_only":
        head = [p for p in model.classifier.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
        opt = torch.optim.SGD([{"params": body, "lr": cfg.uo_lr_backbone, "name": "body"},
                               {"params": head, "lr": cfg.uo_lr_head, "name": "classifier"}],
                              lr=cfg.uo_lr_backbone, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.uo_step, gamma=cfg.gamma)
    else:
        params = [p for p in model.parameters() if p.requires_grad]  # the frozen neck bias is left out
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, amsgrad=cfg.amsgrad)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.milestones), gamma=cfg.gamma)
    return opt, sched


def _epoch_seed(seed: int, epoch: int) -> int:
    from reidkit.train import _epoch_seed as hhcl_epoch_seed

    return hhcl_epoch_seed(seed, epoch)


def _is_sysu_stream(ds: ReIDDataset) -> bool:
    return ds.name == "sysu30k" and not ds.train and (Path(ds.root) / "sysu_train_set_all").is_dir()


def _batch_layout(prof: Profile, variant: str) -> tuple[int, int]:
    """(bag size, bags per batch) of a variant."""
    cfg = prof.dgl
    if variant == "unary_only":
        return cfg.uo_batch_size // cfg.uo_bags_per_batch, cfg.uo_bags_per_batch
    return cfg.ids_per_bag * cfg.images_per_id, cfg.ids_per_batch // cfg.ids_per_bag


def _epoch_loader(prof, variant, records, labels, train_tf, stream, eseed, epoch, workers, dev):
    from reidkit.data.samplers import ConsecutiveBagSampler, PKBagSampler
    from reidkit.data.transforms import ImageDataset

    cfg = prof.dgl
    gen = torch.Generator().manual_seed(eseed)
    common = dict(num_workers=workers, pin_memory=dev.type == "cuda", generator=gen, persistent_workers=False)
    if stream is not None:
        stream.set_epoch(epoch)
        bag_size, bags = _batch_layout(prof, variant)
        return DataLoader(stream, batch_size=bag_size * bags, drop_last=True, **common)
    if variant == "unary_only":
        sampler = ConsecutiveBagSampler(labels, batch_size=cfg.uo_batch_size, bags_per_batch=cfg.uo_bags_per_batch,
                                        seed=eseed)
    else:
        sampler = PKBagSampler(labels, ids_per_batch=cfg.ids_per_batch, images_per_id=cfg.images_per_id,
                               ids_per_bag=cfg.ids_per_bag, seed=eseed)
    return DataLoader(ImageDataset(records, train_tf, labels=labels), batch_sampler=sampler, **common)


def _train_step(model, batch, variant, prof, num_classes, assignment, opt, dev, use_amp, stream) -> dict:
    from reidkit.weak import bag_label_vectors

    cfg = prof.dgl
    x = batch["img"].to(dev, non_blocking=True)
    y = torch.as_tensor(batch["label"]).long().to(dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=use_amp or torch.bfloat16, enabled=use_amp is not None):
        logits, embeddings, low = forward_heads(model, x)
    logits = [z.float() for z in logits]
    embeddings = [f.float() for f in embeddings]
    low = low.float()
    acc = None
    if variant == "full":
        if stream is not None:
            bags = bag_matrix(batch["bag_labels"].to(dev), num_classes)
        else:
            bags = bag_label_vectors(y, cfg.ids_per_bag, cfg.ids_per_batch, cfg.images_per_id, num_classes)
        res = full_dgl_loss(logits, embeddings, low, bags, cfg)
        acc = float(torch.stack([(p == y).float().mean() for p in res["pseudo"]]).mean())
    elif variant == "supervised":
        res = supervised_loss(logits, embeddings, y, cfg)
    else:
        if stream is not None:
            bag_list = _bags_of_batch(batch["bag"], batch["bag_labels"])
        else:
            size = cfg.uo_batch_size // cfg.uo_bags_per_batch
            yl = y.tolist()
            bag_list = [(s, s + size, sorted(set(yl[s:s + size]))) for s in range(0, len(yl), size)]
        targets = balanced_targets(logits[0], bag_list, assignment)
        ce = F.cross_entropy(logits[0], targets)
        res = {"loss": ce, "ce": float(ce.detach()), "pairwise": None, "triplet": None}
        acc = float((targets == y).float().mean())
    opt.zero_grad(set_to_none=True)
    res["loss"].backward()
    opt.step()
    return {"loss": float(res["loss"].detach()), "ce": res["ce"], "pairwise": res["pairwise"],
            "triplet": res["triplet"], "pseudo_acc": acc, "images": int(x.shape[0])}


def _mean(vals):
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else None


def _evaluate(model, ds, prof, dev, variant, flip, stream_eval: bool, log) -> dict:
    if stream_eval:
        res = evaluate_sysu30k(model, ds, prof, dev, amp=dgl_amp_dtype(prof, dev) or False, log=log)
        return {k: res[k] for k in ("rank1", "rank5", "rank10", "mAP", "mAP_standard")} | {"protocol": "sysu30k"}
    res = evaluate_weak(model, ds.query, ds.gallery, prof, dev, variant=variant, flip=flip)
    return {k: v for k, v in res.items() if k != "cmc"} | {"cmc": res["cmc"][:20], "protocol": "market"}


def train_dgl(profile: str | Profile = "workshop", dataset: ReIDDataset | None = None,
              out_dir: str | Path = "runs/dgl", variant: str = "full", device: Any = "auto",
              seed: int | None = None, resume: bool = True, epochs: int | None = None,
              stop_after: int | None = None, iters: int | None = None, evaluate: bool = True,
              eval_every: int | None = None, assignment: str = "greedy", flip: bool | None = None,
              data_root: str | None = None, log: Callable[[str], None] = print) -> WeakTrainResult:
    """Train a DGL variant (``full``, ``unary_only``) or the ``supervised`` baseline; see the
    module docstring for what each one optimises.

    ``dataset``: a parsed dataset (default: the profile's, from ``data_root``). Records datasets
    (the sample, Market, ...) use the training identities only to *form* bags (full / unary-only)
    or as labels (supervised); a ``sysu30k`` dataset loaded with ``load_train=False`` streams its
    training folders (:class:`SYSUBagStream`). ``epochs`` overrides the profile's (``dgl.epochs``,
    or ``dgl.uo_epochs`` for unary-only); ``stop_after`` stops after that many epochs of this call
    (to test resuming); ``iters`` caps the iterations per epoch. Evaluation (Market protocol, or
    the SYSU-30k protocol for sysu30k) runs every ``eval_every`` epochs and after the last one
    (``evaluate=False``: never). Checkpoints: ``out_dir/checkpoint.pt`` every epoch,
    ``out_dir/model_final.pt`` and ``out_dir/history.json`` at the end.

    One process, one device: the model is not wrapped in DistributedDataParallel (the SYSU stream
    already shards its bags by DDP rank and loader worker, ready for a DDP loop)."""
    from reidkit.data.datasets import load_dataset, relabel

    _check_variant(variant)
    prof = get_profile(profile)
    cfg = prof.dgl
    n_epochs = int(epochs) if epochs is not None else (cfg.uo_epochs if variant == "unary_only" else cfg.epochs)
    seed = prof.seed if seed is None else int(seed)
    dev = activate_device(device)  # --device cuda:1: that GPU is the current one
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = dataset if dataset is not None else load_dataset(prof.data.dataset, data_root)
    train_tf = _train_transform(prof, variant)

    stream = None
    records, labels, class_of_pid = [], None, {}
    if _is_sysu_stream(ds):
        train_dir = Path(ds.root) / "sysu_train_set_all"
        train_list = Path(ds.root) / "meta" / "train.txt"
        bag_size, _ = _batch_layout(prof, variant)
        stream = SYSUBagStream(train_dir, train_list if train_list.is_file() else None, train_tf,
                               bag_size=bag_size, seed=seed)
        num_classes = stream.num_classes
    else:
        records = list(ds.train)
        if not records:
            raise ValueError(f"{ds.name}: no training images")
        labels, class_of_pid = relabel(records)
        num_classes = len(class_of_pid)

    seed_everything(seed)
    model = build_weak_model(prof, variant, num_classes, device=dev)
    network = model.network
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    opt, sched = _optimizer(model, prof, variant)
    use_amp = dgl_amp_dtype(prof, dev)  # fp32 unless the profile asks (dgl.amp), bf16 only where native

    history: list[dict] = []
    start_epoch = 0
    ckpt_path = out_dir / "checkpoint.pt"
    from reidkit.train import check_resume_settings, read_train_checkpoint, run_settings

    settings = run_settings(prof, "dgl", variant=variant, network=network)
    if resume and ckpt_path.is_file():
        state = read_train_checkpoint(ckpt_path, map_location=dev)
        if state.get("variant") != variant or state.get("num_classes") != num_classes:
            raise ValueError(f"{ckpt_path} is a checkpoint of variant {state.get('variant')!r} with "
                             f"{state.get('num_classes')} classes, not {variant!r} with {num_classes}; "
                             f"use another out_dir or resume=False")
        if int(state["epoch"]) > n_epochs:
            raise ValueError(f"{ckpt_path} has {int(state['epoch'])} epochs done, more than the {n_epochs} "
                             f"asked (epochs={n_epochs}); ask for at least {int(state['epoch'])} epochs, "
                             f"or use another out_dir or resume=False")
        check_resume_settings(ckpt_path, state, settings)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        optimizer_steps_to_cpu(opt)  # map_location=dev put Adam's step counters on the GPU
        sched.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        history = json.loads(state["history"])
        log(f"{variant}: resumed from {ckpt_path} at epoch {start_epoch}")

    stream_eval = ds.name == "sysu30k"
    run_epochs = 0
    for epoch in range(start_epoch, n_epochs):
        if stop_after is not None and run_epochs >= stop_after:
            break
        eseed = _epoch_seed(seed, epoch)
        seed_everything(eseed)
        t0 = time.time()
        loader = _epoch_loader(prof, variant, records, labels, train_tf, stream, eseed, epoch,
                               prof.data.workers, dev)
        model.train()
        steps = []
        total = len(loader) if stream is None else None
        if iters is not None and total is not None:
            total = min(total, iters)
        for it, batch in enumerate(progress(loader, desc=f"{variant} epoch {epoch}", total=total)):
            if iters is not None and it >= iters:
                break
            steps.append(_train_step(model, batch, variant, prof, num_classes, assignment, opt, dev, use_amp,
                                     stream))
        lr = opt.param_groups[0]["lr"]
        sched.step()
        entry = {"epoch": epoch, "lr": lr, "iters": len(steps), "images": sum(s["images"] for s in steps),
                 "t_train": time.time() - t0}
        for key in ("loss", "ce", "pairwise", "triplet", "pseudo_acc"):
            entry[key] = _mean([s[key] for s in steps])
        last = epoch + 1 == n_epochs
        if evaluate and (last or (eval_every and (epoch + 1) % eval_every == 0)):
            t1 = time.time()
            entry["test"] = _evaluate(model, ds, prof, dev, variant, flip, stream_eval, log)
            entry["t_eval"] = time.time() - t1
        entry["t_epoch"] = time.time() - t0
        history.append(entry)
        log(_epoch_line(variant, entry))
        atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                           "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": json.dumps(history),
                           "variant": variant, "network": network, "num_classes": num_classes,
                           "profile": prof.name, "seed": seed, "method": "dgl", "arch": prof.model.arch,
                           "settings": settings}, ckpt_path)
        run_epochs += 1
    finished = len(history) >= n_epochs
    atomic_write_json(out_dir / "history.json", history)
    if finished:
        final = out_dir / "model_final.pt"
        if not final.is_file() or run_epochs:
            atomic_torch_save({"model": model.state_dict(), "variant": variant, "network": network,
                               "num_classes": num_classes, "profile": prof.name, "epoch": len(history),
                               "arch": prof.model.arch, "method": "dgl", "settings": settings}, final)
    test = next((h["test"] for h in reversed(history) if "test" in h), None) if finished else None
    return WeakTrainResult(out_dir, variant, network, history, test, num_classes, finished, class_of_pid, model)


def load_weak_model(path: str | Path, profile: str | Profile, device: Any = "auto") -> nn.Module:
    """Rebuild a trained network from ``model_final.pt`` / ``checkpoint.pt`` (random init, then the
    saved weights)."""
    from reidkit.train import read_train_checkpoint

    state = read_train_checkpoint(path, map_location="cpu")
    model = build_weak_model(profile, state["variant"], int(state["num_classes"]), device="cpu",
                             network=state.get("network", "auto"), pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(resolve_device(device))


def _epoch_line(variant: str, e: dict) -> str:
    parts = [f"{variant} epoch {e['epoch']:3d}", f"lr {e['lr']:.2e}"]
    for key, label in (("loss", "loss"), ("ce", "ce"), ("pairwise", "pair"), ("triplet", "tri")):
        if e.get(key) is not None:
            parts.append(f"{label} {e[key]:.3f}")
    if e.get("pseudo_acc") is not None:
        parts.append(f"pseudo-label acc {100 * e['pseudo_acc']:.1f}%")
    if "test" in e:
        t = e["test"]
        parts.append(f"test mAP {100 * t['mAP']:.1f} r1 {100 * t['rank1']:.1f}")
    parts.append(f"{e['t_epoch']:.1f}s")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------
# notebook 05 helpers: one example bag, per-image outputs, the results tables

#: the names the three variants' test features and table rows carry
VARIANT_NAMES = {"full": "DGL_full", "unary_only": "DGL_unary-only", "supervised": "supervised_upper-bound"}
_SUPERVISION = {"full": "weak (bags)", "unary_only": "weak (bags)", "supervised": "full labels"}


def example_bag(profile: str | Profile, dataset: ReIDDataset, seed: int = 0, sysu_ids: int = 3) -> dict:
    """One bag to look at, formed the way training forms bags.

    Records datasets: the first bag of the first :class:`~reidkit.data.samplers.PKBagSampler` batch
    (``ids_per_bag`` ids x ``images_per_id`` images, id-major) and its soft bag vector. SYSU-30k
    (``dataset.train`` empty): the first streamed bag of 8 images with ``sysu_ids`` folders.
    Returns ``records``, ``true_cls`` (class index per image, hidden from training), ``bag_classes``
    (the label set, ascending), ``num_classes`` (None for SYSU-30k) and ``bag_vector`` (the first
    image's non-zero bag-vector entries, or None)."""
    from reidkit.data.datasets import iter_sysu_bags, relabel
    from reidkit.data.samplers import PKBagSampler
    from reidkit.weak import bag_label_vectors

    prof = get_profile(profile)
    cfg = prof.dgl
    vector, num_classes = None, None
    if not dataset.train and dataset.name == "sysu30k":
        bags = iter_sysu_bags(Path(dataset.root) / "sysu_train_set_all", bag_size=8, seed=seed)
        bag = next(b for b in bags if len(b.labels) == sysu_ids)
        records = list(bag.records)
        class_of_pid = {pid: pid - 1 for pid in bag.labels}
    else:
        labels, class_of_pid = relabel(dataset.train)
        num_classes = len(class_of_pid)
        sampler = PKBagSampler(labels, cfg.ids_per_batch, cfg.images_per_id, cfg.ids_per_bag, seed=seed)
        batch = next(iter(sampler))
        records = [dataset.train[i] for i in batch[:cfg.ids_per_bag * cfg.images_per_id]]
        vec = bag_label_vectors(torch.tensor([labels[i] for i in batch]), cfg.ids_per_bag, cfg.ids_per_batch,
                                cfg.images_per_id, num_classes)
        vector = {int(c): round(float(vec[0, c]), 4) for c in torch.nonzero(vec[0]).flatten()}
    true_cls = np.array([class_of_pid[r.pid] for r in records])
    return {"records": records, "true_cls": true_cls, "bag_classes": sorted(set(true_cls.tolist())),
            "num_classes": num_classes, "bag_vector": vector}


@torch.no_grad()
def forward_records(model: nn.Module, records: Sequence[Record], profile: str | Profile, device: Any = "auto",
                    variant: str = "full", batch_size: int = 64) -> dict:
    """Head-0 logits and the low-level descriptor ``g`` of every record (eval mode, test transform
    at the variant's input size), as float32 NumPy: ``{"logits": (n, C), "low": (n, d)}``."""
    from reidkit.data.transforms import ImageDataset, test_transform

    prof = get_profile(profile)
    dev = resolve_device(device)
    ds = ImageDataset(records, test_transform(*_input_size(prof, variant)))
    was = model.training
    model.eval()
    logits, low = [], []
    try:
        for s in range(0, len(ds), batch_size):
            x = torch.stack([ds[i]["img"] for i in range(s, min(s + batch_size, len(ds)))]).to(dev)
            z, _, g = forward_heads(model, x)
            logits.append(z[0].float().cpu())
            low.append(g.float().cpu())
    finally:
        model.train(was)
    return {"logits": torch.cat(logits).numpy(), "low": torch.cat(low).numpy()}


def _pct(v):
    return round(100 * v, 1) if isinstance(v, float) else v


def evaluate_variants(runs: dict, dataset: ReIDDataset, profile: str | Profile, out_dir: str | Path,
                      device: Any = "auto") -> dict:
    """Score every trained variant of ``runs`` (``{variant: WeakTrainResult}``) on the test split.

    SYSU-30k: the official protocol ran at the end of training (``run.test``). Records datasets:
    the Market protocol, and the SYSU-30k protocol on the sample (gallery + every training image as
    a distractor, :func:`sample_sysu_protocol`); the test features are saved as
    ``out_dir/eval_<name>.npz`` (``qf``, ``gf``, ``tf``) for notebook 06.
    Returns ``{variant: {"market": ..., "sysu_protocol": ...}}`` (or ``{"sysu30k": ...}``)."""
    results = {}
    if dataset.name == "sysu30k" and not dataset.train:
        return {v: {"sysu30k": run.test} for v, run in runs.items()}
    q_pids = np.array([r.pid for r in dataset.query]); g_pids = np.array([r.pid for r in dataset.gallery])
    q_cams = np.array([r.camid for r in dataset.query]); g_cams = np.array([r.camid for r in dataset.gallery])
    for variant, run in runs.items():
        market, qf, gf = evaluate_weak(run.model, dataset.query, dataset.gallery, profile, device, variant=variant,
                                       return_features=True)
        tf = extract_weak_features(run.model, dataset.train, profile, device, variant=variant)
        sysu = sample_sysu_protocol(qf, q_pids, q_cams, gf, g_pids, g_cams, tf)
        np.savez(Path(out_dir) / f"eval_{VARIANT_NAMES[variant]}.npz", qf=qf, gf=gf, tf=tf)
        results[variant] = {"market": {k: v for k, v in market.items() if k != "cmc"}, "sysu_protocol": sysu}
    return results


RESULT_COLUMNS = ["model", "supervision", "mAP", "rank-1", "rank-5", "SYSU-protocol rank-1", "SYSU-protocol mAP"]


def results_table(ctx, results: dict, dataset: ReIDDataset) -> tuple[list[str], list[list]]:
    """The comparison table of notebook 05: the DGL variants of ``results`` (from
    :func:`evaluate_variants`), then every other model whose test features earlier notebooks left
    in the run folder (``ctx.eval_features()``: HHCL from 04, direct transfer from 02), scored
    here with the same two protocols. A missing notebook's row says "not run". Percentages."""
    rows = []
    for variant, res in results.items():
        name, sup = VARIANT_NAMES[variant], _SUPERVISION[variant]
        if "sysu30k" in res:
            t = res["sysu30k"] or {}
            rows.append([name, sup, "-", "-", "-", _pct(t.get("rank1", "-")), _pct(t.get("mAP", "-"))])
            continue
        m, s = res["market"], res["sysu_protocol"]
        rows.append([name, sup, _pct(m["mAP"]), _pct(m["rank1"]), _pct(m["rank5"]), _pct(s["rank1"]), _pct(s["mAP"])])
    if dataset.name == "sysu30k" and not dataset.train:
        return list(RESULT_COLUMNS), rows
    ours = {VARIANT_NAMES[v].replace("_", " ") for v in VARIANT_NAMES}
    found = {k: v for k, v in ctx.eval_features().items() if k not in ours}
    q_pids = np.array([r.pid for r in dataset.query]); g_pids = np.array([r.pid for r in dataset.gallery])
    q_cams = np.array([r.camid for r in dataset.query]); g_cams = np.array([r.camid for r in dataset.gallery])
    for name, f in found.items():
        m = _rank_metrics(f["qf"], f["gf"], dataset.query, dataset.gallery, ctx.device)
        s = (sample_sysu_protocol(f["qf"], q_pids, q_cams, f["gf"], g_pids, g_cams, f["tf"]) if "tf" in f else {})
        sup = "ImageNet only" if name == "direct transfer" else "none (clusters)"
        rows.append([name, sup, _pct(m["mAP"]), _pct(m["rank1"]), _pct(m["rank5"]),
                     _pct(s.get("rank1", "-")), _pct(s.get("mAP", "-"))])
    if not any(n.lower().startswith(("hhcl", "cluster")) for n in found):
        rows.append(["HHCL (notebook 04)", "none (clusters)"] + ["not run"] * 5)
    if "direct transfer" not in found:
        rows.append(["direct transfer (notebook 02)", "ImageNet only"] + ["not run"] * 5)
    return list(RESULT_COLUMNS), rows


def training_table(runs: dict) -> tuple[list[str], list[list]]:
    """Per-epoch history of every variant as a table (loss terms, pseudo-label accuracy in %, seconds)."""
    def r(v, nd):
        return None if v is None else round(v, nd)

    columns = ["variant", "epoch", "loss", "CE", "pairwise", "triplet", "pseudo-label acc", "seconds"]
    rows = [[v, h["epoch"], r(h["loss"], 3), r(h["ce"], 3), r(h["pairwise"], 4), r(h["triplet"], 3),
             None if h["pseudo_acc"] is None else _pct(h["pseudo_acc"]), r(h["t_epoch"], 1)]
            for v, run in runs.items() for h in run.history]
    return columns, rows


def variants_summary(runs: dict, results: dict) -> dict:
    """The ``variants`` entry of notebook 05's metrics: network, epochs, classes, final loss and
    pseudo-label accuracy, and the test results of every variant."""
    out = {}
    for v, run in runs.items():
        last = run.history[-1] if run.history else {}
        out[v] = {"network": run.network, "epochs": len(run.history), "num_classes": run.num_classes,
                  "final_loss": last.get("loss"), "final_pseudo_acc": last.get("pseudo_acc"), **results.get(v, {})}
    return out


__all__ += ["VARIANT_NAMES", "example_bag", "forward_records", "evaluate_variants", "results_table",
            "training_table", "variants_summary"]
