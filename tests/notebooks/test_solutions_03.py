"""Notebook 03 (clustering): the camera-split measurements of reidkit.hhcl.clustering, the figures and
eps widget of reidkit.viz.clustering, and the worked solutions of the exercises on the smoke
profile."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from reidkit.hhcl.clustering import camera_split_purity, missed_cross_camera_pairs

# ---------------------------------------------------------------------------------------------
# library: purity and recall within a camera and across cameras

def _brute_force(labels, pids, cams):
    """The same counts, pair by pair (small inputs only)."""
    out = {k: dict(same_id_pairs=0, joined_same_id=0, clustered_pairs=0) for k in ("within_camera", "across_cameras")}
    for i, j in combinations(range(len(labels)), 2):
        kind = "within_camera" if cams[i] == cams[j] else "across_cameras"
        together = labels[i] >= 0 and labels[i] == labels[j]
        same = pids[i] == pids[j]
        out[kind]["same_id_pairs"] += same
        out[kind]["joined_same_id"] += same and together
        out[kind]["clustered_pairs"] += together
    return out


def test_camera_split_purity_on_a_hand_made_clustering():
    # person 1: 3 images in camera 0, 2 in camera 1; person 2: 2 images in camera 0
    pids = np.array([1, 1, 1, 1, 1, 2, 2])
    cams = np.array([0, 0, 0, 1, 1, 0, 0])
    # cluster 0 = person 1 camera 0 plus one image of person 2; cluster 1 = person 1 camera 1;
    # the last image is an outlier
    labels = np.array([0, 0, 0, 1, 1, 0, -1])
    s = camera_split_purity(labels, pids, cams)
    w, a = s["within_camera"], s["across_cameras"]
    assert (w["same_id_pairs"], w["joined_same_id"], w["clustered_pairs"]) == (3 + 1 + 1, 3 + 1, 6 + 1)
    assert w["recall"] == pytest.approx(4 / 5) and w["purity"] == pytest.approx(4 / 7)
    assert (a["same_id_pairs"], a["joined_same_id"], a["clustered_pairs"]) == (6, 0, 0)
    assert a["recall"] == 0.0 and np.isnan(a["purity"])
    assert s["clusters"] == 2 and s["single_camera_clusters"] == 2
    assert s["ids_multi_camera"] == 1 and s["ids_joined_across"] == 0


def test_camera_split_purity_matches_brute_force_pairs():
    rng = np.random.default_rng(3)
    pids, cams = rng.integers(0, 5, 60), rng.integers(0, 3, 60)
    labels = np.where(rng.random(60) < 0.15, -1, rng.integers(0, 6, 60))
    got = camera_split_purity(labels, pids, cams)
    want = _brute_force(labels, pids, cams)
    for kind in want:
        for key, v in want[kind].items():
            assert got[kind][key] == v, (kind, key)


def test_missed_cross_camera_pairs_says_where_each_side_went():
    pids = np.array([7, 7, 7, 7, 8, 8, 9, 9])
    cams = np.array([0, 0, 2, 2, 0, 1, 1, 1])
    labels = np.array([3, 3, 4, -1, 5, 5, 6, 6])
    rows = missed_cross_camera_pairs(labels, pids, cams)
    assert [(r["pid"], r["cam_a"], r["cam_b"]) for r in rows] == [(7, 0, 2), (8, 0, 1)]  # 9: one camera
    r7, r8 = rows
    assert (r7["pairs"], r7["joined"], r7["missed"], r7["status"]) == (4, 0, 4, "missed")
    assert r7["clusters_a"] == {3: 2} and r7["clusters_b"] == {-1: 1, 4: 1}
    assert (r8["pairs"], r8["joined"], r8["status"]) == (1, 1, "joined")


# ---------------------------------------------------------------------------------------------
# the run's data (smoke profile): the sample's clusters are camera-bound

@pytest.fixture(scope="module")
def run(smoke_ctx):
    from reidkit.hhcl.clustering import dbscan_labels
    from reidkit.retrieval.jaccard import jaccard_distance

    c = smoke_ctx.profile.cluster
    ds = smoke_ctx.dataset()
    feats = smoke_ctx.features("train")
    jac = jaccard_distance(feats, k1=c.k1, k2=c.k2, device="cpu")
    labels = dbscan_labels(jac, eps=c.eps, min_samples=c.min_samples)
    arr = {k: np.array([getattr(r, k) for r in ds.train]) for k in ("pid", "camid", "tracklet")}
    return dict(ctx=smoke_ctx, ds=ds, jac=jac, labels=labels, **arr)


def test_the_sample_clusters_miss_cross_camera_pairs(run):
    s = camera_split_purity(run["labels"], run["pid"], run["camid"])
    # fp32 features (no native bf16 on the CPU) give purity 0.85; bf16 ones (AMX, AVX512-BF16) about 0.95
    assert s["within_camera"]["recall"] > 0.7 and s["within_camera"]["purity"] > 0.8
    assert s["across_cameras"]["recall"] < s["within_camera"]["recall"] - 0.2
    assert s["ids_multi_camera"] == 4 and s["single_camera_clusters"] >= 0.7 * s["clusters"]
    rows = missed_cross_camera_pairs(run["labels"], run["pid"], run["camid"])
    assert len(rows) == 4 and all(r["pairs"] == 64 for r in rows)
    assert sum(r["joined"] for r in rows) == s["across_cameras"]["joined_same_id"]
    assert any(r["status"] == "missed" for r in rows)


def test_clustering_figures_and_eps_widget(run, capsys):
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from reidkit import viz
    from reidkit.hhcl.clustering import eps_sweep
    from reidkit.retrieval.knn import knn

    c = run["ctx"].profile.cluster
    pid, cam = run["pid"], run["camid"]
    sweep = eps_sweep(run["jac"], c.eps_grid[:3], gt=pid, return_labels=True)
    splits = [camera_split_purity(s["labels"], pid, cam) for s in sweep]
    d = np.linspace(0, 1, 10)
    figs = [viz.neighbours_figure(run["ds"].train, knn(np.eye(12, dtype=np.float32), 5).indices, 0, k=4),
            viz.distance_histograms(d, d, d > 0.5, d > 0.2),
            viz.eps_sweep_figure(sweep, splits, eps=c.eps, num_ids=16),
            viz.contingency_figure(run["labels"], pid, cam, run["tracklet"]),
            viz.cross_camera_figure(run["ds"].train, run["labels"], 13)]
    assert all(isinstance(f, Figure) for f in figs)
    plt.close("all")

    w = viz.eps_widget(run["jac"], c.eps_grid, pid, cam, run["tracklet"], c.min_samples, value=c.eps)
    slider = w.children[0]
    assert list(slider.options) == [round(e, 4) for e in c.eps_grid] and slider.value == c.eps
    first = capsys.readouterr().out  # outside a kernel the Output widget lets the text through
    slider.value = slider.options[-1]
    moved = capsys.readouterr().out
    assert f"eps {c.eps:.2f}" in first and f"eps {slider.options[-1]:.2f}" in moved
    assert first.split("\n")[0] != moved.split("\n")[0]
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# the worked solutions

SOLUTION = "03_clustering"  # the conftest fixture `sol` loads notebooks/solutions/<SOLUTION>.py


def test_exercise_1_eps(smoke_ctx, sol, capsys):
    guess = {"smallest": {"clusters": 30, "purity": 0.99}, "largest": {"outliers": 0}}
    r = sol.exercise_1(smoke_ctx, prediction=guess)
    assert capsys.readouterr().out == r["explanation"] + "\n"
    rows = r["rows"]
    assert [x["eps"] for x in rows] == list(smoke_ctx.profile.cluster.eps_grid)
    outliers = [x["outliers"] for x in rows]
    assert outliers == sorted(outliers, reverse=True) and outliers[0] > outliers[-1]  # noise only shrinks
    assert r["smallest"]["clusters"] > r["largest"]["clusters"]
    assert r["smallest"]["purity"] > 0.95 > 0.5 > r["largest"]["purity"]
    first = r["first_eps_purity_below_0.9"]
    assert first in smoke_ctx.profile.cluster.eps_grid
    assert all(x["purity"] >= 0.9 for x in rows if x["eps"] < first)
    assert f"first falls below 0.9 at eps {first:g}" in r["explanation"]
    assert r["largest"]["across_cameras_recall"] >= r["smallest"]["across_cameras_recall"]
    assert "(you: 30)" in r["explanation"] and "(you: 0)" in r["explanation"]   # the prediction is shown
    loss = r["smallest"]["purity"] - r["largest"]["purity"]
    gain = r["largest"]["across_cameras_recall"] - r["smallest"]["across_cameras_recall"]
    assert ("far more merged strangers" in r["explanation"]) == (loss > gain)


def test_exercise_2_k1(smoke_ctx, sol, capsys):
    r = sol.exercise_2(smoke_ctx)
    assert capsys.readouterr().out == r["explanation"] + "\n"
    rows = r["rows"]
    assert [x["k1"] for x in rows] == [5, 10, 20, 30]
    stored = [x["stored_pairs"] for x in rows]
    assert stored == sorted(stored) and len(set(stored)) == 4      # more neighbours, more pairs
    assert rows[0]["clusters"] > rows[-1]["clusters"]
    assert rows[-1]["ari"] < rows[2]["ari"]                          # k1 past one person's images merges
    assert rows[0]["across_cameras_recall"] <= rows[-1]["across_cameras_recall"]
    assert r["images_per_identity"] == 16
    assert r["best_k1"] == max(rows, key=lambda x: x["ari"])["k1"]
    assert f"ARI peaks at k1 = {r['best_k1']}" in r["explanation"]
    assert "must hold other people" in r["explanation"]             # 30 > 16 and ARI fell on the sample


def test_exercise_3_one_person_two_cameras(smoke_ctx, sol, capsys):
    r = sol.exercise_3(smoke_ctx)
    assert capsys.readouterr().out == r["explanation"] + "\n"
    eps = smoke_ctx.profile.cluster.eps
    # the first identity the clusters do not join, not simply the first row
    from reidkit.hhcl.clustering import dbscan_labels, missed_cross_camera_pairs
    from reidkit.retrieval.jaccard import jaccard_distance

    c = smoke_ctx.profile.cluster
    ds = smoke_ctx.dataset()
    pids, cams = np.array([x.pid for x in ds.train]), np.array([x.camid for x in ds.train])
    labels = dbscan_labels(jaccard_distance(smoke_ctx.features("train"), k1=c.k1, k2=c.k2, device="cpu"),
                           eps=c.eps, min_samples=c.min_samples)
    rows = missed_cross_camera_pairs(labels, pids, cams)
    assert r["pid"] == next(x for x in rows if x["status"] != "joined")["pid"]
    assert r["status"] != "joined"
    assert not {k for k in r["clusters_a"] if k >= 0} & {k for k in r["clusters_b"] if k >= 0}
    assert 0 <= r["min_distance"] <= r["median_distance"] <= 1
    assert r["joined_at_eps"] is None or r["joined_at_eps"] > eps
    if r["joined_at_eps"] is None:
        assert "No eps of the grid" in r["explanation"]
    else:
        assert f"first share a cluster at eps {r['joined_at_eps']:g}" in r["explanation"]
        assert ("other people merge too" in r["explanation"]) == (r["purity_at_that_eps"] < 0.9)
    other = next(x for x in rows if x["pid"] != r["pid"])
    assert sol.exercise_3(smoke_ctx, pid=other["pid"])["pid"] == other["pid"]


def test_exercise_4_min_samples(smoke_ctx, sol, capsys):
    r = sol.exercise_4(smoke_ctx)
    assert capsys.readouterr().out == r["explanation"] + "\n"
    assert r["tracklet_size"] == 8
    by = {x["min_samples"]: x for x in r["rows"]}
    outliers = [x["outliers"] for x in r["rows"]]
    assert outliers == sorted(outliers)
    assert by[9]["outliers"] - by[8]["outliers"] > 20   # the jump past the tracklet length
    assert by[9]["clusters"] < by[8]["clusters"]
    assert r["largest_jump"][:2] == (8, 9) and "across the tracklet length" in r["explanation"]


def test_exercise_5_euclidean_against_jaccard(smoke_ctx, sol, capsys):
    r = sol.exercise_5(smoke_ctx)
    assert capsys.readouterr().out == r["explanation"] + "\n"
    assert r["best_jaccard"]["ari_all"] > r["best_euclidean"]["ari_all"]
    assert "the Jaccard distance wins" in r["explanation"]
    assert r["euclidean"][-1]["clusters"] <= 2                       # above its best eps it chains
    good = [x for x in r["jaccard"] if x["ari_all"] > 0.8]
    assert len(good) >= 3                                            # a wide range of good eps


# ---------------------------------------------------------------------------------------------
# the toy picture of R*(p, k)

def test_kreciprocal_toy_follows_the_rule_and_the_kit():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from reidkit.viz.clustering import kreciprocal_toy, kreciprocal_toy_figure

    toy = kreciprocal_toy()
    assert toy["kit_R_star"] == toy["R_star"]
    assert toy["p"] in toy["R"] <= toy["N"] and len(toy["N"]) == toy["k"]
    assert toy["R"] < toy["N"]                                        # some neighbours are one-way
    assert any(c["accepted"] and c["adds"] for c in toy["candidates"])   # the expansion adds a point
    assert any(not c["accepted"] for c in toy["candidates"])             # and refuses a candidate
    for c in toy["candidates"]:
        assert c["accepted"] == (3 * c["inside"] > 2 * len(c["half"]))
    assert toy["R_star"] == toy["R"].union(*(c["half"] for c in toy["candidates"] if c["accepted"]))
    plt.close(kreciprocal_toy_figure(toy))
    # on random sets too: the plain-set R* is the kit's (the function raises otherwise)
    rng = np.random.default_rng(0)
    for _ in range(5):
        kreciprocal_toy(points=rng.standard_normal((30, 2)), p=int(rng.integers(30)), k=int(rng.integers(4, 12)))
