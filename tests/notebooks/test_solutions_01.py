"""Notebook 01: the worked solutions of its exercises on the embedded sample, and the counting
helpers it teaches from (reidkit.data.stats), on hand-made records whose answers are known."""

import numpy as np
import pytest

from reidkit.data import stats
from reidkit.data.records import Record
from reidkit.data.samplers import CameraAwarePKSampler

SOLUTION = "01_data_prep"  # the conftest fixture `sol` loads notebooks/solutions/<SOLUTION>.py


def rec(pid, cam, trk=0, name="x"):
    return Record(f"/{name}_{pid}_{cam}_{trk}.jpg", pid, cam, trk)


# -- the counting helpers ---------------------------------------------------------------------

def test_cameras_tracklets_and_summary_on_known_records():
    recs = [rec(1, 0, 0), rec(1, 0, 0), rec(1, 2, 1), rec(2, 1, 2), rec(2, 1, 3), rec(3, 0, 4)]
    assert stats.cameras_per_identity(recs) == {1: 2, 2: 1, 3: 1}
    assert stats.tracklets_per_identity(recs) == {1: 2, 2: 2, 3: 1}
    counts, pids, cams = stats.identity_camera_counts(recs)
    assert pids == [1, 2, 3] and cams == [0, 1, 2]
    assert counts.tolist() == [[2, 0, 1], [0, 2, 0], [1, 0, 0]]
    s = stats.split_summary(recs)
    assert s == {"images": 6, "identities": 3, "tracklets": 5, "cameras": 3, "images_per_identity": 2.0,
                 "single_camera_ids": 2, "multi_camera_ids": 1}


def test_match_counts_split_same_person_into_junk_and_matches():
    query = [rec(7, 0), rec(7, 1), rec(8, 0)]
    gallery = [rec(7, 0), rec(7, 0), rec(7, 2), rec(8, 0), rec(9, 1)]
    c = stats.match_counts(query, gallery)
    assert c["junk"].tolist() == [2, 0, 1]
    assert c["matches"].tolist() == [1, 3, 0]


def test_pk_batch_problems_accepts_the_sampler_and_catches_each_broken_rule():
    labels = [0] * 4 + [1] * 4 + [2] * 3 + [3]
    cams = [0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 2, 0]
    stream = list(CameraAwarePKSampler(labels, cams, num_instances=4, seed=3))
    assert stats.pk_batch_problems(stream, labels, cams, 4) == []
    # id 0, anchor 0 (camera 0): partners must come from its camera-1 images 2, 3
    assert stats.pk_batch_problems([0, 2, 3, 2], labels, cams, 4) == []
    assert any("not from the other cameras" in p for p in stats.pk_batch_problems([0, 1, 2, 3], labels, cams, 4))
    assert any("another label" in p for p in stats.pk_batch_problems([0, 2, 3, 4], labels, cams, 4))
    # id 1 has one camera: partners from its other images, distinct since 3 < 4 allows repeats
    assert stats.pk_batch_problems([4, 5, 5, 6], labels, cams, 4) == []
    assert any("other images" in p for p in stats.pk_batch_problems([4, 4, 5, 6], labels, cams, 4))
    assert any("second run" in p for p in stats.pk_batch_problems([11, 11], labels, cams, 4))
    assert any("expected 4" in p for p in stats.pk_batch_problems([0, 2], labels, cams, 4))
    assert any("outlier" in p for p in stats.pk_batch_problems([0], [-1, 0], [0, 1], 2))


def test_pk_runs_and_cross_camera_share():
    labels = [0, 0, 0, 1, 2, 2, 2]
    cams = [0, 1, 1, 0, 0, 0, 1]
    stream = [1, 0, 0, 3, 4, 6, 6]        # id 0 (K=3), singleton id 1, id 2 (K=3)
    assert stats.pk_runs(stream, labels, 3) == [[1, 0, 0], [3], [4, 6, 6]]
    assert stats.cross_camera_share(stream, labels, cams, 3) == 1.0
    assert stats.cross_camera_share([4, 5, 4], labels, cams, 3) == 0.0
    assert stats.split_summary([r._replace(tracklet=-1) for r in [rec(1, 0), rec(2, 1)]])["tracklets"] == 0


def test_pk_batch_problems_flags_repeats_when_the_pool_is_large_enough():
    labels, cams = [0] * 6, [0, 1, 1, 1, 1, 1]
    assert stats.pk_batch_problems([0, 1, 2, 3, 4], labels, cams, 5) == []
    assert any("repeat" in p for p in stats.pk_batch_problems([0, 1, 1, 2, 3], labels, cams, 5))


def test_nearest_neighbours_and_agreement():
    feats = np.array([[1, 0], [0.99, 0.1], [0, 1], [0.1, 0.99]], dtype=np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    assert stats.nearest_neighbours(feats, chunk=3).tolist() == [1, 0, 3, 2]
    recs = [rec(1, 0, 0), rec(1, 1, 1), rec(2, 0, 2), rec(2, 0, 2)]
    a = stats.neighbour_agreement(feats, recs)
    assert a == {"same_tracklet": 0.5, "same_identity": 1.0, "same_camera": 0.5,
                 "same_identity_other_camera": 0.5}
    no_trk = [r._replace(tracklet=-1) for r in recs]
    assert np.isnan(stats.neighbour_agreement(feats, no_trk)["same_tracklet"])
    with pytest.raises(ValueError):
        stats.neighbour_agreement(feats, recs[:3])


def test_the_sample_is_as_the_notebook_says(smoke_ctx):
    """The facts notebook 01 teaches from: 12 of 16 training ids in one camera, 768 images of 32
    people, disjoint train and test ids, and pixel neighbours that stay inside a tracklet."""
    ds = smoke_ctx.dataset()
    s = stats.split_summary(ds.train)
    assert (s["identities"], s["single_camera_ids"], s["tracklets"]) == (16, 12, 32)
    allr = ds.train + ds.query + ds.gallery
    assert len(allr) == 768 and len({r.pid for r in allr}) == 32
    assert not {r.pid for r in ds.train} & {r.pid for r in ds.query + ds.gallery}
    agree = stats.neighbour_agreement(stats.pixel_vectors(ds.train), ds.train)
    assert agree["same_tracklet"] > 0.7 and agree["same_identity_other_camera"] < 0.05


# -- the exercises ----------------------------------------------------------------------------

def test_exercise_1_file_in_query_of_a_test_person(sol, smoke_ctx, capsys):
    r = sol.exercise_1(smoke_ctx)
    assert (r["pid"], r["camera"], r["frame"]) == (4, 2, 8)
    assert r["splits"] == ["query"] and r["identity_in_train"] is False
    assert "not in the training split" in capsys.readouterr().out
    r = sol.exercise_1(smoke_ctx, "0003C4T0003F001.jpg")
    assert r["splits"] == ["train"] and r["identity_in_train"] is True
    assert "could have learnt" in r["explanation"]


def test_exercise_2_four_training_ids_see_two_cameras(sol, smoke_ctx, capsys):
    r = sol.exercise_2(smoke_ctx)
    assert r["multi_camera_ids"] == 4 and r["single_camera_ids"] == 12
    assert r["ids"] == [13, 21, 23, 35]
    out = capsys.readouterr().out
    assert "4 of 16" in out and "03" in out and "one-camera" in out


def test_exercise_3_camera_aware_partners(sol, smoke_ctx, capsys):
    r = sol.exercise_3(smoke_ctx)
    # camera-aware: all partners of the 4 multi-camera ids (4 of 16) cross cameras, and no more
    assert r["multi_camera_ids"] == 4 and r["identities"] == 16
    assert r["cross_camera_aware"] == pytest.approx(4 / 16)
    assert 0 < r["cross_camera_plain"] < r["cross_camera_aware"]
    out = capsys.readouterr().out
    assert f"{r['cross_camera_aware']:.0%}" in out and "gap is small" in out


def test_exercise_4_pixels_gain_from_junk(sol, smoke_ctx, capsys):
    r = sol.exercise_4(smoke_ctx)
    removed, kept = r["junk_removed"], r["junk_kept"]
    assert (removed["valid"], kept["valid"]) == (184, 256)   # keeping junk brings the skipped queries back
    assert 0 < removed["rank1"] < kept["rank1"] <= 1
    assert removed["mAP"] < kept["mAP"]
    assert f"{removed['rank1']:.0%}" in capsys.readouterr().out


def test_exercise_5_queries_without_a_match(sol, smoke_ctx, capsys):
    r = sol.exercise_5(smoke_ctx)
    assert r["without_match"] == 72 and r["num_valid_q"] == r["queries"] - 72 == 184
    assert len(r["identities"]) == 9
    for pid in r["identities"]:
        assert r["query_cameras"][pid] == r["gallery_cameras"][pid]
    assert "agrees" in capsys.readouterr().out


def test_solutions_load_without_work(capsys):
    """``%run solutions/01_data_prep.py`` defines the exercises and runs nothing."""
    import runpy

    from conftest import SOLUTIONS

    names = runpy.run_path(str(SOLUTIONS / "01_data_prep.py"))
    assert all(callable(names[f"exercise_{k}"]) for k in range(1, 6))
    assert capsys.readouterr().out == ""
