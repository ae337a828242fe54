"""bf16 screening with an exact fp32 answer: the kNN / Jaccard distance and the SYSU-30k evaluation
give identical outputs with ``precision="bf16"`` and ``precision="fp32"``, on random data
and on adversarial ties (duplicates, near-duplicates below bf16 resolution, orthogonal features).
Both precisions run on any CPU (bf16 is emulated where it is not native: slower, same answer)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from reidkit.core.device import bf16_native
from reidkit.retrieval import exact as ex
from reidkit.retrieval import jaccard as jac
from reidkit.retrieval import knn as kn
from reidkit.retrieval import score_blocks
from reidkit.retrieval.sysu import sysu30k_evaluate


def _unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Tight clusters (many neighbours at similar distances: a wide bf16 band)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 10), d)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _duplicates(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Every row repeated 3 times (exact ties) plus a few near-duplicates 1e-4 apart (below bf16's
    resolution of 2^-8 relative, so bf16 sees them equal)."""
    base = _unit(n // 4, d, seed)
    x = np.concatenate([base, base, base, base + np.float32(1e-4) * _unit(n // 4, d, seed + 1)])
    return np.ascontiguousarray(x[np.random.default_rng(seed).permutation(len(x))])


def _orthogonal(n: int, d: int) -> np.ndarray:
    """Rows with disjoint supports in groups: many exact-zero dot products and exact ties."""
    x = np.zeros((n, d), np.float32)
    x[np.arange(n), np.arange(n) % d] = 1.0
    x[np.arange(0, n, 3), (np.arange(0, n, 3) + 1) % d] = 0.5
    return x


DATASETS = {
    "random": lambda: _unit(300, 48),
    "clustered": lambda: _clustered(400, 64),
    "duplicates": lambda: _duplicates(240, 32),
    "orthogonal": lambda: _orthogonal(90, 40),
}


# ------------------------------------------------------------------------- canonical scores
def _exact_fraction_dot(a: np.ndarray, b: np.ndarray) -> Fraction:
    return sum((Fraction(float(u)) * Fraction(float(v)) for u, v in zip(a, b)), Fraction(0))


def _round_fraction_to_f32(f: Fraction) -> np.float32:
    """Reference RN32 of a rational: compare with the two float32 neighbours of a float64 guess."""
    guess = np.float32(float(f))
    cands = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    errs = [abs(Fraction(float(c)) - f) for c in cands]
    best = min(errs)
    ties = [c for c, e in zip(cands, errs) if e == best]
    if len(ties) > 1:  # round half to even
        ties = [c for c in ties if int(np.float32(c).view(np.int32)) % 2 == 0]
    return np.float32(ties[0])


def test_exact_pair_dots_are_correctly_rounded():
    rng = np.random.default_rng(3)
    x = np.concatenate([_unit(20, 64, 1), _orthogonal(6, 64),
                        # cancellation: exact dot far below the magnitude of the terms
                        np.tile(np.float32([1.0, -1.0, 1e-7, 3e-9]), (2, 16))]).astype(np.float32)
    x[-1, 2] = np.float32(1.1e-7)
    xt = torch.from_numpy(x)
    rows = rng.integers(0, len(x), 200)
    cols = rng.integers(0, len(x), 200)
    rows[:3], cols[:3] = [len(x) - 2, len(x) - 1, 21], [len(x) - 1, len(x) - 2, 22]
    got = ex.exact_pair_dots(xt, xt, rows, cols)
    want = np.array([_round_fraction_to_f32(_exact_fraction_dot(x[r], x[c])) for r, c in zip(rows, cols)])
    np.testing.assert_array_equal(got, want)
    assert got[2] == 0.0  # disjoint supports: exactly zero
    # the integer fallback on its own, and the rounding helper at a tie and at the subnormal end
    for r, c in zip(rows[:20], cols[:20]):
        assert ex._exact_dot_f32(x[r], x[c]) == _round_fraction_to_f32(_exact_fraction_dot(x[r], x[c]))
    assert ex._round_to_f32(2**24 + 1, 0) == np.float32(2**24)  # tie -> even
    assert ex._round_to_f32(2**24 + 3, 0) == np.float32(2**24 + 4)
    assert ex._round_to_f32(3, -150) == np.float32(2.0**-148)  # 1.5 subnormal ulps -> 2 (even)
    assert ex._round_to_f32(-1, 200) == -np.inf
    np.testing.assert_array_equal(ex.exact_sqnorms(xt), ex.exact_pair_dots(xt, xt, np.arange(len(x)),
                                                                           np.arange(len(x))))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_screening_bound_holds(precision):
    """|screening score - RN32(a.b)| <= beta ||a|| ||b||, checked on scores of wide dynamic range."""
    rng = np.random.default_rng(5)
    a = (rng.standard_normal((64, 200)) * rng.uniform(0.1, 10, (64, 1))).astype(np.float32)
    b = (rng.standard_normal((80, 200)) * rng.uniform(0.1, 10, (80, 1))).astype(np.float32)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    s = ex.screen_matmul(at, bt, precision).numpy().astype(np.float64)
    r, c = np.meshgrid(np.arange(64), np.arange(80), indexing="ij")
    exact = ex.exact_pair_dots(at, bt, r.ravel(), c.ravel()).reshape(64, 80).astype(np.float64)
    norms = np.linalg.norm(a.astype(np.float64), axis=1)[:, None] * np.linalg.norm(b.astype(np.float64), axis=1)
    beta = ex.score_bound(200, precision)
    assert np.all(np.abs(s - exact) <= beta * norms)
    if precision == "bf16":  # and it is not vacuous: bf16 errors use a good part of it
        assert np.max(np.abs(s - exact) / norms) > beta / 20
    assert 0.0117 < ex.score_bound(2048, "bf16") < 0.0121 and ex.score_bound(2048, "fp32") < 1.3e-4


def test_fp32_pair_dots_are_within_the_fp32_bound_and_workspace_products_equal_fresh_ones():
    """The two-level screen's middle level: fp32 dot products of scattered pairs (a sampled product
    on the CPU) within ``score_bound(d, "fp32")`` of the canonical scores; and the screening
    product made in a workspace's reused buffers equals the freshly allocated one, in both dtypes."""
    rng = np.random.default_rng(8)
    a = (rng.standard_normal((50, 300)) * rng.uniform(0.1, 10, (50, 1))).astype(np.float32)
    b = (rng.standard_normal((90, 300)) * rng.uniform(0.1, 10, (90, 1))).astype(np.float32)
    at, bt = torch.from_numpy(a), torch.from_numpy(b)
    rows, cols = rng.integers(0, 50, 700), rng.integers(0, 90, 700)  # unsorted, repeated pairs
    f = ex.fp32_pair_dots(at, bt, rows, cols).astype(np.float64)
    exact = ex.exact_pair_dots(at, bt, rows, cols).astype(np.float64)
    norms = np.linalg.norm(a.astype(np.float64), axis=1)[rows] * np.linalg.norm(b.astype(np.float64), axis=1)[cols]
    assert np.all(np.abs(f - exact) <= ex.score_bound(300, "fp32") * norms)
    # against a float64 reference made here: the same bound, plus the canonical score's one rounding
    ref = (a[rows].astype(np.float64) * b[cols]).sum(1)
    assert np.all(np.abs(f - ref) <= ex.score_bound(300, "fp32") * norms + ex.U_F32 * np.abs(ref))
    assert ex.fp32_pair_dots(at, bt, np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0,)
    gathered = ex._gathered_pair_dots(at, bt, rows, cols, elems=300 * 64).astype(np.float64)  # the GPU's, 11 blocks
    assert np.all(np.abs(gathered - exact) <= ex.score_bound(300, "fp32") * norms)
    work = ex.Workspace()
    for precision in ("fp32", "bf16"):
        for rows_b in (90, 40, 90):  # a smaller chunk is a view of the same buffers
            fresh = ex.screen_matmul(at, bt[:rows_b], precision)
            kept = ex.screen_matmul(at, bt[:rows_b], precision, work)
            assert kept.dtype == torch.float32 and kept.is_contiguous()
            np.testing.assert_array_equal(kept.numpy(), fresh.numpy())
    streamed = ex.Workspace()  # buffers first made inside inference mode (a gallery extracted
    with torch.inference_mode():  # under it) are written again outside it
        ex.screen_matmul(at, bt, "bf16", streamed)
    np.testing.assert_array_equal(ex.screen_matmul(at, bt, "bf16", streamed).numpy(), fresh.numpy())
    raw = ex.screen_matmul(at, bt, "bf16", work, as_float=False)
    assert raw.dtype == torch.bfloat16
    np.testing.assert_array_equal(raw.float().numpy(), ex.screen_matmul(at, bt, "bf16").numpy())


def test_bf16_blocks_are_searched_as_bit_patterns():
    """The SYSU passes read a CPU bf16 score block as 16-bit patterns: the same entries as the
    float32 comparison, for thresholds of every sign (+-0, +-inf, between two bf16 values, equal
    to one) and blocks holding -inf (junk), -0 and ties."""
    rng = np.random.default_rng(3)
    vals = torch.from_numpy(rng.standard_normal((40, 300)).astype(np.float32)).to(torch.bfloat16)
    vals[:, :5] = -math.inf
    vals[:, 5:10] = -0.0
    vals[:, 10:15] = 0.0
    vals[:, 15:20] = vals[:, 20:25]  # ties
    thr = np.concatenate([
        rng.standard_normal(20).astype(np.float32),  # generic, both signs
        vals[:6, 20].float().numpy(),  # exactly a value of the block
        np.float32([0.0, -0.0, np.inf, -np.inf, 1e-30, -1e-30]),
        np.nextafter(vals[:8, 21].float().numpy(), np.float32(np.inf)),  # just above a value
    ])
    assert len(thr) == 40
    s32 = vals.float().numpy()
    for strict in (False, True):
        for sign in (1, -1):  # all thresholds > 0 (the raw-pattern path) or mixed (order keys)
            t = np.abs(thr) + np.float32(1e-3) if sign == 1 else thr
            r, j, v = score_blocks._entries_above(vals, t, strict)
            ref = s32 > t[:, None] if strict else s32 >= t[:, None]
            rr, jj = np.nonzero(ref)
            np.testing.assert_array_equal(r, rr)
            np.testing.assert_array_equal(j, jj)
            np.testing.assert_array_equal(v, s32[rr, jj])
            r2, j2, v2 = score_blocks._entries_above(vals.float(), t, strict)  # the float32 path
            np.testing.assert_array_equal(r2, rr)
            np.testing.assert_array_equal(v2, v)


def test_precision_is_chosen_by_hardware():
    cpu = torch.device("cpu")
    assert ex.resolve_precision("auto", cpu) == ("bf16" if bf16_native(cpu) else "fp32")
    assert ex.resolve_precision("fp32", cpu) == "fp32" and ex.resolve_precision("bf16", cpu) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        ex.resolve_precision("fp16", cpu)
    # the kNN screens in fp32 unless bf16 is asked: on a CPU with native bf16 (AMX or AVX512-BF16)
    # the bf16 screen's wider band costs more exact re-scoring than it saves (see knn's docstring)
    assert kn.knn(_unit(20, 8), 3, device="cpu").precision == "fp32"
    for backend in ("torch", "faiss", "auto"):  # refused whichever search would run
        with pytest.raises(ValueError, match="precision must be one of"):
            kn.knn(_unit(20, 8), 3, device="cpu", backend=backend, precision="fp16")


# ------------------------------------------------------------------------------- kNN, Jaccard
def _reference_knn(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force on canonical distances (every pair scored exactly), ties by index."""
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    r, c = np.meshgrid(np.arange(len(q)), np.arange(len(x)), indexing="ij")
    dots = ex.exact_pair_dots(qt, xt, r.ravel(), c.ravel()).reshape(len(q), len(x))
    d = (ex.exact_sqnorms(qt)[:, None] + ex.exact_sqnorms(xt)[None, :]) - np.float32(2) * dots
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), d.shape), d), axis=1)[:, :k]
    return order, np.take_along_axis(d, order, 1)


@pytest.mark.parametrize("data", list(DATASETS))
def test_knn_bf16_equals_the_exact_fp32_screen(data):
    x = DATASETS[data]()
    k = 12
    res = {p: kn.knn(x, k, backend="torch", device="cpu", precision=p, block=64) for p in ("exact", "bf16")}
    assert res["bf16"].precision == "bf16" and res["exact"].precision == "exact"
    np.testing.assert_array_equal(res["bf16"].indices, res["exact"].indices)
    np.testing.assert_array_equal(res["bf16"].sq_dists, res["exact"].sq_dists)
    assert np.all(res["exact"].indices[:, 0] == np.arange(len(x)))
    # query search (no self-first rule): both equal the brute-force canonical ranking
    q = x[::7] + np.float32(1e-5)
    want_i, want_d = _reference_knn(x, q, k)
    for p in ("exact", "bf16"):
        r = kn.knn(x, k, queries=q, backend="torch", device="cpu", precision=p, block=32)
        np.testing.assert_array_equal(r.indices, want_i)
        np.testing.assert_array_equal(r.sq_dists, np.maximum(want_d, 0))


def test_knn_bf16_widens_full_candidate_lists():
    """All points equidistant up to bf16 resolution: the screening lists are full below the limit
    and must be widened (to the whole set) before the exact choice."""
    x = np.tile(_unit(1, 16), (100, 1))
    x += np.float32(1e-4) * _unit(100, 16, seed=2)  # distinct, invisible to bf16
    a = kn.knn(x, 30, backend="torch", device="cpu", precision="bf16", block=16)
    b = kn.knn(x, 30, backend="torch", device="cpu", precision="exact", block=16)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.sq_dists, b.sq_dists)
    rows, _ = kn._screen_candidates(torch.from_numpy(x), None, 30, 16, "bf16")
    assert np.all(np.bincount(rows) == 100)  # widened from 45 to every point


def test_fp32_pair_dots_split_over_threads_equal_one_thread():
    """Above 50,000 pairs the CPU's sampled product is split by row over torch's threads: the same
    float32 values in the pairs' order."""
    rng = np.random.default_rng(9)
    a = torch.from_numpy(_unit(400, 24, 4))
    rows, cols = rng.integers(0, 400, 60_000), rng.integers(0, 400, 60_000)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ex.fp32_pair_dots(a, a, rows, cols)
        torch.set_num_threads(2)
        two = ex.fp32_pair_dots(a, a, rows, cols)
    finally:
        torch.set_num_threads(saved)
    np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize("data", list(DATASETS))
def test_fp32_band_keeps_every_pair_up_to_the_kth_canonical_distance(data):
    """The two-level kNN screen: the fp32 level narrows the bf16 band (on clustered data from 15 to
    12 = k pairs per row) and keeps every (i, j) with ``D_ij <= D_(k)``, ties at the k-th included."""
    x = torch.from_numpy(DATASETS[data]())
    k = 12
    nx = ex.exact_sqnorms(x)
    r0, c0 = kn._screen_candidates(x, None, k, 64, "bf16")
    r1, c1 = kn._screen_candidates(x, None, k, 64, "bf16", middle=(nx, nx))
    band, kept = set(zip(r0.tolist(), c0.tolist())), set(zip(r1.tolist(), c1.tolist()))
    assert kept <= band
    if data == "clustered":
        assert len(band) > 1.2 * k * len(x) and len(kept) <= 1.02 * k * len(x)
    # the canonical distances of every pair, and each row's k-th
    n = len(x)
    r, c = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    d = ex._canonical_sqdist(x, x, nx, nx, r.ravel(), c.ravel()).reshape(n, n)
    kth = np.sort(d, axis=1)[:, k - 1]
    need = set(zip(*np.nonzero(d <= kth[:, None])))
    assert need <= kept


@pytest.mark.parametrize("data", ["clustered", "duplicates", "orthogonal"])
def test_jaccard_bf16_equals_the_exact_fp32_screen(data):
    x = DATASETS[data]()
    out = {}
    for p in ("exact", "bf16"):
        jd, info = jac.jaccard_distance(x, k1=10, k2=4, device="cpu", precision=p, return_info=True)
        assert info["knn_precision"] == p
        out[p] = jd
    a, b = out["exact"], out["bf16"]
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.data, b.data)
    dense = {p: jac.jaccard_distance(x, k1=10, k2=4, device="cpu", precision=p, dense=True) for p in out}
    np.testing.assert_array_equal(dense["exact"], dense["bf16"])


def test_default_knn_is_the_direct_fp32_search_and_agrees_off_ties():
    """``precision="auto"`` is the direct fp32 search (the screen's own distances, no re-scoring):
    on data without near-ties it returns the exact neighbours, with distances within fp32 rounding."""
    x = DATASETS["clustered"]()
    fast = kn.knn(x, 12, backend="torch", device="cpu", block=64)
    exact = kn.knn(x, 12, backend="torch", device="cpu", precision="exact", block=64)
    assert fast.precision == "fp32" and exact.precision == "exact"
    gaps = np.diff(exact.sq_dists, axis=1).min(axis=1)
    clear = gaps > 1e-5
    assert clear.sum() > len(x) // 2
    np.testing.assert_array_equal(fast.indices[clear], exact.indices[clear])
    np.testing.assert_allclose(fast.sq_dists, exact.sq_dists, atol=1e-5)


# ------------------------------------------------------------------------------------ SYSU-30k
def _sysu_case(kind: str, seed: int = 0):
    """Queries, and a gallery whose good matches tie with or sit just next to distractors."""
    rng = np.random.default_rng(seed)
    d, nq = 64, 30
    q = _unit(nq, d, seed)
    ql = np.arange(nq)
    qc = np.zeros(nq, np.int64)
    good = q + np.float32(0.9) * _unit(nq, d, seed + 1)  # score about 0.7
    good[:10] = _unit(10, d, seed + 5)  # weak matches, ranked behind many earlier distractors
    good /= np.linalg.norm(good, axis=1, keepdims=True)
    dis = _unit(600, d, seed + 2)
    if kind == "duplicates":  # distractors equal to good matches (exact ties) and 1e-4 apart
        dis[:nq] = good
        dis[nq:2 * nq] = good + np.float32(1e-4) * _unit(nq, d, seed + 3)
    elif kind == "orthogonal":  # one-hot features: scores exactly 0 or 1
        q = np.eye(d, dtype=np.float32)[rng.integers(0, d, nq)]
        good = np.eye(d, dtype=np.float32)[rng.integers(0, d, nq)]
        dis = np.eye(d, dtype=np.float32)[rng.integers(0, d, 600)]
    feats = np.concatenate([dis[:300], good, dis[300:]]).astype(np.float32)
    labels = np.concatenate([np.full(300, -1000), ql, np.full(300, -1000)])
    labels[5] = labels[310] = -1  # junk columns
    cams = np.ones(len(labels), np.int64)
    cams[300 + np.arange(0, nq, 5)] = 0  # same camera as the query: junk, not good
    return (q, ql, qc), (feats, labels, cams)


@pytest.mark.parametrize("kind", ["random", "duplicates", "orthogonal"])
def test_sysu_bf16_equals_fp32(kind):
    qs, (feats, labels, cams) = _sysu_case(kind)
    out = {}
    for p in ("fp32", "bf16"):
        # good matches in the middle of the gallery: chunk 0 holds distractors only (the pool),
        # and a 4-item buffer forces the exact second pass for many of them
        gal = lambda: iter([(feats[s:s + 97], labels[s:s + 97], cams[s:s + 97])  # noqa: E731
                            for s in range(0, len(labels), 97)])
        out[p] = [sysu30k_evaluate(*qs, (feats, labels, cams), chunk_size=128, device="cpu",
                                   precision=p, max_rank=None),
                  sysu30k_evaluate(*qs, gal, chunk_size=64, buffer_size=4, device="cpu", precision=p,
                                   max_rank=None)]
    ref = out["fp32"][0]
    assert ref["precision"] == "fp32" and out["bf16"][0]["precision"] == "bf16"
    assert out["fp32"][1]["passes"] == 2
    for res in out["fp32"] + out["bf16"]:
        np.testing.assert_array_equal(res["ranks"], ref["ranks"])
        np.testing.assert_array_equal(res["per_query_AP"], ref["per_query_AP"])
        np.testing.assert_array_equal(res["cmc"], ref["cmc"])
        assert res["mAP"] == ref["mAP"] and res["unverified_comparisons"] == 0
    # and the ranks are those of the exact scores: ties count the good match first
    q = torch.from_numpy(qs[0])
    g = torch.from_numpy(feats)
    for i in range(len(q)):
        gi = 300 + i
        if cams[gi] == 0:
            assert ref["ranks"][i] == -1
            continue
        kept = np.flatnonzero((labels != -1) & ~((labels == i) & (cams == 0)))
        s = ex.exact_pair_dots(q, g, np.full(len(kept), i), kept)
        c = ex.exact_pair_dots(q, g, np.array([i]), np.array([gi]))[0]
        assert ref["ranks"][i] == int((s > c).sum())
    if kind == "duplicates":
        assert (ref["ranks"] > 0).sum() < len(ref["ranks"])  # exact ties do not push it down


def test_sysu_one_shot_generator_uses_fp32_screening():
    qs, (feats, labels, cams) = _sysu_case("random", seed=4)
    gen = ((feats[s:s + 100], labels[s:s + 100], cams[s:s + 100]) for s in range(0, len(labels), 100))
    res = sysu30k_evaluate(*qs, gen, chunk_size=100, device="cpu", max_rank=None)
    ref = sysu30k_evaluate(*qs, (feats, labels, cams), device="cpu", precision="bf16", max_rank=None)
    assert res["precision"] == "fp32" and res["passes"] == 1
    np.testing.assert_array_equal(res["ranks"], ref["ranks"])
    assert math.isclose(res["mAP"], ref["mAP"], rel_tol=0, abs_tol=0)
