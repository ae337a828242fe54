"""Tests for reidkit.retrieval.rerank.re_ranking: golden parity with torchreid's ``re_ranking``
(tests/golden/rerank.npz, README §3) and an independent naive re-implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _golden import case_prefixes, load_golden
from _kreciprocal import jaccard_of, kreciprocal_encoding

from reidkit.retrieval.rerank import re_ranking

ATOL = 1e-5


@pytest.fixture(scope="module")
def z():
    return load_golden("rerank")


def _cases(z):
    return case_prefixes(z, "q_g_dist", "final_dist")


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_golden_rerank(z, device):
    for p in _cases(z):
        out, info = re_ranking(z[p + "q_g_dist"], z[p + "q_q_dist"], z[p + "g_g_dist"], k1=int(z[p + "k1"]),
                               k2=int(z[p + "k2"]), lambda_value=float(z[p + "lambda_value"]), device=device,
                               return_info=True)
        assert info["device"].startswith(device)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        assert out.shape == z[p + "final_dist"].shape
        np.testing.assert_allclose(out, z[p + "final_dist"], atol=ATOL, rtol=0)


def test_golden_rerank_torch_inputs_and_chunks(z):
    p = _cases(z)[0]
    args = [torch.from_numpy(z[p + k]) for k in ("q_g_dist", "q_q_dist", "g_g_dist")]
    out = re_ranking(*args, k1=int(z[p + "k1"]), k2=int(z[p + "k2"]), lambda_value=float(z[p + "lambda_value"]),
                     chunk=7)
    np.testing.assert_allclose(out, z[p + "final_dist"], atol=ATOL, rtol=0)


def _naive_rerank(qg, qq, gg, k1, k2, lam):
    """The documented semantics, dense (tests/_kreciprocal.py): the squared distances scaled per
    column, ranked in full, float64."""
    o = np.block([[qq, qg], [qg.T, gg]]).astype(np.float32)
    o = (o * o).astype(np.float32)
    o = (o / o.max(axis=0)).T.astype(np.float64)
    q = qg.shape[0]
    v = kreciprocal_encoding(np.argsort(o, 1, kind="stable"), o, k1, k2)
    return ((1 - lam) * jaccard_of(v[:q], v) + lam * o[:q])[:, q:]


@pytest.mark.parametrize("k1,k2,lam", [(7, 3, 0.3), (6, 1, 0.5), (5, 4, 0.0)])
def test_rerank_matches_naive_reference(k1, k2, lam):
    rng = np.random.default_rng(k1)
    c = rng.standard_normal((10, 16))
    f = c[rng.integers(0, 10, 110)] + 0.7 * rng.standard_normal((110, 16))
    f = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
    qf, gf = torch.from_numpy(f[:25]), torch.from_numpy(f[25:])

    def d(a, b):  # squared Euclidean via addmm, like torchreid
        return torch.addmm((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None], a, b.T, beta=1, alpha=-2).numpy()

    qg, qq, gg = d(qf, gf), d(qf, qf), d(gf, gf)
    ref = _naive_rerank(qg, qq, gg, k1, k2, lam)
    out = re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=lam, device="cpu")
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
