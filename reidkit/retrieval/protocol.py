"""The evaluation protocols applied to a model, each written once: the Market protocol (extract
query and gallery features, rank, score; optionally after k-reciprocal re-ranking) and the SYSU-30k
protocol (query features, then the gallery's streamed chunk by chunk into the search). The training
loops, the notebooks and ``reidkit evaluate`` all call these."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from torch import nn

from reidkit.config import EvalConfig, Profile
from reidkit.core.device import amp_dtype
from reidkit.data.records import Record
from reidkit.data.transforms import ImageDataset, test_transform
from reidkit.nets.features import extract_features, iter_features
from reidkit.retrieval.distances import pairwise_distance
from reidkit.retrieval.market import evaluate_rank
from reidkit.retrieval.rerank import re_ranking
from reidkit.retrieval.sysu import sysu30k_evaluate


def extract_records(model: nn.Module, records: Sequence[Record], profile: Profile, device: Any = "auto",
                    desc: str = "features", amp: Any = None) -> np.ndarray:
    """L2-normalised features of ``records`` with the test transform of ``profile``. ``amp``: the
    run's AMP dtype (a training run passes its RunSpec's); None asks the profile's policy here (a
    notebook's call outside a run): fp32 features as in the papers unless the profile asks."""

    ds = ImageDataset(records, test_transform(profile.data.height, profile.data.width))
    amp = amp_dtype(profile, device) if amp is None else amp
    return extract_features(model, ds, device=device, batch_size=profile.data.test_batch_size,
                            num_workers=profile.data.workers, amp=amp or False, desc=desc)


def rank_metrics(qf, gf, query: Sequence[Record], gallery: Sequence[Record], device: Any = "cpu",
                 max_rank: int = 20, rerank: EvalConfig | None = None, rerank_device: Any = None,
                 show_progress: bool = False) -> dict:
    """Market-protocol mAP, mINP and CMC of query / gallery features (Euclidean distance; with
    ``rerank`` (an ``EvalConfig``), after k-reciprocal re-ranking with its k1, k2 and lambda, on
    ``rerank_device``, default ``device``)."""

    dist = pairwise_distance(qf, gf, device=device)
    if rerank is not None:
        dist = re_ranking(dist, pairwise_distance(qf, qf, device=device), pairwise_distance(gf, gf, device=device),
                          k1=rerank.rerank_k1, k2=rerank.rerank_k2, lambda_value=rerank.rerank_lambda,
                          device=device if rerank_device is None else rerank_device)
    res = evaluate_rank(np.asarray(dist), np.array([r.pid for r in query]), np.array([r.pid for r in gallery]),
                        np.array([r.camid for r in query]), np.array([r.camid for r in gallery]),
                        max_rank=min(max_rank, len(gallery)), device=device, show_progress=show_progress)
    cmc = np.asarray(res["cmc"], dtype=float)
    return {"mAP": float(res["mAP"]), "mINP": float(res["mINP"]), "rank1": float(cmc[0]),
            "rank5": float(cmc[min(4, len(cmc) - 1)]), "rank10": float(cmc[min(9, len(cmc) - 1)]),
            "cmc": cmc.tolist()}


def evaluate_model(model: nn.Module, query: Sequence[Record], gallery: Sequence[Record], profile: Profile,
                   device: Any = "auto", max_rank: int = 20, amp: Any = None) -> dict:
    """Market-protocol mAP / CMC of ``model`` on (query, gallery) records (``amp``: as
    :func:`extract_records`)."""
    qf = extract_records(model, query, profile, device, "query features", amp)
    gf = extract_records(model, gallery, profile, device, "gallery features", amp)
    return rank_metrics(qf, gf, query, gallery, device, max_rank)


def sysu30k_protocol(model: nn.Module, query: Sequence[Record], gallery: Sequence[Record], transform,
                     device: Any, *, flip: bool = True, batch_size: int = 64, num_workers: int = 0,
                     chunk: int = 8192, forward_fn: Callable | None = None, amp: Any = False,
                     buffer_size: int = 1024, show_progress: bool = False, desc: str = "sysu30k") -> dict:
    """The SYSU-30k protocol of ``model``: query features first, then the gallery's streamed in
    chunks of ``chunk`` rows straight into :func:`reidkit.retrieval.sysu.sysu30k_evaluate`, so that
    memory is O(queries x chunk) whatever the gallery size. The gallery is passed as a callable:
    a second pass (a true match streaming past late) re-extracts instead of failing.
    ``forward_fn(model, x)`` replaces ``model(x)`` (e.g. the released model's logits)."""

    qf = extract_features(model, ImageDataset(list(query), transform), device=device, flip=flip, amp=amp,
                          batch_size=batch_size, num_workers=num_workers, forward_fn=forward_fn,
                          desc=f"{desc} query")
    g_labels = np.fromiter((r.pid for r in gallery), dtype=np.int64, count=len(gallery))
    g_cams = np.fromiter((r.camid for r in gallery), dtype=np.int64, count=len(gallery))
    data = ImageDataset(gallery, transform)

    def gallery_chunks():
        for feats, start in iter_features(model, data, device=device, flip=flip, amp=amp, batch_size=batch_size,
                                          num_workers=num_workers, chunk_rows=chunk, forward_fn=forward_fn,
                                          desc=f"{desc} gallery"):
            end = start + feats.shape[0]
            yield feats, g_labels[start:end], g_cams[start:end]

    return sysu30k_evaluate(qf, np.array([r.pid for r in query]), np.array([r.camid for r in query]),
                            gallery_chunks, chunk_size=chunk, buffer_size=buffer_size, device=device,
                            show_progress=show_progress)
