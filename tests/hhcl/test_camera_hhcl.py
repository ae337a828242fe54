"""Camera-aware HHCL on the engine: the ``camera`` section's parts (centring, CA-Jaccard, camera
proxies, the balanced sampler) each reach the kernels they name, ``--camera-aware`` turns on the
recipe and records it, pseudo-label quality lands in history.json and train.log every epoch, and
the supervised upper bound trains HHCL's recipe on the true identities."""

from argparse import Namespace

import numpy as np
import pytest
import torch
from _tiny import QUIET, one_torch_thread, tiny_dataset, tiny_hhcl_profile

from reidkit.config import CAMERA_AWARE_RECIPE, apply_overrides, camera_parts, get_profile
from reidkit.core.io import CheckpointError, read_train_checkpoint
from reidkit.course.reproduce import overrides_from_args
from reidkit.data.records import relabel
from reidkit.hhcl.clustering import dbscan_labels
from reidkit.hhcl.method import HHCL, cluster, train_hhcl
from reidkit.hhcl.supervised import Softmax, Supervised, train_supervised
from reidkit.methods import gpu_cost
from reidkit.nets.released import load_released
from reidkit.retrieval.ca_jaccard import ca_jaccard_distance
from reidkit.retrieval.camera_bias import camera_centred
from reidkit.retrieval.jaccard import jaccard_distance

pytestmark = pytest.mark.usefixtures("one_thread")  # torch at one thread (conftest)


def _blobs(seed=0):
    """60 unit features: 12 people x 5 images over 3 cameras, each camera shifting every feature."""
    rng = np.random.default_rng(seed)
    pids = np.repeat(np.arange(12), 5)
    cams = np.tile(np.arange(5) % 3, 12)
    x = rng.normal(size=(12, 32))[pids] + 0.4 * rng.normal(size=(60, 32)) + 1.5 * rng.normal(size=(3, 32))[cams]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), pids, cams


@pytest.mark.parametrize("parts", [{}, {"camera.centre": True}, {"camera.jaccard": "ca"},
                                   {"camera.centre": True, "camera.jaccard": "ca"}])
def test_cluster_runs_the_kernels_the_camera_section_names(parts):
    x, _, cams = _blobs()
    prof = apply_overrides("smoke", {"cluster.k1": 8, "cluster.k2": 3, "cluster.eps": 0.5, **parts})
    labels, times = cluster(x, prof, "cpu", cams, epoch=3)
    y = camera_centred(x, cams) if parts.get("camera.centre") else x
    c = prof.camera
    if parts.get("camera.jaccard") == "ca":
        dist = ca_jaccard_distance(y, cams, k1=8, k2=3, k1_intra=c.k1_intra, k1_inter=c.k1_inter,
                                   k2_intra=c.k2_intra, k2_inter=c.k2_inter, epoch=3, device="cpu")
    else:
        dist = jaccard_distance(y, k1=8, k2=3, device="cpu")
    np.testing.assert_array_equal(labels, dbscan_labels(dist, eps=0.5, min_samples=prof.cluster.min_samples))
    assert set(times) == {"t_jaccard", "t_dbscan"}


def test_camera_aware_clustering_needs_the_cameras():
    x, _, _ = _blobs()
    with pytest.raises(ValueError, match="needs the cameras"):
        cluster(x, apply_overrides("smoke", {"camera.jaccard": "ca"}), "cpu", None)


def test_the_switch_is_the_recipe_and_set_wins():
    args = Namespace(camera_aware=True, set=["camera.proxies=false"], subset_ids=None)
    assert overrides_from_args(args) == {**CAMERA_AWARE_RECIPE, "camera.proxies": False}
    assert overrides_from_args(Namespace(camera_aware=False, set=None, subset_ids=None)) == {}
    assert camera_parts("smoke") == []
    assert camera_parts(apply_overrides("smoke", CAMERA_AWARE_RECIPE)) == [
        "centre", "ca-jaccard", "proxies x1", "balanced-sampler"]


def _recipe(**kw):
    # crosscam_epoch 0: the inter-camera association loss is on from the first step
    return tiny_hhcl_profile(**{"camera__centre": True, "camera__jaccard": "ca", "camera__proxies": True,
                                "camera__balanced": True, "camera__crosscam_epoch": 0, "cluster__eps": 0.5, **kw})


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("camera-run")
    with one_torch_thread():
        return out, train_hhcl(_recipe(hhcl__epochs=1), tiny_dataset(), out_dir=out, **QUIET)


def test_the_recipe_trains_and_scores_its_pseudo_labels_every_epoch(recipe_run):
    out, res = recipe_run
    entry = res.history[0]
    assert entry["loss"] is not None and np.isfinite(entry["loss"])
    q = entry["labels"]
    assert q["num_points"] == len(tiny_dataset().train) and q["num_clusters"] == entry["clusters"]
    assert q["num_outliers"] == entry["outliers"] and 0.0 <= q["ari"] <= 1.0
    assert q["cross_camera_pairs"] > 0 and q["cross_camera_join_rate"] is not None
    log = (out / "train.log").read_text()
    assert "ARI " in log and "cross-cam pairs joined" in log
    assert "centre, ca-jaccard, proxies x1, balanced-sampler" in log  # the run says what it trains
    assert "device cpu x 1 (CPU allocator: " in log  # and how the CPU's memory is kept


def test_the_recipe_is_recorded_in_the_checkpoint_and_refused_on_a_changed_resume(recipe_run, tmp_path):
    out, _ = recipe_run
    ck = read_train_checkpoint(out / "checkpoint.pt")
    assert ck["settings"]["camera"] == ["centre", "ca-jaccard", "proxies x1", "balanced-sampler"]
    assert ck["settings"]["overrides"]["camera.jaccard"] == "ca"
    with pytest.raises(CheckpointError, match="camera"):
        train_hhcl(_recipe(hhcl__epochs=2, camera__proxies=False), tiny_dataset(), out_dir=out, **QUIET)


def test_camera_proxies_follow_the_kept_images(tmp_path):
    """The CAP memory is indexed like the epoch's loader: the kept (clustered) images, in order."""
    prof = _recipe()
    m = HHCL(prof, tiny_dataset())
    m.prepare(torch.device("cpu"), "last", 0, print)
    x, _, _ = _blobs()
    feats = np.resize(x, (len(m.train_recs), x.shape[1]))
    labels = np.arange(len(feats)) % 5
    labels[::7] = -1
    keep = np.flatnonzero(labels >= 0)
    cap = m._proxies(feats, labels, keep, torch.device("cpu"))
    assert cap.image_label.tolist() == labels[keep].tolist()
    assert cap.image_cam.tolist() == m.camids[keep].tolist()
    assert m._proxies(feats, labels, keep, torch.device("cpu")) is not None
    assert HHCL(tiny_hhcl_profile(), tiny_dataset())._proxies(feats, labels, keep, "cpu") is None


def test_supervised_trains_on_the_true_identities(tmp_path):
    ds = tiny_dataset()
    m = Supervised(tiny_hhcl_profile(), ds)
    m.prepare(torch.device("cpu"), "last", 0, print)
    labels, _ = m.pseudo_labels(np.zeros((len(ds.train), 4), np.float32), 0, "cpu")
    assert labels.tolist() == relabel(ds.train)[0]
    res = train_supervised(tiny_hhcl_profile(hhcl__epochs=1), ds, out_dir=tmp_path, **QUIET)
    assert res.method == "supervised" and res.history[0]["clusters"] == 8 and res.history[0]["outliers"] == 0
    assert "labels" not in res.history[0]  # nothing to score: the labels are the truth
    assert read_train_checkpoint(tmp_path / "checkpoint.pt")["settings"]["method"] == "supervised"


def test_softmax_baseline_trains_a_classifier_on_the_true_identities(tmp_path):
    """The softmax reference: a classifier over the true identities on random batches of every
    training image (no extraction, no memory), recorded as its own method and read back by
    ``load_released`` with its classifier."""
    ds = tiny_dataset()
    n_ids = len(relabel(ds.train)[1])
    m = Softmax(tiny_hhcl_profile(), ds)
    m.prepare(torch.device("cpu"), "last", 0, print)
    assert m.num_classes == n_ids
    model = m.build_model(torch.device("cpu"))
    assert model.classifier.out_features == n_ids
    keep = np.arange(len(ds.train))
    order = list(m._sampler(m.true_labels, keep, 3))
    assert sorted(order) == keep.tolist() and order != keep.tolist()   # every image once, shuffled
    assert order == list(m._sampler(m.true_labels, keep, 3)) != list(m._sampler(m.true_labels, keep, 4))

    res = train_supervised(tiny_hhcl_profile(hhcl__epochs=2), ds, out_dir=tmp_path, method="softmax", **QUIET)
    assert res.method == "softmax" and [h["clusters"] for h in res.history] == [n_ids, n_ids]
    assert "t_extract" not in res.history[0] and "labels" not in res.history[0]   # nothing extracted or scored
    assert f"identities {n_ids:5d}" in (tmp_path / "train.log").read_text()
    assert np.isfinite(res.history[-1]["loss"]) and 0 < res.history[0]["loss"] < 1.1 * np.log(n_ids)
    ckpt = read_train_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["settings"]["method"] == "softmax" and "memory" not in ckpt["settings"]
    net, feature = load_released(tmp_path / "model_best.pt")
    assert net.classifier.out_features == n_ids and feature.layout == "kit"

    with pytest.raises(ValueError, match="no camera-aware parts"):
        Softmax(tiny_hhcl_profile(camera__centre=True), ds).prepare(torch.device("cpu"), "last", 0, print)


def test_softmax_gpu_plan_drops_the_extraction_and_the_memory():
    sup, soft = Supervised.gpu_plan(get_profile("market1501")), Softmax.gpu_plan(get_profile("market1501"))
    assert soft["method"] == "softmax" and soft["resident_gb"] == 0.0 and sup["resident_gb"] > 0
    assert soft["fwd_gflop_epoch"] < sup["fwd_gflop_epoch"] / 5 and soft["train_gflop"] == sup["train_gflop"]
    cost = gpu_cost(get_profile("market1501").replace(method="softmax"))
    assert cost["epoch_minutes"] < gpu_cost("market1501")["epoch_minutes"]
