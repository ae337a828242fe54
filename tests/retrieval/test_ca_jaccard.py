"""Tests for reidkit.retrieval.ca_jaccard: golden parity with CA-Jaccard's ``compute_jaccard_distance``
(tests/golden/caj_jaccard.npz, README §8) and a dense re-implementation on an input with duplicates."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from _golden import load_golden

from reidkit.hhcl.clustering import dbscan_labels
from reidkit.retrieval.ca_jaccard import ca_jaccard_distance

ATOL = 1e-5
CASES = ("caj_", "warmup_", "ckrnns_", "clqe_", "plain_")


@pytest.fixture(scope="module")
def z():
    return load_golden("caj_jaccard")


def _params(z, p: str) -> dict:
    kw = {k: int(z[k]) for k in ("k1", "k2", "k1_intra", "k1_inter", "k2_intra", "k2_inter")}
    return dict(kw, ckrnns=bool(z[p + "ckrnns"]), clqe=bool(z[p + "clqe"]), epoch=int(z[p + "epoch"]))


def _densify(m: sp.csr_matrix) -> np.ndarray:
    """Absent entries are distance 1."""
    out = np.ones(m.shape, np.float32)
    c = m.tocoo()
    out[c.row, c.col] = c.data
    return out


@pytest.fixture(scope="module")
def golden_runs(z):
    """(case, precision) -> (sparse result, info) on the CPU."""
    return {(p, prec): ca_jaccard_distance(z["features"], z["cam_labels"], **_params(z, p), device="cpu",
                                           precision=prec, return_info=True)
            for p in CASES for prec in ("auto", "exact")}


@pytest.mark.parametrize("precision", ["auto", "exact"])
@pytest.mark.parametrize("p", CASES)
def test_golden_distances(z, golden_runs, p, precision):
    jd, info = golden_runs[p, precision]
    assert sp.issparse(jd) and jd.format == "csr" and jd.dtype == np.float32
    n = jd.shape[0]
    coo = jd.tocoo()
    assert int((coo.row == coo.col).sum()) == n  # the diagonal is always stored
    assert abs(jd - jd.T).max() == 0  # symmetric
    assert jd.data.min() >= 0 and jd.data.max() < 1
    np.testing.assert_allclose(_densify(jd), z[p + "jaccard_dist"], atol=ATOL, rtol=0)
    assert info["mode"] == {"caj_": "CKRNNs + CLQE", "warmup_": "CKRNNs + CLQE", "ckrnns_": "CKRNNs + LQE",
                            "clqe_": "KRNNs + CLQE", "plain_": "KRNNs + LQE"}[p]
    assert (info["k2_intra"], info["k2_inter"]) == ((3, 3) if p == "warmup_" else (2, 4))


@pytest.mark.parametrize("precision", ["auto", "exact"])
def test_golden_rankings(z, golden_runs, precision):
    k1, k2, k1_intra, k1_inter = (int(z[k]) for k in ("k1", "k2", "k1_intra", "k1_inter"))
    for p in ("caj_", "clqe_", "ckrnns_"):
        info = golden_runs[p, precision][1]
        np.testing.assert_array_equal(info["rank_intra"][:, :k1_intra + 1], z["rank_intra"][:, :k1_intra + 1])
        np.testing.assert_array_equal(info["rank_inter"][:, :k1_inter + 1], z["rank_inter"][:, :k1_inter + 1])
    assert golden_runs["caj_", precision][1]["rank_global"] is None  # CKRNNs + CLQE: no global list
    assert golden_runs["plain_", precision][1]["rank_intra"] is None
    for p in ("plain_", "clqe_"):
        got = golden_runs[p, precision][1]["rank_global"]
        np.testing.assert_array_equal(got[:, :k1 + 1], z["rank_global"][:, :k1 + 1])
    # CKRNNs + LQE: the global top-k2, merged from the two camera lists
    np.testing.assert_array_equal(golden_runs["ckrnns_", precision][1]["rank_global"][:, :k2],
                                  z["rank_global"][:, :k2])


def test_golden_dbscan_labels(z, golden_runs):
    labels = dbscan_labels(golden_runs["caj_", "auto"][0], eps=float(z["dbscan_eps"]),
                           min_samples=int(z["dbscan_min_samples"]))
    ref = z["caj_dbscan_labels"]
    np.testing.assert_array_equal(labels == -1, ref == -1)
    pairs = set(zip(labels[ref >= 0].tolist(), ref[ref >= 0].tolist()))
    assert len(pairs) == len(set(ref[ref >= 0].tolist())) == len(set(labels[labels >= 0].tolist()))
    assert len(pairs) == 28 and int((ref == -1).sum()) == 22  # README §8


def test_golden_dense_and_torch_inputs(z, golden_runs):
    p = "caj_"
    dense = ca_jaccard_distance(torch.from_numpy(z["features"]), torch.from_numpy(z["cam_labels"]),
                                **_params(z, p), device="cpu", dense=True, max_triples=300)
    assert isinstance(dense, np.ndarray) and dense.dtype == np.float32
    np.testing.assert_array_equal(dense, _densify(golden_runs[p, "auto"][0]))


def test_camera_labels_are_arbitrary(z, golden_runs):
    """Cameras are groups: any integer labels give the same result (up to the summation order)."""
    cams = np.array([17, -3, 5, 100])[z["cam_labels"]]
    jd = ca_jaccard_distance(z["features"], cams, **_params(z, "caj_"), device="cpu")
    np.testing.assert_allclose(_densify(jd), _densify(golden_runs["caj_", "auto"][0]), atol=1e-6, rtol=0)


def test_errors(z):
    x, cams = z["features"], z["cam_labels"]
    with pytest.raises(ValueError, match="cams has 239 entries for 240"):
        ca_jaccard_distance(x, cams[:-1], device="cpu")
    few = cams.copy()
    few[np.flatnonzero(cams == 3)[3:]] = 2  # camera 3 keeps 3 images; the intra list needs k1_intra + 1 = 6
    with pytest.raises(ValueError, match="camera 3 has 3 images"):
        ca_jaccard_distance(x, few, k1_intra=5, device="cpu")
    with pytest.raises(ValueError, match="camera 3 has 3 images"):
        ca_jaccard_distance(x, few, ckrnns=False, clqe=True, device="cpu")
    with pytest.raises(ValueError, match="outside camera"):
        ca_jaccard_distance(x, np.where(cams == 0, 0, 1), k1_inter=100, device="cpu")  # 84 outside camera 1
    # the plain mode ignores the cameras
    plain = ca_jaccard_distance(x, few, ckrnns=False, clqe=False, epoch=3, device="cpu")
    np.testing.assert_allclose(_densify(plain), z["plain_jaccard_dist"], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Dense re-implementation on an input with duplicates
# ---------------------------------------------------------------------------------------------
def _dense_caj(x, cams, k1, k2, k1_intra, k1_inter, k2_intra, k2_inter, ckrnns, clqe):
    """Row-by-row dense CA-Jaccard (README §8 steps 1-7). Rankings use the kit's canonical float32
    distance, self first, ties by the lower index (``knn(precision="exact")``)."""
    n = len(x)
    u, inv = np.unique(x, axis=0, return_inverse=True)  # duplicates get bit-identical distances
    inv = inv.ravel()
    g = (u.astype(np.float64) @ u.astype(np.float64).T)[inv][:, inv]
    nrm = np.diag(g).astype(np.float32)
    canon = (nrm[:, None] + nrm[None, :]) - np.float32(2) * g.astype(np.float32)
    same = cams[:, None] == cams[None, :]

    def ranking(allowed):
        key = np.where(allowed, canon.astype(np.float64), np.inf)
        key[np.eye(n, dtype=bool) & allowed] = -np.inf
        return np.argsort(key, axis=1, kind="stable")

    glob, intra, inter = ranking(np.ones_like(same)), ranking(same), ranking(~same)

    def recip(rank, i, k):
        return [j for j in rank[i, :k + 1] if i in rank[j, :k + 1]]

    d = 2 - 2 * g
    v = np.zeros((n, n))
    for i in range(n):
        if ckrnns:
            e = set(recip(intra, i, k1_intra)) | set(recip(inter, i, k1_inter))
        else:
            r = recip(glob, i, k1)
            e = set(r)
            for c in r:
                rc = recip(glob, c, int(np.around(k1 / 2)))
                if len(set(rc) & set(r)) > 2 / 3 * len(rc):
                    e |= set(rc)
        e = sorted(e)
        w = np.exp(-d[i, e])
        v[i, e] = w / w.sum()
    if k2 != 1:
        rows = [np.r_[intra[i, :k2_intra], inter[i, :k2_inter]] if clqe else glob[i, :k2] for i in range(n)]
        v = np.stack([v[r].mean(0) for r in rows])
    m = np.minimum(v[:, None, :], v[None, :, :]).sum(-1)
    return np.maximum(1 - m / (2 - m), 0)


@pytest.fixture(scope="module")
def dup_input():
    """90 rows in 4 cameras, 25 of them exact copies of other rows (in the same or another camera)."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((65, 8)).astype(np.float32)
    src = rng.choice(65, 25, replace=False)
    x = np.concatenate([base, base[src]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cams = rng.integers(0, 4, len(x))
    order = rng.permutation(len(x))
    x, cams = x[order], cams[order]
    assert np.bincount(cams).min() >= 8 and len(np.unique(x, axis=0)) == 65
    return x, cams


@pytest.mark.parametrize("ckrnns,clqe,k2", [(False, False, 4), (True, True, 4), (True, False, 4),
                                            (False, True, 4), (True, True, 1)])
def test_matches_dense_reference_with_duplicates(dup_input, ckrnns, clqe, k2):
    x, cams = dup_input
    kw = dict(k1=10, k2=k2, k1_intra=3, k1_inter=6, k2_intra=2, k2_inter=3, ckrnns=ckrnns, clqe=clqe)
    ref = _dense_caj(x, cams, **kw)
    got = ca_jaccard_distance(x, cams, **kw, epoch=5, device="cpu", precision="exact", max_triples=500)
    np.testing.assert_allclose(_densify(got), ref, atol=ATOL, rtol=0)
    # (the default fp32 search orders exact duplicates arbitrarily, so only the exact search is compared)


def test_warmup_is_clqe_with_three_and_three(dup_input):
    x, cams = dup_input
    kw = dict(k1=10, k2=4, k1_intra=3, k1_inter=6)
    warm = ca_jaccard_distance(x, cams, **kw, k2_intra=2, k2_inter=4, epoch=0, device="cpu",
                               precision="exact", dense=True)
    ref = _dense_caj(x, cams, **kw, k2_intra=3, k2_inter=3, ckrnns=True, clqe=True)
    np.testing.assert_allclose(warm, ref, atol=ATOL, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("p", CASES)
def test_golden_cuda(z, p):
    jd, info = ca_jaccard_distance(z["features"], z["cam_labels"], **_params(z, p), device="cuda",
                                   return_info=True)
    assert info["device"].startswith("cuda")
    np.testing.assert_allclose(_densify(jd), z[p + "jaccard_dist"], atol=ATOL, rtol=0)
