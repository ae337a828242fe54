"""Notebook 06 (evaluation): the worked solutions on the smoke sample, the functions the notebook
added to ``reidkit.retrieval.market`` (one query's precision-recall, outcome groups, plain vs re-ranked
comparison), and the query browser and figures of ``reidkit.viz``."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from reidkit.retrieval.inspect import compare_rankings, precision_recall, queries_by_outcome
from reidkit.retrieval.market import evaluate_rank

SOLUTION = "06_evaluation"  # the conftest fixture `sol` loads notebooks/solutions/<SOLUTION>.py


def _random_case(seed=0, nq=12, ng=60, ids=6, cams=3):
    rng = np.random.default_rng(seed)
    q_pids, g_pids = rng.integers(0, ids, nq), rng.integers(0, ids, ng)
    q_cams, g_cams = rng.integers(0, cams, nq), rng.integers(0, cams, ng)
    dist = rng.random((nq, ng)).astype(np.float32)
    return dist, q_pids, g_pids, q_cams, g_cams


# -- reidkit.retrieval.market additions ------------------------------------------------------------------


def test_precision_recall_matches_evaluate_rank():
    dist, q_pids, g_pids, q_cams, g_cams = _random_case()
    res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=5)
    for q in range(len(q_pids)):
        pr = precision_recall(dist[q], q_pids[q], q_cams[q], g_pids, g_cams)
        junk = (g_pids == q_pids[q]) & (g_cams == q_cams[q])
        assert len(pr["order"]) == len(g_pids) - junk.sum()
        if res["num_matches"][q] == 0:
            assert math.isnan(pr["AP"]) and len(pr["match_ranks"]) == 0
            continue
        assert pr["AP"] == pytest.approx(res["AP"][q]) and pr["INP"] == pytest.approx(res["INP"][q])
        assert pr["match_ranks"][0] - 1 == res["first_match_rank"][q]
        assert pr["recall"][-1] == pytest.approx(1.0)
        # AP is the area under the precision-recall step curve
        area = np.sum(pr["precision"] * np.diff(np.concatenate([[0.0], pr["recall"]])))
        assert area == pytest.approx(pr["AP"])


def test_precision_recall_by_hand():
    # gallery: pid 1 at positions 2 and 4 (cam 1), pid 1 cam 0 is junk, others are negatives
    g_pids = np.array([2, 1, 1, 3, 1])
    g_cams = np.array([0, 1, 0, 0, 1])
    dist = np.array([0.1, 0.2, 0.05, 0.3, 0.4])
    pr = precision_recall(dist, 1, 0, g_pids, g_cams)
    assert pr["order"].tolist() == [0, 1, 3, 4]
    assert pr["match_ranks"].tolist() == [2, 4]
    assert pr["AP"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert pr["INP"] == pytest.approx(2 / 4)


def test_queries_by_outcome_partitions_the_queries():
    dist, q_pids, g_pids, q_cams, g_cams = _random_case(1)
    res = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, max_rank=5)
    g = queries_by_outcome(res)
    parts = np.sort(np.concatenate([g["rank-1 hit"], g["rank-1 miss"], g["no match"]]))
    assert parts.tolist() == g["all"].tolist() == list(range(len(q_pids)))
    assert np.all(res["first_match_rank"][g["rank-1 hit"]] == 0)
    assert np.all(res["first_match_rank"][g["rank-1 miss"]] > 0)
    assert np.all(res["num_matches"][g["no match"]] == 0)


def test_compare_rankings_counts_and_examples():
    # 3 queries, identity = query index, one match each in camera 1; queries in camera 0
    g_pids = np.array([0, 1, 2, 9, 9])
    g_cams = np.array([1, 1, 1, 1, 1])
    q_pids, q_cams = np.array([0, 1, 2]), np.array([0, 0, 0])
    before = np.array([[0.1, 0.9, 0.9, 0.5, 0.6],   # q0: hit
                       [0.9, 0.7, 0.9, 0.5, 0.6],   # q1: match at 3
                       [0.9, 0.9, 0.1, 0.5, 0.6]])  # q2: hit
    after = np.array([[0.1, 0.9, 0.9, 0.5, 0.6],    # q0 unchanged
                      [0.9, 0.1, 0.9, 0.5, 0.6],    # q1 fixed
                      [0.9, 0.9, 0.7, 0.5, 0.6]])   # q2 broken (match at 3)
    b = evaluate_rank(before, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    a = evaluate_rank(after, q_pids, g_pids, q_cams, g_cams, max_rank=3)
    c = compare_rankings(b, a)
    assert (c["fixed"], c["broken"]) == (1, 2)
    assert (c["rank1_fixed"], c["rank1_broken"]) == (1, 1)
    assert (c["first_better"], c["first_worse"], c["first_same"]) == (1, 1, 1)
    assert (c["ap_up"], c["ap_down"]) == (1, 1)
    assert c["ap_change"][1] == pytest.approx(1 - 1 / 3) and c["ap_change"][2] == pytest.approx(1 / 3 - 1)
    with pytest.raises(ValueError):
        compare_rankings(b, evaluate_rank(before[:2], q_pids[:2], g_pids, q_cams[:2], g_cams, max_rank=3))


# -- figures and the browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_eval(smoke_ctx):
    from reidkit.retrieval.distances import pairwise_distance
    from reidkit.retrieval.rerank import re_ranking

    ds = smoke_ctx.dataset()
    f = next(iter(smoke_ctx.eval_features().values()))  # the ImageNet features
    dist = np.asarray(pairwise_distance(f["qf"], f["gf"], device="cpu"))
    rr = np.asarray(re_ranking(dist, pairwise_distance(f["qf"], f["qf"], device="cpu"),
                               pairwise_distance(f["gf"], f["gf"], device="cpu"), device="cpu"))
    return ds, dist, rr


def test_figures(smoke_eval):
    import matplotlib.pyplot as plt

    from reidkit import viz

    ds, dist, rr = smoke_eval
    q_pids = np.array([r.pid for r in ds.query]); g_pids = np.array([r.pid for r in ds.gallery])
    q_cams = np.array([r.camid for r in ds.query]); g_cams = np.array([r.camid for r in ds.gallery])
    b = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams)
    a = evaluate_rank(rr, q_pids, g_pids, q_cams, g_cams)
    c = compare_rankings(b, a)
    q = c["fixed"]
    figs = [viz.precision_recall_figure(precision_recall(dist[q], q_pids[q], q_cams[q], g_pids, g_cams)),
            viz.rank_shift_figure(c),
            viz.ranked_comparison({"plain": dist, "re-ranked": rr}, ds.query, ds.gallery, q, topk=5),
            viz.ranked_query_figure(dist, ds.query, ds.gallery, q, topk=5)]
    assert len(figs[2].axes) == 2 * 6
    for fig in figs:
        assert isinstance(fig, matplotlib.figure.Figure)
        plt.close(fig)
    nomatch = int(np.flatnonzero(b["num_matches"] == 0)[0])
    assert viz.match_summary(dist[nomatch], q_pids[nomatch], q_cams[nomatch], g_pids, g_cams).startswith("no true match")
    line = viz.match_summary(dist[q], q_pids[q], q_cams[q], g_pids, g_cams)
    assert line.startswith(f"{b['num_matches'][q]} true matches")


def _shown(info) -> int:
    """The query index the browser's info line names."""
    import re

    return int(re.search(r"query (\d+)</b>", info.value).group(1))


def test_ranked_browser_filters_and_responds(smoke_eval):
    import ipywidgets as widgets

    from reidkit import viz

    ds, dist, rr = smoke_eval
    w = viz.ranked_browser(dist, ds.query, ds.gallery, topk=4, title="t", reranked=rr)
    which, show, slider, k, info = w.children[:5]
    assert isinstance(slider, widgets.IntSlider) and slider.layout.width == "100%"
    assert not slider.continuous_update and not k.continuous_update
    assert [v for _, v in show.options] == ["all", "rank-1 hit", "rank-1 miss", "no match"]
    q_pids = np.array([r.pid for r in ds.query]); g_pids = np.array([r.pid for r in ds.gallery])
    q_cams = np.array([r.camid for r in ds.query]); g_cams = np.array([r.camid for r in ds.gallery])
    groups = queries_by_outcome(evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams))
    assert slider.max == len(ds.query) - 1
    # the slider changes what is shown
    before = info.value
    slider.value = 5
    assert info.value != before and _shown(info) == 5
    # the filter restricts the slider to that group and jumps to its first query
    show.value = "rank-1 miss"
    assert slider.max == len(groups["rank-1 miss"]) - 1 and slider.value == 0
    assert _shown(info) == groups["rank-1 miss"][0]
    slider.value = 1
    assert _shown(info) == groups["rank-1 miss"][1]
    # switching the distance keeps the group's meaning (re-ranked misses)
    which.value = "re-ranked"
    groups_rr = queries_by_outcome(evaluate_rank(rr, q_pids, g_pids, q_cams, g_cams))
    assert slider.max == len(groups_rr["rank-1 miss"]) - 1
    assert _shown(info) in groups_rr["rank-1 miss"]
    before = info.value
    k.value = 7
    assert info.value == before  # top-k re-renders the figure, the match line stays


# -- the worked solutions --------------------------------------------------------------------------


def test_exercise_1_chance_level(sol, smoke_ctx, capsys):
    r = sol.exercise_1(smoke_ctx, trials=3)
    assert 0 < r["chance_rank1"] < 0.2 and 0 < r["chance_mAP"] < 0.2
    assert r["chance_rank1"] == pytest.approx(r["expected_rank1"], abs=0.05)   # the formula predicts it
    assert r["model_mAP"] > 2 * r["chance_mAP"]
    assert r["model"] == "ImageNet features"
    assert f"{r['chance_rank1']:.1%}" in capsys.readouterr().out


def test_exercise_2_one_late_match(sol, smoke_ctx, capsys):
    r = sol.exercise_2(smoke_ctx)
    assert r["INP"] < r["AP"]
    n = len(r["positions"])
    assert r["one_late_positions"][:-1] == list(range(1, n))
    assert r["one_late_AP"] > 0.9 and r["one_late_INP"] < 0.1  # mAP barely moves, INP collapses
    assert r["one_late_INP"] == pytest.approx(n / r["one_late_positions"][-1])
    assert r["falls_more"] == "INP" and "INP falls more" in capsys.readouterr().out


def test_exercise_3_fixed_and_broken(sol, smoke_ctx, capsys):
    r = sol.exercise_3(smoke_ctx)
    assert r["mAP"][1] > r["mAP"][0]  # re-ranking raises mAP on the sample
    fx, br = r["fixed"], r["broken"]
    assert fx["first"][0] > 1 and fx["first"][1] == 1 and fx["AP"][1] > fx["AP"][0]
    assert br["first"][0] == 1 and br["first"][1] > 1 and br["AP"][1] < br["AP"][0]
    assert fx["top10"]["re-ranked"][0][0] == fx["pid"] and br["top10"]["re-ranked"][0][0] != br["pid"]
    assert r["single_identity_top8_re-ranked"] > r["single_identity_top8_plain"]
    assert r["blocks"]["fixed"][0] == fx["pid"] and r["blocks"]["broken"][0] != br["pid"]
    out = capsys.readouterr().out
    assert "more common" in out and "does not" not in out


def test_exercise_4_one_match_protocol(sol, smoke_ctx, capsys):
    r = sol.exercise_4(smoke_ctx)
    for rank_lib, rank_hand, ap_lib, ap_hand in r["checked_with_sysu30k_evaluate"]:
        assert rank_lib == rank_hand and ap_lib == pytest.approx(ap_hand)
    assert r["one_match_rank1"] < r["market_rank1"]
    assert r["one_match_mAP_trapezoid"] < r["one_match_mAP_standard"]
    pos = r["positions"]
    # trapezoid = half the usual AP for every miss, equal for hits
    expected = (np.sum(pos == 0) + np.sum(0.5 / (pos[pos > 0] + 1))) / len(pos)
    assert r["one_match_mAP_trapezoid"] == pytest.approx(expected)
    out = capsys.readouterr().out
    assert "points lower" in out and "DO NOT" not in out


def test_exercise_5_compares_the_rows(sol, smoke_ctx, capsys):
    r = sol.exercise_5(smoke_ctx, lambdas=(0.3, 1.0), k1s=(20,))
    by = {row["lambda"]: row for row in r["rows"]}
    assert by[1.0]["mAP"] == pytest.approx(r["plain"]["mAP"])
    assert by[1.0]["rank1"] == pytest.approx(r["plain"]["rank1"])
    assert by[0.3]["mAP"] > r["plain"]["mAP"]
    assert r["best"] == max(r["rows"], key=lambda row: row["mAP"]) and r["best"]["lambda"] == 0.3
    assert "gives the plain ranking back" in capsys.readouterr().out


def test_solutions_load_without_work(capsys):
    """``%run solutions/06_evaluation.py`` defines the exercises and runs nothing."""
    import runpy

    from conftest import SOLUTIONS

    names = runpy.run_path(str(SOLUTIONS / "06_evaluation.py"))
    assert all(callable(names[f"exercise_{k}"]) for k in range(1, 6))
    assert capsys.readouterr().out == ""
