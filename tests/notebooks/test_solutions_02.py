"""The worked solutions of notebook 02 (notebooks/solutions/02_backbone.py) on the smoke profile,
and the figure helpers of reidkit/viz/backbone.py that the notebook uses."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from reidkit import viz  # noqa: E402
from reidkit.nets.backbones import GeneralizedMeanPooling  # noqa: E402
from reidkit.nets.features import pixel_features  # noqa: E402
from reidkit.retrieval.inspect import camera_share_by_rank  # noqa: E402

SOLUTION = "02_backbone"  # the conftest fixture `sol` loads notebooks/solutions/<SOLUTION>.py


def _check_interval(out):
    lo, hi = out["interval"]
    assert lo <= hi
    assert out["verdict"] == ("a real gain" if lo > 0 else "a real loss" if hi < 0 else "within the noise")
    assert out["verdict"] in out["explanation"]                      # the printed conclusion follows the numbers


def test_tracklet_interval_resamples_whole_tracklets(sol, smoke_ctx):
    ds = smoke_ctx.dataset()
    n = len(ds.query)
    a = np.full(n, 0.2)
    assert sol.tracklet_interval(a, a + 0.1, ds.query) == pytest.approx((0.1, 0.1))   # a constant gain
    b = a.copy()
    b[[i for i, r in enumerate(ds.query) if r.tracklet == ds.query[0].tracklet]] += 0.5  # one tracklet gains
    lo, hi = sol.tracklet_interval(a, b, ds.query)
    assert lo >= 0 and hi > lo and sol.verdict((lo, hi)) in ("a real gain", "within the noise")
    assert sol.verdict((-0.2, -0.1)) == "a real loss" and sol.verdict((-0.1, 0.1)) == "within the noise"


def test_exercise_1_predict_then_measure_gem(sol, smoke_ctx, capsys):
    out = sol.exercise_1(smoke_ctx, ps=(3.0, 8.0), prediction={3.0: "up", 8: "down"})
    printed = capsys.readouterr().out
    assert out["kit_max_abs_difference"] < 1e-4                  # the one-line GeM is the kit's GeM
    assert out["p_values"] == [3.0, 8.0]
    ds = smoke_ctx.dataset()
    plain = sol.score(smoke_ctx.features("query"), smoke_ctx.features("gallery"), ds.query, ds.gallery)
    assert abs(out["average"]["mAP"] - plain["mAP"]) < 0.01     # p = 1 + normalised = the ImageNet features
    for p in (3.0, 8.0):
        assert 0.05 < out["gem"][p]["mAP"] < 1
        assert np.isclose(out["mAP_difference"][p], out["gem"][p]["mAP"] - out["average"]["mAP"])
        lo, hi = out["interval"][p]
        assert lo <= hi
        measured = {"a real gain": "up", "a real loss": "down"}.get(out["verdict"][p], "no change")
        assert out["prediction_right"][p] == (measured == {3.0: "up", 8.0: "down"}[p])
        assert out["verdict"][p] in printed
    assert printed.strip() == out["explanation"].strip()
    assert sol.exercise_1(smoke_ctx, ps=(3.0,), prediction={})["prediction_right"] == {3.0: None}


def test_gem_by_hand_matches_the_kit(sol):
    fmap = torch.rand(2, 5, 4, 3) * 4
    for p in (1.0, 3.0, 7.5):
        kit = GeneralizedMeanPooling(p=p)(fmap).flatten(1).detach()
        assert torch.allclose(sol.gem(fmap, p), kit, rtol=1e-5)
    assert torch.allclose(sol.gem(fmap, 1.0), fmap.mean(dim=(2, 3)), atol=1e-5)


def test_exercise_2_worst_query(sol, smoke_ctx, capsys):
    import matplotlib.pyplot as plt

    out = sol.exercise_2(smoke_ctx)
    assert capsys.readouterr().out.strip() == out["explanation"]
    plt.close(out["figure"])
    assert np.isclose(out["AP"], out["AP_by_sorting"], atol=1e-6)   # evaluate_rank's AP = AP by sorting
    assert out["first_match_rank"] > 1 and out["num_matches"] >= 1
    assert out["camera"] not in out["match_cameras"]               # junk removed: matches from other cameras
    ds = smoke_ctx.dataset()
    from reidkit.retrieval.distances import pairwise_distance
    from reidkit.retrieval.market import evaluate_rank
    q_pids, q_cams = sol.ids_and_cams(ds.query)
    g_pids, g_cams = sol.ids_and_cams(ds.gallery)
    res = evaluate_rank(pairwise_distance(smoke_ctx.features("query"), smoke_ctx.features("gallery")),
                        q_pids, g_pids, q_cams, g_cams, max_rank=10)
    assert out["AP"] <= res["AP"][res["num_matches"] > 0].min() + 1e-12   # it is the worst
    assert out["pid"] not in out["top10_pids"][: out["first_match_rank"] - 1]
    assert 0 <= out["wrong_top10_from_query_camera"] <= 1 and 0 < out["chance_query_camera"] < 1
    assert 1 <= out["wrong_top10_people"] <= 10
    assert out["first_match_rank"] <= out["gallery_size_after_junk"]
    share, chance = out["wrong_top10_from_query_camera"], out["chance_query_camera"]
    expected = ("own camera far more often" if share > max(1.5 * chance, chance + 0.15) else
                "mostly come from other cameras" if share < chance / 1.5 else "about as often as chance")
    assert expected in out["explanation"]


def test_exercise_3_last_stride(sol, smoke_ctx, capsys):
    out = sol.exercise_3(smoke_ctx)
    assert capsys.readouterr().out.strip() == out["explanation"]
    (c1, h1, w1), (c2, h2, w2) = out["map_shape"][1], out["map_shape"][2]
    assert c1 == c2 and (h1, w1) == (2 * h2, 2 * w2)              # 128x64: 8x4 against 4x2
    assert (h1, w1) == (smoke_ctx.profile.data.height // 16, smoke_ctx.profile.data.width // 16)
    assert out["cells"][1] == 4 * out["cells"][2]
    for stride in (1, 2):
        assert 0.05 < out["scores"][stride]["mAP"] < 1
    assert np.isclose(out["mAP_gain_of_stride_1"], out["scores"][1]["mAP"] - out["scores"][2]["mAP"])
    assert abs(out["mAP_gain_of_stride_1"]) < 0.15
    _check_interval(out)
    assert ("changes little" in out["explanation"]) == (out["verdict"] == "within the noise")


def test_exercise_4_flip(sol, smoke_ctx, capsys):
    out = sol.exercise_4(smoke_ctx)
    assert capsys.readouterr().out.strip() == out["explanation"]
    assert out["invariance_error"] < 1e-5                          # mirrored image, same feature
    assert np.allclose(out["norms"], 1, atol=1e-4)
    assert 0.05 < out["flip"]["mAP"] < 1
    assert out["flip"]["mAP"] != out["plain"]["mAP"]              # the features did change
    assert abs(out["mAP_difference"]) < 0.1
    _check_interval(out)


def test_exercise_5_fitted_neck(sol, smoke_ctx, capsys):
    out = sol.exercise_5(smoke_ctx)
    assert capsys.readouterr().out.strip() == out["explanation"]
    assert out["network_difference"] < 1e-4                     # numpy neck = the network's neck, fitted
    assert out["train_images"] == 256 and out["train_identities"] == 16
    sc = out["scores"]
    ds = smoke_ctx.dataset()
    plain = sol.score(smoke_ctx.features("query"), smoke_ctx.features("gallery"), ds.query, ds.gallery)
    assert abs(sc["untouched neck"]["mAP"] - plain["mAP"]) < 0.01  # the untouched neck is the ImageNet features
    assert sc["fitted neck"]["mAP"] != sc["untouched neck"]["mAP"]
    assert 0.05 < sc["fitted neck"]["mAP"] < 1 and 0.05 < sc["centred only"]["mAP"] < 1
    assert out["mean_cosine_before"] > 0.3                       # positive activations: one shared direction
    _check_interval(out)
    label = {"a real gain": "helps", "a real loss": "hurts"}.get(out["verdict"], "changes little")
    assert out["explanation"].split(":")[0].endswith(label)
    centring_does_more = abs(out["mAP_from_centring"]) >= abs(out["mAP_difference"] - out["mAP_from_centring"])
    assert ("comes from subtracting the mean" in out["explanation"]) == centring_does_more


# -- the figure helpers of the notebook -----------------------------------------------------------
def test_gem_share_moves_from_average_to_max():
    fmap = np.full((3, 4, 2), 0.5, dtype=np.float32)
    fmap[:, 1, 1] = 3.0
    s1, s8 = viz.gem_share(fmap, 1.0), viz.gem_share(fmap, 8.0)
    assert s1.shape == (4, 2) and np.isclose(s1.sum(), 1) and np.isclose(s8.sum(), 1)
    assert np.isclose(s1[1, 1], 3.0 / (3.0 + 7 * 0.5))            # p = 1: share in proportion to x
    assert s8[1, 1] > 0.99                                          # large p: the peak takes it all
    vals = viz.gem_values(fmap, [1.0, 3.0, np.inf])
    assert np.allclose(vals[0], fmap.reshape(3, -1).mean(1), atol=1e-6)
    assert np.allclose(vals[2], 3.0) and np.all(vals[0] < vals[1]) and np.all(vals[1] < vals[2])
    with pytest.raises(ValueError):
        viz.gem_share(np.zeros((2, 3, 3)), 3.0)


def test_camera_share_by_rank():
    # query 0 (id 0, cam 0): the two nearest other-person images are from cam 0, the far ones not
    dist = np.array([[0.1, 0.2, 0.9, 1.0, 0.05]])
    g_pids = np.array([1, 2, 3, 4, 0]); g_cams = np.array([0, 0, 1, 1, 1])
    share, chance = camera_share_by_rank(dist, [0], g_pids, [0], g_cams, max_k=10)
    assert len(share) == 4 and np.allclose(share, [1, 1, 2 / 3, 0.5]) and chance == 0.5


def test_local_imagenet_weights_never_downloads(monkeypatch, tmp_path):
    import reidkit.nets.imagenet as im
    from reidkit.nets.imagenet import local_imagenet_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(im, "_probe", lambda *a, **k: pytest.fail("local_imagenet_weights must not go online"))
    assert local_imagenet_weights("resnet50") is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / im.HUB_FILES["resnet50"][-1]).write_bytes(b"")
    assert local_imagenet_weights("resnet50") == tmp_path / "checkpoints" / im.HUB_FILES["resnet50"][-1]
    assert local_imagenet_weights("mobilenetv2") == im.deep_sort_mobilenetv2_path()


def test_pixel_features_and_figures(smoke_ctx):
    import matplotlib.pyplot as plt

    ds = smoke_ctx.dataset()
    px = pixel_features(ds.query[:5], smoke_ctx.profile)
    assert px.shape == (5, 3 * 16 * 8) and np.allclose(np.linalg.norm(px, axis=1), 1, atol=1e-5)
    fmap = np.random.default_rng(0).random((16, 8, 4)).astype(np.float32)
    path = ds.query[0].path
    figs = [viz.pipeline_diagram("mobilenetv2", (128, 64), (1280, 8, 4), "gem"),
            viz.stride_maps_figure(path, {"a": fmap[:, ::2, ::2], "b": fmap}, (128, 64)),
            viz.gem_figure(path, fmap, 4.0, size=(128, 64)),
            viz.baseline_figure({"x": {"mAP": 0.2, "rank1": 0.3}, "y": {"mAP": 0.1, "rank1": 0.2}}, {"x": 2_000_000})]
    feats = np.asarray(smoke_ctx.features("query"))[:40], np.asarray(smoke_ctx.features("gallery"))[:60]
    from reidkit.retrieval.distances import pairwise_distance
    q_pids, q_cams = np.array([r.pid for r in ds.query[:40]]), np.array([r.camid for r in ds.query[:40]])
    g_pids, g_cams = np.array([r.pid for r in ds.gallery[:60]]), np.array([r.camid for r in ds.gallery[:60]])
    figs.append(viz.pair_distance_figure(pairwise_distance(*feats), q_pids, g_pids, q_cams, g_cams, title="t"))
    for fig in figs:
        assert fig.axes
        plt.close(fig)


def test_gem_widget_slider_redraws_at_the_new_p(smoke_ctx, monkeypatch):
    pytest.importorskip("ipywidgets")
    import reidkit.viz.backbone as vb

    drawn = []
    real = vb.gem_figure
    monkeypatch.setattr(vb, "gem_figure", lambda path, fmap, p, **kw: drawn.append(p) or real(path, fmap, p, **kw))
    fmap = np.random.default_rng(1).random((16, 8, 4)).astype(np.float32)
    w = viz.gem_widget(smoke_ctx.dataset().query[0].path, fmap, p=3.0, size=(128, 64))
    slider, out = w.children
    assert slider.continuous_update is False and slider.min == 1.0
    slider.value = 12.0
    assert drawn == [3.0, 12.0]                                    # one redraw per move, at the slider's p
    assert not np.allclose(viz.gem_share(fmap, 3.0), viz.gem_share(fmap, 12.0))   # and it looks different
