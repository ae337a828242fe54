"""The Market protocol applied to a model: extract query and gallery features, rank, score."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch import nn

from reidkit.config import Profile
from reidkit.core.device import amp_dtype
from reidkit.data.records import Record
from reidkit.data.transforms import ImageDataset, test_transform
from reidkit.nets.features import extract_features
from reidkit.retrieval.distances import pairwise_distance
from reidkit.retrieval.market import evaluate_rank


def extract_records(model: nn.Module, records: Sequence[Record], profile: Profile, device: Any = "auto",
                    desc: str = "features") -> np.ndarray:
    """L2-normalised features of ``records`` with the test transform of ``profile``."""

    ds = ImageDataset(records, test_transform(profile.data.height, profile.data.width))
    # fp32 features as in the papers unless the profile asks for mixed precision
    return extract_features(model, ds, device=device, batch_size=profile.data.test_batch_size,
                            num_workers=profile.data.workers, amp=amp_dtype(profile, device) or False,
                            desc=desc)


def rank_metrics(qf, gf, query: Sequence[Record], gallery: Sequence[Record], device: Any = "cpu",
                 max_rank: int = 20) -> dict:
    """Market-protocol mAP, mINP and CMC of query / gallery features (Euclidean distance)."""

    dist = pairwise_distance(qf, gf, device=device)
    res = evaluate_rank(np.asarray(dist), np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
                        np.array([r.camid for r in query]), np.array([r.camid for r in gallery]),
                        max_rank=min(max_rank, len(gallery)), device=device)
    cmc = np.asarray(res["cmc"], dtype=float)
    return {"mAP": float(res["mAP"]), "mINP": float(res["mINP"]), "rank1": float(cmc[0]),
            "rank5": float(cmc[min(4, len(cmc) - 1)]), "rank10": float(cmc[min(9, len(cmc) - 1)]),
            "cmc": cmc.tolist()}


def evaluate_model(model: nn.Module, query: Sequence[Record], gallery: Sequence[Record], profile: Profile,
                   device: Any = "auto", max_rank: int = 20) -> dict:
    """Market-protocol mAP / CMC of ``model`` on (query, gallery) records."""
    qf = extract_records(model, query, profile, device, "query features")
    gf = extract_records(model, gallery, profile, device, "gallery features")
    return rank_metrics(qf, gf, query, gallery, device, max_rank)
