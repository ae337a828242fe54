"""Notebook 07 (cameras): the worked solutions of the exercises on the smoke profile, and the notebook's
optional part (a folder of real two-camera training runs) run headless on made-up run histories."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

SOLUTION = "07_cameras"  # the conftest fixture `sol` loads notebooks/solutions/<SOLUTION>.py


def _truth(ctx):
    ds = ctx.dataset()
    return np.array([r.pid for r in ds.train]), np.array([r.camid for r in ds.train])


def test_exercise_1_camera_share_of_the_variance(smoke_ctx, sol):
    r = sol.exercise_1(smoke_ctx)
    rho, ratio = r["rho"], r["median_ratio"]
    assert 0 <= rho["centred"] < 1e-3 < rho["shuffled"] < rho["raw"] < 1     # the camera is not noise
    pids, cams = _truth(smoke_ctx)
    assert r["ids_per_camera"] == {int(c): len(set(pids[cams == c])) for c in np.unique(cams)}
    assert r["cameras_with_few_people"] == sorted(c for c, n in r["ids_per_camera"].items() if n <= 3)
    assert r["centring_brought_closer"] == (ratio["centred"] < ratio["raw"])
    # on the sample, cameras that see one to three people make centring remove identity too
    assert not r["centring_brought_closer"] and len(r["cameras_with_few_people"]) >= 4
    text = r["conclusion"]
    assert f"{rho['raw']:.1%}" in text and f"{rho['shuffled']:.1%}" in text and f"{rho['centred']:.2%}" in text
    assert f"{ratio['raw']:.3f} -> {ratio['centred']:.3f}" in text
    assert ("farther" in text) == (not r["centring_brought_closer"])


def test_exercise_2_inter_camera_neighbours(smoke_ctx, sol):
    r = sol.exercise_2(smoke_ctx)
    rows, plain = r["rows"], r["plain"]
    assert [x["k1_inter"] for x in rows] == [0, 2, 5, 10, 20]
    for x in rows + [plain]:
        assert 0 <= x["purity"] <= 1 and 0 <= x["join_rate"] <= 1 and x["ids_joined"] <= x["ids_multi_camera"] == 4
    assert r["best"]["ari"] == max(x["ari"] for x in rows)
    # more inter-camera neighbours join more cross-camera pairs, and more strangers
    assert rows[-1]["join_rate"] >= rows[0]["join_rate"] > plain["join_rate"]
    assert rows[-1]["purity"] <= rows[0]["purity"] < plain["purity"]
    assert r["best"]["ari"] < plain["ari"]            # the sample: most people meet one camera
    text = r["conclusion"]
    assert f"from {rows[0]['join_rate']:.3f} to {rows[-1]['join_rate']:.3f}" in text
    assert f"{r['best']['ari']:.3f} at k1_inter={r['best']['k1_inter']}" in text
    assert "below the plain clustering's" in text and f"{plain['ari']:.3f}" in text


def test_exercise_3_clqe_costs_the_purity(smoke_ctx, sol):
    r = sol.exercise_3(smoke_ctx)
    both, no_clqe, neither = r["rows"]
    assert [x["distance"] for x in r["rows"]] == ["CKRNNs + CLQE", "CKRNNs + LQE", "KRNNs + LQE"]
    # for a person seen by one camera, every inter-camera row shows somebody else, by construction
    assert r["stranger_share"]["one_camera"] == 1.0
    assert 0 < r["stranger_share"]["several_cameras"] < 1
    assert r["purity_cost"]["CLQE"] == pytest.approx(no_clqe["purity"] - both["purity"])
    assert r["purity_cost"]["CKRNNs"] == pytest.approx(neither["purity"] - no_clqe["purity"])
    assert r["culprit"] == "CLQE" and no_clqe["purity"] > both["purity"] + 0.3
    assert both["join_rate"] > no_clqe["join_rate"]
    text = r["conclusion"]
    assert text.count("CLQE costs the most purity") == 1
    for x in r["rows"]:
        assert f"{x['purity']:.3f}" in text and f"{x['join_rate']:.3f}" in text
    assert "100% show a stranger" in text


def test_exercise_4_proxies_against_clusters(smoke_ctx, sol):
    from reidkit.config import apply_overrides
    from reidkit.hhcl.method import cluster

    r = sol.exercise_4(smoke_ctx)
    _, cams = _truth(smoke_ctx)
    for name, ov in (("plain", sol.PLAIN), ("recipe", sol.RECIPE)):
        d = r[name]
        labels, _ = cluster(smoke_ctx.features("train"), apply_overrides(smoke_ctx.profile, ov), "cpu", cams)
        per = [len(set(cams[labels == k])) for k in range(int(labels.max()) + 1)]
        assert d["cameras_per_cluster"] == per and d["clusters"] == len(per)
        assert d["proxies"] - d["clusters"] == sum(n - 1 for n in per)          # one extra per camera joined
        assert d["multi_camera_clusters"] == sum(n > 1 for n in per)
        kept = labels >= 0
        assert d["pullable_share"] == pytest.approx(np.mean(np.array(per)[labels[kept]] > 1))
        assert f"{d['proxies']} proxies for {d['clusters']} clusters" in r["conclusion"]
    assert r["plain"]["proxies"] >= r["plain"]["clusters"]
    assert r["recipe"]["pullable_share"] >= r["plain"]["pullable_share"]
    assert ("more to work on" in r["conclusion"]) == (r["recipe"]["pullable_share"] > r["plain"]["pullable_share"])


# ---------------------------------------------------------------------------------------------
# the notebook's optional part: curves of real runs when CAMERA_RUN_DIR holds some

def _history(join_rates, test_map):
    hist = []
    for e, j in enumerate(join_rates):
        h = {"epoch": e, "clusters": 10, "outliers": 0,
             "labels": {"cross_camera_join_rate": j, "ari": 0.5 + 0.1 * e}}
        if e == len(join_rates) - 1:
            h["test"] = {"mAP": test_map, "rank1": test_map}
        hist.append(h)
    return hist


def test_notebook_plots_camera_runs_when_given(smoke_ctx, tmp_path):
    """07 run headless on the smoke profile with a CAMERA_RUN_DIR of two made-up runs: it plots their
    per-epoch label quality and prints their test mAP (the smoke chain covers the run without one)."""
    import nbformat
    import papermill as pm

    from reidkit.course.reproduce import notebooks_dir

    run_dir = tmp_path / "run"
    shutil.copytree(smoke_ctx.run_dir / "02_backbone", run_dir / "02_backbone")   # skip the extraction
    runs = tmp_path / "cameras"
    for name, joins, m in (("plain", [0.05, 0.06], 0.301), ("camera-aware", [0.05, None, 0.4], 0.352)):
        (runs / name).mkdir(parents=True)
        (runs / name / "history.json").write_text(json.dumps(_history(joins, m)))
    out = tmp_path / "07.ipynb"
    nb = notebooks_dir() / "07_cameras.ipynb"
    pm.execute_notebook(str(nb), str(out), kernel_name="python3", cwd=str(nb.parent), progress_bar=False,
                        log_output=False, parameters={"PROFILE": "smoke", "RUN_DIR": str(run_dir), "DEVICE": "cpu",
                                                      "INTERACTIVE": False, "CAMERA_RUN_DIR": str(runs)})
    text = "\n".join(o.get("text", "") for c in nbformat.read(out, as_version=4).cells
                     for o in c.get("outputs", []) if o.get("output_type") == "stream")
    assert "plain: 2 epochs; test mAP at the last evaluated epoch: 30.1" in text
    assert "camera-aware: 3 epochs; test mAP at the last evaluated epoch: 35.2" in text
    assert (run_dir / "07_cameras" / "figures" / "camera_runs.png").is_file()
    metrics = json.loads((run_dir / "07_cameras" / "metrics.json").read_text())
    assert "07_cameras/figures/camera_runs.png" in metrics["figures"]
