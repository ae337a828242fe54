"""The losses of weakly supervised training: the full DGL objective over bags, the unary-only
balanced assignment, and the supervised baseline (spec dgl-sysu30k §2.4, §3.3)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from reidkit.dgl.graphical import (
    exact_balanced_assignment,
    graph_loss,
    greedy_balanced_assignment,
    weak_triplet_loss,
)


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

    solve = {"greedy": greedy_balanced_assignment, "exact": exact_balanced_assignment}.get(method)
    if solve is None:
        raise ValueError(f"assignment must be 'greedy' or 'exact', got {method!r}")
    scores = logits.detach().float().cpu().numpy()
    out = np.empty(scores.shape[0], dtype=np.int64)
    for start, end, ids in bags:
        out[start:end] = solve(scores[start:end], list(ids))
    return torch.from_numpy(out).to(logits.device)


def bags_of_batch(bag_index: torch.Tensor, bag_sets: torch.Tensor) -> list[tuple[int, int, list[int]]]:
    """Contiguous runs of equal ``bag_index`` -> (start, end, the bag's class ids)."""
    idx = bag_index.tolist()
    out, start = [], 0
    for i in range(1, len(idx) + 1):
        if i == len(idx) or idx[i] != idx[start]:
            ids = sorted({int(c) for c in bag_sets[start].tolist() if c >= 0})
            out.append((start, i, ids))
            start = i
    return out
