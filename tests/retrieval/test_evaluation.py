"""Tests of reidkit.retrieval.market against the golden reference outputs (tests/golden/README.md
sections 2 and 4) and against brute-force re-implementations on small random data with ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _golden import load_golden

from reidkit.retrieval import market as ev
from reidkit.retrieval.distances import pairwise_distance
from reidkit.retrieval.market import evaluate_rank
from reidkit.retrieval import exact as exact_module
from reidkit.retrieval import score_blocks
from reidkit.retrieval import sysu as sysu_module
from reidkit.retrieval.sysu import sysu30k_evaluate


@pytest.fixture(scope="module")
def market():
    return load_golden("eval_market")


@pytest.fixture(scope="module")
def sysu():
    return load_golden("sysu_protocol")


# ----------------------------------------------------------------------------------------------
# brute-force references (straight from the protocol text, one query at a time, full sorts)
# ----------------------------------------------------------------------------------------------


def brute_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """torchreid-style evaluation with a stable sort (ties by gallery index)."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    ap = np.full(num_q, np.nan)
    inp = np.full(num_q, np.nan)
    first = np.full(num_q, -1)
    for i in range(num_q):
        order = np.argsort(distmat[i], kind="stable")
        remove = (g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])
        matches = (g_pids[order] == q_pids[i])[~remove]
        if not matches.any():
            continue
        pos = np.flatnonzero(matches)
        ap[i] = np.mean(np.arange(1, len(pos) + 1) / (pos + 1.0))
        inp[i] = len(pos) / (pos[-1] + 1.0)
        first[i] = pos[0]
    valid = first >= 0
    cmc = np.array([np.mean(first[valid] < k) for k in range(1, max_rank + 1)])
    return dict(cmc=cmc, mAP=np.nanmean(ap), mINP=np.nanmean(inp), AP=ap, INP=inp,
                first=first, num_valid_q=int(valid.sum()))


def brute_sysu(qf, ql, qc, gf, gl, gc):
    """The reference loop with an explicit tie rule: descending score, then good items first,
    then gallery index."""
    nq, ng = len(ql), len(gl)
    scores = qf.astype(np.float32) @ gf.astype(np.float32).T
    cmc = np.zeros(ng)
    aps, aps_std, first = np.zeros(nq), np.zeros(nq), np.full(nq, -1)
    for i in range(nq):
        good = (gl == ql[i]) & (gc != qc[i]) & (gl != -1)
        junk = ((gl == ql[i]) & (gc == qc[i])) | (gl == -1)
        order = np.lexsort((np.arange(ng), ~good, -scores[i]))
        order = order[~junk[order]]
        rows = np.flatnonzero(good[order])
        if len(rows) == 0:
            continue
        first[i] = rows[0]
        cmc[rows[0]:] += 1
        ngood = len(rows)
        for j, r in enumerate(rows):
            prec = (j + 1) / (r + 1)
            old = j / r if r != 0 else 1.0
            aps[i] += 1.0 / ngood * (old + prec) / 2
            aps_std[i] += prec / ngood
    return dict(cmc=cmc / nq, AP=aps, AP_std=aps_std, first=first)


def tied_market_problem(seed, num_q=40, num_g=300, num_ids=12, levels=6, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids + 3, num_g)  # ids >= num_ids: never queried
    q_camids = rng.integers(0, 3, num_q)
    g_camids = rng.integers(0, 3, num_g)
    # few distinct levels -> massive exact ties; include negatives and -0.0 for the key mapping
    vals = np.array([-1.5, -0.0, 0.0, 0.25, 0.5, 2.0, 7.0][: levels + 1], dtype=np.float64)
    distmat = rng.choice(vals, size=(num_q, num_g)).astype(dtype)
    return distmat, q_pids, g_pids, q_camids, g_camids


# ----------------------------------------------------------------------------------------------
# evaluate_rank
# ----------------------------------------------------------------------------------------------

MARKET_VARIANTS = [("distmat", "tr_py", "first_match_rank"),
                   ("distmat_tied", "tiedstable_tr_py", "tiedstable_first_match_rank")]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dm_key,prefix,first_key", MARKET_VARIANTS)
def test_evaluate_rank_golden(market, dm_key, prefix, first_key, dtype, backend):
    z = market
    res = evaluate_rank(z[dm_key].astype(dtype), z["q_pids"], z["g_pids"], z["q_camids"],
                        z["g_camids"], max_rank=50, device="cpu", backend=backend)
    assert res["cmc"].shape == (50,)
    np.testing.assert_allclose(res["cmc"], z[f"{prefix}_cmc"], rtol=0, atol=1e-6)
    assert abs(res["mAP"] - float(z[f"{prefix}_mAP"])) < 1e-6
    ref_ap = z[f"{prefix}_AP_per_query"]
    np.testing.assert_array_equal(np.isnan(res["AP"]), np.isnan(ref_ap))
    np.testing.assert_allclose(res["AP"], ref_ap, rtol=0, atol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(res["first_match_rank"], z[first_key])
    assert res["num_valid_q"] == int(z["num_valid_q"])
    assert 0 < res["mINP"] <= 1


def test_evaluate_rank_single_rows_and_torch_input(market):
    """Single-row calls give the per-query AP (how the golden AP was produced); torch input
    is accepted, in chunks of any size."""
    z = market
    dm = torch.from_numpy(z["distmat_tied"])
    ref_ap = z["tiedstable_tr_py_AP_per_query"]
    for i in np.flatnonzero(~np.isnan(ref_ap))[:5]:
        r = evaluate_rank(dm[i : i + 1], z["q_pids"][i : i + 1], z["g_pids"],
                          z["q_camids"][i : i + 1], z["g_camids"], device="cpu")
        assert r["num_valid_q"] == 1
        assert abs(r["mAP"] - ref_ap[i]) < 1e-12
    full = evaluate_rank(dm, torch.from_numpy(z["q_pids"]), z["g_pids"], list(z["q_camids"]),
                         z["g_camids"], device="cpu", chunk_size=7)
    np.testing.assert_allclose(full["AP"], ref_ap, atol=1e-9, equal_nan=True)
    assert full["backend"].startswith("numpy")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("seed", [0, 1])
def test_evaluate_rank_bruteforce_ties(seed, dtype, backend, monkeypatch):
    if seed == 1:  # exercise the "sort heavy rows" path of the NumPy kernel as well
        monkeypatch.setattr(ev, "_SORT_ROW_MIN_MATCHES", 3)
    dm, qp, gp, qc, gc = tied_market_problem(seed, dtype=dtype)
    ref = brute_market(dm.astype(np.float64), qp, gp, qc, gc, max_rank=20)
    res = evaluate_rank(dm, qp, gp, qc, gc, max_rank=20, device="cpu", backend=backend,
                        chunk_size=9)
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-12)
    np.testing.assert_allclose(res["AP"], ref["AP"], atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(res["INP"], ref["INP"], atol=1e-12, equal_nan=True)
    np.testing.assert_array_equal(res["first_match_rank"], ref["first"])
    assert abs(res["mAP"] - ref["mAP"]) < 1e-12
    assert abs(res["mINP"] - ref["mINP"]) < 1e-12
    assert res["num_valid_q"] == ref["num_valid_q"]


def test_evaluate_rank_random_continuous():
    """Tie-free float32 distances, many matches per query, a gallery smaller than max_rank."""
    rng = np.random.default_rng(5)
    dm = rng.standard_normal((30, 45)).astype(np.float32)
    qp, gp = rng.integers(0, 3, 30), rng.integers(0, 4, 45)
    qc, gc = rng.integers(0, 2, 30), rng.integers(0, 2, 45)
    ref = brute_market(dm, qp, gp, qc, gc, max_rank=50)
    res = evaluate_rank(dm, qp, gp, qc, gc)  # default device="auto"
    assert res["cmc"].shape == (45,)  # cut to the gallery size, as torchreid does
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-12)
    np.testing.assert_allclose(res["AP"], ref["AP"], atol=1e-12, equal_nan=True)
    assert abs(res["mINP"] - ref["mINP"]) < 1e-12


def test_evaluate_rank_errors():
    dm = np.zeros((4, 6), np.float32)
    ids4, ids6 = np.arange(4), np.arange(6)
    with pytest.raises(ValueError, match=r"q_pids has shape \(3,\).*\(4, 6\)"):
        evaluate_rank(dm, np.arange(3), ids6, ids4, ids6)
    with pytest.raises(ValueError, match=r"g_camids has shape \(5,\).*\(4, 6\)"):
        evaluate_rank(dm, ids4, ids6, ids4, np.arange(5))
    with pytest.raises(ValueError, match=r"2-D.*\(6,\)"):
        evaluate_rank(np.zeros(6), ids4, ids6, ids4, ids6)
    bad = dm.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_rank(bad, ids4, ids6, ids4 + 10, ids6, device="cpu")
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_rank(dm, ids4 + 100, ids6, ids4, ids6, device="cpu")


def test_pairwise_distance_matches_reference(market):
    z = market
    d = pairwise_distance(z["qf"], z["gf"], device="cpu", chunk_size=77)
    assert d.dtype == np.float32 and d.shape == z["distmat"].shape
    np.testing.assert_allclose(d, z["distmat"], rtol=0, atol=1e-6)
    dt = pairwise_distance(torch.from_numpy(z["qf"][:5]), torch.from_numpy(z["gf"]), device="cpu")
    assert isinstance(dt, torch.Tensor)
    with pytest.raises(ValueError, match=r"\(5, 128\) and \(3, 4\)"):
        pairwise_distance(z["qf"][:5], np.zeros((3, 4)))


# ----------------------------------------------------------------------------------------------
# sysu30k_evaluate
# ----------------------------------------------------------------------------------------------


def sysu_gallery(z, variant):
    labels = z["junk_gallery_label"] if variant == "junk_" else z["gallery_label"]
    cams = z["junk_gallery_cam"] if variant == "junk_" else z["gallery_cam"]
    return z["gallery_feature"], labels, cams


def chunk_generator(feats, labels, cams, sizes):
    """One-shot generator of chunks whose sizes cycle through ``sizes``."""
    s, i = 0, 0
    while s < len(labels):
        e = s + sizes[i % len(sizes)]
        yield feats[s:e], labels[s:e], cams[s:e]
        s, i = e, i + 1


def check_sysu(res, z, variant, full_cmc=True):
    p = variant
    np.testing.assert_array_equal(res["ranks"], z[p + "per_query_rank"])
    np.testing.assert_allclose(res["per_query_AP"], z[p + "per_query_AP"], rtol=0, atol=1e-12)
    for k in ("rank1", "rank5", "rank10"):
        assert abs(res[k] - float(z[p + k])) < 1e-6
    assert abs(res["mAP"] - float(z[p + "mAP"])) < 1e-9
    ref_cmc = z[p + "CMC"]
    n = len(ref_cmc) if full_cmc else len(res["cmc"])
    np.testing.assert_allclose(res["cmc"][:n], ref_cmc[:n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["", "junk_"])
@pytest.mark.parametrize("chunk_size", [5000, 777])
def test_sysu_golden_arrays(sysu, variant, chunk_size):
    z = sysu
    res = sysu30k_evaluate(z["query_feature"], z["query_label"], z["query_cam"],
                           sysu_gallery(z, variant), max_rank=None, chunk_size=chunk_size,
                           device="cpu")
    check_sysu(res, z, variant)
    assert res["cmc"].shape == (5000,) and res["num_gallery"] == 5000
    # with one good match per query the standard AP is 1/(r+1)
    valid = res["ranks"] >= 0
    np.testing.assert_allclose(res["per_query_AP_standard"][valid], 1 / (res["ranks"][valid] + 1))
    assert res["num_valid_q"] == int(valid.sum())
    if variant == "junk_":
        assert (~valid).sum() == 8


@pytest.mark.parametrize("variant", ["", "junk_"])
@pytest.mark.parametrize("sizes,chunk_size,buffer_size",
                         [((1, 2, 3, 1, 5, 7, 2, 30), 11, 4096),  # tiny, odd chunks
                          ((999, 37, 1501, 1), 256, 8192)])  # odd sizes, big ones are split
def test_sysu_golden_generator(sysu, variant, sizes, chunk_size, buffer_size):
    """A one-shot generator gallery; the buffer is large enough to need no second pass."""
    z = sysu
    feats, labels, cams = sysu_gallery(z, variant)
    n = 400 if sizes[0] == 1 else 5000  # tiny chunks: only the first 400 items (speed)
    gen = chunk_generator(feats[:n], labels[:n], cams[:n], sizes)
    res = sysu30k_evaluate(z["query_feature"], z["query_label"], z["query_cam"], gen,
                           chunk_size=chunk_size, buffer_size=buffer_size, device="cpu")
    assert res["passes"] == 1 and res["cmc"].shape == (50,)
    if n == 5000:
        check_sysu(res, z, variant, full_cmc=False)
    else:
        ref = brute_sysu(z["query_feature"], z["query_label"], z["query_cam"],
                         feats[:n], labels[:n], cams[:n])
        np.testing.assert_array_equal(res["ranks"], ref["first"])
        np.testing.assert_allclose(res["per_query_AP"], ref["AP"], atol=1e-12)
        np.testing.assert_allclose(res["cmc"], ref["cmc"][:50], atol=1e-12)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_sysu_torch_code_paths(sysu, monkeypatch, precision):
    """The GPU code paths (torch passes over the block, pool updates, the gathered fp32 level of
    the two-level screen) run on CPU tensors here."""
    monkeypatch.setattr(score_blocks, "_FORCE_TORCH_OPS", True)

    def numpy_path(*args):
        raise AssertionError("the numpy bit-pattern pass ran instead of the torch one")

    monkeypatch.setattr(score_blocks, "_bf16_entries_at_least", numpy_path)
    calls = []

    def gathered(*args):
        calls.append(len(args[2]))
        return exact_module._gathered_pair_dots(*args)

    monkeypatch.setattr(sysu_module, "fp32_pair_dots", gathered)
    z = sysu
    feats, labels, cams = sysu_gallery(z, "junk_")
    res = sysu30k_evaluate(z["query_feature"], z["query_label"], z["query_cam"],
                           lambda: chunk_generator(feats, labels, cams, (700, 301)),
                           buffer_size=8, max_rank=None, chunk_size=512, device="cpu", precision=precision)
    assert res["precision"] == precision
    check_sysu(res, z, "junk_")
    assert (sum(calls) > 0) == (precision == "bf16")  # the fp32 level runs after a bf16 screen only


def test_sysu_small_buffer_second_pass(sysu):
    """Good matches arriving after more than buffer_size better-scoring items: a re-iterable
    gallery (callable or list of chunks) is completed exactly by a second pass; a one-shot
    generator raises."""
    z = sysu
    feats, labels, cams = sysu_gallery(z, "junk_")
    q = (z["query_feature"], z["query_label"], z["query_cam"])
    for buffer_size in (0, 16):
        res = sysu30k_evaluate(*q, lambda: chunk_generator(feats, labels, cams, (613, 1000)),
                               buffer_size=buffer_size, max_rank=None, chunk_size=500,
                               device="cpu")
        assert res["passes"] == 2
        check_sysu(res, z, "junk_")
    chunks = list(chunk_generator(feats, labels, cams, (2049,)))
    res = sysu30k_evaluate(*q, chunks, buffer_size=16, device="cpu")
    assert res["passes"] == 2
    check_sysu(res, z, "junk_", full_cmc=False)
    with pytest.raises(RuntimeError, match="second pass"):
        sysu30k_evaluate(*q, chunk_generator(feats, labels, cams, (1000,)), buffer_size=16,
                         device="cpu")


@pytest.mark.parametrize("buffer_size", [0, 3, 1024])
def test_sysu_bruteforce_multi_good_ties(buffer_size):
    """Several good matches per query, junk of both kinds, a query labelled -1, and many exact
    score ties (integer-valued features give exact float32 dot products)."""
    rng = np.random.default_rng(7)
    nq, ng, d = 25, 400, 6
    qf = rng.integers(-2, 3, (nq, d)).astype(np.float32)
    gf = rng.integers(-2, 3, (ng, d)).astype(np.float32)
    ql = rng.integers(0, 10, nq)
    ql[3] = -1
    qc = rng.integers(0, 3, nq)
    gl = rng.choice(np.r_[np.arange(12), [-1, -1000, -1000, -1000]], ng)
    gc = rng.integers(0, 3, ng)
    ref = brute_sysu(qf, ql, qc, gf, gl, gc)
    assert (np.bincount(np.flatnonzero((gl[None] == ql[:, None]).ravel()) // ng) > 5).any()
    gallery = lambda: chunk_generator(gf, gl, gc, (17, 1, 40))  # noqa: E731 (re-iterable)
    res = sysu30k_evaluate(torch.from_numpy(qf), list(ql), qc, gallery, chunk_size=13,
                           buffer_size=buffer_size, max_rank=None, device="cpu")
    np.testing.assert_array_equal(res["ranks"], ref["first"])
    np.testing.assert_allclose(res["per_query_AP"], ref["AP"], atol=1e-12)
    np.testing.assert_allclose(res["per_query_AP_standard"], ref["AP_std"], atol=1e-12)
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-12)
    assert abs(res["mAP"] - ref["AP"].mean()) < 1e-12
    assert abs(res["mAP_standard"] - ref["AP_std"].mean()) < 1e-12
    assert res["ranks"][3] == -1  # label -1 is junk, never good


def test_sysu_errors(sysu):
    z = sysu
    qf, ql, qc = z["query_feature"], z["query_label"], z["query_cam"]
    g = sysu_gallery(z, "")
    with pytest.raises(ValueError, match=r"\(100, 128\).*\(99,\)"):
        sysu30k_evaluate(qf, ql[:99], qc, g, device="cpu")
    with pytest.raises(ValueError, match=r"features \(10, 64\).*\(B, 128\)"):
        sysu30k_evaluate(qf, ql, qc, [(np.zeros((10, 64), np.float32), np.zeros(10, int),
                                       np.zeros(10, int))], device="cpu")
    with pytest.raises(ValueError, match=r"labels \(9,\)"):
        sysu30k_evaluate(qf, ql, qc, (g[0][:10], g[1][:9], g[2][:10]), device="cpu")
    with pytest.raises(TypeError):
        sysu30k_evaluate(qf, ql, qc, 42, device="cpu")
