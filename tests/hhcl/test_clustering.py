"""Tests for reidkit.retrieval.jaccard (kNN, Jaccard) and reidkit.hhcl.clustering (DBSCAN, stats, eps sweep).

Golden parity with cluster-contrast's ``compute_jaccard_distance`` + sklearn DBSCAN
(tests/golden/jaccard.npz, README §1), plus independent checks against a naive dense
re-implementation written from the documented semantics.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _golden import case_prefixes, load_golden
from _kreciprocal import jaccard_of, kreciprocal_encoding
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score

from reidkit.hhcl.clustering import cluster_stats, dbscan_labels, eps_sweep, radius_graph
from reidkit.retrieval import knn as kn
from reidkit.retrieval.jaccard import jaccard_distance
from reidkit.retrieval.knn import knn

ATOL = 1e-5


@pytest.fixture(scope="module")
def z():
    return load_golden("jaccard")


def _cases(z):
    return case_prefixes(z, "features", "jaccard_dist")


def _backends():
    out = ["torch"]
    if kn.faiss_available():
        out.append("faiss")
    return out


def _densify(m: sp.csr_matrix) -> np.ndarray:
    """Absent entries of the sparse Jaccard matrix mean distance 1."""
    c = m.tocoo()
    d = np.ones(m.shape, dtype=np.float32)
    d[c.row, c.col] = c.data
    return d


@pytest.fixture(scope="module")
def sparse_by_backend(z):
    """Sparse Jaccard of every case with every available kNN backend (computed once)."""
    out = {}
    for p in _cases(z):
        for be in _backends():
            out[p, be] = jaccard_distance(z[p + "features"], int(z[p + "k1"]), int(z[p + "k2"]),
                                          backend=be, device="cpu", return_info=True)
    return out


# ------------------------------------------------------------------------------- golden parity
@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_golden_jaccard_sparse(z, sparse_by_backend, backend):
    if backend == "faiss" and not kn.faiss_available():
        pytest.skip("faiss is not importable")
    for p in _cases(z):
        jd, info = sparse_by_backend[p, backend]
        assert info["knn_backend"] == f"{backend}-cpu"
        assert isinstance(jd, sp.csr_matrix) and jd.dtype == np.float32
        ref = z[p + "jaccard_dist"]
        np.testing.assert_allclose(_densify(jd), ref, atol=ATOL, rtol=0)
        # the stored pattern is exactly the set of pairs below 1
        assert jd.nnz == int((ref < 1).sum())


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_golden_jaccard_dense(z, backend):
    if backend == "faiss" and not kn.faiss_available():
        pytest.skip("faiss is not importable")
    for p in _cases(z):
        jd = jaccard_distance(torch.from_numpy(z[p + "features"]), int(z[p + "k1"]), int(z[p + "k2"]),
                              backend=backend, device="cpu", dense=True)
        assert isinstance(jd, np.ndarray) and jd.dtype == np.float32
        np.testing.assert_allclose(jd, z[p + "jaccard_dist"], atol=ATOL, rtol=0)


def test_sparse_structure(z, sparse_by_backend):
    for p in _cases(z):
        jd, _ = sparse_by_backend[p, "torch"]
        n = jd.shape[0]
        assert jd.has_canonical_format
        # symmetric, with identical patterns
        diff = (jd != jd.T)
        assert diff.nnz == 0
        # every diagonal entry is stored, even the exact zeros
        c = jd.tocoo()
        on_diag = c.row == c.col
        assert on_diag.sum() == n
        assert np.all(c.data[on_diag] <= ATOL)
        assert np.all(c.data < 1.0) and np.all(c.data >= 0.0)


def test_golden_knn_table(z):
    """The kNN used internally equals the reference faiss table (as sets; the README guarantees gaps)."""
    for p in _cases(z):
        x = z[p + "features"]
        k = z[p + "knn_index"].shape[1]
        for be in _backends():
            idx, d2, name = knn(x, k, backend=be, device="cpu")
            assert name.startswith(be)
            assert idx.dtype == np.int64 and d2.dtype == np.float32 and idx.shape == (len(x), k)
            assert np.array_equal(idx[:, 0], np.arange(len(x)))
            for cut in (6, 16, k):
                assert np.array_equal(np.sort(idx[:, :cut], 1), np.sort(z[p + "knn_index"][:, :cut], 1))
            np.testing.assert_allclose(d2[:, 1:], z[p + "knn_sqdist"][:, 1:], atol=1e-5)


def test_golden_dbscan_sparse_and_dense(z, sparse_by_backend):
    for p in _cases(z):
        eps, ms = float(z[p + "dbscan_eps"]), int(z[p + "dbscan_min_samples"])
        ref = z[p + "dbscan_labels"]
        jd, _ = sparse_by_backend[p, "torch"]
        for dist in (jd, _densify(jd), z[p + "jaccard_dist"]):
            lab = dbscan_labels(dist, eps, ms)
            assert adjusted_rand_score(ref, lab) == 1.0
            assert np.array_equal(lab < 0, ref < 0)


# ------------------------------------------------------------------------------- kNN
def test_knn_backends_agree_and_queries():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 48)).astype(np.float32)
    q = rng.standard_normal((90, 48)).astype(np.float32)
    k = 12
    full = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
    ref = np.argsort(full, 1)[:, :k]
    results = [knn(x, k, queries=q, backend=be, device="cpu") for be in _backends()]
    results.append(knn(torch.from_numpy(x), k, queries=torch.from_numpy(q), backend="torch", block=64))
    for r in results:
        assert np.array_equal(r.indices, ref)
        np.testing.assert_allclose(r.sq_dists, np.take_along_axis(full, ref, 1), rtol=1e-4, atol=1e-4)
    # self-search: the symmetric tiled search with small tiles equals the plain one
    a = knn(x, k, backend="torch", block=100)
    b = knn(x, k, backend="torch", block=4096)
    assert np.array_equal(a.indices, b.indices)
    for be in _backends():
        c = knn(x, k, backend=be)
        assert np.array_equal(c.indices[:, 0], np.arange(len(x)))
        assert np.array_equal(np.sort(c.indices, 1), np.sort(a.indices, 1))
        assert np.all(c.sq_dists[:, 0] == 0)


def test_knn_self_first_with_duplicates():
    rng = np.random.default_rng(1)
    base = rng.standard_normal((50, 16)).astype(np.float32)
    x = np.concatenate([base, base, base[:5], base[:5]])  # rows 0..4 have 3 exact copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for be in _backends():
        idx, d2, _ = knn(x, 3, backend=be)
        assert np.array_equal(idx[:, 0], np.arange(len(x)))
        assert np.all(d2[:, 0] == 0)
        assert all(len(set(r)) == 3 for r in idx)  # no repeated neighbour


def test_knn_rejects_bad_k():
    with pytest.raises(ValueError):
        knn(np.zeros((3, 2), np.float32), 4)


# ------------------------------------------------------------------------------- independent reference
def _naive_jaccard(x: np.ndarray, k1: int, k2: int) -> np.ndarray:
    """The documented semantics, dense (tests/_kreciprocal.py): ranking on squared distances cut
    to k1 columns, weights on ``2 - 2 x.y``, float64."""
    x64 = x.astype(np.float64)
    d2 = ((x64[:, None, :] - x64[None]) ** 2).sum(-1)
    rank = np.argsort(d2, 1, kind="stable")[:, :k1]
    v = kreciprocal_encoding(rank, 2 - 2 * x64 @ x64.T, k1, k2)
    return np.maximum(jaccard_of(v, v), 0)


@pytest.mark.parametrize("k1,k2", [(9, 3), (8, 1), (5, 5)])
def test_jaccard_matches_naive_reference(k1, k2):
    rng = np.random.default_rng(k1 * 10 + k2)
    centres = rng.standard_normal((12, 24))
    x = centres[rng.integers(0, 12, 150)] + 0.6 * rng.standard_normal((150, 24))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ref = _naive_jaccard(x, k1, k2)
    got = jaccard_distance(x, k1, k2, device="cpu")
    np.testing.assert_allclose(_densify(got), ref, atol=ATOL, rtol=0)
    # tiny chunks exercise the block logic of the min-sum
    got_small = jaccard_distance(x, k1, k2, device="cpu", max_triples=500)
    np.testing.assert_allclose(_densify(got_small), ref, atol=ATOL, rtol=0)


def test_exact_zero_distances_stay_stored():
    """Duplicated points give Jaccard distance exactly 0; sparse DBSCAN must still see them."""
    rng = np.random.default_rng(3)
    c = rng.standard_normal((8, 32))
    x = c[rng.integers(0, 8, 120)] + 0.5 * rng.standard_normal((120, 32))
    x = np.concatenate([x, x[:30]])  # 30 exact duplicates
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    jd = jaccard_distance(x, 10, 3)
    dense = jaccard_distance(x, 10, 3, dense=True)
    np.testing.assert_allclose(_densify(jd), dense, atol=1e-6)
    assert (jd.tocoo().data == 0).sum() >= len(x)  # diagonal zeros at least
    g = radius_graph(jd, 0.5)
    assert (g.diagonal() == 0).all() and g.nnz >= len(x)
    for eps in (0.2, 0.5):
        ref = DBSCAN(eps=eps, min_samples=4, metric="precomputed").fit_predict(dense)
        assert np.array_equal(dbscan_labels(jd, eps), ref)
        assert np.array_equal(dbscan_labels(dense, eps), ref)


def test_sparse_eps_must_be_below_one(z, sparse_by_backend):
    jd, _ = sparse_by_backend[_cases(z)[0], "torch"]
    with pytest.raises(ValueError):
        dbscan_labels(jd, 1.0)


# ------------------------------------------------------------------------------- stats and sweep
def test_cluster_stats_hand_example():
    labels = np.array([0, 0, 0, 1, 1, -1, -1, 2, 2, 2])
    gt = np.array([5, 5, 6, 7, 7, 8, 5, 9, 9, 9])
    s = cluster_stats(labels)
    assert s["num_points"] == 10 and s["num_clusters"] == 3 and s["num_outliers"] == 2
    assert s["outlier_fraction"] == pytest.approx(0.2)
    assert s["largest_cluster"] == 3 and s["mean_cluster_size"] == pytest.approx(8 / 3)
    s = cluster_stats(labels, gt)
    # clustered points: cluster 0 = {5,5,6} -> 2 right; cluster 1 = {7,7}; cluster 2 = {9,9,9}
    assert s["purity"] == pytest.approx(7 / 8)
    assert s["num_gt_ids"] == 5
    perfect = cluster_stats(gt, gt)
    assert perfect["purity"] == 1.0 and perfect["nmi"] == pytest.approx(1.0) and perfect["ari"] == pytest.approx(1.0)
    assert perfect["nmi_all"] == pytest.approx(1.0) and perfect["ari_all"] == pytest.approx(1.0)
    none = cluster_stats(np.full(4, -1), np.arange(4))
    assert none["num_clusters"] == 0 and np.isnan(none["purity"])
    # all outliers = every point its own cluster, which is right when every gt id is a singleton
    assert none["ari_all"] == pytest.approx(1.0)


def test_eps_sweep_matches_individual_runs(z, sparse_by_backend):
    p = _cases(z)[0]
    jd, _ = sparse_by_backend[p, "torch"]
    eps_values = [0.6, 0.3, 0.45]
    out = eps_sweep(jd, eps_values, gt=z[p + "gt_cluster"], return_labels=True)
    assert [o["eps"] for o in out] == eps_values
    for o in out:
        # compared with dense DBSCAN on the same values (golden labels are only pinned at eps=0.6)
        ref = DBSCAN(eps=o["eps"], min_samples=4, metric="precomputed").fit_predict(_densify(jd))
        assert np.array_equal(ref, o["labels"])
        assert o["num_clusters"] == ref.max() + 1
        assert 0 <= o["purity"] <= 1
    dense_out = eps_sweep(_densify(jd), eps_values)
    assert [o["num_clusters"] for o in dense_out] == [o["num_clusters"] for o in out]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_golden_jaccard_cuda(z):
    for p in _cases(z):
        jd, info = jaccard_distance(z[p + "features"], int(z[p + "k1"]), int(z[p + "k2"]), device="cuda",
                                    return_info=True)
        assert info["device"].startswith("cuda")
        np.testing.assert_allclose(_densify(jd), z[p + "jaccard_dist"], atol=ATOL, rtol=0)
        lab = dbscan_labels(jd, float(z[p + "dbscan_eps"]), int(z[p + "dbscan_min_samples"]))
        assert adjusted_rand_score(z[p + "dbscan_labels"], lab) == 1.0


def test_runs_under_deterministic_algorithms(z):
    p = _cases(z)[0]
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        jd = jaccard_distance(z[p + "features"][:300], 10, 3, device="cpu", backend="torch")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert jd.shape == (300, 300)
