"""The run-folder contract the notebooks rely on: what an earlier notebook left, or the same thing
computed here (features, pseudo-labels, every model's test features), key figures for the report,
and the ranked list under the Market protocol."""

import json
import os

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from reidkit.course.runctx import RunContext, latest_complete_run  # noqa: E402
from reidkit.hhcl.clustering import dbscan_labels  # noqa: E402
from reidkit.retrieval.inspect import ranked_gallery  # noqa: E402
from reidkit.retrieval.jaccard import jaccard_distance  # noqa: E402


def test_features_come_from_notebook_02_when_it_ran(smoke_ctx):
    saved = np.load(smoke_ctx.run_dir / "02_backbone" / "features_train.npy")
    assert np.array_equal(smoke_ctx.features("train"), saved)
    assert saved.shape == (len(smoke_ctx.dataset().train), 1280)


def _run_with_notebook_02(smoke_ctx, tmp_path, name):
    """A fresh run folder holding only notebook 02's direct-transfer arrays."""
    ctx = RunContext.open("smoke", None, str(tmp_path / "run"), "cpu", 1, name=name)
    (tmp_path / "run" / "02_backbone").mkdir()
    for split in ("train", "query", "gallery"):
        np.save(tmp_path / "run" / "02_backbone" / f"features_{split}.npy", smoke_ctx.features(split))
    return ctx


def test_pseudo_labels_are_clustered_here_with_the_profile_when_03_did_not_run(smoke_ctx, tmp_path, capsys):
    ctx = _run_with_notebook_02(smoke_ctx, tmp_path, "04_hybrid_contrast")
    labels = ctx.pseudo_labels()
    assert "notebook 03 has not run" in capsys.readouterr().out
    c = ctx.profile.cluster
    expected = dbscan_labels(jaccard_distance(ctx.features("train"), k1=c.k1, k2=c.k2, device="cpu"), eps=c.eps,
                             min_samples=c.min_samples)
    assert np.array_equal(labels, expected) and labels.max() >= 1
    (tmp_path / "run" / "03_clustering").mkdir()
    np.save(tmp_path / "run" / "03_clustering" / "pseudo_labels.npy", np.zeros(len(labels), dtype=int))
    assert not ctx.pseudo_labels().any()                  # notebook 03's labels win once they exist


def test_eval_features_fall_back_to_imagenet_features_then_read_the_run_folder(smoke_ctx, tmp_path):
    ctx = _run_with_notebook_02(smoke_ctx, tmp_path, "06_evaluation")   # no eval_*.npz yet
    found = ctx.eval_features()
    assert list(found) == ["ImageNet features"] and set(found["ImageNet features"]) == {"qf", "gf", "tf"}
    qf = found["ImageNet features"]["qf"]
    np.savez(tmp_path / "run" / "02_backbone" / "eval_direct_transfer.npz", qf=qf, gf=qf[:5])
    (tmp_path / "run" / "04_hybrid_contrast").mkdir()
    np.savez(tmp_path / "run" / "04_hybrid_contrast" / "eval_HHCL_CMhybrid.npz", qf=qf, gf=qf)
    found = ctx.eval_features()
    assert list(found) == ["ImageNet features", "HHCL CMhybrid"]          # notebook order, names readable
    assert found["ImageNet features"]["gf"].shape == (5, qf.shape[1]) and "tf" not in found["HHCL CMhybrid"]


def test_key_figures_reach_the_metrics_and_savefig_prints_nothing(tmp_path, capsys):
    ctx = RunContext.open("smoke", None, str(tmp_path / "run"), "cpu", 1, name="03_clustering")
    fig = plt.figure()
    assert ctx.savefig(fig, "eps_sweep", key=True) is None
    assert ctx.savefig(fig, "detail") is None
    plt.close(fig)
    assert ctx.write_metrics({"eps": 0.6}) is None
    metrics = json.loads((ctx.out / "metrics.json").read_text())
    assert metrics["figures"] == ["03_clustering/figures/eps_sweep.png"]
    assert (ctx.out / "figures" / "detail.png").is_file()
    assert "PosixPath" not in capsys.readouterr().out


def test_ranked_gallery_removes_same_camera_matches_and_keeps_ties_in_order():
    g_pids = np.array([7, 7, 3, 7, 5, 3])
    g_cams = np.array([0, 1, 0, 0, 2, 1])
    dist = np.array([0.1, 0.5, 0.5, 0.0, 0.5, 0.2])
    order = ranked_gallery(dist, 7, 0, g_pids, g_cams)
    assert order.tolist() == [5, 1, 2, 4]               # 0 and 3 are junk; the 0.5 tie stays in gallery order
    assert ranked_gallery(dist, 7, 0, g_pids, g_cams, topk=2).tolist() == [5, 1]
    assert ranked_gallery(dist, 3, 2, g_pids, g_cams).tolist() == [3, 0, 5, 1, 2, 4]


def _fake_run(base, name, profile, report=True, mtime=None):
    run = base / name
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"parameters": {"PROFILE": profile}}))
    if report:
        (run / "report.md").write_text("# report\n")
        if mtime is not None:
            os.utime(run / "report.md", (mtime, mtime))
    return run


def test_a_notebook_opened_by_hand_reads_the_latest_complete_run_of_its_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REIDKIT_RUNS", str(tmp_path))
    assert latest_complete_run("smoke") is None
    ctx = RunContext.open("smoke", None, None, "cpu", 1, name="t")
    assert ctx.run_dir == (tmp_path / "smoke-interactive").resolve()
    assert "no complete `make reproduce` run" in capsys.readouterr().out

    old = _fake_run(tmp_path, "smoke-20261201-100000", "smoke", mtime=1_000)
    new = _fake_run(tmp_path, "smoke-20261202-100000", "smoke", mtime=2_000)
    _fake_run(tmp_path, "smoke-20261203-100000", "smoke", report=False)        # still running, or failed
    _fake_run(tmp_path, "smoke-20261204-100000", "workshop", mtime=3_000)       # another profile's run
    _fake_run(tmp_path, "workshop-20261205-100000", "workshop", mtime=4_000)
    assert latest_complete_run("smoke") == new and old != new
    ctx = RunContext.open("smoke", None, "", "cpu", 1, name="t")
    assert ctx.run_dir == new.resolve()
    assert f"latest complete run of profile smoke, {new.resolve()}" in capsys.readouterr().out
    assert RunContext.open("smoke", None, str(old), "cpu", 1, name="t").run_dir == old.resolve()  # RUN_DIR wins
