"""Tests for reidkit.retrieval.camera_bias (distance groups, camera means, centring, 2-D embedding) and
reidkit.viz.cameras: hand-computed cases, brute-force pair enumeration, and the sampling path."""

from __future__ import annotations

import itertools

import matplotlib
import numpy as np
import pytest
from scipy.spatial.distance import pdist, squareform

from reidkit.retrieval import camera_bias as cb
from reidkit.retrieval.camera_bias import (
    GROUPS,
    camera_centred,
    camera_distance_groups,
    embedding_2d,
    per_camera_means,
)
from reidkit.viz.cameras import camera_bias_figure

matplotlib.use("Agg")

NAMES = [g[0] for g in GROUPS]


def _unit(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_case(seed=0, n=40, d=5, ids=6, cams=3):
    rng = np.random.default_rng(seed)
    return _unit(rng, n, d), rng.integers(0, ids, n), rng.integers(0, cams, n)


def _brute(x, pid, cam, metric="sqeuclidean"):
    """Every pair i < j sorted into the four kinds by loops, with scipy's distance."""
    full = squareform(pdist(x, metric))
    out = {name: ([], []) for name in NAMES}
    for i, j in itertools.combinations(range(len(x)), 2):
        name = "same_id" if pid[i] == pid[j] else "diff_id"
        name += "_same_cam" if cam[i] == cam[j] else "_cross_cam"
        out[name][0].append((i, j))
        out[name][1].append(full[i, j])
    return {k: (np.array(p, dtype=np.int64).reshape(-1, 2), np.array(d)) for k, (p, d) in out.items()}


# --------------------------------------------------------------------------------------------
# camera_distance_groups
# --------------------------------------------------------------------------------------------
def test_distance_groups_hand_case():
    # person 0 in cameras 0, 1, 0; person 1 in cameras 0, 1
    x = np.array([[1, 0], [0, 1], [1, 0], [-1, 0], [0, -1]], dtype=np.float32)
    pid, cam = [0, 0, 0, 1, 1], [0, 1, 0, 0, 1]
    g = camera_distance_groups(x, pid, cam)
    assert g["metric"] == "sqeuclidean"
    assert g["counts"] == {"same_id_same_cam": 1, "same_id_cross_cam": 3,
                           "diff_id_same_cam": 3, "diff_id_cross_cam": 3}
    assert not any(g["sampled"].values())
    expect = {  # pairs and |x_i - x_j|^2 worked out by hand
        "same_id_same_cam": ([(0, 2)], [0.0]),
        "same_id_cross_cam": ([(0, 1), (1, 2), (3, 4)], [2.0, 2.0, 2.0]),
        "diff_id_same_cam": ([(0, 3), (1, 4), (2, 3)], [4.0, 4.0, 4.0]),
        "diff_id_cross_cam": ([(0, 4), (1, 3), (2, 4)], [2.0, 2.0, 2.0]),
    }
    for name, (pairs, dist) in expect.items():
        np.testing.assert_array_equal(g["pairs"][name], pairs)
        np.testing.assert_allclose(g["distances"][name], dist, atol=1e-6)
    s = g["summary"]
    assert s["mean_same_id_cross_cam"] == pytest.approx(2.0)
    assert s["median_diff_id_same_cam"] == pytest.approx(4.0)
    assert s["camera_gap_same_id"] == pytest.approx(2.0)
    assert s["camera_gap_diff_id"] == pytest.approx(-2.0)
    assert s["cross_cam_pos_beyond_same_cam_neg_median"] == pytest.approx(0.0)  # 2 < 4: none farther
    cos = camera_distance_groups(x, pid, cam, metric="cosine")
    np.testing.assert_allclose(cos["distances"]["diff_id_same_cam"], [2.0, 2.0, 2.0], atol=1e-6)


def test_distance_groups_share_beyond_the_stranger_median_by_hand():
    # three people, each seen once by camera 0 and once by camera 1, each in a plane of their own:
    # strangers are orthogonal (distance 2), a person's two images are 1, 3 and 3.5 apart
    x = np.zeros((6, 6))
    for k, d in enumerate([1.0, 3.0, 3.5]):
        theta = np.arccos(1 - d / 2)  # the angle whose squared chord is d
        x[2 * k, 2 * k] = 1
        x[2 * k + 1, 2 * k:2 * k + 2] = np.cos(theta), np.sin(theta)
    pid, cam = [0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]
    g = camera_distance_groups(x, pid, cam)
    np.testing.assert_allclose(g["distances"]["same_id_cross_cam"], [1.0, 3.0, 3.5], atol=1e-9)
    np.testing.assert_allclose(g["distances"]["diff_id_same_cam"], [2.0] * 6, atol=1e-9)
    assert g["counts"]["same_id_same_cam"] == 0 and g["distances"]["same_id_same_cam"].size == 0
    s = g["summary"]
    assert s["cross_cam_pos_beyond_same_cam_neg_median"] == pytest.approx(2 / 3)  # 3 and 3.5 exceed 2
    assert s["mean_same_id_cross_cam"] == pytest.approx(7.5 / 3)
    assert s["mean_same_id_same_cam"] is None and s["camera_gap_same_id"] is None


@pytest.mark.parametrize("metric", ["sqeuclidean", "cosine"])
def test_distance_groups_match_brute_force(metric):
    x, pid, cam = _random_case(seed=1)
    g = camera_distance_groups(x, pid, cam, metric=metric)
    ref = _brute(x, pid, cam, metric)
    for name in NAMES:
        pairs, dist = ref[name]
        assert g["counts"][name] == len(pairs)
        np.testing.assert_array_equal(g["pairs"][name], pairs)
        np.testing.assert_allclose(g["distances"][name], dist, atol=1e-9)
        assert g["summary"][f"mean_{name}"] == pytest.approx(dist.mean())
        assert g["summary"][f"median_{name}"] == pytest.approx(np.median(dist))
    assert sum(g["counts"].values()) == len(x) * (len(x) - 1) // 2


def test_distance_groups_small_blocks_give_the_same_answer(monkeypatch):
    x, pid, cam = _random_case(seed=2, n=37)
    ref = camera_distance_groups(x, pid, cam)
    monkeypatch.setattr(cb, "_BLOCK", 7)  # row blocks of 1 row, distance chunks of 1 pair
    small = camera_distance_groups(x, pid, cam)
    for name in NAMES:
        np.testing.assert_array_equal(small["pairs"][name], ref["pairs"][name])
        np.testing.assert_allclose(small["distances"][name], ref["distances"][name], atol=1e-12)


def test_bounded_path_is_exact_when_max_pairs_covers_every_pair():
    x, pid, cam = _random_case(seed=3)
    n_all = len(x) * (len(x) - 1) // 2
    g = camera_distance_groups(x, pid, cam, max_pairs=n_all)
    ref = _brute(x, pid, cam)
    assert not any(g["sampled"].values())
    for name in NAMES:
        np.testing.assert_array_equal(g["pairs"][name], ref[name][0])
        np.testing.assert_allclose(g["distances"][name], ref[name][1], atol=1e-9)
    # exactly at a kind's own count: still exact; one below: sampled
    k = g["counts"]["diff_id_cross_cam"]
    assert camera_distance_groups(x, pid, cam, max_pairs=k)["sampled"]["diff_id_cross_cam"] is False
    assert camera_distance_groups(x, pid, cam, max_pairs=k - 1)["sampled"]["diff_id_cross_cam"] is True


def test_sampled_path_draws_valid_pairs_deterministically():
    x, pid, cam = _random_case(seed=4, n=60)
    full = squareform(pdist(x, "sqeuclidean"))
    g = camera_distance_groups(x, pid, cam, max_pairs=50, seed=7)
    again = camera_distance_groups(x, pid, cam, max_pairs=50, seed=7)
    other = camera_distance_groups(x, pid, cam, max_pairs=50, seed=8)
    for name, same_id, same_cam in GROUPS:
        p = g["pairs"][name]
        assert g["sampled"][name] == (g["counts"][name] > 50)
        assert len(p) == min(50, g["counts"][name])
        assert (p[:, 0] < p[:, 1]).all()
        assert ((pid[p[:, 0]] == pid[p[:, 1]]) == same_id).all()
        assert ((cam[p[:, 0]] == cam[p[:, 1]]) == same_cam).all()
        np.testing.assert_allclose(g["distances"][name], full[p[:, 0], p[:, 1]], atol=1e-9)
        np.testing.assert_array_equal(again["pairs"][name], p)
    assert g["sampled"]["diff_id_cross_cam"]
    assert not np.array_equal(other["pairs"]["diff_id_cross_cam"], g["pairs"]["diff_id_cross_cam"])


@pytest.mark.parametrize("name,same_id,same_cam", GROUPS)
def test_sampler_is_uniform_over_the_pairs_of_a_kind(name, same_id, same_cam):
    # uneven cameras and identities, so that a non-uniform sampler would show
    rng = np.random.default_rng(5)
    n = 30
    pid = rng.integers(0, 4, n)
    cam = np.minimum(rng.geometric(0.4, n) - 1, 3)
    ref = _brute(np.zeros((n, 1)), pid, cam)[name][0]
    k = 400 * len(ref)
    got = cb._sample_pairs(pid, cam, same_id, same_cam, k, len(ref), np.random.default_rng(0))
    assert len(got) == k
    index = {tuple(p): t for t, p in enumerate(ref.tolist())}
    counts = np.bincount([index[tuple(p)] for p in got.tolist()], minlength=len(ref))  # KeyError = wrong kind
    chi2 = float(((counts - 400) ** 2 / 400).sum())
    # chi-square with len(ref) - 1 degrees of freedom: mean dof, sd sqrt(2 dof); 6 sd is far out
    dof = len(ref) - 1
    assert counts.min() > 0 and chi2 < dof + 6 * np.sqrt(2 * dof)


def test_distance_groups_rejects_bad_input():
    x, pid, cam = _random_case()
    with pytest.raises(ValueError, match="pids has 39 entries"):
        camera_distance_groups(x, pid[:-1], cam)
    with pytest.raises(ValueError, match="cams has 39 entries"):
        camera_distance_groups(x, pid, cam[:-1])
    with pytest.raises(ValueError, match="metric"):
        camera_distance_groups(x, pid, cam, metric="euclidean")
    with pytest.raises(ValueError, match="max_pairs"):
        camera_distance_groups(x, pid, cam, max_pairs=0)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        camera_distance_groups(x[0], pid[:1], cam[:1])


# --------------------------------------------------------------------------------------------
# per_camera_means and camera_centred
# --------------------------------------------------------------------------------------------
def test_per_camera_means_hand_case():
    x = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
    m = per_camera_means(x, [3, 3, 5, 5])
    assert m["cameras"] == [3, 5] and m["counts"] == [2, 2]
    np.testing.assert_allclose(m["means"], [[0.5, 0.5], [-0.5, -0.5]])
    np.testing.assert_allclose(m["mean_norms"], [np.sqrt(0.5)] * 2)
    np.testing.assert_allclose(m["mean_distances"], [[0, np.sqrt(2)], [np.sqrt(2), 0]])
    assert m["max_mean_distance"] == pytest.approx(np.sqrt(2))
    # total spread 4 (four unit vectors about mean 0); between cameras 2 * 0.5 + 2 * 0.5 = 2
    assert m["camera_variance_share"] == pytest.approx(0.5)
    # opposite vectors in each camera: both camera means are 0
    assert per_camera_means(x, [0, 1, 0, 1])["camera_variance_share"] == pytest.approx(0.0)


def test_per_camera_means_variance_share_is_one_minus_within_over_total():
    x, _, cam = _random_case(seed=6, n=50, d=7)
    x[cam == 1] += 0.5  # a camera offset
    m = per_camera_means(x, cam)
    within = sum(((x[cam == c] - x[cam == c].mean(0)) ** 2).sum() for c in np.unique(cam))
    total = ((x - x.mean(0)) ** 2).sum()
    assert m["camera_variance_share"] == pytest.approx(1 - within / total)
    assert m["camera_variance_share"] > 0.1
    with pytest.raises(ValueError, match="cams has 49 entries"):
        per_camera_means(x, cam[:-1])


def test_camera_centred_zeroes_camera_means_then_renormalises():
    x, _, cam = _random_case(seed=7, n=50, d=7)
    x = (x + 0.3 * (cam[:, None] == 2)).astype(np.float32)
    raw = camera_centred(x, cam, normalise=False)
    for c in np.unique(cam):
        np.testing.assert_allclose(raw[cam == c].mean(0), 0, atol=1e-6)
        np.testing.assert_allclose(raw[cam == c], x[cam == c] - x[cam == c].mean(0), atol=1e-6)
    assert per_camera_means(raw, cam)["camera_variance_share"] == pytest.approx(0, abs=1e-10)
    out = camera_centred(x, cam)
    assert out.dtype == np.float32 and out is not x
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(out, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    # a camera's only image equals its mean: it becomes the zero vector, not NaN
    lone = camera_centred(x, np.where(np.arange(50) == 0, 9, cam))
    np.testing.assert_array_equal(lone[0], 0)
    with pytest.raises(ValueError, match="cams has 49 entries"):
        camera_centred(x, cam[:-1])


# --------------------------------------------------------------------------------------------
# embedding_2d and the figure
# --------------------------------------------------------------------------------------------
def test_embedding_2d_is_deterministic_for_a_seed():
    x, _, _ = _random_case(seed=8, n=60, d=60)  # d > 50: PCA to 50 first
    a, ia = embedding_2d(x, seed=3)
    b, _ = embedding_2d(x, seed=3)
    assert a.shape == (60, 2) and np.isfinite(a).all()
    np.testing.assert_array_equal(ia, np.arange(60))
    np.testing.assert_array_equal(a, b)
    s1, i1 = embedding_2d(x, method="pca", seed=1, max_points=20)
    s2, i2 = embedding_2d(x, method="pca", seed=1, max_points=20)
    _, i3 = embedding_2d(x, method="pca", seed=2, max_points=20)
    assert s1.shape == (20, 2) and len(np.unique(i1)) == 20 and (np.diff(i1) > 0).all()
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)
    assert not np.array_equal(i1, i3)
    with pytest.raises(ValueError, match="method"):
        embedding_2d(x, method="umap")


def test_camera_bias_figure_draws_three_panels():
    x, pid, cam = _random_case(seed=9, n=30)
    g = camera_distance_groups(x, pid, cam)
    xy, idx = embedding_2d(x, method="pca")
    fig = camera_bias_figure(g, xy, pid[idx], cam[idx], title="t", max_ids=3)
    axes = fig.get_axes()
    assert len(axes) == 3
    share = g["summary"]["cross_cam_pos_beyond_same_cam_neg_median"]
    assert f"{100 * share:.0f}%" in axes[0].get_title()
    assert "3 of 6 people" in axes[1].get_title()
    assert sorted(t.get_text().split()[0] for t in axes[2].get_legend().get_texts()) == ["C1", "C2", "C3"]
    with pytest.raises(ValueError, match="sizes differ"):
        camera_bias_figure(g, xy[:-1], pid, cam)
