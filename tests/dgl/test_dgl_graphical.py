"""Tests for reidkit.dgl.graphical: golden parity with the GraphReID reference + independent checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from _golden import load_golden

from reidkit.dgl import graphical as weak


@pytest.fixture(scope="module")
def z():
    return load_golden("dgl_losses")


def _loss_cases(z):
    """Prefixes of the loss cases in the file ('' = public; a larger case may carry a prefix)."""
    return [k[: -len("logits")] for k in z if k.endswith("logits") and k[: -len("logits")] + "labels" in z]


def _t(a):
    return torch.from_numpy(np.array(a))


def _bags(z, p):
    return weak.bag_label_vectors(_t(z[p + "labels"]), int(z[p + "bagid"]), int(z[p + "batchid"]),
                                  int(z[p + "batchimage"]), int(z[p + "num_classes"]))


# ------------------------------------------------------------------------------- golden parity
def test_golden_bag_labels(z):
    for p in _loss_cases(z):
        bl = _bags(z, p)
        assert bl.dtype == torch.float32
        np.testing.assert_array_equal(bl.numpy(), z[p + "bag_labels"])


def test_golden_graph_loss(z):
    for p in _loss_cases(z):
        logits = _t(z[p + "logits"]).requires_grad_()
        g = _t(z[p + "g"]).requires_grad_()
        total, unary, pair, pseudo = weak.graph_loss(logits, _t(z[p + "bag_labels"]), g)
        total.backward()
        np.testing.assert_array_equal(pseudo.numpy(), z[p + "pseudo_labels"])
        assert abs(total.item() - z[p + "ce_total_loss"].item()) < 1e-5
        assert abs(unary.item() - z[p + "ce_unary_loss"].item()) < 1e-5
        assert abs(pair.item() - z[p + "ce_pairwise_loss"].item()) < 1e-5
        np.testing.assert_allclose(logits.grad.numpy(), z[p + "ce_grad_logits"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(g.grad.numpy(), z[p + "ce_grad_g"], rtol=0, atol=1e-6)


def test_golden_weak_triplet(z):
    for p in _loss_cases(z):
        emb = _t(z[p + "embeddings"]).requires_grad_()
        loss, ap, an = weak.weak_triplet_loss(emb, _t(z[p + "bag_labels"]), float(z[p + "margin"]))
        loss.backward()
        assert abs(loss.item() - z[p + "triplet_loss"].item()) < 1e-5
        np.testing.assert_allclose(ap.detach().numpy(), z[p + "triplet_dist_ap"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(an.detach().numpy(), z[p + "triplet_dist_an"], rtol=0, atol=1e-5)
        np.testing.assert_allclose(emb.grad.numpy(), z[p + "triplet_grad_emb"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("bag", ["bag0", "bag1", "tie"])
def test_golden_greedy_select(z, bag):
    out = weak.greedy_balanced_assignment(z[f"select_{bag}_scores"], z[f"select_{bag}_id_list"])
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, z[f"select_{bag}_labels_new"])


def test_golden_greedy_tie_break_order(z):
    asc = sorted(z["select_tie_id_list"].tolist())
    out = weak.greedy_balanced_assignment(torch.from_numpy(z["select_tie_scores"]), asc)
    np.testing.assert_array_equal(out, z["select_tie_labels_new_if_ascending_order"])
    assert not np.array_equal(out, z["select_tie_labels_new"])  # the order matters here


@pytest.mark.parametrize("bag", ["bag0", "bag1", "tie"])
def test_exact_not_worse_on_golden_bags(z, bag):
    s, ids = z[f"select_{bag}_scores"], z[f"select_{bag}_id_list"]
    ex = weak.exact_balanced_assignment(s, ids)
    gr = weak.greedy_balanced_assignment(s, ids)
    assert weak.assignment_cost(s, ids, ex) <= weak.assignment_cost(s, ids, gr) + 1e-9
    _, counts = np.unique(ex, return_counts=True)
    assert set(np.unique(ex)) <= set(ids.tolist()) and set(counts) <= {s.shape[0] // len(ids)}


# ------------------------------------------------------------------------------- bags/pseudo
def test_bag_label_vectors_layout():
    labels = torch.tensor([3, 3, 7, 7, 1, 1, 4, 4, 0, 0, 2, 2])  # 6 ids x 2 images, bags of 3 ids
    bl = weak.bag_label_vectors(labels, bagid=3, batchid=6, batchimage=2, num_classes=8)
    assert bl.shape == (12, 8)
    first = torch.zeros(8)
    first[[3, 7, 1]] = 1 / 3
    second = torch.zeros(8)
    second[[4, 0, 2]] = 1 / 3
    torch.testing.assert_close(bl[:6], first.expand(6, 8), rtol=0, atol=0)
    torch.testing.assert_close(bl[6:], second.expand(6, 8), rtol=0, atol=0)
    with pytest.raises(ValueError):
        weak.bag_label_vectors(labels, bagid=4, batchid=6, batchimage=2, num_classes=8)
    with pytest.raises(ValueError):
        weak.bag_label_vectors(labels[:10], bagid=3, batchid=6, batchimage=2, num_classes=8)


def test_pseudo_labels_from_bags():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 9, generator=gen, requires_grad=True)
    bag = (torch.rand(20, 9, generator=gen) < 0.3).float()
    bag[:, 0] = 1.0
    pseudo = weak.pseudo_labels_from_bags(logits, bag / bag.sum(1, keepdim=True))
    assert pseudo.dtype == torch.int64 and not pseudo.requires_grad
    for i in range(20):
        ids = torch.nonzero(bag[i]).flatten()
        assert pseudo[i].item() == ids[logits[i, ids].argmax()].item()


# ------------------------------------------------------------------------------- loss semantics
def _loop_graph_loss(logits, bag, g, sigma, w):
    """Entry-by-entry float64 reading of the pairwise definition."""
    p = torch.softmax(logits, 1)
    n = logits.shape[0]
    pseudo = [int(torch.argmax(bag[i] * p[i].detach())) for i in range(n)]
    unary = sum(-torch.log(p[i, pseudo[i]]) for i in range(n)) / n
    pair = 0.0
    for i in range(n):
        for j in range(n):
            if pseudo[i] != pseudo[j]:
                pair = pair + torch.exp(-((g[i] - g[j]) ** 2).sum() / sigma) * -(p[i] @ p[j])
    pair = pair / n ** 2
    return unary + w * pair, unary, pair, pseudo


@pytest.mark.parametrize("sigma,w", [(1.0, 2.0), (3.0, 0.5)])
def test_graph_loss_matches_loop(sigma, w):
    gen = torch.Generator().manual_seed(1)
    n, C = 12, 6
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 5, 5, 5])
    bag = weak.bag_label_vectors(labels, 2, 4, 3, C).double()
    logits = torch.randn(n, C, generator=gen, dtype=torch.float64)
    g = 0.3 * torch.randn(n, 5, generator=gen, dtype=torch.float64)
    l1, g1 = logits.clone().requires_grad_(), g.clone().requires_grad_()
    l2, g2 = logits.clone().requires_grad_(), g.clone().requires_grad_()
    tot, un, pa, ps = weak.graph_loss(l1, bag, g1, sigma=sigma, pairwise_weight=w)
    rtot, run, rpa, rps = _loop_graph_loss(l2, bag, g2, sigma, w)
    assert ps.tolist() == rps
    assert len(set(rps)) > 1
    torch.testing.assert_close(tot, rtot)
    torch.testing.assert_close(un, run)
    torch.testing.assert_close(pa, rpa)
    tot.backward()
    rtot.backward()
    torch.testing.assert_close(l1.grad, l2.grad)
    torch.testing.assert_close(g1.grad, g2.grad)


def test_graph_loss_detach_kernel(z):
    logits = _t(z["logits"]).requires_grad_()
    g = _t(z["g"]).requires_grad_()
    tot, un, pa, ps = weak.graph_loss(logits, _t(z["bag_labels"]), g, detach_kernel=True)
    assert abs(tot.item() - z["ce_total_loss"].item()) < 1e-5
    tot.backward()
    assert g.grad is None  # fixed kernel: features receive nothing
    # the logits gradient is unchanged: the kernel does not depend on the logits
    np.testing.assert_allclose(logits.grad.numpy(), z["ce_grad_logits"], rtol=0, atol=1e-6)


def _loop_triplet(emb, bag, margin):
    """The reference's per-anchor reading, with torch.median / torch.min on each row."""
    sq = (emb * emb).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * emb @ emb.t()).clamp(min=1e-12).sqrt()
    pos = (bag @ bag.t()) > 0
    ap = torch.stack([dist[i][pos[i]].median() for i in range(len(emb))])
    an = torch.stack([dist[i][~pos[i]].min() for i in range(len(emb))])
    return torch.relu(ap - an + margin).mean(), ap, an


def _random_bag_batch(gen, sizes, C=40):
    """Bags with the given image counts, disjoint id sets, in shuffled order."""
    rows, start = [], 0
    for s in sizes:
        ids = list(range(start, start + 1 + s % 3))
        start += len(ids)
        v = torch.zeros(C, dtype=torch.float64)
        v[ids] = 1.0 / len(ids)
        rows += [v] * s
    bag = torch.stack(rows)
    return bag[torch.randperm(len(bag), generator=gen)]


@pytest.mark.parametrize("sizes", [(8, 8), (1, 2, 3, 4, 5), (7, 6, 2, 9)])
def test_weak_triplet_matches_loop(sizes):
    gen = torch.Generator().manual_seed(sum(sizes))
    bag = _random_bag_batch(gen, sizes)
    emb = torch.rand(len(bag), 7, generator=gen, dtype=torch.float64) * 2
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    l1, ap1, an1 = weak.weak_triplet_loss(e1, bag, margin=1.0)
    l2, ap2, an2 = _loop_triplet(e2, bag, 1.0)
    torch.testing.assert_close(ap1, ap2, rtol=0, atol=0)
    torch.testing.assert_close(an1, an2, rtol=0, atol=0)
    torch.testing.assert_close(l1, l2)
    assert 0 < l1.item()
    l1.backward()
    l2.backward()
    torch.testing.assert_close(e1.grad, e2.grad)


def test_weak_triplet_ties_share_gradient_like_torch_median():
    """Duplicated images (sampling with replacement) give exact ties in D; torch's full-reduction
    median()/min() split the gradient evenly among tied entries, and so must we."""
    gen = torch.Generator().manual_seed(7)
    base = torch.randint(0, 4, (6, 3), generator=gen).double()  # integers: distances are exact
    emb = torch.cat([base, base[[0, 1, 3]]])  # 9 images, three duplicates
    bag = torch.zeros(9, 4, dtype=torch.float64)
    bag[[0, 1, 2, 6, 7], 0] = 1.0  # bag A (5 images, two are duplicates)
    bag[[3, 4, 5, 8], 1:3] = 0.5  # bag B (4 images, one duplicate)
    e1, e2 = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    l1, ap1, an1 = weak.weak_triplet_loss(e1, bag, margin=5.0)
    l2, ap2, an2 = _loop_triplet(e2, bag, 5.0)
    # there really are ties at the selected values
    sq = (emb * emb).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * emb @ emb.t()).clamp(min=1e-12).sqrt()
    pos = (bag @ bag.t()) > 0
    n_ties = ((d == ap1.detach()[:, None]) & pos).sum(1) + ((d == an1.detach()[:, None]) & ~pos).sum(1)
    assert (n_ties > 2).any()
    torch.testing.assert_close(ap1, ap2, rtol=0, atol=0)
    torch.testing.assert_close(an1, an2, rtol=0, atol=0)
    l1.backward()
    l2.backward()
    assert torch.isfinite(e1.grad).all()
    torch.testing.assert_close(e1.grad, e2.grad)


def test_weak_triplet_needs_positives():
    bag = torch.ones(4, 2) / 2
    bag[1] = 0  # an all-zero bag vector: the anchor has no positive, not even itself
    with pytest.raises(ValueError, match="no positive"):
        weak.weak_triplet_loss(torch.randn(4, 3), bag)


# ------------------------------------------------------------------------------- assignment
def _brute_force_balanced(scores, ids):
    """Minimum cost over all labellings where every id gets n//m or n//m + 1 images."""
    n, m = scores.shape[0], len(ids)
    k = n // m
    best = np.inf
    for lab in itertools.product(ids, repeat=n):
        counts = np.array([lab.count(c) for c in ids])
        if counts.min() >= k and counts.max() <= k + 1:
            best = min(best, weak.assignment_cost(scores, ids, np.array(lab)))
    return best


@pytest.mark.parametrize("n,m", [(6, 3), (7, 3), (5, 2), (2, 3)])
def test_exact_is_optimal_and_balanced(n, m):
    rng = np.random.default_rng(n * 10 + m)
    C = 8
    ids = rng.choice(C, size=m, replace=False)
    for _ in range(3):
        scores = rng.normal(scale=2.0, size=(n, C)).astype(np.float32)
        out = weak.exact_balanced_assignment(scores, ids)
        assert out.shape == (n,) and set(out.tolist()) <= set(ids.tolist())
        counts = np.array([(out == c).sum() for c in ids])
        assert counts.sum() == n and counts.min() >= n // m and counts.max() <= n // m + 1
        assert abs(weak.assignment_cost(scores, ids, out) - _brute_force_balanced(scores, ids)) < 1e-9


def test_greedy_strictly_worse_than_exact_on_constructed_bag():
    # Both images prefer id 10. Greedy locks image 0 (higher raw logit) on id 10 and forces image 1,
    # which is sure it is id 10, onto id 20. Exact swaps them: a small loss on image 0 only.
    scores = np.full((2, 25), -50.0, dtype=np.float32)
    scores[0, [10, 20]] = [10.0, 9.0]
    scores[1, [10, 20]] = [5.0, -10.0]
    ids = [10, 20]
    gr = weak.greedy_balanced_assignment(scores, ids)
    ex = weak.exact_balanced_assignment(scores, ids)
    np.testing.assert_array_equal(gr, [10, 20])
    np.testing.assert_array_equal(ex, [20, 10])
    c_gr, c_ex = weak.assignment_cost(scores, ids, gr), weak.assignment_cost(scores, ids, ex)
    assert c_gr > c_ex + 10.0


def test_exact_never_worse_than_greedy_on_random_bags():
    rng = np.random.default_rng(123)
    strictly_better = 0
    for trial in range(200):
        m = int(rng.integers(1, 6))
        k = int(rng.integers(1, 5))
        n, C = m * k, 30
        ids = rng.choice(C, size=m, replace=False)
        scores = (rng.normal(size=(n, C)) * rng.uniform(0.5, 4)).astype(np.float32)
        gr = weak.greedy_balanced_assignment(scores, ids)
        ex = weak.exact_balanced_assignment(scores, ids)
        for out in (gr, ex):  # both satisfy the same constraint when n = m*k
            assert sorted((out == c).sum() for c in ids) == [k] * m
        c_gr, c_ex = weak.assignment_cost(scores, ids, gr), weak.assignment_cost(scores, ids, ex)
        assert c_ex <= c_gr + 1e-9
        strictly_better += c_ex < c_gr - 1e-9
    assert strictly_better > 0


def test_greedy_remainder_goes_to_last_round():
    rng = np.random.default_rng(5)
    scores = rng.normal(size=(11, 6)).astype(np.float32)
    ids = [4, 1, 2]
    out = weak.greedy_balanced_assignment(scores, ids)
    counts = sorted((out == c).sum() for c in ids)
    assert counts == [3, 3, 5]


# ------------------------------------------------------------------------------- device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_golden(z):
    dev = torch.device("cuda")
    bl = weak.bag_label_vectors(_t(z["labels"]).to(dev), int(z["bagid"]), int(z["batchid"]),
                                int(z["batchimage"]), int(z["num_classes"]))
    assert bl.device.type == "cuda"
    logits = _t(z["logits"]).to(dev).requires_grad_()
    g = _t(z["g"]).to(dev).requires_grad_()
    tot, _, _, ps = weak.graph_loss(logits, bl, g)
    tot.backward()
    np.testing.assert_array_equal(ps.cpu().numpy(), z["pseudo_labels"])
    assert abs(tot.item() - z["ce_total_loss"].item()) < 1e-5
    np.testing.assert_allclose(g.grad.cpu().numpy(), z["ce_grad_g"], rtol=0, atol=1e-5)
    emb = _t(z["embeddings"]).to(dev).requires_grad_()
    loss, ap, an = weak.weak_triplet_loss(emb, bl, float(z["margin"]))
    loss.backward()
    assert abs(loss.item() - z["triplet_loss"].item()) < 1e-5
    np.testing.assert_allclose(emb.grad.cpu().numpy(), z["triplet_grad_emb"], rtol=0, atol=1e-5)


def test_weak_triplet_leaves_out_anchors_without_a_negative():
    """Overlapping streamed bags: anchors whose bag covers the whole batch drop out of the mean (no
    NaN, no stop); the others keep exactly the loss they have on their own."""
    import torch

    from reidkit.dgl.graphical import weak_triplet_loss

    g = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 8, generator=g, requires_grad=True)
    # images 0-1: bag {0, 1, 2} overlaps every other bag; images 2-3: bag {0}; images 4-5: bag {2}
    bags = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.float32)
    loss, ap, an = weak_triplet_loss(emb, bags, margin=1.2)
    assert torch.isinf(an[:2]).all() and torch.isfinite(an[2:]).all()
    ref = torch.relu(ap[2:] - an[2:] + 1.2).mean()
    assert torch.allclose(loss, ref)
    loss.backward()
    assert torch.isfinite(emb.grad).all()
    # no anchor with a negative at all: a zero loss, still differentiable
    emb2 = torch.randn(4, 8, generator=g, requires_grad=True)
    zero, _, _ = weak_triplet_loss(emb2, torch.ones(4, 2), margin=1.2)
    zero.backward()
    assert float(zero.detach()) == 0.0 and torch.isfinite(emb2.grad).all()
