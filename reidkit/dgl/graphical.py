"""Weakly supervised re-ID losses and pseudo-labelling of the DGL paper (SYSU-30k / GraphReID).

Setting
-------
Only *bags* are labelled: a bag is a group of images together with the set ``L_b`` of person ids
that appear somewhere in it. Which image shows which id is unknown, so training has to infer a
pseudo-label ``y_i in L_b`` for every image ``i``.

The CRF view (one bag, n images)
--------------------------------
::

    E(Y) = sum_i U(y_i)  +  lambda * sum_{i != j} k_ij [y_i != y_j]  +  sum_i B(y_i; L_b)

* **Unary** ``U(y) = -log p(y | x_i)``, the classifier's negative log-probability.
* **Pairwise** (Potts with an appearance kernel ``k_ij = exp(-||g_i - g_j||^2 / sigma)``): similar
  looking images should not get different labels. For training, the indicator ``[y_i != y_j]`` is
  relaxed to ``1 - p_i . p_j`` so the term becomes differentiable in the class distributions.
* **Bag constraint** ``B(y; L_b) = 0`` if ``y in L_b`` else ``+inf``: an image can only be one of
  the bag's ids.

With unary + bag constraint alone the nodes decouple, and the exact MAP labelling is the per-image
``argmax_{c in L_b} p_i[c]`` (:func:`pseudo_labels_from_bags`). The full model (:func:`graph_loss`)
uses these hard pseudo-labels as CE targets and adds the relaxed Potts energy as a loss;
:func:`weak_triplet_loss` adds a metric-learning term that only needs bag membership. The
unary-only variant adds a *cardinality* prior (every id of a bag takes ``n/|L_b|`` images), solved
greedily by the reference (:func:`greedy_balanced_assignment`) or exactly by a min-cost assignment
(:func:`exact_balanced_assignment`).

Per-batch code (bag vectors, pseudo-labels, pairwise term, triplet) is vectorised torch and runs on
whatever device its inputs live on. The balanced assignments are per-bag NumPy/SciPy (CPU), like
the reference ``mySelect``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

__all__ = ['bag_label_vectors', 'pseudo_labels_from_bags', 'graph_loss', 'weak_triplet_loss', 'greedy_balanced_assignment', 'exact_balanced_assignment', 'assignment_cost']


# --------------------------------------------------------------------------------------------
# Bags
# --------------------------------------------------------------------------------------------
def bag_label_vectors(labels, bagid: int, batchid: int, batchimage: int, num_classes: int) -> torch.Tensor:
    """Soft bag-label vector of every image (the reference ``Trainer.full_to_weak``).

    The batch must be laid out id-major: ``batchid`` ids, each with ``batchimage`` consecutive
    images; consecutive groups of ``bagid`` ids form one bag. Each image gets the vector
    ``l_b`` with ``l_b[c] = 1/bagid`` for every id ``c`` of its bag (counted with multiplicity, so
    a bag whose ids repeat gets a weight ``2/bagid`` etc.), 0 elsewhere.

    Computation, exactly as the reference: one-hot ``(n, C)`` -> reshape
    ``(batchid//bagid, bagid, batchimage, C)`` -> sum over the bag axis -> ``/ bagid`` -> copy to
    every image of the bag. Image slot ``t`` of every id of a bag receives row ``t`` of the sum,
    which is the same vector for all slots when each id's images really share one label.

    Returns float32 ``(n, C)`` on the device of ``labels``.
    """
    labels = torch.as_tensor(labels)
    n = labels.numel()
    if batchid % bagid != 0:
        raise ValueError(f"batchid={batchid} is not a multiple of bagid={bagid}")
    if n != batchid * batchimage:
        raise ValueError(f"got {n} labels, expected batchid*batchimage = {batchid * batchimage}")
    onehot = F.one_hot(labels.reshape(-1).long(), num_classes).to(torch.float32)
    nbags = batchid // bagid
    per_slot = onehot.reshape(nbags, bagid, batchimage, num_classes).sum(1) / bagid
    return per_slot.unsqueeze(1).expand(nbags, bagid, batchimage, num_classes).reshape(n, num_classes)


@torch.no_grad()
def pseudo_labels_from_bags(logits: torch.Tensor, bag_labels: torch.Tensor) -> torch.Tensor:
    """Exact MAP of unary + bag constraint: ``argmax_c bag[i, c] * softmax(logits)[i, c]``.

    ``bag_labels`` is the ``(n, C)`` bag vector (soft weights as from :func:`bag_label_vectors`,
    or a 0/1 mask). Uniform weights inside a bag do not change the argmax, so this is the most
    probable id among the bag's ids. No gradient (hard targets). Returns int64 ``(n,)``.
    """
    p = torch.softmax(logits.detach(), dim=1)
    return torch.argmax(bag_labels.to(p.dtype) * p, dim=1)


# --------------------------------------------------------------------------------------------
# Full model losses
# --------------------------------------------------------------------------------------------
def _sq_dist(x: torch.Tensor) -> torch.Tensor:
    """||x_i||^2 + ||x_j||^2 - 2 x_i.x_j (expanded form, like the reference; not clamped)."""
    sq = (x * x).sum(1)
    return sq[:, None] + sq[None, :] - 2.0 * (x @ x.t())


def graph_loss(logits: torch.Tensor, bag_labels: torch.Tensor, low_level_features: torch.Tensor,
               sigma: float = 1.0, pairwise_weight: float = 2.0, detach_kernel: bool = False):
    """Unary CE against bag-constrained pseudo-labels + relaxed Potts pairwise energy.

    This is the reference ``CrossEntropyLoss`` of GraphReID's full model:

    * ``p = softmax(logits)``; ``pseudo = argmax(bag_labels * p)`` (no gradient through it);
    * ``unary = CE(logits, pseudo)`` (mean);
    * ``W_ij = exp(-(||g_i||^2 + ||g_j||^2 - 2 g_i.g_j) / sigma)`` (no clamp, no sqrt);
    * ``pairwise = mean_{i,j} W_ij * (-p_i.p_j) * [pseudo_i != pseudo_j]`` over all n^2 entries
      (pairs across bags included);
    * ``total = unary + pairwise_weight * pairwise``.

    CRF reading: the Potts penalty ``k_ij [y_i != y_j]`` is relaxed to ``k_ij (1 - p_i.p_j)``
    (constant dropped) and only charged on pairs whose current pseudo-labels disagree, so visually
    similar images are pushed to agree. Gradients reach ``logits`` (CE and ``p``) and, by default,
    ``low_level_features`` through the kernel, which also pulls their features together.
    ``detach_kernel=True`` treats ``W`` as a constant: a fixed-kernel CRF where only the class
    distributions move (not in the reference).

    Returns ``(total, unary, pairwise, pseudo_labels)``; ``pairwise`` is before the weight.
    """
    p = torch.softmax(logits, dim=1)
    pseudo = pseudo_labels_from_bags(logits, bag_labels)
    unary = F.cross_entropy(logits, pseudo)
    g = low_level_features.detach() if detach_kernel else low_level_features
    kernel = torch.exp(-_sq_dist(g) / sigma)
    mask = (pseudo[:, None] != pseudo[None, :]).to(p.dtype)
    pairwise = (kernel * -(p @ p.t()) * mask).mean()
    total = unary + pairwise_weight * pairwise
    return total, unary, pairwise, pseudo


def _select_with_tie_grad(dist: torch.Tensor, masked_sorted_vals: torch.Tensor, valid: torch.Tensor):
    """Value ``v_i`` per row with the gradient of a full-reduction torch.median/min.

    ``torch.median()`` / ``torch.min()`` without ``dim`` spread the gradient *evenly* over every
    element equal to the result. Forward value is exactly ``v_i``; backward sends
    ``1/#ties`` to each entry of ``dist[i]`` (within ``valid[i]``) equal to ``v_i``.
    """
    ties = valid & (dist.detach() == masked_sorted_vals[:, None])
    w = ties.to(dist.dtype) / ties.sum(1, keepdim=True).clamp(min=1).to(dist.dtype)  # a row without ties: 0
    return masked_sorted_vals + ((dist - dist.detach()) * w).sum(1)


def weak_triplet_loss(embeddings: torch.Tensor, bag_labels: torch.Tensor, margin: float = 1.2):
    """Weakly supervised triplet loss: median in-bag distance vs. hardest out-of-bag distance.

    * ``D = sqrt(clamp(||e_i||^2 + ||e_j||^2 - 2 e_i.e_j, min=1e-12))``;
    * positives of anchor ``i``: every ``j`` with ``bag_i . bag_j > 0`` (the whole bag, itself and
      the other ids included); negatives: the rest;
    * ``ap_i`` = lower median of the positive distances (``torch.median`` semantics: sorted index
      ``(cnt-1)//2``); ``an_i`` = min negative distance;
    * ``loss = mean(relu(ap - an + margin))``.

    Only ~1/|L_b| of the in-bag images are true positives; the median is robust to the rest.
    Vectorised: masked entries are set to +inf, rows are sorted and the wanted rank is gathered.
    The gradient goes only to the selected entries; like the reference's ``median()``/``min()``,
    exact ties share it evenly.

    An anchor whose bag shares an id with every other image of the batch has no negative: it is
    left out of the mean (its ``dist_an`` is +inf). Streamed SYSU-30k bags of adjacent folders can
    overlap, so a rare batch has such anchors; a batch where no anchor has a negative gives a zero
    loss (still connected to the graph) instead of stopping a long run.

    Returns ``(loss, dist_ap, dist_an)``.
    """
    bag = bag_labels.to(embeddings.dtype)
    dist = _sq_dist(embeddings).clamp(min=1e-12).sqrt()
    pos = (bag @ bag.t()) > 0
    neg = ~pos
    n_pos = pos.sum(1)
    if bool((n_pos == 0).any()):
        raise ValueError("an anchor has no positive (all-zero bag vector)")
    has_neg = neg.any(1)
    d = dist.detach()
    inf = torch.full_like(d, float("inf"))
    pos_sorted = torch.where(pos, d, inf).sort(dim=1).values
    ap_val = pos_sorted.gather(1, ((n_pos - 1) // 2)[:, None]).squeeze(1)
    an_val = torch.where(neg, d, inf).min(dim=1).values
    dist_ap = _select_with_tie_grad(dist, ap_val, pos)
    dist_an = _select_with_tie_grad(dist, an_val, neg)
    if bool(has_neg.all()):
        loss = F.relu(dist_ap - dist_an + margin).mean()
    else:
        loss = F.relu(dist_ap - dist_an + margin)[has_neg].sum() / has_neg.sum().clamp(min=1) + 0.0 * dist_ap.sum()
        dist_an = torch.where(has_neg, dist_an, torch.full_like(dist_an, float("inf")))
    return loss, dist_ap, dist_an


# --------------------------------------------------------------------------------------------
# Unary-only variant: balanced assignment inside one bag
# --------------------------------------------------------------------------------------------
def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _bag_setup(scores, bag_ids):
    s = _as_numpy(scores).astype(np.float64)  # exact for float32 inputs: comparisons unchanged
    ids = _as_numpy(bag_ids).astype(np.int64).reshape(-1)
    if s.ndim != 2:
        raise ValueError("scores must be (n_images, num_classes)")
    if ids.size == 0 or len(set(ids.tolist())) != ids.size:
        raise ValueError("bag_ids must be a non-empty list of distinct class ids")
    return s, ids


def greedy_balanced_assignment(scores, bag_ids) -> np.ndarray:
    """The reference ``mySelect`` greedy balanced labelling of one bag.

    ``scores``: ``(n, C)`` raw logits (columns are global class ids). ``bag_ids``: the bag's ids;
    their order is the column order and the vote **tie-break order** (pass the reference's
    ``list(set(labels))`` order to reproduce it). With ``m`` ids and ``k = n // m``, ``m`` rounds:

    1. every active image (max remaining score >= -10000) votes for its best remaining id (first
       max), with score ``best``;
    2. the id with most votes wins (ties: first in ``bag_ids`` order);
    3. all its voters are labelled with it; its ``k`` voters with the highest ``best`` are locked
       (removed; ties by image index), and the id is removed.

    Unlocked voters are relabelled in later rounds, so every id but the last gets exactly ``k``
    images and the last gets ``k + n - m*k``. Greedy and not differentiable; note it ranks voters
    by raw logits, which are not comparable across images. Returns int64 ``(n,)`` of class ids.
    """
    s, ids = _bag_setup(scores, bag_ids)
    n, m = s.shape[0], ids.size
    k = n // m
    S = s[:, ids].copy()
    removed = -1e5
    out = np.full(n, -1, dtype=np.int64)
    for _ in range(m):
        best = S.max(1)
        active = np.flatnonzero(best >= -10000)
        vote = S[active].argmax(1)
        counts = np.bincount(vote, minlength=m)
        b = int(np.argmax(counts))  # first max -> bag_ids order
        voters = active[vote == b]
        if voters.size < k:  # cannot happen (pigeonhole) unless scores are <= -10000
            raise RuntimeError("winner has fewer than k voters; scores must be > -10000")
        out[voters] = ids[b]
        order = np.argsort(-best[voters], kind="stable")
        S[voters[order[:k]], :] = removed
        S[:, b] = removed
    return out


def _bag_log_probs(s: np.ndarray, ids: np.ndarray) -> np.ndarray:
    z = s[:, ids]
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def assignment_cost(scores, bag_ids, labels) -> float:
    """Total unary cost ``sum_i -log softmax_bag(scores_i)[labels_i]`` of a labelling.

    The softmax is taken over the bag's columns only (the bag constraint: probabilities
    renormalised over ``L_b``). This is the objective of :func:`exact_balanced_assignment`.
    """
    s, ids = _bag_setup(scores, bag_ids)
    col = {int(c): j for j, c in enumerate(ids)}
    j = np.array([col[int(l)] for l in _as_numpy(labels).reshape(-1)])
    return float(-_bag_log_probs(s, ids)[np.arange(s.shape[0]), j].sum())


def exact_balanced_assignment(scores, bag_ids) -> np.ndarray:
    """Optimal balanced labelling of one bag (exact counterpart of the greedy ``mySelect``).

    Minimises ``sum_i -log q_i[y_i]`` with ``q_i = softmax(scores_i restricted to bag_ids)`` (the
    unary energy under the bag constraint) subject to the cardinality prior: with ``m`` ids and
    ``k = n // m``, every id gets ``k`` or ``k + 1`` images (the ``n - m*k`` remainder goes one
    each to the ids where it is cheapest). When ``n = m*k`` every id gets exactly ``k``, the same
    constraint as the greedy rule; otherwise the greedy gives the whole remainder to its last id.

    Solved with ``scipy.optimize.linear_sum_assignment``: each id has ``k`` mandatory slots and,
    if there is a remainder, one optional slot; ``m*(k+1) - n`` dummy rows may only take optional
    slots, so a perfect matching fills every mandatory slot. Ties between equal-cost solutions are
    broken by the solver. Returns int64 ``(n,)`` of class ids.
    """

    s, ids = _bag_setup(scores, bag_ids)
    n, m = s.shape[0], ids.size
    k, r = divmod(n, m)
    cost = -_bag_log_probs(s, ids)  # (n, m)
    slot_id = np.repeat(np.arange(m), k)
    if r == 0:
        rows, cols = linear_sum_assignment(cost[:, slot_id])
        return ids[slot_id[cols]][np.argsort(rows)]
    slot_id = np.concatenate([slot_id, np.arange(m)])  # + one optional slot per id
    optional = np.arange(slot_id.size) >= m * k
    n_dummy = m * (k + 1) - n
    dummy = np.where(optional, 0.0, np.inf)[None, :].repeat(n_dummy, 0)
    full = np.vstack([cost[:, slot_id], dummy])
    rows, cols = linear_sum_assignment(full)
    real = rows < n
    out = np.empty(n, dtype=np.int64)
    out[rows[real]] = ids[slot_id[cols[real]]]
    return out


# --------------------------------------------------------------------------------------------
# Teaching helpers (notebook 05): the kernel alone, simulated bags, greedy vs exact on many bags
# --------------------------------------------------------------------------------------------
def appearance_kernel(g, sigma: float = 1.0):
    """The pairwise appearance kernel ``k_ij = exp(-||g_i - g_j||^2 / sigma)`` of :func:`graph_loss`.

    Same expanded squared distance as the loss (not clamped), so the diagonal is 1 up to round-off.
    Torch in, torch out (same device); anything else in, float64 NumPy out."""
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if isinstance(g, torch.Tensor):
        return torch.exp(-_sq_dist(g.float()) / sigma)
    x = np.asarray(g, dtype=np.float64)
    sq = (x * x).sum(1)
    return np.exp(-(sq[:, None] + sq[None, :] - 2.0 * x @ x.T) / sigma)


def simulated_bags(labels, ids_per_bag: int, images_per_id: int, num_bags: int, seed: int = 0):
    """Bags drawn from a labelled set, as the full model's sampler forms them (spec §1.2).

    Each bag takes ``ids_per_bag`` distinct ids at random and ``images_per_id`` images of each
    (without replacement when the id has enough), id-major. Returns a list of
    ``(image indices, bag ids)`` with the ids ascending; the true labels stay with the caller."""
    labels = np.asarray(labels, dtype=np.int64)
    ids = np.unique(labels)
    if ids_per_bag > ids.size:
        raise ValueError(f"ids_per_bag={ids_per_bag} but only {ids.size} ids")
    rng = np.random.default_rng(seed)
    index_of = {int(c): np.flatnonzero(labels == c) for c in ids}
    bags = []
    for _ in range(num_bags):
        chosen = np.sort(rng.choice(ids, size=ids_per_bag, replace=False))
        idx = [rng.choice(index_of[int(c)], size=images_per_id, replace=index_of[int(c)].size < images_per_id)
               for c in chosen]
        bags.append((np.concatenate(idx), [int(c) for c in chosen]))
    return bags


def compare_assignments(scores, bags, true_labels) -> dict:
    """Pseudo-labels of many bags by three rules, scored against the (hidden) true labels.

    ``scores``: ``(N, C)`` logits of every image; ``bags``: ``(image indices, bag ids)`` pairs (as
    :func:`simulated_bags` returns); ``true_labels``: ``(N,)``. Per bag: the accuracy of the MAP
    rule without balance (argmax inside the bag), of :func:`greedy_balanced_assignment` and of
    :func:`exact_balanced_assignment`, the unary cost of both balanced labellings
    (:func:`assignment_cost`), and whether greedy and exact disagree. Returns arrays of length
    ``len(bags)``."""
    s = _as_numpy(scores)
    y = _as_numpy(true_labels).astype(np.int64)
    keys = ("map_acc", "greedy_acc", "exact_acc", "greedy_cost", "exact_cost", "disagree")
    out = {k: [] for k in keys}
    for idx, ids in bags:
        idx = np.asarray(idx)
        ids_arr = np.asarray(ids, dtype=np.int64)
        sub = s[idx]
        mapped = ids_arr[np.argmax(sub[:, ids_arr], axis=1)]
        greedy = greedy_balanced_assignment(sub, ids_arr)
        exact = exact_balanced_assignment(sub, ids_arr)
        out["map_acc"].append(float((mapped == y[idx]).mean()))
        out["greedy_acc"].append(float((greedy == y[idx]).mean()))
        out["exact_acc"].append(float((exact == y[idx]).mean()))
        out["greedy_cost"].append(assignment_cost(sub, ids_arr, greedy))
        out["exact_cost"].append(assignment_cost(sub, ids_arr, exact))
        out["disagree"].append(bool((greedy != exact).any()))
    return {k: np.asarray(v) for k, v in out.items()}


__all__ += ["appearance_kernel", "simulated_bags", "compare_assignments"]
