"""Tests for reidkit.hhcl.label_quality.pseudo_label_quality: a hand-computed case, brute-force pair
enumeration on random labellings, the JSON form, edge cases and memory at large N."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from reidkit.hhcl.label_quality import pseudo_label_quality
from reidkit.hhcl.method import label_quality_line


def _singletons(a):
    """Negative entries replaced by fresh ids (the convention of the module, rebuilt here)."""
    a = np.asarray(a).copy()
    neg = a < 0
    a[neg] = (a.max() + 1 if (~neg).any() else 0) + np.arange(neg.sum())
    return a


def _ari_by_pairs(x, y):
    """Adjusted Rand index from the 2 x 2 pair confusion, every pair enumerated (Hubert-Arabie)."""
    a = b = c = d = 0
    for i, j in itertools.combinations(range(len(x)), 2):
        sx, sy = x[i] == x[j], y[i] == y[j]
        a += sx and sy
        b += sx and not sy
        c += sy and not sx
        d += not sx and not sy
    den = (a + b) * (b + d) + (a + c) * (c + d)
    return 1.0 if den == 0 else 2 * (a * d - b * c) / den


def _brute(lab, pid, cam):
    """Pair counts, purity and identity shares by loops over every pair, cluster and identity."""
    lab, pid, cam = map(np.asarray, (lab, pid, cam))
    pid = _singletons(pid)
    cross = cross_joined = within = within_joined = clustered = clustered_same = 0
    for i, j in itertools.combinations(range(len(lab)), 2):
        joined = lab[i] >= 0 and lab[i] == lab[j]
        clustered += joined
        if pid[i] == pid[j]:
            clustered_same += joined
            if cam[i] != cam[j]:
                cross += 1
                cross_joined += joined
            else:
                within += 1
                within_joined += joined
    c = lab >= 0
    majority = sum(Counter(pid[lab == k].tolist()).most_common(1)[0][1] for k in set(lab[c].tolist()))
    multi = across = every = leading = 0
    sizes = {k: Counter(pid[lab == k].tolist()) for k in set(lab[c].tolist())}
    for p in set(pid.tolist()):
        cams = set(cam[pid == p].tolist())
        if len(cams) < 2:
            continue
        multi += 1
        per_cluster = [set(cam[(pid == p) & (lab == k)].tolist()) for k in set(lab[(pid == p) & c].tolist())]
        across += any(len(s) > 1 for s in per_cluster)
        every += any(s == cams for s in per_cluster)
        leading += any(len(set(cam[(pid == p) & (lab == k)].tolist())) > 1
                       and sizes[k][p] == max(sizes[k].values()) for k in set(lab[(pid == p) & c].tolist()))
    return {"cross": cross, "cross_joined": cross_joined, "within": within, "within_joined": within_joined,
            "precision": clustered_same / clustered if clustered else None,
            "purity": majority / c.sum() if c.any() else None,
            "multi": multi, "across": across / multi if multi else None,
            "every": every / multi if multi else None, "leading": leading / multi if multi else None}


def test_hand_case():
    # person 0: cameras 0, 1, 1; person 1: cameras 0, 1; person 2: camera 0
    labels = [0, 0, -1, 1, 0, -1]
    pids = [0, 0, 0, 1, 1, 2]
    cams = [0, 1, 1, 0, 1, 0]
    q = pseudo_label_quality(labels, pids, cams)
    assert q["num_points"] == 6 and q["num_ids"] == 3
    assert q["num_clusters"] == 2 and q["num_outliers"] == 2 and q["largest_cluster"] == 3
    assert q["outlier_share"] == pytest.approx(1 / 3)
    # cross-camera same-person pairs: (0,1) joined, (0,2) not (2 is an outlier), (3,4) not
    assert q["cross_camera_pairs"] == 3 and q["cross_camera_joined"] == 1
    assert q["cross_camera_join_rate"] == pytest.approx(1 / 3)
    assert q["within_camera_join_rate"] == pytest.approx(0.0)  # (1,2): 2 is an outlier
    # cluster 0 = {0, 1, 4}: persons 0, 0, 1 -> 2 right; cluster 1 = {3} -> 1 right; 3 of 4
    assert q["purity"] == pytest.approx(3 / 4)
    assert q["pair_precision"] == pytest.approx(1 / 3)  # cluster 0 joins 3 pairs, one of a person
    # persons 0 and 1 are seen by two cameras; only person 0 has both in one cluster
    assert q["ids_multi_camera"] == 2
    assert q["ids_joined_across_share"] == pytest.approx(0.5)
    assert q["ids_all_cameras_joined_share"] == pytest.approx(0.5)
    assert q["ids_joined_across_leading_share"] == pytest.approx(0.5)  # cluster 0: person 0 has 2 of 3
    singles = [0, 0, 2, 1, 0, 3]  # outliers as clusters of their own
    assert q["ari"] == pytest.approx(adjusted_rand_score(pids, singles))
    assert q["ari"] == pytest.approx(_ari_by_pairs(pids, singles))
    assert q["nmi"] == pytest.approx(normalized_mutual_info_score(pids, singles))
    kept = [0, 1, 3, 4]
    assert q["ari_clustered"] == pytest.approx(_ari_by_pairs([0, 0, 1, 1], [0, 0, 1, 0]))
    assert q["nmi_clustered"] == pytest.approx(normalized_mutual_info_score(
        np.array(pids)[kept], np.array(labels)[kept]))


def test_all_cameras_differs_from_two_cameras_with_three_cameras():
    # one person in cameras 0, 1, 2: cameras 0 and 1 share a cluster, camera 2 is elsewhere
    q = pseudo_label_quality([5, 5, 7], [4, 4, 4], [0, 1, 2])
    assert q["ids_joined_across_share"] == pytest.approx(1.0)
    assert q["ids_all_cameras_joined_share"] == pytest.approx(0.0)
    q = pseudo_label_quality([5, 5, 5], [4, 4, 4], [0, 1, 2])
    assert q["ids_all_cameras_joined_share"] == pytest.approx(1.0)
    assert q["cross_camera_join_rate"] == pytest.approx(1.0) and q["purity"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_labels(seed):
    rng = np.random.default_rng(seed)
    n = 70
    pid = rng.integers(0, 12, n)
    cam = rng.integers(0, 3, n)
    lab = np.where(rng.random(n) < 0.25, -1, (pid + rng.integers(0, 2, n) * rng.integers(0, 8, n)) % 10)
    pid[:3] = -1  # images without an identity: each a person of its own
    q = pseudo_label_quality(lab, pid, cam)
    ref = _brute(lab, pid, cam)
    assert q["cross_camera_pairs"] == ref["cross"] and q["cross_camera_joined"] == ref["cross_joined"]
    assert q["cross_camera_join_rate"] == pytest.approx(ref["cross_joined"] / ref["cross"])
    assert q["within_camera_join_rate"] == pytest.approx(ref["within_joined"] / ref["within"])
    assert q["pair_precision"] == pytest.approx(ref["precision"])
    assert q["purity"] == pytest.approx(ref["purity"])
    assert q["ids_multi_camera"] == ref["multi"]
    assert q["ids_joined_across_share"] == pytest.approx(ref["across"])
    assert q["ids_all_cameras_joined_share"] == pytest.approx(ref["every"])
    assert q["ids_joined_across_leading_share"] == pytest.approx(ref["leading"])
    g, s = _singletons(pid), _singletons(lab)
    assert q["ari"] == pytest.approx(_ari_by_pairs(g, s))
    assert q["ari"] == pytest.approx(adjusted_rand_score(g, s))
    assert q["nmi"] == pytest.approx(normalized_mutual_info_score(g, s))
    c = lab >= 0
    assert q["ari_clustered"] == pytest.approx(_ari_by_pairs(g[c], lab[c]))
    assert q["nmi_clustered"] == pytest.approx(normalized_mutual_info_score(g[c], lab[c]))
    assert q["num_outliers"] == int((~c).sum()) and q["num_clusters"] == len(set(lab[c].tolist()))
    assert q["num_ids"] == len(set(g.tolist()))


def test_one_cluster_of_everyone_joins_every_camera_but_leads_for_few():
    # four people, each in cameras 0 and 1; person 3 has three images. One cluster holds everyone:
    # every person's cameras are "joined", but the cluster is person 3's
    pids = [0, 0, 1, 1, 2, 2, 3, 3, 3]
    cams = [0, 1, 0, 1, 0, 1, 0, 1, 1]
    q = pseudo_label_quality([0] * 9, pids, cams)
    assert q["ids_joined_across_share"] == pytest.approx(1.0)
    assert q["ids_joined_across_leading_share"] == pytest.approx(0.25)
    # clusters = identities: each person leads their own cluster
    q = pseudo_label_quality(pids, pids, cams)
    assert q["ids_joined_across_leading_share"] == pytest.approx(1.0)
    # a tie leads: persons 0 and 1, two images each, share a cluster; both count
    q = pseudo_label_quality([0, 0, 0, 0, -1, -1, -1, -1, -1], pids, cams)
    assert q["ids_joined_across_leading_share"] == pytest.approx(0.5)


def test_train_log_line_names_the_leading_share():
    q = pseudo_label_quality([0] * 9, [0, 0, 1, 1, 2, 2, 3, 3, 3], [0, 1, 0, 1, 0, 1, 0, 1, 1])
    assert label_quality_line(q).endswith("ids joined 100% (25% in a cluster they lead)")
    assert label_quality_line({"ari": 0.0}).endswith("ids joined n/a")


def test_values_are_plain_json():
    rng = np.random.default_rng(3)
    q = pseudo_label_quality(rng.integers(-1, 5, 40), rng.integers(0, 6, 40), rng.integers(0, 2, 40))
    assert all(type(v) in (int, float) for v in q.values())
    assert json.loads(json.dumps(q, allow_nan=False)) == q


def test_undefined_scores_are_none():
    # every point an outlier, one camera: nothing clustered, no cross-camera pair
    q = pseudo_label_quality([-1, -1, -1], [0, 0, 1], [2, 2, 2])
    assert q["num_clusters"] == 0 and q["outlier_share"] == pytest.approx(1.0)
    for key in ("purity", "ari_clustered", "nmi_clustered", "cross_camera_join_rate", "pair_precision",
                "ids_joined_across_share", "ids_all_cameras_joined_share", "ids_joined_across_leading_share"):
        assert q[key] is None, key
    assert q["within_camera_join_rate"] == pytest.approx(0.0)
    assert q["cross_camera_pairs"] == 0 and q["ids_multi_camera"] == 0
    json.dumps(q, allow_nan=False)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="sizes differ"):
        pseudo_label_quality([0, 1], [0, 1, 2], [0, 0, 0])
    with pytest.raises(ValueError, match="sizes differ"):
        pseudo_label_quality([0, 1, 1], [0, 1, 2], [0, 0])
    with pytest.raises(ValueError, match="no labels"):
        pseudo_label_quality([], [], [])


def test_large_n_runs_without_pair_matrices():
    # 150,000 points: an N x N boolean matrix would be 22 GB
    rng = np.random.default_rng(4)
    n = 150_000
    pid = rng.integers(0, 300, n)
    cam = rng.integers(0, 2, n)
    lab = np.where(rng.random(n) < 0.1, -1, pid)  # clusters = identities, minus outliers
    q = pseudo_label_quality(lab, pid, cam)
    assert q["purity"] == pytest.approx(1.0) and q["pair_precision"] == pytest.approx(1.0)
    assert q["ids_all_cameras_joined_share"] == pytest.approx(1.0)
    assert q["cross_camera_join_rate"] == pytest.approx(0.81, abs=0.01)  # both ends kept: 0.9 ** 2
